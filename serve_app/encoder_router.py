"""Import path kept for deployed configs: the router lives in deployments.text_encoder.router."""

from deployments.text_encoder.router import PrefixAffinityRouter

__all__ = ["PrefixAffinityRouter"]
