"""Prometheus metrics of `serve`: the port binds to 127.0.0.1 unless told otherwise, and the
gauges (retry queue, pending users, requests today) follow the state, against loopback Crisp."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import crisp_destination, crisp_env, write_config, write_csv
from crisp_server import CrispServer

from audience_sync.config import ServiceConfig
from audience_sync.metrics import RunMetrics

pytestmark = pytest.mark.timeout(180)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_metrics_port_binds_to_localhost_by_default() -> None:
    assert ServiceConfig().metrics_host == "127.0.0.1"
    metrics = RunMetrics(ServiceConfig(metrics_port=free_port()))
    metrics.start()
    try:
        assert metrics.server.server_address[0] == "127.0.0.1"
        port = metrics.server.server_address[1]
        assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 200
    finally:
        metrics.server.shutdown()
        metrics.server.server_close()


def gauge(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            return float(match.group(2))
    return None


@pytest.mark.slow
def test_serve_exposes_the_retry_queue_pending_users_and_requests_today(
    tmp_path: Path, state_url: str, crisp: CrispServer
) -> None:
    # Two users Crisp can create; one without an email, skipped into the retry queue.
    write_csv(tmp_path / "vip.csv", "user_id,email\nu1,a@x.io\nu2,b@x.io\nu3,\n")
    port = free_port()
    config = write_config(
        tmp_path / "c.toml",
        state_url=state_url,
        destination=crisp_destination(crisp),
        audiences=[{"name": "VIP", "source": "vip.csv", "interval": "1s"}],
        extra=f"\n[service]\nmetrics_port = {port}\n",
    )
    log = (tmp_path / "serve.log").open("wb")
    executable = Path(sys.executable).parent / "audience-sync"
    proc = subprocess.Popen(
        [str(executable), "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **crisp_env()},
    )
    try:
        deadline = time.monotonic() + 90
        text = ""
        while time.monotonic() < deadline:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            except httpx.TransportError:
                text = ""
            if gauge(text, "audience_sync_retry_queue_users", audience="vip") is not None:
                break
            time.sleep(0.2)
        labels = {"destination": "crisp:website-1", "audience": "vip"}
        assert gauge(text, "audience_sync_retry_queue_users", **labels) == 1.0, text
        assert gauge(text, "audience_sync_pending_users", **labels) == 0.0
        used = gauge(text, "audience_sync_requests_today", destination="crisp:website-1")
        assert used == crisp.quota_used > 0  # later runs send nothing: no change, u3 has no email
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()
        log.close()
