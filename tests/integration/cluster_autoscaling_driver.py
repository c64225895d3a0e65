"""Cluster autoscaling on one machine: Ray's fake multi-node autoscaler + Serve autoscaling.

Starts its own Ray cluster (a head node and an autoscaled `unet_worker` node type, each
fake worker node a real raylet on this machine), serves the app on it, drives bounded
load, and records how Denoiser replicas and worker nodes go up and then down again.

    .venv/bin/python -m tests.integration.cluster_autoscaling_driver --json out.json

Run by tests/integration/test_cluster_autoscaling.py in a subprocess: the other
integration tests share one Ray instance in the pytest process, this one needs a cluster
of its own. The cluster is isolated from any other Ray instance on the machine: its own
temp dir (so `/tmp/ray/ray_current_cluster`, which a bare `ray.init()` reads, is never
touched), free ports for GCS, the Ray client server and the dashboard agent, and no
`ray stop --force` (which `ray.cluster_utils.AutoscalingCluster` runs and which kills
every Ray process on the machine). Every process of the cluster runs in one session made
for it, and shutdown kills exactly that session.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from serve_app.config import apply_ray_environment

apply_ray_environment()  # before Ray starts: the cluster's processes inherit it
# `ray start` turns token auth on by default in Ray 2.60 while a driver that connects does
# not: one mode for both (a throwaway localhost cluster; set RAY_AUTH_MODE=token to test it).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import httpx  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import AutoscalingCluster  # noqa: E402

APP_NAME = "fusionserve"
UNET_RESOURCE = "unet_slot"  # stands in for a GPU: one per worker node, one per UNet replica
WORKER_TYPE = "unet_worker"
OBJECT_STORE_BYTES = 150 * 1024 * 1024  # per node; Ray's default is 30% of RAM for each

# The fake cluster: a head with CPU only (every light stage fits there) and one worker
# node type that carries what a UNet replica asks for. Node idle timeout: 0.05 min = 3 s.
HEAD_RESOURCES = {"CPU": 2}
WORKER_NODE_TYPES = {
    WORKER_TYPE: {
        "resources": {"CPU": 1, UNET_RESOURCE: 1, "object_store_memory": OBJECT_STORE_BYTES},
        "node_config": {},
        "min_workers": 0,
        "max_workers": 3,
    },
}
IDLE_TIMEOUT_MINUTES = 0.05

# Deployment options on top of serve_config.yaml (the laptop profile). Light stages:
# one replica each with small CPU shares, so they all fit on the head; the Denoiser
# asks for a unet_slot, which only worker nodes have.
DEPLOYMENT_OPTIONS = {
    "Ingress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}},
    "PromptOptimizer": {"num_replicas": 1, "autoscaling_config": None, "ray_actor_options": {"num_cpus": 0.1}},
    "TextEncoder": {"num_replicas": 1, "autoscaling_config": None, "ray_actor_options": {"num_cpus": 0.2}},
    "VaeCodec": {"num_replicas": 1, "autoscaling_config": None, "ray_actor_options": {"num_cpus": 0.2}},
    "Denoiser": {
        "max_ongoing_requests": 2,
        "ray_actor_options": {"num_cpus": 0.5, "resources": {UNET_RESOURCE: 1}},
        "autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": 3,
            "initial_replicas": 1,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 2,
            "downscale_delay_s": 5,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 2,
        },
    },
}
SETTINGS_OVERRIDES = {
    "num_threads": 1,
    "stage_threads": {"TextEncoder": 1, "Denoiser": 1, "VaeCodec": 1},
    "denoiser": {"max_batch_size": 2},
}

LOAD_BODY = {"prompt": "portrait of a smiling woman", "size": "256x256", "seed": 1, "num_inference_steps": 40}
PROBE_BODY = {"prompt": "portrait", "size": "64x64", "seed": 2, "num_inference_steps": 10}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class LocalAutoscalingCluster(AutoscalingCluster):
    """`AutoscalingCluster` that works from the wheel and leaves other Ray instances alone.

    As shipped, `_generate_config` reads `fake_multi_node/example.yaml`, which the wheel
    lacks, and `start()`/`shutdown()` run `ray stop --force` (every Ray process on the
    machine) on the default ports (GCS 6379, client 10001, dashboard agent 52365).
    """

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        # The `fake_multi_node/example.yaml` of Ray's repository, inline.
        config = {
            "cluster_name": "fusionserve-fake",
            "max_workers": sum(t.get("max_workers", 0) for t in worker_node_types.values()),
            "provider": {
                "type": "fake_multinode",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
            },
            "available_node_types": dict(worker_node_types),
            "head_node_type": "ray.head.default",
            "auth": {},
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": 0.1,
            "docker": {},
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
        }
        config["available_node_types"]["ray.head.default"] = {
            "resources": dict(head_resources),
            "node_config": {},
            "max_workers": 0,
        }
        config.update(config_kwargs)
        return config

    def start(self, _system_config=None, override_env=None):
        self.node_ip = ray._private.services.get_node_ip_address()
        self.gcs_port = free_port()
        self.address = f"{self.node_ip}:{self.gcs_port}"
        # The fake provider starts worker raylets against provider.gcs_address (default :6379).
        self._config["provider"]["gcs_address"] = self.address
        self.temp_dir = tempfile.mkdtemp(prefix="fsray-", dir="/tmp")  # short: socket paths <= 107 chars
        config_file = os.path.join(self.temp_dir, "autoscaling.json")
        with open(config_file, "w") as f:
            json.dump(self._config, f)
        resources = dict(self._head_resources)
        cmd = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            f"--autoscaling-config={config_file}",
            f"--port={self.gcs_port}",
            f"--node-ip-address={self.node_ip}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--include-dashboard=false",
            f"--temp-dir={self.temp_dir}",
            f"--num-cpus={resources.pop('CPU', 1)}",
            f"--num-gpus={resources.pop('GPU', 0)}",
            f"--object-store-memory={resources.pop('object_store_memory', OBJECT_STORE_BYTES)}",
            "--disable-usage-stats",
        ]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        if _system_config is not None:
            cmd.append(f"--system-config={json.dumps(_system_config, separators=(',', ':'))}")
        env = os.environ.copy()
        env.pop("RAY_ADDRESS", None)
        env.update({"AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1", "RAY_USAGE_STATS_ENABLED": "0"})
        env.update(override_env or {})
        # A session of its own: `ray start` leads it, and every process of the cluster
        # (head daemons, the fake worker nodes the autoscaler starts, their workers) stays
        # in it, so shutdown() can kill exactly these processes.
        process = subprocess.Popen(
            cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.session_id = process.pid
        output, _ = process.communicate(timeout=120)
        if process.returncode != 0:
            self.shutdown()
            raise RuntimeError(f"`ray start --head` failed ({process.returncode}):\n{output}")

    def session_pids(self) -> list[int]:
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == self.session_id:  # fields after the name: state ppid pgrp session
                pids.append(int(entry))
        return pids

    def rss_mib(self) -> int:
        """Resident memory of all the cluster's processes (shared pages counted per process)."""
        total_kib = 0
        for pid in self.session_pids():
            try:
                with open(f"/proc/{pid}/status") as f:
                    total_kib += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
            except OSError:
                continue
        return total_kib // 1024

    def shutdown(self, keep_temp: bool = False):
        session = getattr(self, "session_id", None)
        if session is not None:
            for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                for pid in self.session_pids():
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + wait_s
                while self.session_pids() and time.monotonic() < deadline:
                    time.sleep(0.1)
            left = self.session_pids()
            if left:
                print(f"warning: Ray processes left after shutdown: {left}", file=sys.stderr)
        temp_dir = getattr(self, "temp_dir", None)
        if temp_dir and not keep_temp:
            shutil.rmtree(temp_dir, ignore_errors=True)


