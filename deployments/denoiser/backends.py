"""UNet backends behind one call: `runner(sample, timesteps, context) -> noise` (float32).

- torch: fp32; bf16 (CPU) or fp16 (GPU) weights and activations; channels-last;
  optional `torch.compile`.
- onnxruntime: the UNet exported once per model to ONNX with dynamic batch and latent
  size axes, cached on disk under the model's identity; fp32, or INT8 weights through
  ONNX Runtime's dynamic quantization.
- tensorrt: GPU only and optional; import-guarded, so it reports itself unavailable here.

`FallbackUNet` tries a configured chain (e.g. tensorrt -> onnxruntime -> torch): a backend
that fails to load is skipped, one that fails at run time is replaced by the next for the
same forward, so no request in flight fails for it; both are logged and counted.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock

from deployments.denoiser.deep_cache import DeepCacheUNet
from deployments.denoiser.settings import BackendName, BackendSpec
from deployments.models import loading

logger = logging.getLogger(__name__)

Runner = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class BackendUnavailable(RuntimeError):
    """This backend cannot run here (library missing, no GPU, build failed)."""


def cache_root() -> Path:
    return loading.cache_dir() / "onnx"


def model_fingerprint(model_path: Path) -> str:
    """Identity of a UNet's weights: names the exported ONNX files."""
    digest = hashlib.blake2b(digest_size=8)
    for path in sorted((Path(model_path) / "unet").glob("*")):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return f"{Path(model_path).name}-{digest.hexdigest()}"


# --------------------------------------------------------------------------- torch
@dataclass(frozen=True)
class TorchPlacement:
    """Where and how a torch UNet runs: its inputs are moved there, its noise comes back as
    contiguous float32 on the CPU (what every runner returns)."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    memory_format: torch.memory_format = torch.contiguous_format

    def inputs(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        sample = sample.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)
        embeds = None if image_embeds is None else image_embeds.to(self.device, self.dtype)
        return sample, timesteps.to(self.device), context.to(self.device, self.dtype), embeds

    @staticmethod
    def output(noise: torch.Tensor) -> torch.Tensor:
        return noise.float().cpu().contiguous()


class TorchFeatureCache:
    """Feature caching across steps (deep_cache.py) on a torch backend's module: inputs and
    outputs converted as its runner converts them; the kept features stay on the module's
    device, in its dtype. `around()` wraps every forward (the adapter puts itself in)."""

    def __init__(
        self,
        unet: torch.nn.Module,
        placement: TorchPlacement,
        around: Callable[[], contextlib.AbstractContextManager] | None = None,
    ):
        self.model = DeepCacheUNet(unet)
        self.placement = placement
        self.around = around or contextlib.nullcontext

    def supports(self, branch_id: int) -> bool:
        return True  # the module runs any branch its UNet has (the engine checks the depth)

    def full(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        branch_ids: Iterable[int],
        image_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        sample, timesteps, context, embeds = self.placement.inputs(sample, timesteps, context, image_embeds)
        with self.around():
            noise, features = self.model.full(sample, timesteps, context, branch_ids, image_embeds=embeds)
        return self.placement.output(noise), features

    def shallow(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        deep_features: torch.Tensor,
        branch_id: int,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        sample, timesteps, context, embeds = self.placement.inputs(sample, timesteps, context, image_embeds)
        with self.around():
            noise = self.model.shallow(sample, timesteps, context, deep_features, branch_id, image_embeds=embeds)
        return self.placement.output(noise)


class TorchRunner:
    """A torch UNet: `runner(sample, timesteps, context) -> noise`, and its `feature_cache`."""

    def __init__(self, model_path: Path, spec: BackendSpec):
        device = spec.device
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("no CUDA GPU here")
        if spec.precision == "int8":
            raise BackendUnavailable("int8 runs on the onnxruntime backend")
        if spec.precision == "fp16" and device == "cpu":
            raise BackendUnavailable("fp16 needs a GPU; use bf16 on CPU")
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec.precision]
        memory_format = torch.channels_last if spec.channels_last else torch.contiguous_format
        self.placement = TorchPlacement(device, dtype, memory_format)
        unet = loading.load_unet(model_path, dtype=dtype).to(device)
        if spec.channels_last:
            unet = unet.to(memory_format=memory_format)
        # dynamic: the step loop's batches change size every few steps, and a static compile
        # recompiles per shape (51 s each for the tiny UNet on 2 CPU cores). Measured on CPU:
        # static 1.13x eager, dynamic 1.0x after a 100 s compile -- worth it only on GPUs.
        self.forward = torch.compile(unet, dynamic=True) if spec.compile else unet
        self.module = unet  # eager: the feature cache's partial forwards, the adapter's shared weights
        self.compiled = spec.compile
        # the cached path runs the module eagerly (its hooks and partial forwards)
        self.feature_cache = TorchFeatureCache(unet, self.placement)

    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        sample, timesteps, context, _ = self.placement.inputs(sample, timesteps, context)
        noise = self.forward(sample, timesteps, encoder_hidden_states=context, return_dict=False)[0]
        return self.placement.output(noise)


def torch_runner(model_path: Path, spec: BackendSpec) -> Runner:
    return TorchRunner(model_path, spec)


# --------------------------------------------------------------------------- onnxruntime
def _export(
    module: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    target: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> Path:
    """Export once (later calls reuse the file); written to a partial file, then renamed."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial.onnx")
    with torch.inference_mode():
        torch.onnx.export(
            module.eval(),
            inputs,
            str(partial),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=17,
            dynamo=False,
        )
    partial.replace(target)
    return target


