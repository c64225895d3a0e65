"""The HTTP layer of the OpenAI-style Images API: `routes` (the FastAPI app and handlers),
`schemas` (request bodies and response models, what /docs shows), `errors` (the OpenAI error
shape), `image_request` (checks against the limits, body -> ImageRequest), `uploads`
(decoded and checked images), `image_output` (the answer's png | jpeg | webp encoding),
`api_keys` (the key file) and `auth` (API keys and per-key limits at the ingress).

Turns HTTP into `serve_app.flow.request.ImageRequest` and results back into responses; no
stage ever sees an HTTP object. May import serve_app.flow, serve_app.config and types and
constants of deployments (never an engine)."""