def build_app():
    from serve_app.app import build_application
    from serve_app.config import AppSettings
    from serve_app.ops.cli import DEFAULT_CONFIG, load_serve_config, split_app_config
    from serve_app.ops.profiles import merge  # the profiles' semantics: dicts merge, None deletes

    settings, options, _ = split_app_config(load_serve_config(DEFAULT_CONFIG), model="tiny")
    settings = AppSettings.model_validate(merge(settings.model_dump(), SETTINGS_OVERRIDES))
    options = merge(options, DEPLOYMENT_OPTIONS)
    return build_application(settings, options), options


class Observer:
    """Samples Denoiser replicas (serve.status) and alive worker nodes (ray.nodes)."""

    def __init__(self, t0: float, cluster: LocalAutoscalingCluster):
        self.t0 = t0
        self.cluster = cluster
        self.timeline: list[dict] = []

    def sample(self, phase: str) -> dict:
        from ray import serve

        states: dict[str, int] = {}
        try:
            app = serve.status().applications.get(APP_NAME)
            if app and "Denoiser" in app.deployments:
                states = {str(getattr(k, "value", k)): v for k, v in app.deployments["Denoiser"].replica_states.items()}
        except Exception as exc:  # the controller may be busy; keep sampling
            states = {"error": repr(exc)}
        workers = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get(UNET_RESOURCE)]
        point = {
            "t": round(time.monotonic() - self.t0, 2),
            "phase": phase,
            "running": states.get("RUNNING", 0),
            "replicas": sum(v for k, v in states.items() if k != "error"),  # every state (starting, stopping...)
            "states": states,
            "worker_nodes": len(workers),
            "rss_mib": self.cluster.rss_mib(),
        }
        if not self.timeline or any(point[k] != self.timeline[-1][k] for k in ("phase", "states", "worker_nodes")):
            print(f"[{point['t']:6.1f}s] {phase:9s} denoiser {states}  worker nodes {len(workers)}", flush=True)
        self.timeline.append(point)
        return point

    def wait(self, phase: str, done, timeout_s: float, period_s: float = 0.5) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            point = self.sample(phase)
            if done(point):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(period_s)


