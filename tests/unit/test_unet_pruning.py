"""Structured pruning: a variant folder that loads through the normal path and computes
what the pruned module computes; pruning nothing changes nothing."""

from __future__ import annotations

import json

import torch

from deployments.denoiser.pruning import parameter_count, prune_unet, save_pruned_variant
from deployments.models import loading


def unet_inputs():
    generator = torch.Generator().manual_seed(0)
    return (
        torch.randn(2, 4, 8, 8, generator=generator),
        torch.tensor([10, 900]),
        torch.randn(2, 77, 64, generator=generator),
    )


def forward(unet, inputs):
    sample, timesteps, context = inputs
    with torch.inference_mode():
        return unet(sample, timesteps, encoder_hidden_states=context, return_dict=False)[0]


def test_pruning_nothing_changes_nothing(tiny_model_path):
    original, pruned = loading.load_unet(tiny_model_path), loading.load_unet(tiny_model_path)
    plan = prune_unet(pruned, 0.0)
    assert plan and parameter_count(pruned) == parameter_count(original)
    assert torch.equal(forward(pruned, unet_inputs()), forward(original, unet_inputs()))


def test_pruned_variant_folder_loads_through_the_normal_path(tiny_model_path, tmp_path):
    summary = save_pruned_variant(tiny_model_path, tmp_path / "tiny-pruned50", 0.5)
    in_memory = loading.load_unet(tiny_model_path)
    prune_unet(in_memory, 0.5)
    loaded = loading.load_unet(tmp_path / "tiny-pruned50")  # the same code a served --model path uses
    assert parameter_count(loaded) == summary["parameters_after"] < summary["parameters_before"]
    # kept widths (so the reduction) follow from the tiny preset's UNet widths alone, not its weights
    assert (summary["parameters_before"], summary["parameters_after"]) == (803204, 487876)
    assert summary["params_reduction"] == 0.3926
    assert torch.equal(forward(loaded, unet_inputs()), forward(in_memory, unet_inputs()))
    assert forward(loaded, unet_inputs()).shape == (2, 4, 8, 8)
    saved = json.loads((tmp_path / "tiny-pruned50" / "unet" / "pruning.json").read_text())
    groups = loading.load_unet_config(tiny_model_path)["norm_num_groups"]
    resnet_widths = [width for name, width in saved["kept"].items() if ".resnets." in name]
    assert resnet_widths and all(width % groups == 0 for width in resnet_widths)
    loading.check_model_folder(tmp_path / "tiny-pruned50")
