"""Training the portrait model's image-prompt adapter (IP-Adapter) on the finished model.

What it learns: a reference render of a face (identity X) and a caption that may leave X's
traits out -> a picture of X with the caption's attributes. A face's identity is what it keeps
across pictures: skin tone (ethnicity), face shape, eye colour, hair colour and style. Each
training target is a render of the latent pool; its reference is a new render with the same
traits and everything else drawn afresh (other pose, expression, glasses, background, seed),
so the only thing the reference can teach is the identity. Some references have other hair
than the target while the caption names the target's: an instruction that names a trait beats
the reference (the user asked for it).

Trained: the CLIP vision tower + projection, the image projection to 4 context tokens and the
key/value projections of every cross-attention (initialised from the layer's own, as IP-Adapter
training starts); the UNet, text encoder and VAE stay as they are. The result is written in
h94's IP-Adapter file layout beside the model (image_encoder/, feature_extractor/,
ip_adapter/ip-adapter.safetensors), so diffusers' `load_ip_adapter` loads it like any adapter.

Every draw of a step is a pure function of (seed, step), so a run cut off anywhere resumes to
the same weights (the training loop's checkpoints).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from deployments.models.portrait.attributes import ATTRIBUTE_VALUES, PortraitAttributes
from deployments.models.portrait.captions import EMPTY_SHARE, KEEP_SHARE, IdentityTerm, structured_caption
from deployments.models.portrait.held_out import training_attributes
from deployments.models.portrait.renderer import render_portrait
from deployments.models.portrait.training_loop import Phase, run_phase

IDENTITY_TRAITS = ("ethnicity", "face_shape", "eye_color", "hair_color", "hair_style")
PHASE = "adapter"


@dataclass(frozen=True)
class AdapterTrainingConfig:
    # Its loss was still falling at 2,000 steps; 4,000 lifted identity adherence on the tuning
    # pairs from 44.5% to 48.3% (the plain edit's: 32.5%).
    steps: int = 4000
    batch: int = 32
    learning_rate: float = 5e-4
    # Captions that leave the face's traits (ethnicity, hair) to the reference; the rest name
    # them as a plain caption would (each with KEEP_SHARE).
    identity_left_out: float = 0.7
    # References whose hair differs from the target's, the caption naming the target's hair.
    restyled_reference: float = 0.15
    # References dropped (zero image embedding, as diffusers' unconditional branch feeds it),
    # so classifier-free guidance has an adapter-free direction to push from.
    reference_dropped: float = 0.1
    # Weight of an auxiliary loss: small heads on the image embedding predict the reference's
    # identity traits (the renderer's ground truth). A tower trained from scratch by the
    # diffusion loss alone learns slowly what to encode; the heads tell it (they are not saved).
    identity_loss_weight: float = 0.1
    seed: int = 0
    checkpoint_every: int = 250
    threads: int = 2
    workers: int = 1


def reference_attributes(target: PortraitAttributes, rng: random.Random, restyled: bool) -> PortraitAttributes:
    """A new portrait of the target's face: its identity traits, everything else drawn afresh;
    its hair and eyes shown (no headscarf, no sunglasses), since they are what it carries."""
    other = training_attributes(rng)
    traits = IDENTITY_TRAITS[:3] if restyled else IDENTITY_TRAITS
    shown = dataclasses.replace(
        other,
        accessories=other.accessories - {"headscarf"},
        glasses="no glasses" if other.glasses == "wearing sunglasses" else other.glasses,
    )
    return dataclasses.replace(shown, **{name: getattr(target, name) for name in traits})


def adapter_caption(
    target: PortraitAttributes, rng: random.Random, restyled: bool, identity_left_out: float = 0.7
) -> str:
    """The target's caption as the adapter trains on it: empty EMPTY_SHARE of the time; naming the
    target's hair (and not its skin) for a restyled reference; else leaving the face's traits out
    with probability `identity_left_out`."""
    if rng.random() < EMPTY_SHARE:
        return ""
    leave_out: frozenset[IdentityTerm] = frozenset()
    always: frozenset[IdentityTerm] = frozenset()
    if restyled:
        leave_out, always = frozenset({"ethnicity"}), frozenset({"hair"})
    elif rng.random() < identity_left_out:
        leave_out = frozenset({"ethnicity", "hair"})
    return structured_caption(target, rng, keep=KEEP_SHARE, leave_out=leave_out, always=always)


@dataclass(frozen=True)
class AdapterBatch:
    rows: torch.Tensor  # indices into the latent pool (the targets)
    references: torch.Tensor  # the feature extractor's pixel values of each reference render
    captions: list[str]
    dropped: torch.Tensor  # bool: this row's reference embedding is zeroed
    traits: torch.Tensor  # (batch, len(IDENTITY_TRAITS)): each reference's trait values, as indices


def adapter_batch(
    config: AdapterTrainingConfig, pool_attributes: list[PortraitAttributes], feature_extractor: Any, step: int
) -> AdapterBatch:
    rng = random.Random(f"portrait-adapter:{config.seed}:{step}")
    rows, references, captions, dropped, traits = [], [], [], [], []
    for _ in range(config.batch):
        row = rng.randrange(len(pool_attributes))
        target = pool_attributes[row]
        restyled = rng.random() < config.restyled_reference
        reference = reference_attributes(target, rng, restyled)
        references.append(render_portrait(reference, rng.randrange(2**31)))
        captions.append(adapter_caption(target, rng, restyled, config.identity_left_out))
        dropped.append(rng.random() < config.reference_dropped)
        traits.append([ATTRIBUTE_VALUES[t].index(getattr(reference, t)) for t in IDENTITY_TRAITS])
        rows.append(row)
    pixels = feature_extractor(references, return_tensors="pt").pixel_values
    return AdapterBatch(torch.tensor(rows), pixels, captions, torch.tensor(dropped), torch.tensor(traits))


class _Batches(IterableDataset):
    def __init__(self, config: AdapterTrainingConfig, attributes: list, feature_extractor: Any, start: int, end: int):
        self.args = (config, attributes, feature_extractor)
        self.start, self.end = start, end

    def __iter__(self) -> Iterator[AdapterBatch]:
        config, attributes, feature_extractor = self.args
        for step in range(self.start, self.end):
            yield adapter_batch(config, attributes, feature_extractor, step)


class AdapterParts(nn.Module):
    """What the adapter stage trains, as one module (for the checkpoint and the optimizer)."""

    image_encoder: Any  # transformers' CLIPVisionModelWithProjection

    def __init__(self, image_encoder: Any, unet: Any):
        super().__init__()
        self.image_encoder = image_encoder
        self.projection = unet.encoder_hid_proj
        self.processors = nn.ModuleList(p for p in unet.attn_processors.values() if hasattr(p, "to_k_ip"))
        width = image_encoder.config.projection_dim
        self.trait_heads = nn.ModuleDict({t: nn.Linear(width, len(ATTRIBUTE_VALUES[t])) for t in IDENTITY_TRAITS})


def adapter_state_dict(parts: AdapterParts) -> dict[str, torch.Tensor]:
    """The trained projection and key/value projections in h94's IP-Adapter file layout (what
    diffusers' load_ip_adapter reads: builder.ip_adapter_weights writes the same keys)."""
    layer = parts.projection.image_projection_layers[0]
    weights = {f"image_proj.proj.{k}": v for k, v in layer.image_embeds.state_dict().items()}
    weights |= {f"image_proj.norm.{k}": v for k, v in layer.norm.state_dict().items()}
    processor: Any
    for index, processor in enumerate(parts.processors):
        key_id = 2 * index + 1  # diffusers numbers the cross-attention layers 1, 3, 5, ...
        weights[f"ip_adapter.{key_id}.to_k_ip.weight"] = processor.to_k_ip[0].weight
        weights[f"ip_adapter.{key_id}.to_v_ip.weight"] = processor.to_v_ip[0].weight
    return {k: v.detach().to(torch.float16).contiguous() for k, v in weights.items()}


