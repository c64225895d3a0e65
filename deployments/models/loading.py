"""Where model folders come from and how each stage loads its part of one.

A model spec is a trained model's name (`portrait`: trained by our code on rendered
portraits, its fp16 weights shipped in the package), a preset name (`tiny`, a throwaway model
for tests; `sd15`, the real SD-1.5 architecture with random weights) or a path to a diffusers
folder. Presets are built once into the cache directory; every model is loaded with
`from_pretrained`, through exactly the same code as a real checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from filelock import FileLock

from deployments.models import builder

DEFAULT_MODEL = "portrait"
# Models trained by our code (`fusionserve train-model`), shipped as package data: used as they are.
TRAINED_DIR = Path(__file__).parent / "trained"
REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class ModelNotFoundError(ValueError):
    """The model spec names neither a preset nor a usable diffusers folder."""


def cache_dir() -> Path:
    return Path(os.environ.get("FUSIONSERVE_HOME", Path.home() / ".cache" / "fusionserve"))


def preset_model_dir(name: str) -> Path:
    return cache_dir() / "models" / f"{name}-{builder.preset_fingerprint(name)}"


def is_preset(spec: str) -> bool:
    return "/" not in spec and (builder.PRESET_DIR / f"{spec}.yaml").is_file()


def is_trained(spec: str) -> bool:
    return "/" not in spec and (TRAINED_DIR / spec / "model_index.json").is_file()


def known_models() -> list[str]:
    """Every name a model spec may give: trained models and presets."""
    trained = (
        [p.name for p in TRAINED_DIR.iterdir() if (p / "model_index.json").is_file()] if TRAINED_DIR.is_dir() else []
    )
    return sorted(trained) + sorted(p.stem for p in builder.PRESET_DIR.glob("*.yaml"))


def resolve_model(spec: str | os.PathLike | None = None, build: bool = True) -> Path:
    """Return the folder for a model spec, building a preset if it is missing.

    Building holds a file lock, so replicas that start together build it once.
    """
    spec = str(spec or DEFAULT_MODEL)
    if is_trained(spec):
        return TRAINED_DIR / spec
    if is_preset(spec):
        target = preset_model_dir(spec)
        if not (target / "model_index.json").is_file():
            if not build:
                raise ModelNotFoundError(f"preset {spec!r} is not built yet: run `fusionserve build-model {spec}`")
            target.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(target.parent / f".{target.name}.lock"):
                if not (target / "model_index.json").is_file():
                    builder.build_model(spec, target)
        return target
    path = Path(spec).expanduser().resolve()
    check_model_folder(path)
    return path


def check_model_folder(path: Path) -> None:
    if not (path / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"{path} is not a diffusers model folder (no model_index.json). Pass a preset "
            f"name ({', '.join(known_models())}) "
            "or the path of a Stable Diffusion 1.x folder in the diffusers layout."
        )
    missing = [part for part in REQUIRED_PARTS if not (path / part).is_dir()]
    if missing:
        raise ModelNotFoundError(f"{path} lacks the folders {missing}")


def native_size(path: Path) -> int:
    """The side, in pixels, of the images the model was made for (its VAE's sample_size)."""
    return int(json.loads((Path(path) / "vae" / "config.json").read_text())["sample_size"])


def model_id(path: Path) -> str:
    """A stable identity for a model folder (used in cache keys and responses)."""
    index = json.loads((Path(path) / "model_index.json").read_text())
    return f"{Path(path).name}:{index.get('_class_name', 'unknown')}"


def unet_digest(path: Path) -> str:
    """The UNet's weights by content (a measured sampler table names the weights it holds for)."""
    digest = hashlib.blake2b(digest_size=8)
    for weights in sorted((Path(path) / "unet").glob("*.safetensors")):
        digest.update(weights.read_bytes())
    return digest.hexdigest()


def set_torch_threads(num_threads: int | None) -> None:
    """Ray gives a replica with a fractional CPU OMP_NUM_THREADS=1, which would run the
    model on one core; set the count explicitly (default: every core of the node).

    OpenMP keeps the count per OS thread: call this in the thread that runs the model
    (engines do, under their lock), not only in the constructor."""
    import torch

    torch.set_num_threads(int(num_threads or os.cpu_count() or 1))


# from_pretrained builds modules under accelerate's init_empty_weights, which patches
# torch.nn.Module for the whole process while it runs: two threads loading at once can hand
# each other meta tensors ("Cannot copy out of meta tensor"). Our loaders take turns.
_LOADING = threading.RLock()


def _one_load_at_a_time(load):
    @functools.wraps(load)
    def locked(*args, **kwargs):
        with _LOADING:
            return load(*args, **kwargs)

    return locked


def load_tokenizer(path: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path), subfolder="tokenizer")


