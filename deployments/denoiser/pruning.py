"""Structured channel pruning of the UNet, saved as a model variant folder.

Only channels that nothing outside their block sees are removed, so the UNet's skip
connections and block interfaces keep their widths:
- in every ResNet block, the inner channels (conv1's outputs = time projection's
  outputs = norm2's channels = conv2's inputs), kept in multiples of norm2's group size;
- in every transformer feed-forward (GEGLU), the inner width (the hidden and gate halves
  of the first projection alike, the inputs of the second).
The channels kept are those with the largest L1 weight norm.

A variant folder is the model folder with `unet/` replaced: `unet/config.json` (the
original config), `unet/pruning.json` (kept widths per module) and the pruned weights.
`loading.load_unet` sees `pruning.json`, builds the UNet from the config, narrows the same
modules and loads the weights, so every backend (ONNX export included) loads it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

PRUNING_FILE = "pruning.json"

Layer = TypeVar("Layer", nn.Linear, nn.Conv2d)


def _sliced(
    layer: nn.Linear | nn.Conv2d, rows: torch.Tensor | None, cols: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's weight (and bias) keeping only output channels `rows` and input channels `cols`."""
    weight = layer.weight.data
    weight = weight[rows] if rows is not None else weight
    weight = weight[:, cols] if cols is not None else weight
    bias = None if layer.bias is None else layer.bias.data if rows is None else layer.bias.data[rows]
    return weight, bias


def _copy_into(new: Layer, weight: torch.Tensor, bias: torch.Tensor | None) -> Layer:
    new.weight.data.copy_(weight)
    if bias is not None and new.bias is not None:  # `new` was built with a bias exactly when there is one
        new.bias.data.copy_(bias)
    return new


def _pair(size: tuple[int, ...]) -> tuple[int, int]:
    """Conv2d keeps its sizes as tuples of any length; its constructor takes pairs."""
    return size[0], size[1]


def _narrow_linear(layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    weight, bias = _sliced(layer, rows, cols)
    return _copy_into(
        nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype), weight, bias
    )


def _narrow_conv(conv: nn.Conv2d, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None) -> nn.Conv2d:
    weight, bias = _sliced(conv, out_idx, in_idx)
    return _copy_into(
        nn.Conv2d(
            weight.shape[1],
            weight.shape[0],
            _pair(conv.kernel_size),
            _pair(conv.stride),
            conv.padding if isinstance(conv.padding, str) else _pair(conv.padding),
            bias=bias is not None,
            dtype=weight.dtype,
        ),
        weight,
        bias,
    )


def _prunable(unet):
    from diffusers.models.attention import FeedForward
    from diffusers.models.resnet import ResnetBlock2D

    for name, module in unet.named_modules():
        if (
            isinstance(module, ResnetBlock2D)
            and module.time_emb_proj is not None
            and module.time_embedding_norm == "default"
        ):
            yield name, "resnet", module
        elif isinstance(module, FeedForward) and type(module.net[0]).__name__ == "GEGLU":
            yield name, "geglu", module


def _keep_resnet(block, keep: torch.Tensor) -> None:
    block.conv1 = _narrow_conv(block.conv1, out_idx=keep)
    block.time_emb_proj = _narrow_linear(block.time_emb_proj, rows=keep)
    norm = block.norm2
    new_norm = nn.GroupNorm(norm.num_groups, len(keep), norm.eps, norm.affine)
    if norm.affine:
        new_norm.weight.data.copy_(norm.weight.data[keep])
        new_norm.bias.data.copy_(norm.bias.data[keep])
    block.norm2 = new_norm
    block.conv2 = _narrow_conv(block.conv2, in_idx=keep)


def _keep_geglu(feed_forward, keep: torch.Tensor) -> None:
    proj = feed_forward.net[0].proj
    inner = proj.out_features // 2
    feed_forward.net[0].proj = _narrow_linear(proj, rows=torch.cat([keep, keep + inner]))  # hidden and gate halves
    feed_forward.net[2] = _narrow_linear(feed_forward.net[2], cols=keep)


def _kept_count(width: int, fraction: float, multiple: int) -> int:
    kept = max(multiple, int(round(width * (1.0 - fraction) / multiple)) * multiple)
    return min(width, kept)


@torch.no_grad()
def prune_unet(unet, fraction: float) -> dict[str, int]:
    """Prune `unet` in place; returns the kept width per pruned module (the plan)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError("fraction must be in [0, 1)")
    plan: dict[str, int] = {}
    for name, kind, module in list(_prunable(unet)):
        if kind == "resnet":
            width, multiple = module.conv1.out_channels, module.norm2.num_groups
            scores = module.conv1.weight.abs().sum(dim=(1, 2, 3))
        else:
            proj = module.net[0].proj
            width, multiple = proj.out_features // 2, 1
            scores = proj.weight[:width].abs().sum(dim=1) + proj.weight[width:].abs().sum(dim=1)
        count = _kept_count(width, fraction, multiple)
        keep = torch.sort(torch.topk(scores, count).indices).values
        (_keep_resnet if kind == "resnet" else _keep_geglu)(module, keep)
        plan[name] = count
    return plan


@torch.no_grad()
def apply_plan(unet, plan: dict[str, int]) -> None:
    """Narrow a freshly built UNet to a saved plan's widths (weights are loaded afterwards)."""
    modules = {name: (kind, module) for name, kind, module in _prunable(unet)}
    for name, count in plan.items():
        kind, module = modules[name]
        (_keep_resnet if kind == "resnet" else _keep_geglu)(module, torch.arange(count))


def parameter_count(unet) -> int:
    return sum(p.numel() for p in unet.parameters())


def save_pruned_variant(model_path: Path, target: Path, fraction: float) -> dict:
    """Write a model variant folder with the UNet pruned by `fraction`; returns a summary."""
    from safetensors.torch import save_file

    from deployments.models import loading

    model_path, target = Path(model_path), Path(target)
    unet = loading.load_unet(model_path)
    before = parameter_count(unet)
    plan = prune_unet(unet, fraction)
    after = parameter_count(unet)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(model_path, partial, ignore=shutil.ignore_patterns("unet"))
    (partial / "unet").mkdir()
    shutil.copy(model_path / "unet" / "config.json", partial / "unet" / "config.json")
    summary = {
        "fraction": fraction,
        "source": str(model_path),
        "parameters_before": before,
        "parameters_after": after,
        "params_reduction": round(1 - after / before, 4),
        "kept": plan,
    }
    (partial / "unet" / PRUNING_FILE).write_text(json.dumps(summary, indent=2))
    save_file(
        {k: v.contiguous() for k, v in unet.state_dict().items()},
        str(partial / "unet" / "diffusion_pytorch_model.safetensors"),
    )
    shutil.rmtree(target, ignore_errors=True)
    partial.replace(target)
    return summary


def load_pruned_unet(path: Path, dtype=None):
    """A pruned variant's UNet: built from the config, narrowed to the plan, weights loaded."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    unet_dir = Path(path) / "unet"
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(unet_dir)))
    apply_plan(unet, json.loads((unet_dir / PRUNING_FILE).read_text())["kept"])
    unet.load_state_dict(load_file(str(unet_dir / "diffusion_pytorch_model.safetensors")), strict=True)
    return unet.to(dtype or torch.float32).eval()