class Load:
    """N client threads posting requests until stopped; every response recorded."""

    def __init__(self, url: str, body: dict, clients: int, t0: float, interval_s: float = 0.0):
        self.url, self.body, self.t0, self.interval_s = url, body, t0, interval_s
        self.stop_event = threading.Event()
        self.results: list[dict] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        self.unfinished = 0

    def _client(self):
        with httpx.Client(timeout=180) as client:
            while not self.stop_event.is_set():
                start = time.monotonic()
                try:
                    response = client.post(f"{self.url}/v1/images/generations", json=self.body)
                    status, error = response.status_code, (None if response.status_code == 200 else response.text[:300])
                except Exception as exc:
                    status, error = None, repr(exc)
                with self.lock:
                    self.results.append(
                        {
                            "t": round(start - self.t0, 2),
                            "latency_s": round(time.monotonic() - start, 2),
                            "status": status,
                            "error": error,
                        }
                    )
                if self.interval_s:
                    self.stop_event.wait(self.interval_s)

    def start(self):
        for thread in self.threads:
            thread.start()
        return self

    def stop(self, timeout_s: float = 90):
        """Stop sending; wait (bounded) for the requests in flight to answer."""
        self.stop_event.set()
        deadline = time.monotonic() + timeout_s
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        with self.lock:
            self.unfinished = sum(thread.is_alive() for thread in self.threads)


def first_time(timeline, predicate):
    return next((p["t"] for p in timeline if predicate(p)), None)


