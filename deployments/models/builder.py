"""Builds Stable-Diffusion-1.x-shaped model folders with random weights from a fixed seed.

A preset (`configs/models/<name>.yaml`) names the component configs. The result is an
ordinary diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
`tokenizer/`, `scheduler/`), loaded later by `from_pretrained` exactly like a real
checkpoint. Same preset + same seed -> byte-identical weight files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from deployments.models.clip_vocab import write_tokenizer_files

# configs/models/, shipped as package data (pyproject.toml: package-dir fusionserve_configs)
PRESET_DIR = Path(str(resources.files("fusionserve_configs") / "models"))
# Bump when the builder's code changes what it writes, so cached folders are rebuilt.
BUILDER_VERSION = 2  # 2: image-prompt adapter (image_encoder/, feature_extractor/, ip_adapter/)
CLIP_MAX_LENGTH = 77


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ValueError(f"unknown model preset {name!r}; known presets: {known}")
    return path


def load_preset(name: str) -> dict:
    return yaml.safe_load(preset_path(name).read_text())


def preset_fingerprint(name: str) -> str:
    """Short hash of the preset file and builder version: names the cached folder."""
    digest = hashlib.sha256(preset_path(name).read_bytes())
    digest.update(str(BUILDER_VERSION).encode())
    return digest.hexdigest()[:10]


def _calibrate_unet(unet, text_hidden_size: int, seed: int) -> None:
    """Rescale the output conv so a random UNet predicts noise with unit variance.

    A randomly initialised UNet's prediction can have a std far from 1; over 20 guided
    steps that drives latents to saturation and every image decodes to a flat colour,
    which would make image-equality tests meaningless.
    """
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    sample = torch.randn(2, unet.config.in_channels, 32, 32, generator=generator)
    context = torch.randn(2, CLIP_MAX_LENGTH, text_hidden_size, generator=generator)
    with torch.no_grad():
        std = unet(sample, torch.tensor([500, 500]), encoder_hidden_states=context).sample.std()
        unet.conv_out.weight.mul_(1.0 / std)
        unet.conv_out.bias.mul_(1.0 / std)


def ip_adapter_weights(unet, projection_dim: int, seed: int) -> dict:
    """IP-Adapter weights in h94's file layout for `unet`: an image projection to 4 context
    tokens, and per cross-attention layer `to_k_ip`/`to_v_ip` initialised from the layer's
    own `to_k`/`to_v` (as IP-Adapter training starts), numbered 1, 3, 5, ... in diffusers'
    `attn_processors` order (loaders/unet.py: _convert_ip_adapter_attn_to_diffusers)."""
    import torch

    torch.manual_seed(seed)
    cross = unet.config.cross_attention_dim
    projection = torch.nn.Linear(projection_dim, cross * 4)
    norm = torch.nn.LayerNorm(cross)
    weights = {f"image_proj.proj.{k}": v for k, v in projection.state_dict().items()}
    weights.update({f"image_proj.norm.{k}": v for k, v in norm.state_dict().items()})
    modules = dict(unet.named_modules())
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attention = modules[name.removesuffix(".processor")]
        weights[f"ip_adapter.{key_id}.to_k_ip.weight"] = attention.to_k.weight.detach().clone()
        weights[f"ip_adapter.{key_id}.to_v_ip.weight"] = attention.to_v.weight.detach().clone()
        key_id += 2
    return {key: value.contiguous() for key, value in weights.items()}


def build_image_encoder(preset: dict) -> tuple[Any, Any]:
    """The preset's image-prompt encoder (CLIP vision tower + projection) with its random
    starting weights, and the feature extractor that feeds it."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(int(preset.get("seed", 0)) + 30)
    vision_config = CLIPVisionConfig(**preset["image_encoder"])
    image_encoder = CLIPVisionModelWithProjection(vision_config).eval()
    side = vision_config.image_size  # an int; transformers types it int | list | tuple | None
    feature_extractor = CLIPImageProcessor(
        size={"shortest_edge": side},  # type: ignore[dict-item]
        crop_size={"height": side, "width": side},  # type: ignore[dict-item]
    )
    return image_encoder, feature_extractor


def build_model(preset_name: str, destination: Path) -> Path:
    """Build the preset into `destination` (atomically: a half-written folder is never seen)."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    preset = load_preset(preset_name)
    seed = int(preset.get("seed", 0))
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
    try:
        vocab_dir = staging / "_vocab"
        write_tokenizer_files(vocab_dir)
        tokenizer = CLIPTokenizer.from_pretrained(str(vocab_dir), model_max_length=CLIP_MAX_LENGTH)

        torch.manual_seed(seed)
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **preset["text_encoder"],
        )
        text_encoder = CLIPTextModel(text_config).eval()
        torch.manual_seed(seed + 10)
        # diffusers' models and pipelines lose their torch.nn.Module / DiffusionPipeline bases to
        # mypy (their mixins' decorators are untyped): eval() and save_pretrained() are there.
        unet = UNet2DConditionModel(**preset["unet"]).eval()  # type: ignore[attr-defined]
        torch.manual_seed(seed + 20)
        vae = AutoencoderKL(**preset["vae"]).eval()  # type: ignore[attr-defined]
        if preset.get("calibrate_unet"):
            _calibrate_unet(unet, text_config.hidden_size, seed)

        scheduler_config = dict(preset["scheduler"])
        scheduler_cls = getattr(diffusers, scheduler_config.pop("class"))
        scheduler = scheduler_cls(**scheduler_config)

        # The optional image-prompt adapter: built last, from its own seed, so presets
        # without it (and the parts above) are unchanged by it.
        image_encoder = feature_extractor = None
        if "image_encoder" in preset:
            image_encoder, feature_extractor = build_image_encoder(preset)

        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=False,
        )
        model_dir = staging / "model"
        pipe.save_pretrained(model_dir, safe_serialization=True)  # type: ignore[attr-defined]
        if image_encoder is not None:
            from safetensors.torch import save_file

            from deployments.models.loading import IP_ADAPTER_FILE

            (model_dir / IP_ADAPTER_FILE).parent.mkdir(parents=True)
            save_file(
                ip_adapter_weights(unet, image_encoder.config.projection_dim, seed + 40),
                str(model_dir / IP_ADAPTER_FILE),
            )
        (model_dir / "fusionserve_preset.yaml").write_text(preset_path(preset_name).read_text())
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(model_dir, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def weight_hashes(model_dir: Path) -> dict[str, str]:
    """sha256 of every weight file in a model folder (reproducibility checks)."""
    model_dir = Path(model_dir)
    return {
        str(path.relative_to(model_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(model_dir.rglob("*.safetensors"))
    }
