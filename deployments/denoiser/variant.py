"""Which UNet runs a job: the batch key of the step loop (a batch holds one variant)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

ADAPTER_SCALE_RANGE = (0.0, 2.0)  # the image-prompt adapter's weight (IP-Adapter scale), inclusive


class VariantKind(StrEnum):
    PRODUCTION = "production"  # the served UNet (settings.backends)
    BASELINE = "baseline"  # the quality guard's full-precision UNet (settings.baseline_backends)
    IP_ADAPTER = "ip_adapter"  # the UNet with the image-prompt adapter (reference-image edits)


@dataclass(frozen=True)
class UNetVariant:
    """A UNet and, for the adapter, its scale: jobs share a forward only when these are equal
    (the adapter's scale is set once per forward, for every image in it)."""

    kind: VariantKind
    adapter_scale: float | None = None  # set exactly for IP_ADAPTER

    def __post_init__(self) -> None:
        if (self.kind is VariantKind.IP_ADAPTER) != (self.adapter_scale is not None):
            raise ValueError(f"{self.kind} UNet: an adapter scale goes with the ip_adapter variant, and only with it")
        low, high = ADAPTER_SCALE_RANGE
        if self.adapter_scale is not None and not low <= self.adapter_scale <= high:
            raise ValueError(f"image_prompt_scale must be in [{low:g}, {high:g}], got {self.adapter_scale}")

    @classmethod
    def production(cls) -> UNetVariant:
        return cls(VariantKind.PRODUCTION)

    @classmethod
    def baseline(cls) -> UNetVariant:
        return cls(VariantKind.BASELINE)

    @classmethod
    def ip_adapter(cls, scale: float = 1.0) -> UNetVariant:
        return cls(VariantKind.IP_ADAPTER, float(scale))

    @property
    def takes_image_embeds(self) -> bool:
        """Jobs of this variant carry a reference image's embedding (and only they do)."""
        return self.kind is VariantKind.IP_ADAPTER

    def __str__(self) -> str:
        return self.kind if self.adapter_scale is None else f"{self.kind}@{self.adapter_scale:g}"
