"""`fusionserve serve` (what `make serve` runs): starts, prints its URLs, serves the
README's request, and stops cleanly on Ctrl-C (SIGINT)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

PORT = int(os.environ.get("FUSIONSERVE_TEST_CLI_PORT", "8124"))


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def test_serve_command_starts_serves_and_stops_on_ctrl_c(tmp_path):
    assert port_is_free(PORT), f"port {PORT} is taken"
    fusionserve = Path(sys.executable).with_name("fusionserve")
    log = open(tmp_path / "serve.log", "w+")
    process = subprocess.Popen([str(fusionserve), "serve", "--port", str(PORT)], stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{PORT}"
    try:
        deadline = time.time() + 180
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "server did not become healthy in 180 s"
            time.sleep(1)
        response = httpx.post(f"{url}/v1/images/generations", timeout=120, json={
            "prompt": "portrait of an Asian man, age:35, smiling expression, wearing glasses",
            "size": "64x64", "seed": 7, "num_inference_steps": 2})
        assert response.status_code == 200 and response.json()["data"][0]["b64_json"]
        deadline = time.time() + 30
        while "Press Ctrl-C to stop." not in (tmp_path / "serve.log").read_text():
            assert time.time() < deadline
            time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            status = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    output = (tmp_path / "serve.log").read_text()
    assert status == 0, output
    assert f"API:        http://127.0.0.1:{PORT}" in output
    assert "Dashboard:  http://" in output
    assert "stopped." in output
    deadline = time.time() + 15
    while not port_is_free(PORT):  # the proxy is gone with Ray
        assert time.time() < deadline, "port still served after Ctrl-C"
        time.sleep(0.5)
