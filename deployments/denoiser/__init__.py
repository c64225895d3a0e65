"""Stage 3: UNet replicas with step-level continuous batching.

engine (DenoiserEngine, DenoiseJob), step_batcher (the loop that admits and retires jobs
between steps), backends (torch | onnxruntime | tensorrt with fallback), pruning (a pruned
model variant), edit_latents (img2img / inpaint arithmetic), autoscaling (the queued-work
policy, imported by Ray Serve), metrics and deployment (Ray only). May import
deployments.models and deployments.common."""
