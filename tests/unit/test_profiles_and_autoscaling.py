"""Deployment profiles merged over serve_config.yaml, and the queued-work autoscaling policy."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.denoiser.autoscaling import QueuedWorkPolicy
from serve_app.ops import cli
from serve_app.ops.profiles import apply_profile, merge, profile_names


def deployments(config: dict) -> dict:
    return {entry["name"]: entry for entry in config["applications"][0]["deployments"]}


def test_every_profile_is_a_valid_serve_config():
    assert profile_names() == ["cluster", "laptop", "single-gpu"]
    for name in profile_names():
        ServeDeploySchema.model_validate(cli.load_serve_config("serve_config.yaml", name))


def test_laptop_is_serve_config_as_is_and_gpu_profiles_give_the_unet_a_card():
    plain = cli.load_serve_config("serve_config.yaml")
    assert cli.load_serve_config("serve_config.yaml", "laptop") == plain
    for name in ("single-gpu", "cluster"):
        config = cli.load_serve_config("serve_config.yaml", name)
        denoiser = deployments(config)["Denoiser"]
        assert denoiser["ray_actor_options"]["num_gpus"] == 1
        settings, _, _ = cli.split_app_config(config)
        # a replica holds at most one batch: max_ongoing_requests = the denoiser's batch size
        assert denoiser["max_ongoing_requests"] == settings.denoiser.max_batch_size == 16
        assert settings.denoiser.backends[0].precision == "fp16" and settings.denoiser.backends[0].device == "cuda"
        assert deployments(config)["TextEncoder"]["ray_actor_options"].get("num_gpus", 0) == 0
    cluster = cli.load_serve_config("serve_config.yaml", "cluster")
    assert cluster["proxy_location"] == "EveryNode"
    ingress = deployments(cluster)["Ingress"]
    assert "num_replicas" not in ingress and ingress["autoscaling_config"]["max_replicas"] == 4  # null removed it
    policy = deployments(cluster)["Denoiser"]["autoscaling_config"]["policy"]
    assert policy["policy_function"] == "deployments.denoiser.autoscaling:QueuedWorkPolicy"
    # the rest of serve_config.yaml is untouched
    assert cluster["applications"][0]["args"]["prompt"] == plain["applications"][0]["args"]["prompt"]


def test_merge_semantics():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 2, "c": 3}
    assert merge(base, {"a": {"y": [3]}, "b": None, "d": 4}) == {"a": {"x": 1, "y": [3]}, "c": 3, "d": 4}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 2, "c": 3}  # not modified
    config = {"applications": [{"args": {}, "deployments": [{"name": "Denoiser", "max_ongoing_requests": 8}]}]}
    merged = apply_profile(
        config,
        {
            "deployments": [
                {"name": "Denoiser", "ray_actor_options": {"num_gpus": 1}},
                {"name": "Extra", "num_replicas": 1},
            ]
        },
    )
    assert deployments(merged) == {
        "Denoiser": {"name": "Denoiser", "max_ongoing_requests": 8, "ray_actor_options": {"num_gpus": 1}},
        "Extra": {"name": "Extra", "num_replicas": 1},
    }


def test_unknown_profile_is_a_clear_error(capsys):
    with pytest.raises(cli.CliError, match="unknown profile 'gpu-farm'; known: cluster, laptop, single-gpu"):
        cli.load_serve_config("serve_config.yaml", "gpu-farm")
    assert cli.main(["export-config", "--profile", "gpu-farm"]) == 1  # as a config error always exited
    assert capsys.readouterr().err.startswith("error: unknown profile 'gpu-farm'")


def test_export_config_writes_the_merged_config(tmp_path):
    out = tmp_path / "cluster.yaml"
    assert cli.main(["export-config", "--profile", "cluster", "-o", str(out)]) == 0
    assert yaml.safe_load(out.read_text()) == cli.load_serve_config("serve_config.yaml", "cluster")


def context(work: dict, jobs: dict, queued_at_handles=0.0, target=1, metrics=True):
    aggregated = {"queued_work": work, "jobs": jobs} if metrics else {}
    return SimpleNamespace(
        aggregated_metrics=aggregated, total_queued_requests=queued_at_handles, target_num_replicas=target
    )


def test_queued_work_policy_sizes_replicas_to_the_work_not_the_request_count():
    policy = QueuedWorkPolicy(target_work_per_replica=1000)
    # the same 4 requests per replica: small ones fit one replica, large ones need five
    small, large = context({"r1": 400.0}, {"r1": 4}), context({"r1": 4600.0}, {"r1": 4})
    assert policy(small)[0] == 1 and policy(large)[0] == 5
    assert policy(context({"r1": 900.0, "r2": 1300.0}, {"r1": 2, "r2": 2}))[0] == 3  # summed over replicas
    assert policy(context({"r1": 0.0}, {"r1": 0}))[0] == 0  # idle: Serve clamps to min_replicas after its delay


def test_requests_queued_at_the_handles_count_at_the_mean_job_work():
    policy = QueuedWorkPolicy(target_work_per_replica=1000)
    desired, state = policy(context({"r1": 1000.0}, {"r1": 4}, queued_at_handles=8))  # 8 more of 250 each
    assert desired == 3 and state["queued_work"] == 3000.0
    assert policy(context({"r1": 0.0}, {"r1": 0}, queued_at_handles=2))[0] == 2  # idle replicas, waiting requests


def test_without_reports_the_policy_holds():
    assert QueuedWorkPolicy()(context({}, {}, target=3, metrics=False))[0] == 3
    with pytest.raises(ValueError):
        QueuedWorkPolicy(target_work_per_replica=0)