def run(args, report: dict) -> dict:
    from ray import serve

    t0 = time.monotonic()
    report.update({"ok": False, "port": args.port, "clients": args.clients, "deployment_options": None})
    cluster = LocalAutoscalingCluster(HEAD_RESOURCES, WORKER_NODE_TYPES, idle_timeout_minutes=IDLE_TIMEOUT_MINUTES)
    observer = Observer(t0, cluster)
    load = probes = None
    try:
        application, options = build_app()
        report["deployment_options"] = options
        cluster.start()
        if args.session_file:  # for the caller's clean-up if this process gets killed
            Path(args.session_file).write_text(str(cluster.session_id))
        report["cluster"] = {
            "gcs_address": cluster.address,
            "temp_dir": cluster.temp_dir,
            "head_resources": HEAD_RESOURCES,
            "worker_node_types": WORKER_NODE_TYPES,
            "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        }
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        report["t_cluster_up"] = round(time.monotonic() - t0, 1)
        serve.start(http_options={"host": "127.0.0.1", "port": args.port}, proxy_location="HeadOnly")
        url = f"http://127.0.0.1:{args.port}"

        # (1) one Denoiser replica, on the one worker node launched for it. serve.run waits
        # for the application: in a thread, so the timeline shows the node coming up.
        deploy_error: list[BaseException] = []

        def deploy():
            try:
                serve.run(application, name=APP_NAME, route_prefix="/")
            except BaseException as exc:  # noqa: BLE001 - reported below
                deploy_error.append(exc)

        deployer = threading.Thread(target=deploy, daemon=True)
        deployer.start()
        ok = observer.wait(
            "start",
            lambda p: (
                bool(deploy_error)
                or (not deployer.is_alive() and p["running"] == 1 and p["replicas"] == 1 and p["worker_nodes"] == 1)
            ),
            args.start_timeout,
        )
        if deploy_error:
            raise RuntimeError(f"serve.run failed: {deploy_error[0]!r}") from deploy_error[0]
        deadline = time.monotonic() + 30
        while ok:
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                ok = False
            time.sleep(0.5)
        report["t_app_ready"] = round(time.monotonic() - t0, 1)
        report["initial"] = observer.timeline[-1]
        if not ok:
            report["failure"] = f"app not ready with 1 Denoiser replica on 1 worker node within {args.start_timeout}s"
            return report

        # (2) bounded load until the Denoiser runs max replicas on their own worker nodes.
        load = Load(url, LOAD_BODY, args.clients, t0).start()
        load_start = time.monotonic()
        report["t_load_start"] = round(load_start - t0, 1)
        reached = observer.wait("load", lambda p: p["running"] >= 3 and p["worker_nodes"] >= 3, args.load_timeout)
        report["reached_max"] = reached
        if reached and args.hold_s:  # a little load on the grown deployment: new replicas serve
            observer.wait("load", lambda p: False, args.hold_s)
        report["t_load_stop"] = round(time.monotonic() - t0, 1)
        load.stop()
        report["t_load_drained"] = round(time.monotonic() - t0, 1)

        # (3) no load (one light probe every 2 s): back to 1 replica and 1 worker node.
        probes = Load(url, PROBE_BODY, 1, t0, interval_s=2.0).start()
        down = observer.wait(
            "cooldown", lambda p: p["replicas"] == 1 and p["running"] == 1 and p["worker_nodes"] == 1, args.down_timeout
        )
        probes.stop()
        report["t_down"] = round(time.monotonic() - t0, 1)
        if not down:
            report["failure"] = f"did not scale back to 1 replica / 1 worker node within {args.down_timeout}s"
        report["ok"] = down
        return report
    except Exception as exc:
        report["failure"] = f"driver error: {exc!r}"
        raise
    finally:
        for client in (load, probes):
            if client is not None:
                client.stop(timeout_s=10)
        timeline = observer.timeline
        loaded = [p for p in timeline if p["phase"] == "load"]
        cooldown = [p for p in timeline if p["phase"] == "cooldown"]
        report["timeline"] = timeline
        report["requests"] = (load.results if load else []) + (probes.results if probes else [])
        report["load_requests"] = len(load.results) if load else 0
        report["probe_requests"] = len(probes.results) if probes else 0
        report["unanswered_requests"] = sum(c.unfinished for c in (load, probes) if c is not None)
        report["peak_running_replicas"] = max((p["running"] for p in timeline), default=0)
        report["peak_replicas"] = max((p["replicas"] for p in timeline), default=0)
        report["peak_worker_nodes"] = max((p["worker_nodes"] for p in timeline), default=0)
        report["peak_rss_mib"] = max((p["rss_mib"] for p in timeline), default=0)
        report["final_running_replicas"] = timeline[-1]["running"] if timeline else None
        report["final_replicas"] = timeline[-1]["replicas"] if timeline else None
        report["final_worker_nodes"] = timeline[-1]["worker_nodes"] if timeline else None
        report["t_replicas_requested"] = first_time(loaded, lambda p: p["replicas"] > 1)
        report["t_nodes_up"] = first_time(loaded, lambda p: p["worker_nodes"] > 1)
        report["t_max_running"] = first_time(loaded, lambda p: p["running"] >= 3)
        report["t_max_nodes"] = first_time(loaded, lambda p: p["worker_nodes"] >= 3)
        report["t_replicas_down"] = first_time(cooldown, lambda p: p["replicas"] == 1)
        report["t_nodes_down"] = first_time(cooldown, lambda p: p["worker_nodes"] == 1)
        try:
            ray.shutdown()  # Serve's graceful shutdown would drain ~30 s: the cluster goes whole
        finally:
            cluster.shutdown(keep_temp=args.keep_temp or not report.get("ok"))
            report["ray_processes_left"] = cluster.session_pids() if getattr(cluster, "session_id", None) else []
        report["wall_s"] = round(time.monotonic() - t0, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--port", type=int, default=8124, help="Serve HTTP port (the shared test Ray uses 8123)")
    parser.add_argument("--clients", type=int, default=6, help="concurrent load clients")
    parser.add_argument("--start-timeout", type=float, default=120)
    parser.add_argument("--load-timeout", type=float, default=90)
    parser.add_argument("--hold-s", type=float, default=3, help="load kept on after the max is reached")
    parser.add_argument("--down-timeout", type=float, default=120)
    parser.add_argument("--keep-temp", action="store_true", help="keep the cluster's temp dir (logs)")
    parser.add_argument("--session-file", help="write the cluster's session id (all its processes) here")
    args = parser.parse_args(argv)

    def terminate(signum, frame):  # SIGTERM runs the clean-up in `finally` too
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    report: dict = {}
    try:
        run(args, report)
    finally:
        if args.json and report:
            Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    summary = {k: v for k, v in report.items() if k not in ("timeline", "requests", "deployment_options")}
    print(json.dumps(summary, indent=1, default=str))
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
