"""The request flow: the one request type, the pipeline (plain async over four stage
handles), the step controller, the quality guard (live and offline) and the ingress metrics.

No HTTP here. May import serve_app.config and the engines' public types in deployments."""
