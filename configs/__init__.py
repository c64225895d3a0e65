"""The project's configuration files, installed as the package `fusionserve_configs`.

pyproject.toml maps this folder onto that package name (`package-dir`) and ships its YAML and
JSON as package data, so an installed copy reads the same files as a checkout, through
`importlib.resources.files("fusionserve_configs")`: models/ (model presets), profiles/
(deployment profiles), samplers/ (the step controller's measured tables) and
serve_config.yaml (a link to the repository's own, the default `--config` outside a
checkout). kuberay/ and grafana/ are for operators and stay unshipped.
Holds no code; imports nothing."""
