"""Operating the application: the `fusionserve` CLI, `status`, deployment profiles and the
KubeRay manifest. May import everything else; nothing imports it but the CLI entry point."""
