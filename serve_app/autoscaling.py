"""Import path kept for deployed configs: the policy lives in deployments.denoiser.autoscaling."""

from deployments.denoiser.autoscaling import QueuedWorkPolicy

__all__ = ["QueuedWorkPolicy"]
