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
    """Export the UNet with dynamic batch and latent size (once; later calls reuse the file)."""
    if target.is_file():
        return target
    unet = loading.load_unet(model_path)
    names = ["sample", "timesteps", "context"]
    return _export(_WholeUNet(unet), _example_inputs(unet), target, names, ["noise"], UNET_AXES)


class _WholeKeepingFeatures(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        noise, features = DeepCacheUNet(self.unet).full(sample, timesteps, context, [ONNX_CACHE_BRANCH])
        return noise, features[ONNX_CACHE_BRANCH]


class _Shallow(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, deep_features: torch.Tensor
    ) -> torch.Tensor:
        return DeepCacheUNet(self.unet).shallow(sample, timesteps, context, deep_features, ONNX_CACHE_BRANCH)


ONNX_CACHE_BRANCH = 0  # the graphs are exported for one branch: the cheapest, the one the table measures


def export_feature_cache_onnx(model_path: Path, folder: Path) -> tuple[Path, Path]:
    """The UNet as two more graphs for feature caching at branch 0: whole, also returning the
    deep features, and shallow, from them (the whole graph alone stays the plain forward)."""
    whole, shallow = folder / "unet-fp32-cache-whole-b0.onnx", folder / "unet-fp32-cache-shallow-b0.onnx"
    if whole.is_file() and shallow.is_file():
        return whole, shallow
    unet = loading.load_unet(model_path)
    inputs = _example_inputs(unet)
    with torch.inference_mode():
        deep = DeepCacheUNet(unet).full(*inputs, [ONNX_CACHE_BRANCH])[1][ONNX_CACHE_BRANCH]
    deep_axes = {0: "batch", 2: "deep_height", 3: "deep_width"}
    names = ["sample", "timesteps", "context"]
    _export(
        _WholeKeepingFeatures(unet),
        inputs,
        whole,
        names,
        ["noise", "deep_features"],
        {**UNET_AXES, "deep_features": deep_axes},
    )
    _export(
        _Shallow(unet),
        (*inputs, deep),
        shallow,
        [*names, "deep_features"],
        ["noise"],
        {**UNET_AXES, "deep_features": deep_axes},
    )
    return whole, shallow


def _folder_lock(folder: Path) -> FileLock:
    """Replicas starting together export once: the others wait, then reuse the file."""
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(folder / ".lock")


def onnx_model_file(model_path: Path, precision: str) -> Path:
    if precision not in ("fp32", "int8"):
        raise BackendUnavailable(f"onnxruntime backend: precision {precision} is not offered (fp32, int8)")
    folder = cache_root() / model_fingerprint(model_path)
    with _folder_lock(folder):
        fp32 = export_onnx(model_path, folder / "unet-fp32.onnx")
        return fp32 if precision == "fp32" else _quantized(fp32, folder / "unet-int8.onnx")


def _quantized(fp32: Path, int8: Path) -> Path:
    if not int8.is_file():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        partial = int8.with_suffix(".partial.onnx")
        quantize_dynamic(str(fp32), str(partial), weight_type=QuantType.QInt8)
        partial.replace(int8)
    return int8


def _onnx_feeds(sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> dict:
    """The UNet graphs' inputs, as their export named and typed them."""
    return {
        "sample": sample.float().numpy(),
        "timesteps": timesteps.long().numpy(),
        "context": context.float().numpy(),
    }


class OnnxFeatureCache:
    """Feature caching on ONNX Runtime: the two graphs of `export_feature_cache_onnx` (fp32,
    branch 0), exported and loaded at the first cached job; if that fails, `supports` says no
    from then on and jobs run every step whole (logged)."""

    def __init__(self, model_path: Path, options: object):
        self.model_path, self.options = model_path, options
        self._sessions: tuple | None = None
        self._failed = False
        self._lock = threading.Lock()

    def supports(self, branch_id: int) -> bool:
        return branch_id == ONNX_CACHE_BRANCH and not self._failed and self._load() is not None

    def _load(self) -> tuple | None:
        with self._lock:
            if self._sessions is None and not self._failed:
                try:
                    import onnxruntime

                    folder = cache_root() / model_fingerprint(self.model_path)
                    with _folder_lock(folder):
                        paths = export_feature_cache_onnx(self.model_path, folder)
                    self._sessions = tuple(
                        onnxruntime.InferenceSession(str(path), self.options, providers=["CPUExecutionProvider"])
                        for path in paths
                    )
                except Exception:
                    logger.exception("ONNX feature-cache graphs unavailable: cached jobs run every step whole")
                    self._failed = True
            return self._sessions

    def full(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        branch_ids: Iterable[int],
        image_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        sessions = self._load()
        assert sessions is not None and image_embeds is None, "only the production UNet runs on ONNX Runtime"
        noise, deep = sessions[0].run(None, _onnx_feeds(sample, timesteps, context))
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
        sessions = self._load()
        assert sessions is not None and branch_id == ONNX_CACHE_BRANCH
        feeds = {**_onnx_feeds(sample, timesteps, context), "deep_features": deep_features.float().numpy()}
        (noise,) = sessions[1].run(None, feeds)
        return torch.from_numpy(noise)


class OnnxRunner:
    """The UNet on ONNX Runtime: `runner(sample, timesteps, context) -> noise`; `feature_cache`
    at fp32 (int8 runs every step whole: its quantized graph is the whole UNet)."""

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
        self.feature_cache = OnnxFeatureCache(model_path, options) if spec.precision == "fp32" else None

    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        (noise,) = self.session.run(None, _onnx_feeds(sample, timesteps, context))
        return torch.from_numpy(noise)


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


def ip_adapter_runner(model_path: Path, shared: TorchRunner | None = None) -> AdapterUNet:
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
    def shareable_torch_runner(self) -> TorchRunner | None:
        """The active backend when the image-prompt adapter can run on its weights (an eager
        torch UNet; a compiled one's guards would not survive the adapter's processor swap)."""
        runner = self.runner
        return runner if isinstance(runner, TorchRunner) and not runner.compiled else None

    @property
    def feature_cache(self) -> TorchFeatureCache | OnnxFeatureCache | None:
        """The active backend's feature caching across steps; None where it has none (ONNX
        Runtime int8, TensorRT: their graph is the whole UNet), and then jobs run every step whole."""
        return getattr(self.runner, "feature_cache", None)

    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        while True:
            try:
                return self.runner(sample, timesteps, context)
            except Exception as error:
                if self._index + 1 >= len(self.specs):
                    raise
                failed = self.active.name
                self.fallbacks.append((failed, f"run: {error}"))
                logger.warning("denoiser backend %s failed at run time (%s); falling back", failed, error)
                self.runner = self._next_runner(f"{failed} failed")
