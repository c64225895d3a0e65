"""The request flow: the one request type, the pipeline (plain async over four stage
handles, and its in-process variant), what a request used (`usage`), the step controller,
the quality guard (live and offline) and the ingress metrics.

No HTTP here. May import serve_app.config and the engines and their public types in deployments."""
