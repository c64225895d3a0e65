"""A tiny latent -> RGB decoder for live previews (TAESD's idea, smaller): a streamed request's
partial images are predicted clean latents that nobody keeps, so they need a picture fast, not
the VAE's exact one. Measured on the portrait model (benchmarks/streaming.py): the VAE's decode
of a 128x128 image costs about three UNet steps, which would make three previews cost more than
a third of a 20-step request.

Trained by our code against the model's own VAE (`train_previewer`): its decodes of encoded
renders are the targets. Shipped in the model folder as `previewer/` (config.json + safetensors).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

PREVIEWER_FOLDER = "previewer"
WEIGHTS = "previewer.safetensors"


@dataclass(frozen=True)
class PreviewerConfig:
    latent_channels: int = 4
    upsamplings: int = 3  # the VAE's 8x
    widths: tuple[int, ...] = (64, 32, 16, 8)  # the head's, then after each upsampling


class LatentPreviewer(nn.Module):
    """Scaled latents [N, C, h, w] (as the denoiser makes them) -> RGB in [-1, 1] [N, 3, 8h, 8w]."""

    def __init__(self, config: PreviewerConfig | None = None):
        super().__init__()
        self.config = config = config or PreviewerConfig()
        if len(config.widths) != config.upsamplings + 1:
            raise ValueError("a previewer has one width for its head and one per upsampling")
        widths = config.widths
        layers: list[nn.Module] = [
            nn.Conv2d(config.latent_channels, widths[0], 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(widths[0], widths[0], 3, padding=1),
            nn.SiLU(),
        ]
        for before, after in zip(widths, widths[1:]):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(before, after, 3, padding=1), nn.SiLU()]
        layers.append(nn.Conv2d(widths[-1], 3, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.layers(latents))

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        save_file({k: v.detach().half().contiguous() for k, v in self.state_dict().items()}, folder / WEIGHTS)

    @classmethod
    def load(cls, folder: Path) -> LatentPreviewer:
        from safetensors.torch import load_file

        values = json.loads((folder / "config.json").read_text())
        previewer = cls(PreviewerConfig(**{**values, "widths": tuple(values["widths"])}))
        previewer.load_state_dict({k: v.float() for k, v in load_file(folder / WEIGHTS).items()})
        return previewer.eval()


@torch.inference_mode()
def preview_pngs(previewer: LatentPreviewer, latents: torch.Tensor) -> list[bytes]:
    """Predicted clean latents -> one PNG per image (fast compression: a preview is seen once)."""
    from deployments.common.images import encode_png, to_uint8

    return [encode_png(image, compress_level=1) for image in to_uint8(previewer(latents.float()))]


def has_previewer(model_path: Path) -> bool:
    return (model_path / PREVIEWER_FOLDER / WEIGHTS).is_file()


def model_previewer(model_path: Path) -> LatentPreviewer | None:
    """The model folder's trained previewer, None when it has none."""
    return LatentPreviewer.load(model_path / PREVIEWER_FOLDER) if has_previewer(model_path) else None


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of two images in [-1, 1] (peak-to-peak 2)."""
    mse = float(((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4 / mse)