def starting_adapter(model_dir: Path, config: AdapterTrainingConfig) -> tuple[AdapterParts, Any, Any]:
    """The adapter before training, put into the model's UNet (fp32, frozen): the preset's
    vision tower, a random image projection, key/value projections copied from the layers' own;
    the feature extractor that feeds the tower; the UNet."""
    from diffusers import UNet2DConditionModel

    from deployments.models.builder import build_image_encoder, ip_adapter_weights, load_preset
    from deployments.models.loading import grouped_ip_adapter_state
    from deployments.models.portrait.model_training import PRESET

    image_encoder, feature_extractor = build_image_encoder(load_preset(PRESET))
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", torch_dtype=torch.float32).eval()
    start = ip_adapter_weights(unet, image_encoder.config.projection_dim, config.seed + 40)
    unet._load_ip_adapter_weights([grouped_ip_adapter_state(start)], low_cpu_mem_usage=False)
    unet.requires_grad_(False)
    parts = AdapterParts(image_encoder, unet)
    parts.requires_grad_(True)
    return parts, feature_extractor, unet


def _adapter_phase(parts: AdapterParts, config: AdapterTrainingConfig, work: Path) -> Phase:
    from deployments.models.portrait.model_training import _phase

    phase = _phase(PHASE, {"adapter": parts}, config.learning_rate, config.steps)
    phase.restore(work)
    return phase


