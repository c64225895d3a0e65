"""Cluster autoscaling: under load Serve asks for more UNet replicas, Ray's (fake multi-node)
cluster autoscaler launches worker nodes to place them, and both come back down after.

The cluster (a CPU-only head and an autoscaled `unet_worker` node type whose `unet_slot`
resource stands in for a GPU) runs in a subprocess, cluster_autoscaling_driver.py: the
other integration tests share one Ray instance in this process. Takes about 2 minutes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

DRIVER = "tests.integration.cluster_autoscaling_driver"  # run as a module from the checkout's root
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 420  # the driver's own bounded waits end it well before this (~2 min when it works)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(session_id: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[3]) == session_id:
                    pids.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return pids


def _kill_session(session_id: int) -> None:
    for pid in _session_pids(session_id):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _timeline(report: dict) -> str:
    lines, last = [], None
    for point in report.get("timeline", []):
        key = (point["phase"], json.dumps(point["states"], sort_keys=True), point["worker_nodes"])
        if key != last:
            lines.append(
                f"  {point['t']:7.1f}s {point['phase']:9s} denoiser {point['states']} "
                f"worker nodes {point['worker_nodes']}"
            )
        last = key
    return "\n".join(lines)


@pytest.mark.slow
def test_unet_replicas_and_worker_nodes_scale_up_and_down(tmp_path, tiny_model_path):
    out = tmp_path / "cluster_autoscaling.json"
    session_file = tmp_path / "cluster.session"
    port = int(os.environ.get("FUSIONSERVE_CLUSTER_TEST_PORT", "0")) or _free_port()
    command = [
        sys.executable,
        "-m",
        DRIVER,
        "--json",
        str(out),
        "--port",
        str(port),
        "--session-file",
        str(session_file),
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(
        command, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = driver.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        driver.send_signal(signal.SIGINT)  # the driver shuts its cluster down in `finally`
        try:
            output, _ = driver.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            driver.kill()
            output, _ = driver.communicate()
    finally:
        # Never leave Ray processes behind: the driver's session and the cluster's own.
        _kill_session(driver.pid)
        if session_file.is_file():
            _kill_session(int(session_file.read_text()))
            time.sleep(0.5)
            assert not _session_pids(int(session_file.read_text())), "Ray processes of the test cluster were left"

    tail = output[-6000:]
    assert out.is_file(), f"the driver wrote no report (exit {driver.returncode}):\n{tail}"
    report = json.loads(out.read_text())
    story = f"\ntimeline:\n{_timeline(report)}\ndriver output (tail):\n{tail}"

    assert report.get("ok") and driver.returncode == 0, f"driver failed: {report.get('failure')}{story}"
    # went up: Serve added UNet replicas and the cluster autoscaler added nodes to place them
    assert report["initial"]["running"] == 1 and report["initial"]["worker_nodes"] == 1, story
    assert report["peak_running_replicas"] >= 2, f"the Denoiser never scaled up{story}"
    assert report["peak_worker_nodes"] >= 2, f"no worker node was added{story}"
    # in that order: nodes are launched for the replicas Serve asked for
    assert report["t_replicas_requested"] is not None and report["t_nodes_up"] is not None, story
    assert report["t_replicas_requested"] <= report["t_nodes_up"], f"nodes came before replicas were asked for{story}"
    # came down: one replica on one worker node once the load stopped
    assert report["final_running_replicas"] == 1 and report["final_replicas"] == 1, story
    assert report["final_worker_nodes"] == 1, f"idle worker nodes were not removed{story}"
    # no request lost while replicas and nodes came and went
    requests = report["requests"]
    assert report["load_requests"] >= report["clients"], story
    assert report["probe_requests"] >= 1, story
    failed = [r for r in requests if r["status"] != 200]
    assert not failed, f"{len(failed)} of {len(requests)} requests failed: {failed[:5]}{story}"
    assert report["unanswered_requests"] == 0, f"requests still unanswered after the load stopped{story}"
    assert report["ray_processes_left"] == [], story