@_one_load_at_a_time
def load_text_encoder(path: Path, dtype=None):
    import torch
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(str(path), subfolder="text_encoder", dtype=dtype or torch.float32).eval()


@_one_load_at_a_time
def load_unet(path: Path, dtype=None):
    import torch
    from diffusers import UNet2DConditionModel

    from deployments.denoiser import pruning

    if (Path(path) / "unet" / pruning.PRUNING_FILE).is_file():  # a pruned variant folder
        return pruning.load_pruned_unet(Path(path), dtype)

    return UNet2DConditionModel.from_pretrained(str(path), subfolder="unet", torch_dtype=dtype or torch.float32).eval()


def load_unet_config(path: Path) -> dict:
    return json.loads((Path(path) / "unet" / "config.json").read_text())


@_one_load_at_a_time
def load_vae(path: Path, dtype=None):
    import torch
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(path), subfolder="vae", torch_dtype=dtype or torch.float32).eval()


def load_scheduler_config(path: Path) -> tuple[type, dict]:
    """The scheduler class and config; each request builds its own instance from them."""
    import diffusers

    config = json.loads((Path(path) / "scheduler" / "scheduler_config.json").read_text())
    scheduler_cls = getattr(diffusers, config["_class_name"])
    return scheduler_cls, config


# -- the image-prompt adapter (IP-Adapter), optional -------------------------------------
# Layout: `image_encoder/` (CLIPVisionModelWithProjection) and `feature_extractor/`
# (CLIPImageProcessor) as pipeline components, and the adapter's weights as in h94/IP-Adapter:
# one safetensors file with `image_proj.*` and `ip_adapter.*` keys.
IP_ADAPTER_FILE = Path("ip_adapter") / "ip-adapter.safetensors"


def is_inpainting_unet(unet_config: dict) -> bool:
    """A 9-channel UNet (sd-v1-5-inpainting and kin): latents + mask + masked-image latents in."""
    return unet_config["in_channels"] == 9


def features(path: Path) -> dict[str, bool | int]:
    """What a model folder can serve beyond text-to-image (the ingress answers 400 otherwise)."""
    unet_config = load_unet_config(path)
    return {
        "image_prompt_adapter": has_image_prompt_adapter(path),
        "inpainting_unet": is_inpainting_unet(unet_config),
        "max_cache_branch_id": len(unet_config["down_block_types"]) - 2,  # deep_cache.max_branch_id
    }


def has_image_prompt_adapter(path: Path) -> bool:
    path = Path(path)
    return (
        (path / IP_ADAPTER_FILE).is_file()
        and (path / "image_encoder" / "config.json").is_file()
        and (path / "feature_extractor").is_dir()
    )


def load_ip_adapter_state_dict(path: Path) -> dict[str, dict]:
    """The folder's adapter file, grouped for diffusers' loader (`grouped_ip_adapter_state`)."""
    from safetensors.torch import load_file

    return grouped_ip_adapter_state(load_file(str(Path(path) / IP_ADAPTER_FILE)))


def grouped_ip_adapter_state(flat: dict[str, Any]) -> dict[str, dict]:
    """h94's flat keys as {"image_proj": {...}, "ip_adapter": {...}}, split as diffusers'
    `load_ip_adapter` splits them (other keys ignored)."""
    state: dict[str, dict[str, Any]] = {"image_proj": {}, "ip_adapter": {}}
    for key, tensor in flat.items():
        group, _, rest = key.partition(".")
        if group in state:
            state[group][rest] = tensor
    return state


@_one_load_at_a_time
def load_ip_adapter_unet(path: Path):
    """The UNet with the adapter's projection and cross-attention processors, fp32.

    `_load_ip_adapter_weights` is what the pipelines' public `load_ip_adapter` calls; the
    Denoiser holds a bare UNet, not a pipeline, so it calls it directly."""
    unet = load_unet(path)
    unet._load_ip_adapter_weights([load_ip_adapter_state_dict(path)], low_cpu_mem_usage=False)
    return unet.eval()


@_one_load_at_a_time
def load_image_encoder(path: Path):
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    # fp32 whatever the file holds (the portrait model ships its tower in fp16)
    encoder = CLIPVisionModelWithProjection.from_pretrained(
        str(path), subfolder="image_encoder", dtype=torch.float32
    ).eval()
    return encoder, CLIPImageProcessor.from_pretrained(str(path), subfolder="feature_extractor")