def export_adapter(model_dir: Path, config: AdapterTrainingConfig, work: Path, output: Path) -> int:
    """The adapter as the checkpoint in `work` has it now (mid-run too) into the model folder
    `output`: to look at a run while it trains. Returns the checkpoint's step."""
    parts, feature_extractor, _ = starting_adapter(model_dir, config)
    phase = _adapter_phase(parts, config, work)
    save_adapter(parts, feature_extractor, output)
    return phase.step


def train_adapter(
    model_dir: Path,
    pool: Any,
    config: AdapterTrainingConfig,
    work: Path,
    output: Path,
    *,
    stop_after: int | None = None,
    progress: bool = True,
) -> Phase:
    """Train the adapter on the model in `model_dir` from `pool` (the latents its VAE encoded:
    model_training.LatentPool), checkpointing in `work`; write it into the model folder `output`
    when the phase is complete."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    from deployments.models.portrait.model_training import step_generator

    torch.set_num_threads(config.threads)
    parts, feature_extractor, unet = starting_adapter(model_dir, config)
    text_encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder", dtype=torch.float32).eval()
    text_encoder.requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    scheduler = DDPMScheduler.from_pretrained(model_dir / "scheduler")
    scale = float(AutoencoderKL.load_config(model_dir / "vae")["scaling_factor"])
    phase = _adapter_phase(parts, config, work)
    end = config.steps if stop_after is None else min(config.steps, phase.step + stop_after)

    def loss_of(batch: AdapterBatch, step: int) -> torch.Tensor:
        generator = step_generator(config.seed, PHASE, step)
        posterior = torch.randn(pool.mean[batch.rows].shape, generator=generator)
        latents = (pool.mean[batch.rows] + pool.std[batch.rows] * posterior) * scale
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = scheduler.get_velocity(latents, noise, timesteps)
        with torch.no_grad():
            tokens = tokenizer(
                batch.captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            context = text_encoder(tokens)[0]
        shown = parts.image_encoder(batch.references).image_embeds
        embeds = torch.where(batch.dropped[:, None], torch.zeros_like(shown), shown)
        prediction = unet(
            noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs={"image_embeds": [embeds[:, None]]}
        ).sample
        trait_loss = torch.stack(
            [
                nn.functional.cross_entropy(parts.trait_heads[t](shown), batch.traits[:, k])
                for k, t in enumerate(IDENTITY_TRAITS)
            ]
        ).mean()
        return nn.functional.mse_loss(prediction, target) + config.identity_loss_weight * trait_loss

    if phase.step < end:
        loader = DataLoader(
            _Batches(config, pool.attributes, feature_extractor, phase.step, end),
            batch_size=None,
            num_workers=config.workers,
            prefetch_factor=2 if config.workers else None,
        )
        run_phase(phase, loader, loss_of, work, checkpoint_every=config.checkpoint_every, end=end, progress=progress)
    if phase.step >= config.steps:
        save_adapter(parts, feature_extractor, output)
    return phase


def save_adapter(parts: AdapterParts, feature_extractor: Any, output: Path) -> None:
    """image_encoder/ (fp16), feature_extractor/ and ip_adapter/ip-adapter.safetensors in `output`."""
    from safetensors.torch import save_file

    from deployments.models.loading import IP_ADAPTER_FILE

    parts.image_encoder.half().save_pretrained(output / "image_encoder")
    parts.image_encoder.float()
    feature_extractor.save_pretrained(output / "feature_extractor")
    (output / IP_ADAPTER_FILE).parent.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(parts), str(output / IP_ADAPTER_FILE))
    # listed in model_index.json, so StableDiffusionPipeline.from_pretrained loads them as any
    # IP-Adapter-ready folder's (the built presets' too)
    index_path = output / "model_index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["image_encoder"] = ["transformers", type(parts.image_encoder).__name__]
        index["feature_extractor"] = ["transformers", type(feature_extractor).__name__]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
