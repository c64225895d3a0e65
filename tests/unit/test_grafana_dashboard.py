"""The Grafana dashboard only charts metrics that exist: ours in the code, Serve's in Ray."""

from __future__ import annotations

import json
import re
from pathlib import Path

import ray

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = ("_total", "_bucket", "_sum", "_count")


def metric_base(name: str) -> str:
    name = name.removeprefix("ray_")
    for suffix in SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def test_every_charted_metric_is_defined():
    dashboard = json.loads((ROOT / "configs" / "grafana" / "fusionserve.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    charted = {metric_base(m) for expr in expressions for m in re.findall(r"\bray_[a-z_]+", expr)}
    ours = {m for m in charted if m.startswith("fusionserve_")}
    source = "".join(p.read_text() for folder in ("deployments", "serve_app") for p in (ROOT / folder).rglob("*.py"))
    defined = set(re.findall(r'"(fusionserve_[a-z_]+)"', source))
    assert ours and ours <= defined, ours - defined
    ray_source = "".join(p.read_text() for p in (Path(ray.__file__).parent / "serve" / "_private").glob("*.py"))
    serve_metrics = charted - ours
    assert serve_metrics and all(f'"{m}"' in ray_source for m in serve_metrics), serve_metrics
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
