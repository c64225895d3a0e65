"""Feature caching across steps (DeepCache, Ma et al. 2023, arXiv 2312.00858).

A UNet's deep features change slowly from one denoising step to the next, its outer levels
(which see the current latents directly) do not. On a *full* step the UNet runs whole and the
job keeps the output of the up block just inside its cached branch (`deep_features`); on the
next `cache_interval - 1` steps only the *shallow* path runs: `conv_in`, the outer down
block(s) without the last one's downsampler, the outer up block(s) fed with the kept
features, `conv_out`.

`cache_branch_id` picks the branch as diffusers' DeepCache helper names it: 0 runs only the
outermost level on a cached step (the cheapest), k runs the k + 1 outermost levels.

The full step is the UNet's own forward (a hook reads the features on the way), so a job
with `cache_interval` 1 is the uncached job exactly. The shallow step repeats the parts of
diffusers' `UNet2DConditionModel.forward` that a Stable-Diffusion-1.x UNet uses (time and
text-time embeddings, the image-prompt adapter's projection), not ControlNet or T2I inputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

MAX_CACHE_INTERVAL = 10  # beyond this a job's features are older than the picture they help draw


def max_branch_id(unet_config: dict[str, Any]) -> int:
    """The deepest branch a cached step can keep: the innermost level always runs from cache."""
    return len(unet_config["down_block_types"]) - 2


def check_cache_settings(cache_interval: int, cache_branch_id: int, unet_config: dict[str, Any]) -> None:
    """ValueError (the API's 400) for settings this UNet cannot run."""
    if not 1 <= cache_interval <= MAX_CACHE_INTERVAL:
        raise ValueError(
            f"cache_interval must be between 1 (no feature caching) and {MAX_CACHE_INTERVAL}, got {cache_interval}"
        )
    deepest = max_branch_id(unet_config)
    if not 0 <= cache_branch_id <= deepest:
        raise ValueError(f"cache_branch_id must be in [0, {deepest}] for this model's UNet, got {cache_branch_id}")


class DeepCacheUNet:
    """A diffusers UNet2DConditionModel run whole (keeping the deep features) or shallow
    (from kept features). Plain torch on the module's device and dtype; the caller converts."""

    def __init__(self, unet: Any):
        self.unet = unet

    def full(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        branch_ids: Iterable[int],
        image_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The UNet's output and, per branch id asked for, the features a cached step of that
        branch reuses ([rows, C, h, w]: the output of the up block just inside the branch)."""
        blocks = self.unet.up_blocks
        captured: dict[int, torch.Tensor] = {}
        hooks = []
        for branch_id in set(branch_ids):
            block = blocks[len(blocks) - 2 - branch_id]

            def keep(_module: Any, _inputs: Any, output: torch.Tensor, branch_id: int = branch_id) -> None:
                captured[branch_id] = output

            hooks.append(block.register_forward_hook(keep))
        added = _added_conditions(image_embeds)
        try:
            noise = self.unet(sample, timesteps, encoder_hidden_states=context, added_cond_kwargs=added)[0]
        finally:
            for hook in hooks:
                hook.remove()
        return noise, captured

    def shallow(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        deep_features: torch.Tensor,
        branch_id: int,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The UNet's output on a cached step: only the `branch_id + 1` outermost levels run."""
        unet = self.unet
        levels = branch_id + 1
        added = _added_conditions(image_embeds)
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timesteps), None)
        aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs=added or {})
        emb = emb + aug_emb if aug_emb is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        context = unet.process_encoder_hidden_states(encoder_hidden_states=context, added_cond_kwargs=added)

        hidden = unet.conv_in(sample)
        residuals: tuple[torch.Tensor, ...] = (hidden,)
        for index, block in enumerate(unet.down_blocks[:levels]):
            if index < levels - 1:
                hidden, states = _down_block(block, hidden, emb, context)
            else:  # its downsampler's output feeds only the levels inside the branch
                hidden, states = _down_block_without_downsampler(block, hidden, emb, context)
            residuals += states

        hidden = deep_features
        up_blocks = unet.up_blocks[len(unet.up_blocks) - levels :]
        forward_upsample_size = any(dim % (2**unet.num_upsamplers) != 0 for dim in sample.shape[-2:])
        for index, block in enumerate(up_blocks):
            res = residuals[-len(block.resnets) :]
            residuals = residuals[: -len(block.resnets)]
            upsample_size = residuals[-1].shape[2:] if forward_upsample_size and index < len(up_blocks) - 1 else None
            hidden = _up_block(block, hidden, res, emb, context, upsample_size)
        if unet.conv_norm_out:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)


def _added_conditions(image_embeds: torch.Tensor | None) -> dict[str, list[torch.Tensor]] | None:
    """The UNet's `added_cond_kwargs`: the image-prompt adapter's input, when there is one."""
    return {"image_embeds": [image_embeds]} if image_embeds is not None else None


def _down_block(block: Any, hidden: torch.Tensor, emb: torch.Tensor, context: Any) -> tuple[torch.Tensor, tuple]:
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=hidden, temb=emb, encoder_hidden_states=context)
    return block(hidden_states=hidden, temb=emb)


def _down_block_without_downsampler(
    block: Any, hidden: torch.Tensor, emb: torch.Tensor, context: Any
) -> tuple[torch.Tensor, tuple]:
    """A down block's resnets (and attentions), as its forward runs them, minus the downsampler."""
    attentions = getattr(block, "attentions", None) if getattr(block, "has_cross_attention", False) else None
    states: tuple[torch.Tensor, ...] = ()
    for index, resnet in enumerate(block.resnets):
        hidden = resnet(hidden, emb)
        if attentions is not None:
            hidden = attentions[index](hidden, encoder_hidden_states=context, return_dict=False)[0]
        states += (hidden,)
    return hidden, states


def _up_block(
    block: Any, hidden: torch.Tensor, residuals: tuple, emb: torch.Tensor, context: Any, upsample_size: Any
) -> torch.Tensor:
    if getattr(block, "has_cross_attention", False):
        return block(
            hidden_states=hidden,
            temb=emb,
            res_hidden_states_tuple=residuals,
            encoder_hidden_states=context,
            upsample_size=upsample_size,
        )
    return block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=residuals, upsample_size=upsample_size)
