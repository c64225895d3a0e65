"""The HTTP layer: FastAPI routes of the OpenAI-style Images API, request and response
schemas, OpenAI-shaped errors, decoded uploads.

Turns HTTP into `serve_app.flow.request.ImageRequest` and results back into responses; no
stage ever sees an HTTP object. May import serve_app.flow, serve_app.config and types of
deployments (never an engine)."""