UNET_AXES = {
    "sample": {0: "batch", 2: "height", 3: "width"},
    "timesteps": {0: "batch"},
    "context": {0: "batch"},
    "noise": {0: "batch", 2: "height", 3: "width"},
    "deep_features": {0: "batch", 2: "deep_height", 3: "deep_width"},
    "image_embeds": {0: "batch"},
    "ip_scale": {0: "batch"},
}


def _example_inputs(unet: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    config = unet.config
    sample = torch.randn(2, config.in_channels, 8, 8)
    return sample, torch.tensor([999, 999]), torch.randn(2, 77, config.cross_attention_dim)


class _WholeUNet(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timesteps, encoder_hidden_states=context, return_dict=False)[0]


def export_onnx(model_path: Path, target: Path) -> Path:
    """The plain UNet with dynamic batch and latent size (once; later calls reuse the file): the
    source of the int8 graph and of TensorRT engines."""
    if target.is_file():
        return target
    unet = loading.load_unet(model_path)
    names = ["sample", "timesteps", "context"]
    return _export(_WholeUNet(unet), _example_inputs(unet), target, names, ["noise"], UNET_AXES)


class _RowScaled(torch.nn.Module):
    """An adapter value projection whose output is multiplied per row by `scale` (set for each
    forward): attention is linear in its values, so this is the adapter's `scale * attention`
    with the scale a graph input, one per row (0: exactly the plain UNet's row)."""

    def __init__(self, projection: torch.nn.Module):
        super().__init__()
        self.projection = projection
        self.scale: torch.Tensor | None = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        assert self.scale is not None, "set by _UNetGraph.forward"
        values = self.projection(tokens)  # [rows, images, tokens, width]
        return values * self.scale.view(-1, *([1] * (values.dim() - 1)))


class _UNetGraph(torch.nn.Module):
    """The fp32 graphs ONNX Runtime runs: the whole UNet, also returning the deep features of
    cache branch 0 (the production graph), or its shallow cached step from them. With the
    image-prompt adapter in when `adapter` (inputs image_embeds [rows, 1, dim] and ip_scale
    [rows]; plain rows: zeros at scale 0), so one set of weights serves plain and reference rows."""

    def __init__(self, unet: Any, shallow: bool, adapter: bool):
        super().__init__()
        self.unet, self.shallow, self.adapter = unet, shallow, adapter
        self.scaled: list[_RowScaled] = []
        if adapter:
            for processor in unet.attn_processors.values():
                if hasattr(processor, "to_v_ip"):
                    processor.to_v_ip = torch.nn.ModuleList(_RowScaled(v) for v in processor.to_v_ip)
                    processor.scale = [1.0] * len(processor.scale)
                    self.scaled.extend(processor.to_v_ip)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        sample, timesteps, context, *rest = inputs
        deep = rest.pop(0) if self.shallow else None
        embeds = None
        if self.adapter:
            embeds, scale = rest
            for projection in self.scaled:
                projection.scale = scale
        model = DeepCacheUNet(self.unet)
        if deep is not None:
            return model.shallow(sample, timesteps, context, deep, ONNX_CACHE_BRANCH, image_embeds=embeds)
        noise, features = model.full(sample, timesteps, context, [ONNX_CACHE_BRANCH], image_embeds=embeds)
        return noise, features[ONNX_CACHE_BRANCH]


ONNX_CACHE_BRANCH = 0  # the graphs are exported for one branch: the cheapest, the one the table measures


def image_embed_dim(unet: Any) -> int:
    """The width of the image embedding the adapter's projection takes."""
    return int(unet.encoder_hid_proj.image_projection_layers[0].image_embeds.in_features)


def graph_name(model_path: Path, kind: str) -> str:
    """`unet-fp32-<kind>[-ip-<adapter digest>].onnx`: an adapter's own weights name its graphs too."""
    if not loading.has_image_prompt_adapter(model_path):
        return f"unet-fp32-{kind}.onnx"
    stat = (Path(model_path) / loading.IP_ADAPTER_FILE).stat()
    digest = hashlib.blake2b(f"{stat.st_size}:{int(stat.st_mtime)}".encode(), digest_size=4).hexdigest()
    return f"unet-fp32-{kind}-ip-{digest}.onnx"


def export_fp32_graph(model_path: Path, folder: Path, shallow: bool) -> Path:
    """The production graph (`shallow=False`: noise and deep features) or the cached step's
    (once per model; later calls reuse the file)."""
    target = folder / graph_name(model_path, "cache-shallow-b0" if shallow else "whole-b0")
    if target.is_file():
        return target
    unet = loading.load_unet(model_path)
    adapter = loading.has_image_prompt_adapter(model_path)
    if adapter:  # diffusers' own loader, as a pipeline's load_ip_adapter calls it
        unet._load_ip_adapter_weights([loading.load_ip_adapter_state_dict(model_path)], low_cpu_mem_usage=False)
    sample, timesteps, context = _example_inputs(unet)
    inputs: tuple[torch.Tensor, ...] = (sample, timesteps, context)
    names = ["sample", "timesteps", "context"]
    embeds = torch.randn(sample.shape[0], 1, image_embed_dim(unet)) if adapter else None
    if shallow:
        with torch.inference_mode():
            kept = DeepCacheUNet(unet).full(sample, timesteps, context, [ONNX_CACHE_BRANCH], image_embeds=embeds)
        inputs, names = (*inputs, kept[1][ONNX_CACHE_BRANCH]), [*names, "deep_features"]
    if embeds is not None:
        inputs = (*inputs, embeds, torch.linspace(0.5, 1.0, sample.shape[0]))
        names = [*names, "image_embeds", "ip_scale"]
    outputs = ["noise"] if shallow else ["noise", "deep_features"]
    return _export(_UNetGraph(unet, shallow, adapter), inputs, target, names, outputs, UNET_AXES)


def _folder_lock(folder: Path) -> FileLock:
    """Replicas starting together export once: the others wait, then reuse the file."""
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(folder / ".lock")


def onnx_model_file(model_path: Path, precision: str) -> Path:
    """The graph a runner of `precision` loads: fp32's production graph, or the int8 one."""
    if precision not in ("fp32", "int8"):
        raise BackendUnavailable(f"onnxruntime backend: precision {precision} is not offered (fp32, int8)")
    folder = cache_root() / model_fingerprint(model_path)
    if precision == "fp32":
        with _folder_lock(folder):
            return export_fp32_graph(model_path, folder, shallow=False)
    plain = onnx_plain_graph_file(model_path)
    with _folder_lock(folder):
        return _quantized(plain, folder / "unet-int8.onnx")


def onnx_plain_graph_file(model_path: Path) -> Path:
    """The plain UNet's graph (no features out, no adapter): int8's source, and a comparison."""
    folder = cache_root() / model_fingerprint(model_path)
    with _folder_lock(folder):
        return export_onnx(model_path, folder / "unet-fp32.onnx")


def _quantized(fp32: Path, int8: Path) -> Path:
    if not int8.is_file():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        partial = int8.with_suffix(".partial.onnx")
        quantize_dynamic(str(fp32), str(partial), weight_type=QuantType.QInt8)
        partial.replace(int8)
    return int8


class _FP32Session:
    """An fp32 graph's session with its feeds: plain rows get zero embeddings at scale 0 when
    the graph has the adapter in."""

    def __init__(self, session: Any):
        self.session = session
        embeds = next((i for i in session.get_inputs() if i.name == "image_embeds"), None)
        self.embed_dim = None if embeds is None else int(embeds.shape[-1])

    def run(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        scale: float = 0.0,
        deep_features: torch.Tensor | None = None,
    ) -> list[np.ndarray]:
        feeds = {
            "sample": sample.float().numpy(),
            "timesteps": timesteps.long().numpy(),
            "context": context.float().numpy(),
        }
        if deep_features is not None:
            feeds["deep_features"] = deep_features.float().numpy()
        if self.embed_dim is not None:
            rows = sample.shape[0]
            if image_embeds is None:
                feeds["image_embeds"] = np.zeros((rows, 1, self.embed_dim), np.float32)
            else:
                feeds["image_embeds"] = image_embeds.float().numpy()
            feeds["ip_scale"] = np.full(rows, scale if image_embeds is not None else 0.0, np.float32)
        elif image_embeds is not None:
            raise ValueError("this model's ONNX graph has no image-prompt adapter")
        return self.session.run(None, feeds)


class OnnxFeatureCache:
    """Feature caching on ONNX Runtime at fp32, branch 0: the whole step is the production
    session itself (its graph returns the deep features too); the shallow graph is exported and
    loaded at the first cached job (if that fails, `supports` says no from then on and jobs run
    every step whole, logged). `scale`: the adapter's, for reference rows (`at_scale`)."""

    def __init__(self, model_path: Path, options: object, whole: _FP32Session, scale: float = 0.0):
        self.model_path, self.options, self.whole, self.scale = model_path, options, whole, scale
        self._shallow: _FP32Session | None = None
        self._failed = False
        self._lock = threading.Lock()

    def at_scale(self, scale: float) -> OnnxFeatureCache:
        """The same graphs (the shallow one loaded once) for reference rows at `scale`."""
        self._load()
        view = OnnxFeatureCache(self.model_path, self.options, self.whole, scale)
        view._shallow, view._failed = self._shallow, self._failed
        return view

    def supports(self, branch_id: int) -> bool:
        return branch_id == ONNX_CACHE_BRANCH and not self._failed and self._load() is not None

    def _load(self) -> _FP32Session | None:
        with self._lock:
            if self._shallow is None and not self._failed:
                try:
                    import onnxruntime

                    folder = cache_root() / model_fingerprint(self.model_path)
                    with _folder_lock(folder):
                        path = export_fp32_graph(self.model_path, folder, shallow=True)
                    session = onnxruntime.InferenceSession(str(path), self.options, providers=["CPUExecutionProvider"])
                    self._shallow = _FP32Session(session)
                except Exception:
                    logger.exception("ONNX feature-cache graph unavailable: cached jobs run every step whole")
                    self._failed = True
            return self._shallow

    def full(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        branch_ids: Iterable[int],
        image_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        noise, deep = self.whole.run(sample, timesteps, context, image_embeds, self.scale)
        return torch.from_numpy(noise), {ONNX_CACHE_BRANCH: torch.from_numpy(deep)}

    def shallow(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        deep_features: torch.Tensor,
        branch_id: int,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        session = self._load()
        assert session is not None and branch_id == ONNX_CACHE_BRANCH
        if session.embed_dim is None:
            # The exporter drops inputs a graph never reads: an outer level without
            # cross-attention (the portrait UNet's) never sees the reference, so its rows run
            # exactly without it.
            image_embeds = None
        (noise,) = session.run(sample, timesteps, context, image_embeds, self.scale, deep_features)
        return torch.from_numpy(noise)


class OnnxRunner:
    """The UNet on ONNX Runtime: `runner(sample, timesteps, context) -> noise`.

    fp32: one graph for everything (`export_fp32_graph`): it returns the deep features that
    feature caching keeps (`feature_cache`), and for a model with an image-prompt adapter it has
    the adapter in, so reference rows run on the same session (`adapter`): one copy of the
    UNet's weights per replica, plus the shallow graph's outer levels once a job caches.
    int8 runs every step whole on the plain quantized graph (the adapter then keeps its own
    torch copy)."""

    def __init__(self, model_path: Path, spec: BackendSpec, num_threads: int | None = None):
        try:
            import onnxruntime
        except ImportError as error:
            raise BackendUnavailable(f"onnxruntime is not installed: {error}") from error
        path = onnx_model_file(model_path, spec.precision)
        options = onnxruntime.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.graph = _FP32Session(self.session)  # its feeds; an int8 graph takes the same inputs
        self.feature_cache: OnnxFeatureCache | None = None
        self.adapter: OnnxAdapterUNet | None = None
        if spec.precision == "fp32":
            self.feature_cache = OnnxFeatureCache(model_path, options, self.graph)
            if self.graph.embed_dim is not None:
                self.adapter = OnnxAdapterUNet(self.graph, self.feature_cache)

    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.graph.run(sample, timesteps, context)[0])


class OnnxAdapterUNet:
    """Reference rows on the production ONNX Runtime session (its graph has the adapter in):
    AdapterUNet's interface."""

    shared = True

    def __init__(self, whole: _FP32Session, feature_cache: OnnxFeatureCache):
        self.whole, self._feature_cache = whole, feature_cache
        assert whole.embed_dim is not None
        self.embed_dim: int = whole.embed_dim

    def __call__(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        image_embeds: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        return torch.from_numpy(self.whole.run(sample, timesteps, context, image_embeds, scale)[0])

    def feature_cache(self, scale: float) -> OnnxFeatureCache:
        return self._feature_cache.at_scale(scale)


def onnxruntime_runner(model_path: Path, spec: BackendSpec, num_threads: int | None = None) -> Runner:
    return OnnxRunner(model_path, spec, num_threads)


# --------------------------------------------------------------------------- tensorrt
# Optimization profile: UNet rows (images x 2 with guidance) and latent sides the engine
# accepts. Batches of 1-16 images -> up to 32 rows; latents from 64x64 to 1024x1024 pixels.
TRT_ROWS = (1, 2, 32)  # min, opt, max
TRT_LATENT_SIDE = (8, 64, 128)
TRT_WORKSPACE_BYTES = 8 << 30


def tensorrt_engine_file(model_path: Path, spec: BackendSpec) -> Path:
    """Build (once) a TensorRT engine from the UNet's ONNX export; engines are specific to the
    TensorRT version and the GPU, so both name the file."""
    import tensorrt as trt

    if spec.precision not in ("fp16", "fp32"):
        raise BackendUnavailable(f"tensorrt backend: precision {spec.precision} is not offered (fp16, fp32)")
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    folder = cache_root() / model_fingerprint(model_path)
    with _folder_lock(folder):
        target = folder / f"unet-{spec.precision}-trt{trt.__version__}-{gpu}.plan"
        if target.is_file():
            return target
        onnx_file = export_onnx(model_path, folder / "unet-fp32.onnx")
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_file)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendUnavailable(f"tensorrt could not parse {onnx_file.name}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, TRT_WORKSPACE_BYTES)
        if spec.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        unet_config = loading.load_unet_config(model_path)
        channels, hidden = unet_config["in_channels"], unet_config["cross_attention_dim"]
        profile = builder.create_optimization_profile()
        profile.set_shape("sample", *[(rows, channels, side, side) for rows, side in zip(TRT_ROWS, TRT_LATENT_SIDE)])
        profile.set_shape("timesteps", *[(rows,) for rows in TRT_ROWS])
        profile.set_shape("context", *[(rows, 77, hidden) for rows in TRT_ROWS])
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BackendUnavailable("tensorrt engine build failed (see the TensorRT log above)")
        partial = target.with_suffix(".partial")
        partial.write_bytes(bytes(serialized))
        partial.replace(target)
        return target


def tensorrt_runner(model_path: Path, spec: BackendSpec) -> Runner:
    """TensorRT engine from the same ONNX export (fp16 by default), cached on disk. Needs a
    GPU and the `tensorrt` package (the `trt` extra), which this project's CPU machines lack."""
    try:
        import tensorrt as trt
    except ImportError as error:
        raise BackendUnavailable("tensorrt is not installed (GPU machines only)") from error
    if not torch.cuda.is_available():
        raise BackendUnavailable("tensorrt needs a CUDA GPU")
    engine_file = tensorrt_engine_file(model_path, spec)
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_file.read_bytes())
    if engine is None:
        raise BackendUnavailable(f"tensorrt could not load {engine_file.name}")
    context = engine.create_execution_context()
    dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32}
    if hasattr(trt, "int64"):  # TensorRT >= 10 keeps the int64 timesteps; 8.x takes them as int32
        dtypes[trt.int64] = torch.int64
    dtype_of = {name: dtypes[engine.get_tensor_dtype(name)] for name in ("sample", "timesteps", "context", "noise")}
    max_rows = TRT_ROWS[2]

    def run(sample: torch.Tensor, timesteps: torch.Tensor, context_embeds: torch.Tensor) -> torch.Tensor:
        if sample.shape[0] > max_rows:  # larger batches than the profile: in slices
            return torch.cat(
                [
                    run(sample[i : i + max_rows], timesteps[i : i + max_rows], context_embeds[i : i + max_rows])
                    for i in range(0, sample.shape[0], max_rows)
                ]
            )
        inputs = {"sample": sample, "timesteps": timesteps, "context": context_embeds}
        inputs = {name: tensor.to("cuda", dtype_of[name]).contiguous() for name, tensor in inputs.items()}
        for name, tensor in inputs.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        noise = torch.empty(tuple(context.get_tensor_shape("noise")), dtype=dtype_of["noise"], device="cuda")
        context.set_tensor_address("noise", noise.data_ptr())
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("tensorrt execution failed")
        stream.synchronize()
        return noise.float().cpu()

    return run


class AdapterUNet:
    """The UNet with the image-prompt adapter: `runner(sample, timesteps, context, image_embeds,
    scale)`, and `feature_cache(scale)`.

    On the production torch UNet's own weights when given its runner (`shared`): the adapter's
    image projection and attention processors (its key/value projections) are held beside
    those weights and put in only while an adapter batch runs (reference-image jobs batch only
    with each other: a UNet variant; the step loop runs one batch at a time, on one thread),
    at the production UNet's device and precision. Without one (ONNX Runtime or TensorRT in
    production, or a compiled UNet whose guards a swap would break): its own fp32 copy."""

    def __init__(self, model_path: Path, shared: TorchRunner | None = None):
        self.shared = shared is not None
        if shared is not None:
            unet, self.placement = shared.module, shared.placement
        else:
            unet, self.placement = loading.load_unet(model_path), TorchPlacement()
        plain = dict(unet.attn_processors)
        # diffusers' own loader (what a pipeline's load_ip_adapter calls) on this module; then
        # the adapter's parts are taken out again until an adapter batch needs them
        unet._load_ip_adapter_weights([loading.load_ip_adapter_state_dict(model_path)], low_cpu_mem_usage=False)
        self.unet = unet.eval()
        self._adapter_processors, self._plain_processors = dict(unet.attn_processors), plain
        self._projection = unet.encoder_hid_proj
        self._processors = [p for p in self._adapter_processors.values() if hasattr(p, "to_k_ip")]
        if self.shared:
            self._put_in(adapter=False)

    def _put_in(self, adapter: bool) -> None:
        """The adapter's processors and projection in the UNet, or its plain ones (as diffusers'
        load_ip_adapter and unload_ip_adapter leave it)."""
        # set_attn_processor pops from the dict it is given: a copy each time
        self.unet.set_attn_processor(dict(self._adapter_processors if adapter else self._plain_processors))
        self.unet.encoder_hid_proj = self._projection if adapter else None
        self.unet.config.encoder_hid_dim_type = "ip_image_proj" if adapter else None

    def set_scale(self, scale: float) -> None:
        # the adapter's weight in every cross-attention (diffusers' set_ip_adapter_scale); one
        # per batch: jobs batch together only with the same scale (their variant names it)
        for processor in self._processors:
            processor.scale = [scale] * len(processor.scale)

    @contextlib.contextmanager
    def active(self, scale: float) -> Iterator[None]:
        """The adapter at `scale` for the forwards inside; the plain UNet again after."""
        self.set_scale(scale)
        if not self.shared:
            yield
            return
        self._put_in(adapter=True)
        try:
            yield
        finally:
            self._put_in(adapter=False)

    def __call__(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        image_embeds: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        sample, timesteps, context, embeds = self.placement.inputs(sample, timesteps, context, image_embeds)
        with self.active(scale):
            noise = self.unet(
                sample,
                timesteps,
                encoder_hidden_states=context,
                added_cond_kwargs={"image_embeds": [embeds]},
                return_dict=False,
            )[0]
        return self.placement.output(noise)

    def feature_cache(self, scale: float) -> TorchFeatureCache:
        return TorchFeatureCache(self.unet, self.placement, around=lambda: self.active(scale))


def ip_adapter_runner(
    model_path: Path, shared: TorchRunner | OnnxAdapterUNet | None = None
) -> AdapterUNet | OnnxAdapterUNet:
    """The adapter on the production backend's weights where it can run there (`shared`: an
    eager torch UNet, or the ONNX Runtime graph with the adapter in), else on its own copy."""
    if isinstance(shared, OnnxAdapterUNet):
        return shared
    return AdapterUNet(model_path, shared)


# --------------------------------------------------------------------------- the chain
Loader = Callable[[Path, BackendSpec, "int | None"], Runner]  # (model folder, spec, threads) -> runner

# Looked up when a link of a chain loads, so replacing an entry (fault injection) reaches every chain.
LOADERS: dict[BackendName, Loader] = {
    "torch": lambda path, spec, num_threads: torch_runner(path, spec),
    "onnxruntime": onnxruntime_runner,
    "tensorrt": lambda path, spec, num_threads: tensorrt_runner(path, spec),
}


class FallbackUNet:
    """The first backend of `specs` that loads; on a run-time error, the next one."""

    def __init__(self, model_path: Path, specs: list[BackendSpec], num_threads: int | None = None):
        self.model_path = Path(model_path)
        self.specs = list(specs) or [BackendSpec()]
        self.num_threads = num_threads
        self.fallbacks: list[tuple[str, str]] = []  # (backend name, why) in the order they happened
        self._index = -1
        self.runner = self._next_runner("start")

    @property
    def active(self) -> BackendSpec:
        return self.specs[self._index]

    def _next_runner(self, reason: str) -> Runner:
        """Load the links after the active one until one loads."""
        while self._index + 1 < len(self.specs):
            self._index += 1
            spec = self.specs[self._index]
            try:
                runner = LOADERS[spec.backend](self.model_path, spec, self.num_threads)
            except Exception as error:
                self.fallbacks.append((spec.name, f"load: {error}"))
                logger.warning("denoiser backend %s unavailable (%s); trying the next", spec.name, error)
                continue
            logger.info("denoiser backend: %s", spec.name)
            return runner
        raise BackendUnavailable(f"no denoiser backend could load ({reason}); tried {[s.name for s in self.specs]}")

    @property
    def shareable_runner(self) -> TorchRunner | OnnxAdapterUNet | None:
        """What the image-prompt adapter can run on without a copy of the UNet: an eager torch
        UNet (a compiled one's guards would not survive the adapter's processor swap), or the
        ONNX Runtime graph that has the adapter in."""
        runner = self.runner
        if isinstance(runner, TorchRunner) and not runner.compiled:
            return runner
        return runner.adapter if isinstance(runner, OnnxRunner) else None

    @property
    def feature_cache(self) -> TorchFeatureCache | OnnxFeatureCache | None:
        """The active backend's feature caching across steps; None where it has none (ONNX
        Runtime int8, TensorRT: their graph is the whole UNet), and then jobs run every step whole."""
        return getattr(self.runner, "feature_cache", None)

    def fail_over(self, error: Exception) -> bool:
        """The active backend failed at run time with `error`: load the next one (False, and
        nothing changes, when none is left)."""
        if self._index + 1 >= len(self.specs):
            return False
        failed = self.active.name
        self.fallbacks.append((failed, f"run: {error}"))
        logger.warning("denoiser backend %s failed at run time (%s); falling back", failed, error)
        self.runner = self._next_runner(f"{failed} failed")
        return True

    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        while True:
            try:
                return self.runner(sample, timesteps, context)
            except Exception as error:
                if not self.fail_over(error):
                    raise
