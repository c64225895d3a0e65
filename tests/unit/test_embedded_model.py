"""The embedded model: real CLIP vocabulary, SD-1.x layout, reproducible from its seed."""

from __future__ import annotations

import json

import torch

from deployments.models import builder, loading

# From ../shared/ARCHITECTURE.md: OpenAI CLIP's tokenizer on this sentence.
SENTENCE = "A smiling Asian man who is wearing glasses"
SENTENCE_IDS = [49406, 320, 9200, 7128, 786, 822, 533, 3309, 6116, 49407]


def test_tokenizer_is_the_real_clip_vocabulary(tiny_model_path):
    tokenizer = loading.load_tokenizer(tiny_model_path)
    assert len(tokenizer) == 49408
    assert tokenizer(SENTENCE).input_ids == SENTENCE_IDS
    assert tokenizer.model_max_length == 77


def test_model_folder_has_the_diffusers_layout(tiny_model_path):
    index = json.loads((tiny_model_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert part in index and (tiny_model_path / part).is_dir()
    assert (tiny_model_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_tiny_shapes_match_the_preset(tiny_model_path):
    unet = loading.load_unet(tiny_model_path)
    vae = loading.load_vae(tiny_model_path)
    text_encoder = loading.load_text_encoder(tiny_model_path)
    unet_params = sum(p.numel() for p in unet.parameters())
    assert 0.5e6 < unet_params < 1.5e6, unet_params  # "~1M parameters"
    assert len(vae.config.block_out_channels) == 4
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)  # 8x downscale, 4 latent channels
    assert text_encoder.config.vocab_size == 49408
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size


def test_same_seed_gives_identical_weights(tmp_path, tiny_model_path):
    rebuilt = builder.build_model("tiny", tmp_path / "again")
    assert builder.weight_hashes(rebuilt) == builder.weight_hashes(tiny_model_path)


def test_unknown_model_spec_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(loading.ModelNotFoundError, match="model_index.json"):
        loading.resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="unknown model preset"):
        builder.load_preset("nope")
