"""Named deployment profiles (configs/profiles/NAME.yaml) merged over serve_config.yaml.

A profile holds only what differs from serve_config.yaml (the laptop profile): `args`
(merged into the application's args), `deployments` (merged by name into the
application's deployments), and top-level keys such as `proxy_location`. Dicts merge key
by key, anything else replaces, and `null` removes a key (e.g. `num_replicas: null` where
the profile autoscales instead).
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

# configs/profiles/, shipped as package data (pyproject.toml: package-dir fusionserve_configs)
PROFILES_DIR = Path(str(resources.files("fusionserve_configs") / "profiles"))
META_KEYS = {"description"}


def profile_names() -> list[str]:
    return sorted(path.stem for path in PROFILES_DIR.glob("*.yaml"))


def load_profile(name: str) -> dict[str, Any]:
    """A profile by name (configs/profiles/NAME.yaml) or by path."""
    path = Path(name)
    if not path.suffix:
        path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(profile_names())} (or a path to a YAML file)")
    profile = yaml.safe_load(path.read_text()) or {}
    if not isinstance(profile, dict):
        raise ValueError(f"profile {path} must be a YAML mapping")
    return profile


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """`overlay` over `base`: dicts merge recursively, other values replace, None deletes."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_profile(config: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any]:
    """serve_config.yaml's content with `profile` applied (a new dict)."""
    profile = dict(profile)
    args = profile.pop("args", None) or {}
    deployments = profile.pop("deployments", None) or []
    for key in META_KEYS:
        profile.pop(key, None)
    config = merge(config, profile)
    application = config["applications"][0]
    application["args"] = merge(application.get("args") or {}, args)
    by_name = {entry["name"]: entry for entry in application.get("deployments") or []}
    for entry in deployments:
        name = entry.get("name")
        if not name:
            raise ValueError("every deployment entry of a profile needs a `name`")
        by_name[name] = merge(by_name.get(name, {"name": name}), entry)
    application["deployments"] = list(by_name.values())
    return config
