"""The four pipeline stages. Each module holds a plain engine class (no Ray at import
time) and a `build_deployment()` that wraps it in a thin `@serve.deployment`."""
