"""The one request type that flows through the stages. Made and validated at the ingress."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from serve_app.config import QualityTier, StepPolicy


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    negative_prompt: str
    width: int
    height: int
    n: int
    seed: int
    guidance_scale: float
    num_inference_steps: int | None  # None: the step controller decides
    cache_namespace: str = "default"
    optimize_prompt: bool = True
    step_policy: StepPolicy | None = None  # None: deadline_ms given -> slo, else the config's
    deadline_ms: float | None = None  # latency target for the slo policy
    quality: QualityTier | None = None  # the step range; None: the config's
    scheduler: str | None = None  # a solver of deployments/denoiser/solvers.py; None: the model's own
    cache_interval: int | None = None  # feature caching across steps (1: off); None: the step controller decides
    cache_branch_id: int | None = None  # which deep features cached steps reuse; None: 0
    # Edits (/v1/images/edits): decoded and checked at the ingress (serve_app/http/image_request.py).
    image: Image.Image | None = None  # RGB: the target; its latents start the denoising at `strength`
    mask: Image.Image | None = None  # L, white = repaint (same size as `image`)
    reference_image: Image.Image | None = None  # RGB: the source face for the image-prompt adapter
    strength: float = 1.0
    reference_scale: float = 1.0  # how strongly the reference face conditions the image (IP-Adapter scale)
    keep_unmasked: bool = True  # paste the target's pixels back outside the mask after decoding

    @property
    def is_edit(self) -> bool:
        return self.image is not None

    @property
    def seeds(self) -> list[int]:
        """Image i of the request uses seed + i, so n>1 gives distinct, reproducible images."""
        return [self.seed + i for i in range(self.n)]


@dataclass(frozen=True)
class EditDefaults:
    """What an edit runs at where the request does not say: the face-fusion recipe."""

    strength: float  # the share of the steps run on the target's noised latents
    reference_scale: float  # the reference face's weight (IP-Adapter scale), when one is sent


def edit_defaults(masked: bool) -> EditDefaults:
    """With a mask the masked area is redrawn whole (the unmasked one is kept by the blend and
    the overlay) and the reference weighs 1.5 (measured: the most of the face carried, the
    target's background kept anyway); without one most of the target is redrawn, keeping its
    layout and colours, and the reference weighs 1.0 (more would repaint the target's
    background too). benchmarks/face_fusion.py measures both knobs."""
    if masked:
        return EditDefaults(strength=1.0, reference_scale=1.5)
    return EditDefaults(strength=0.8, reference_scale=1.0)
