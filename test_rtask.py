"""End-to-end tests of rtask: a real server on 127.0.0.1 (ephemeral ports), real processes,
real Argon2, real metrics. Grouped like rtask.py: fixtures, config and CLI, key store, HTTP API,
execution, metrics and logging, resilience.

Run: python3 -m pytest -q test_rtask.py
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import rtask

HERE = Path(__file__).resolve().parent
RTASK = str(HERE / "rtask.py")

# =============================================================================================
# Fixtures: the real server in a subprocess
# =============================================================================================


def rtask_cli(*args, cwd, env=None, input=None, timeout=60):
    """Run ``python3 rtask.py ARGS`` in ``cwd``; returns the CompletedProcess (text mode)."""
    return subprocess.run([sys.executable, RTASK, *args], cwd=cwd, env=env, input=input,
                          capture_output=True, text=True, timeout=timeout)


def new_key(workdir, name) -> str:
    """Create key ``name`` in workdir/keys.toml with the real add-key; return the token."""
    out = rtask_cli("add-key", name, cwd=workdir)
    assert out.returncode == 0, out.stderr
    match = re.fullmatch(r"API-KEY: (\S+)\n", out.stdout)
    assert match, out.stdout
    return match.group(1)


class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    @property
    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Response {self.status} {self.body[:300]!r}>"


class Server:
    """A running ``rtask run`` with its ports, log, and an HTTP helper."""

    def __init__(self, workdir: Path, extra_env=None, args=()):
        self.workdir = workdir
        self.log_path = workdir / "server.log"
        self._log = open(self.log_path, "wb")
        env = {**os.environ, **(extra_env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, RTASK, *args, "run", "--api-address", "127.0.0.1:0",
             "--metrics-address", "127.0.0.1:0"],
            cwd=workdir, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.port, self.metrics_port = self._wait_for_ports()

    def _wait_for_ports(self):
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            text = self.log()
            m = re.search(r"api=\S*:(\d+).*metrics=\S*:(\d+)", text) or \
                re.search(r'"api": "[^"]*:(\d+)", "metrics": "[^"]*:(\d+)"', text)
            if m:
                return int(m.group(1)), int(m.group(2))
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.02)
        raise AssertionError(f"server did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, method, path, body=b"", key=None, headers=None, timeout=30) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            hdrs = dict(headers or {})
            if key is not None:
                hdrs["Authorization"] = f"Bearer {key}"
            if isinstance(body, str):
                body = body.encode()
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return Response(resp.status, resp.headers, resp.read())
        finally:
            conn.close()

    def post(self, task, body=b"", key=None, **kw) -> Response:
        return self.request("POST", f"/tasks/{task}", body, key=key, **kw)

    def get(self, path, key=None, **kw) -> Response:
        return self.request("GET", path, key=key, **kw)

    def raw(self, data: bytes, read_timeout=5.0) -> bytes:
        """Send raw bytes on a fresh connection; return everything read until close/timeout."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=read_timeout) as s:
            s.sendall(data)
            chunks = []
            try:
                while chunk := s.recv(65536):
                    chunks.append(chunk)
            except (socket.timeout, ConnectionResetError):
                pass
            return b"".join(chunks)

    def metrics(self) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            return conn.getresponse().read().decode()
        finally:
            conn.close()

    def metric(self, name, **labels) -> float:
        """The value of one sample, 0.0 when absent."""
        for line in self.metrics().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                sample, _, value = line.rpartition(" ")
                if all(f'{k}="{v}"' in sample for k, v in labels.items()):
                    return float(value)
        return 0.0

    def stop(self, sig=signal.SIGTERM, timeout=15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def workdir(tmp_path):
    return tmp_path


@pytest.fixture
def start_server(tmp_path):
    """start_server(config_text, keys=("ci",), env=None) → (Server, {key name: token}).

    Writes config.toml into a fresh directory, creates the keys with the real add-key, starts
    the server on ephemeral ports and stops it at the end of the test."""
    servers = []

    def start(config_text, keys=("ci",), env=None, args=()):
        (tmp_path / "config.toml").write_text(textwrap.dedent(config_text))
        tokens = {name: new_key(tmp_path, name) for name in keys}
        server = Server(tmp_path, env, args)
        servers.append(server)
        return server, tokens

    yield start
    for server in servers:
        server.stop()


def wait_for(predicate, timeout=10.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
