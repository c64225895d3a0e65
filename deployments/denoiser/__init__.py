"""Stage 3: UNet replicas with step-level continuous batching.

engine (DenoiserEngine, DenoiseJob), settings (DenoiserSettings, BackendSpec; no torch),
variant (UNetVariant: which UNet runs a job, the batch key), step_batcher (the loop that
plans, runs and applies each step and admits and retires jobs between steps), backends
(torch | onnxruntime | tensorrt with fallback), pruning (a pruned model variant),
edit_latents (img2img / inpaint arithmetic), autoscaling (the queued-work policy, imported
by Ray Serve), metrics and deployment (Ray only: the thin `@serve.deployment` wrapper).
May import deployments.models and deployments.common."""
