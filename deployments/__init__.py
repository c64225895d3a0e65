"""The four pipeline stages, one package each, plus the models they load.

prompt/ -> text_encoder/ -> denoiser/ -> vae/ is the order a request takes; models/ builds
and resolves model folders; common/ holds what more than one stage uses. Each stage package
keeps its engine(s) (plain Python: tensors and dataclasses in and out, no Ray at import
time), its settings model, its metrics and a thin `deployment.py` that wraps the engine in
`@serve.deployment`. Nothing here imports `serve_app`."""
