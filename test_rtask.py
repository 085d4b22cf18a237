"""End-to-end tests of rtask: a real server on 127.0.0.1 (ephemeral ports), real processes,
real Argon2, real metrics. Grouped like rtask.py: fixtures, config and CLI, key store, HTTP API,
execution, metrics and logging, resilience.

Run: python3 -m pytest -q test_rtask.py
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import contextlib
import datetime
import fcntl
import gc
import hashlib
import hmac
import http.client
import http.server
import ipaddress
import json
import os
import random
import re
import resource
import secrets
import selectors
import signal
import socket
import sqlite3
import ssl
import stat
import statistics
import string
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import tomllib
import types
import uuid
import urllib.parse
import warnings
from pathlib import Path

from argon2.low_level import Type, hash_secret_raw
import cbor2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
import jwt
import jwt.algorithms
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

    def worker_pid(self) -> int:
        """The pid of the supervisor's single worker (``run`` with the default --workers 1):
        the process that serves the API and runs the tasks (``proc`` is the supervisor, which
        serves /metrics). Waits until there is exactly one (a replaced one may be starting)."""
        def single():
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            return int(children[0]) if len(children) == 1 else None
        return wait_for(single, timeout=15)

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


# Tests that test_rtask.py itself may define must not be collected a second time from here.

# =============================================================================================
# Helpers of this section (prefixed _ck_)
# =============================================================================================

_CK_LISTENING = (re.compile(r"api=\S*:(\d+).*metrics=\S*:(\d+)"),
                 re.compile(r'"api": "[^"]*:(\d+)", "metrics": "[^"]*:(\d+)"'))
_CK_RUN_ARGS = ("run", "--api-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0")


def _ck_env(**extra) -> dict:
    """The test process's environment without rtask's own variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RTASK_LOG", "GO_LOG", "LOG_FORMAT")}
    env.update(extra)
    return env


def _ck_write(directory: Path, text: str, name="config.toml") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def _ck_check(directory: Path, config_text: str | None = None, *args, env=None):
    """``rtask check-config`` in ``directory`` (writing config.toml first when given)."""
    if config_text is not None:
        _ck_write(directory, config_text)
    return rtask_cli("check-config", *args, cwd=directory, env=env or _ck_env())


def _ck_listening(text: str) -> bool:
    return any(p.search(text) for p in _CK_LISTENING)


def _ck_run_briefly(cwd: Path, *argv, env=None, ready=None, timeout=15.0) -> tuple[int, str]:
    """Start ``rtask ARGV`` and return (exit code, combined output). A process that comes up
    (``ready(output)``, by default the listening line) is sent SIGTERM; one that exits on its
    own (a refused start-up) is simply waited for. The process never outlives the call."""
    log_path = cwd / f"ck-run-{time.monotonic_ns()}.log"
    ready = ready or _ck_listening
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, RTASK, *argv], cwd=cwd, env=env or _ck_env(),
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if ready(log_path.read_text(errors="replace")):
                proc.send_signal(signal.SIGTERM)
                proc.wait(15)
                break
            time.sleep(0.02)
        else:
            raise AssertionError(f"rtask neither started nor exited:\n{log_path.read_text()}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log_path.read_text(errors="replace")
    log_path.unlink()
    return proc.returncode, output


def _ck_assert_user_error(returncode: int, output: str, *fragments: str):
    """A refused user mistake: non-zero exit, no traceback, and a message naming each fragment."""
    assert returncode != 0, output
    assert "Traceback" not in output, output
    assert output.strip(), "no message at all"
    for fragment in fragments:
        assert fragment in output, f"{fragment!r} not in:\n{output}"


def _ck_b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _ck_b64d(text: str) -> bytes:
    assert re.fullmatch(r"[A-Za-z0-9_-]+", text), f"not base64url without padding: {text!r}"
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _ck_go_cbor(fields: dict) -> bytes:
    """CBOR as the Go writer makes it: integer keys in the given order, zero/empty omitted."""
    return cbor2.dumps({k: v for k, v in fields.items() if v})


def _ck_argon2(key: bytes, salt: bytes) -> bytes:
    return hash_secret_raw(key, salt, time_cost=1, memory_cost=64 * 1024, parallelism=4,
                           hash_len=40, type=Type.ID)


def _ck_go_key(key_id: int) -> tuple[str, str]:
    """A key made exactly as the Go RTask makes one: (token for the user, keys.toml entry)."""
    key, salt = os.urandom(40), os.urandom(16)
    token = _ck_b64e(_ck_go_cbor({1: key_id, 2: key}))
    entry = _ck_b64e(_ck_go_cbor({1: key_id, 2: salt, 3: 1, 4: 64, 5: 4, 6: _ck_argon2(key, salt)}))
    return token, entry


def _ck_entries(keys_path: Path) -> dict[str, str]:
    """keys.toml as name → stored string, read with tomllib (not through rtask)."""
    return tomllib.loads(keys_path.read_text())


def _ck_stored_fields(entry: str) -> dict:
    return cbor2.loads(_ck_b64d(entry))


def _ck_list_keys(directory: Path) -> dict[str, int]:
    out = rtask_cli("list-keys", cwd=directory, env=_ck_env())
    assert out.returncode == 0, out.stderr
    found = {}
    for line in out.stdout.splitlines():
        words = line.split()
        ids = [w for w in words if w.isdigit()]
        names = [w for w in words if not w.isdigit()]
        if ids and names:
            found[names[0]] = int(ids[0])
    return found


def _ck_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_CK_TASK = """
    [tasks.build]
    command = ["sh", "-c", "echo built"]
    apiKeyNames = ["ci"]
"""

# =============================================================================================
# Command line (README §3)
# =============================================================================================


@pytest.mark.parametrize("placement", ["before", "after"])
def test_global_config_and_keys_options_are_accepted_before_and_after_the_subcommand(tmp_path, placement):
    _ck_write(tmp_path / "etc", _CK_TASK, "alt-config.toml")
    opts = ["--config", "etc/alt-config.toml", "--api-keys-file", "etc/alt-keys.toml"]

    def cli(*cmd):
        argv = [*opts, *cmd] if placement == "before" else [*cmd, *opts]
        return rtask_cli(*argv, cwd=tmp_path, env=_ck_env())

    added = cli("add-key", "ci")
    assert added.returncode == 0, added.stderr
    assert (tmp_path / "etc" / "alt-keys.toml").exists()
    assert not (tmp_path / "keys.toml").exists()
    # No ./config.toml exists: exit 0 proves --config was used, and no "add-key ci" warning
    # proves the key was read from --api-keys-file.
    checked = cli("check-config")
    assert checked.returncode == 0, checked.stderr
    assert "add-key ci" not in checked.stderr, checked.stderr
    listed = cli("list-keys")
    assert listed.returncode == 0 and "ci" in listed.stdout, listed


@pytest.mark.parametrize("placement", ["before", "after"])
def test_log_format_json_gives_json_log_lines(tmp_path, placement):
    _ck_write(tmp_path, _CK_TASK)
    fmt = ["--log-format", "json"]
    argv = [*fmt, *_CK_RUN_ARGS] if placement == "before" else [*_CK_RUN_ARGS, *fmt]
    code, output = _ck_run_briefly(tmp_path, *argv)
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) >= 2, output  # at least "listening" and the shutdown
    for line in lines:
        assert isinstance(json.loads(line), dict), line


def test_log_format_env_variable_selects_json(tmp_path):
    _ck_write(tmp_path, _CK_TASK)
    code, output = _ck_run_briefly(tmp_path, *_CK_RUN_ARGS, env=_ck_env(LOG_FORMAT="json"))
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines and all(isinstance(json.loads(line), dict) for line in lines), output


def test_default_files_are_config_toml_and_keys_toml_in_the_cwd(tmp_path):
    missing = rtask_cli("check-config", cwd=tmp_path, env=_ck_env())
    _ck_assert_user_error(missing.returncode, missing.stderr, "config.toml")

    _ck_write(tmp_path, _CK_TASK)
    before = _ck_check(tmp_path)
    assert before.returncode == 0 and "add-key ci" in before.stderr, before  # key not there yet
    added = rtask_cli("add-key", "ci", cwd=tmp_path, env=_ck_env())
    assert added.returncode == 0, added.stderr
    assert "ci" in _ck_entries(tmp_path / "keys.toml")
    after = _ck_check(tmp_path)
    assert after.returncode == 0 and "add-key ci" not in after.stderr, after


@pytest.mark.parametrize("case", ["missing_config", "invalid_toml", "config_not_utf8", "config_is_a_directory",
                                  "unknown_option", "bad_api_address", "api_port_out_of_range",
                                  "unknown_subcommand", "bad_log_format", "keys_directory_missing"])
def test_user_mistakes_give_one_clear_message_and_no_traceback(tmp_path, case):
    if case == "invalid_toml":
        _ck_write(tmp_path, "[tasks.build\ncommand = [")
    elif case == "config_not_utf8":
        (tmp_path / "config.toml").write_bytes(b'[tasks.b\xe9]\ncommand = ["true"]\n')
    elif case == "config_is_a_directory":
        (tmp_path / "config.toml").mkdir()
    elif case != "missing_config":
        _ck_write(tmp_path, _CK_TASK)
    argv, fragments = {
        "missing_config": (["--config", "nowhere.toml", "check-config"], ["nowhere.toml"]),
        "invalid_toml": (["check-config"], ["config.toml"]),
        "config_not_utf8": (["check-config"], ["config.toml"]),
        "config_is_a_directory": (["check-config"], ["config.toml"]),
        "bad_log_format": (["--log-format", "xml", "check-config"], ["xml"]),
        "keys_directory_missing": (["--api-keys-file", "nodir/keys.toml", "add-key", "x"], ["nodir"]),
        "unknown_option": (["check-config", "--bogus-option"], ["--bogus-option"]),
        "bad_api_address": (["run", "--api-address", "not-an-address",
                             "--metrics-address", "127.0.0.1:0"], ["--api-address", "not-an-address"]),
        "api_port_out_of_range": (["run", "--api-address", "127.0.0.1:99999",
                                   "--metrics-address", "127.0.0.1:0"], ["--api-address"]),
        "unknown_subcommand": (["frobnicate"], ["frobnicate"]),
    }[case]
    code, output = _ck_run_briefly(tmp_path, *argv)
    _ck_assert_user_error(code, output, *fragments)
    assert not _ck_listening(output), output
    error_lines = [line for line in output.splitlines() if line.strip() and not line.startswith(" ")]
    assert len(error_lines) <= 3, output  # one sentence (argparse may add its usage line)


def test_run_with_missing_config_names_the_file(tmp_path):
    code, output = _ck_run_briefly(tmp_path, *_CK_RUN_ARGS)
    _ck_assert_user_error(code, output, "config.toml")
    assert not _ck_listening(output)


# A line logged at debug level: the level word near the start, before any quoted message
# (text "<time> debug ..." or JSON {"time": ..., "level": "debug", ...}).
_CK_DEBUG_LINE = re.compile(r'(?im)^[^\n]{0,50}?(\bdebug\b|"level": "debug")')


@pytest.mark.parametrize("variable", ["RTASK_LOG", "GO_LOG"])
def test_log_level_debug_from_env_shows_debug_lines(start_server, variable):
    server, tokens = start_server(_CK_TASK, env={variable: "debug"})
    assert server.post("build", key=tokens["ci"]).status == 200
    wait_for(lambda: _CK_DEBUG_LINE.search(server.log()), timeout=5)


def test_log_level_default_info_has_no_debug_lines_and_no_output(start_server):
    config = """
        [tasks.build]
        command = ["sh", "-c", "echo OUTPUT-MARKER-4711"]
        apiKeyNames = ["ci"]
    """
    server, tokens = start_server(config)
    resp = server.post("build", key=tokens["ci"])
    assert resp.status == 200 and "OUTPUT-MARKER-4711" in resp.json["stdout"]
    wait_for(lambda: resp.json["task_id"] in server.log(), timeout=5)  # the run is logged
    log_text = server.log()
    assert not _CK_DEBUG_LINE.search(log_text), log_text
    assert "OUTPUT-MARKER-4711" not in log_text, log_text  # command output only at debug


@pytest.mark.parametrize("level", ["error", "warning", "warn"])
def test_log_level_error_or_warning_hides_info_lines(tmp_path, level):
    _ck_write(tmp_path, _CK_TASK)
    port = _ck_free_port()

    def up(_output):  # an answered request: serving, past start-up (and its signal set-up)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except OSError:
            return False

    code, output = _ck_run_briefly(tmp_path, "run", "--api-address", f"127.0.0.1:{port}",
                                   "--metrics-address", "127.0.0.1:0",
                                   env=_ck_env(RTASK_LOG=level), ready=up)
    assert code == 0, output
    assert not _ck_listening(output), output  # the info line "listening" is below the level
    assert not re.search(r"\binfo\b", output, re.I), output
    # the warning about the missing key is below "error" only; no level is reported unknown
    assert ("add-key ci" in output) == (level != "error"), output
    assert "RTASK_LOG" not in output, output


@pytest.mark.parametrize("variable", [
    "RTASK_LOG",
    "GO_LOG",
])
def test_unknown_log_level_warns_naming_the_variable_and_still_works(tmp_path, variable):
    _ck_write(tmp_path, _CK_TASK)
    out = _ck_check(tmp_path, None, env=_ck_env(**{variable: "chatty"}))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    warning = next((line for line in out.stderr.splitlines() if "chatty" in line), "")
    assert variable in warning, out.stderr


# =============================================================================================
# Configuration (README §4)
# =============================================================================================


def test_every_option_is_accepted_with_its_type(start_server, tmp_path):
    secret_file = tmp_path / "wh-secret"
    secret_file.write_text("file-secret-8a7d2c\n")
    workdir = tmp_path / "wd"
    workdir.mkdir()
    config = f"""
        [tasks.full]
        command = ["sh", "-c", "pwd; echo \\"$FULL_VAR-$REQUEST_HEADER_X_TRACE\\"; echo e >&2"]
        workdir = "{workdir}"
        apiKeyNames = ["ci"]
        webhookSecretFiles = {{ fromfile = "{secret_file}" }}
        environment = {{ FULL_VAR = "env-ok" }}
        passRequestHeaders = ["X-Trace"]
        async = false
        asyncResultRetentionSeconds = 0.5
        rateLimit = 0
        maxConcurrentTasks = 3
        maxInputBytes = 1000
        maxOutputBytes = 2000
        executionTimeoutSeconds = 7.5
        mergeStderr = true
        durationHistogramBuckets = [0.01, 0.1, 1, 10]

        [tasks.full2]
        command = ["true"]
        webhookSecrets = {{ inline = "inline-secret-61f0" }}
        async = true
        asyncResultRetentionSeconds = 60
        rateLimit = 2.5
        maxConcurrentTasks = 0
        executionTimeoutSeconds = 3
    """
    server, tokens = start_server(config)
    checked = _ck_check(tmp_path)  # the same config.toml and keys.toml as the server's
    assert checked.returncode == 0, checked.stderr
    assert "error" not in checked.stderr.lower(), checked.stderr
    resp = server.post("full", key=tokens["ci"], headers={"X-Trace": "t1"})
    assert resp.status == 200, resp
    assert resp.json["stdout"] == f"{workdir}\nenv-ok-t1\ne\n", resp.json  # merged stderr
    assert server.request("POST", "/wh/file-secret-8a7d2c").status == 200
    assert "task_id" in server.request("POST", "/wh/inline-secret-61f0").json


def test_workdir_defaults_to_the_server_cwd(start_server, tmp_path):
    server, tokens = start_server("""
        [tasks.where]
        command = ["pwd"]
        apiKeyNames = ["ci"]
    """)
    resp = server.post("where", key=tokens["ci"])
    assert resp.status == 200 and resp.json["stdout"].strip() == str(tmp_path), resp


def test_default_max_output_bytes_is_16384(start_server):
    server, tokens = start_server("""
        [tasks.loud]
        command = ["python3", "-c", "import sys; sys.stdout.write('x' * 20000)"]
        apiKeyNames = ["ci"]
    """)
    result = server.post("loud", key=tokens["ci"]).json
    assert result["status"] == "success", result
    assert result["stdout"] == "x" * 16384
    assert result.get("stdout_truncated") is True, {k: v for k, v in result.items() if k != "stdout"}


def test_default_max_input_bytes_is_16384(start_server):
    server, tokens = start_server("""
        [tasks.eat]
        command = ["wc", "-c"]
        apiKeyNames = ["ci"]
    """)
    ok = server.post("eat", b"a" * 16384, key=tokens["ci"])
    assert ok.status == 200 and ok.json["stdout"].strip() == "16384", ok
    too_big = server.post("eat", b"a" * 16385, key=tokens["ci"])
    assert too_big.status == 413 and too_big.json["error"] == "payload_too_large", too_big


def test_defaults_of_limits_timings_and_listen_addresses(start_server):
    """README §3/§3 defaults, as a running server reports them (GET /tasks and GET /config)."""
    server, tokens = start_server(_CK_TASK + '[auth]\nconfigEndpointEnabled = true\n'
                                  '[auth.keyPermissions]\nci = ["system:config_read"]\n')
    listed = server.get("/tasks", key=tokens["ci"]).json["tasks"]
    assert listed == [{"name": "build", "async": False, "rateLimit": 0.0, "maxConcurrentTasks": 0, "queueSize": 0,
                       "maxInputBytes": 16384, "maxOutputBytes": 16384, "executionTimeoutSeconds": 30.0,
                       "queueTimeoutSeconds": 30.0, "parameters": []}], listed
    shown = server.get("/config", key=tokens["ci"]).json["tasks"]["build"]
    assert shown["asyncResultRetentionSeconds"] == 60.0, shown
    args = rtask.build_parser().parse_args(["run"])
    assert (args.api_address, args.metrics_address) == ("localhost:8800", "localhost:9090")


def test_default_rate_limit_is_unlimited(start_server):
    server, tokens = start_server(_CK_TASK)
    assert [server.post("build", key=tokens["ci"]).status for _ in range(5)] == [200] * 5


# One task with one mistake each → (config, fragments the message must contain).
_CK_INVALID = {
    "unknown_key_typo": ('[tasks.build]\ncommand = ["true"]\napiKeyNames = ["ci"]\nasnyc = true\n',
                         ["build", "asnyc", "async"]),
    "rate_limit_string": ('[tasks.build]\ncommand = ["true"]\napiKeyNames = ["ci"]\nrateLimit = "5"\n',
                          ["build", "rateLimit"]),
    "async_int": ('[tasks.build]\ncommand = ["true"]\napiKeyNames = ["ci"]\nasync = 1\n',
                  ["build", "async"]),
    "empty_command": ('[tasks.build]\ncommand = []\napiKeyNames = ["ci"]\n', ["build", "command"]),
    "command_not_a_list": ('[tasks.build]\ncommand = "echo hi"\napiKeyNames = ["ci"]\n',
                           ["build", "command"]),
    "command_missing": ('[tasks.build]\napiKeyNames = ["ci"]\n', ["build", "command"]),
    "negative_rate_limit": ('[tasks.build]\ncommand = ["true"]\napiKeyNames = ["ci"]\nrateLimit = -1\n',
                            ["build", "rateLimit"]),
    "negative_max_concurrent": ('[tasks.build]\ncommand = ["true"]\napiKeyNames = ["ci"]\n'
                                'maxConcurrentTasks = -1\n', ["build", "maxConcurrentTasks"]),
    "zero_max_input": ('[tasks.build]\ncommand = ["true"]\napiKeyNames = ["ci"]\nmaxInputBytes = 0\n',
                       ["build", "maxInputBytes"]),
    "zero_max_output": ('[tasks.build]\ncommand = ["true"]\napiKeyNames = ["ci"]\nmaxOutputBytes = 0\n',
                        ["build", "maxOutputBytes"]),
    "zero_timeout": ('[tasks.build]\ncommand = ["true"]\napiKeyNames = ["ci"]\n'
                     'executionTimeoutSeconds = 0\n', ["build", "executionTimeoutSeconds"]),
    "zero_retention": ('[tasks.build]\ncommand = ["true"]\napiKeyNames = ["ci"]\n'
                       'asyncResultRetentionSeconds = 0\n', ["build", "asyncResultRetentionSeconds"]),
    "buckets_not_increasing": ('[tasks.build]\ncommand = ["true"]\napiKeyNames = ["ci"]\n'
                               'durationHistogramBuckets = [0.5, 0.5, 1]\n',
                               ["build", "durationHistogramBuckets"]),
    "buckets_decreasing": ('[tasks.build]\ncommand = ["true"]\napiKeyNames = ["ci"]\n'
                           'durationHistogramBuckets = [1, 0.5]\n', ["build", "durationHistogramBuckets"]),
    "buckets_not_finite": ('[tasks.build]\ncommand = ["true"]\napiKeyNames = ["ci"]\n'
                           'durationHistogramBuckets = [-inf, 1]\n', ["build", "durationHistogramBuckets"]),
    "buckets_only_inf": ('[tasks.build]\ncommand = ["true"]\napiKeyNames = ["ci"]\n'
                         'durationHistogramBuckets = [inf]\n', ["build", "durationHistogramBuckets"]),
    "missing_secret_file": ('[tasks.build]\ncommand = ["true"]\n'
                            'webhookSecretFiles = { gh = "/nonexistent/rtask-secret" }\n',
                            ["build", "webhookSecretFiles"]),
    "same_secret_two_tasks": ('[tasks.alpha]\ncommand = ["true"]\nwebhookSecrets = { gh = "dup-secret-5e1" }\n'
                              '[tasks.beta]\ncommand = ["true"]\nwebhookSecrets = { hook = "dup-secret-5e1" }\n',
                              ["alpha", "beta", "secret"]),
    "bad_task_name": ('[tasks."a/b"]\ncommand = ["true"]\napiKeyNames = ["ci"]\n', ["a/b"]),
    "blocking_and_async": ('[tasks.build]\ncommand = ["true"]\napiKeyNames = ["ci"]\n'
                           'blocking = true\nasync = false\n', ["build", "blocking", "async"]),
    "redirect_and_merge": ('[tasks.build]\ncommand = ["true"]\napiKeyNames = ["ci"]\n'
                           'redirectStderr = true\nmergeStderr = true\n',
                           ["build", "redirectStderr", "mergeStderr"]),
    "blocking_not_bool": ('[tasks.build]\ncommand = ["true"]\napiKeyNames = ["ci"]\nblocking = "no"\n',
                          ["build", "blocking"]),
    # An empty secret would open POST /wh/ to anyone.
    "blank_inline_secret": ('[tasks.build]\ncommand = ["true"]\nwebhookSecrets = { gh = "  " }\n',
                            ["build", "webhookSecrets"]),
    "empty_secret_file": ('[tasks.build]\ncommand = ["true"]\nwebhookSecretFiles = { gh = "{tmp}/blank" }\n',
                          ["build", "webhookSecretFiles"]),
    "same_secret_inline_and_file": ('[tasks.alpha]\ncommand = ["true"]\nwebhookSecrets = { gh = "dup-secret-5e1" }\n'
                                    '[tasks.beta]\ncommand = ["true"]\n'
                                    'webhookSecretFiles = { hook = "{tmp}/dup" }\n', ["alpha", "beta", "secret"]),
    "tasks_not_a_table": ('tasks = 5\n', ["tasks"]),
    "api_key_header_not_a_token": ('[tasks.build]\ncommand = ["true"]\napiKeyNames = ["ci"]\n'
                                   '[auth]\napiKeyHeader = "bad header"\n', ["apiKeyHeader", "bad header"]),
    "signature_header_not_a_token": ('[tasks.build]\ncommand = ["true"]\n[tasks.build.signedWebhook]\n'
                                     'provider = "hmac-sha256"\nsecret = "s3cret-value"\nsignatureHeader = "bad h"\n',
                                     ["build", "signatureHeader"]),
    "passed_headers_same_variable": ('[tasks.build]\ncommand = ["true"]\napiKeyNames = ["ci"]\n'
                                     'passRequestHeaders = ["X-Foo", "X_Foo"]\n',
                                     ["build", "passRequestHeaders", "REQUEST_HEADER_X_FOO"]),
    "key_permissions_bad_name": ('[tasks.build]\ncommand = ["true"]\napiKeyNames = ["ci"]\n'
                                 '[auth.keyPermissions]\n" bad name" = ["tasks:run"]\n', ["keyPermissions", "bad name"]),
    "task_not_a_table": ('[tasks]\nbuild = 5\n', ["build"]),
    "top_level_typo": ('[task.build]\ncommand = ["true"]\napiKeyNames = ["ci"]\n', ["task", "tasks"]),
}


@pytest.mark.parametrize("case", list(_CK_INVALID))
def test_invalid_config_fails_check_config_and_stops_run(tmp_path, case):
    config, fragments = _CK_INVALID[case]
    (tmp_path / "blank").write_text(" \n\t\n")
    (tmp_path / "dup").write_text("  dup-secret-5e1\n")
    _ck_write(tmp_path, config.replace("{tmp}", str(tmp_path)))
    checked = _ck_check(tmp_path)
    assert checked.returncode == 1, checked
    _ck_assert_user_error(checked.returncode, checked.stderr, *fragments)
    code, output = _ck_run_briefly(tmp_path, *_CK_RUN_ARGS)
    _ck_assert_user_error(code, output, *fragments)
    assert not _ck_listening(output), output
    if case.startswith("same_secret"):
        assert "dup-secret-5e1" not in checked.stderr + output  # the secret is not echoed


# Every option with a value of the wrong type → check-config names the task and the field.
_CK_WRONG_TYPES = {
    "command": '["echo", 1]', "workdir": "5", "apiKeyNames": '"ci"', "webhookSecrets": '["x"]',
    "webhookSecretFiles": '"f"', "environment": "{ A = 1 }", "passRequestHeaders": '"X-A"',
    "async": '"yes"', "asyncResultRetentionSeconds": '"60"', "rateLimit": "true",
    "maxConcurrentTasks": "1.5", "maxInputBytes": '"10"', "maxOutputBytes": "true",
    "executionTimeoutSeconds": '"5"', "mergeStderr": "1", "durationHistogramBuckets": '"1,2"',
}


def test_option_of_the_wrong_type_is_an_error_naming_task_and_field(tmp_path):
    # One task per option, each with that option mistyped: one run must name every one.
    config = "".join(
        f'[tasks.typed-{field}]\n'
        + "".join(f"{k} = {v}\n" for k, v in
                  {"command": '["true"]', "apiKeyNames": '["ci"]', field: value}.items())
        for field, value in _CK_WRONG_TYPES.items())
    checked = _ck_check(tmp_path, config)
    assert checked.returncode == 1, checked
    _ck_assert_user_error(checked.returncode, checked.stderr)
    missed = [field for field in _CK_WRONG_TYPES
              if not re.search(rf"typed-{field}\b.*\b{field}\b", checked.stderr)]
    assert not missed, f"no error naming task and field for {missed}:\n{checked.stderr}"


# Values at the edge of each option's range → (field, value). Whatever check-config accepts,
# run must serve; what it refuses must be a clear error naming the field.
_CK_EXTREME = {
    "timeout_35_days": ("executionTimeoutSeconds", "3000000"),
    "timeout_huge": ("executionTimeoutSeconds", "1e300"),
    "retention_35_days": ("asyncResultRetentionSeconds", "3000000"),
    "retention_huge": ("asyncResultRetentionSeconds", "1e300"),
    "rate_tiny": ("rateLimit", "1e-320"),
    "rate_huge": ("rateLimit", "1e300"),
    "input_huge": ("maxInputBytes", "9223372036854775807"),
    "output_huge": ("maxOutputBytes", "9223372036854775807"),
    "concurrency_huge": ("maxConcurrentTasks", "9223372036854775807"),
}
@pytest.mark.parametrize("case", list(_CK_EXTREME))
def test_extreme_but_accepted_values_work_at_run_time(tmp_path, case):
    field, value = _CK_EXTREME[case]
    config = (f'[tasks.edge]\ncommand = ["sh", "-c", "echo ok"]\napiKeyNames = ["ci"]\n'
              f'async = {str(field == "asyncResultRetentionSeconds").lower()}\n{field} = {value}\n'
              '[tasks.plain]\ncommand = ["sh", "-c", "echo plain"]\napiKeyNames = ["ci"]\n')
    _ck_write(tmp_path, config)
    token = new_key(tmp_path, "ci")
    checked = _ck_check(tmp_path)
    if checked.returncode != 0:  # refused: that is fine when it is said clearly
        _ck_assert_user_error(checked.returncode, checked.stderr, "edge", field)
        return
    server = Server(tmp_path)
    try:
        resp = server.post("edge", key=token, timeout=3)
        assert resp.status == 200, resp
        if "exit_code" not in resp.json:  # async: poll the result
            path = f"/tasks/edge/{resp.json['task_id']}"
            resp = wait_for(lambda: (r := server.get(path, key=token, timeout=5)).json["status"]
                            != "running" and r, timeout=5, interval=0.05)
        assert resp.json["status"] == "success" and resp.json["stdout"] == "ok\n", resp
        plain = server.post("plain", key=token, timeout=5)  # the server as a whole still works
        assert plain.status == 200 and plain.json["stdout"] == "plain\n", plain
    finally:
        server.proc.kill()  # not SIGTERM: a drain would wait for the longest timeout
        server.stop()


def test_deprecated_blocking_false_means_async_with_a_warning(start_server, tmp_path):
    config = """
        [tasks.old]
        command = ["sleep", "1"]
        apiKeyNames = ["ci"]
        blocking = false
    """
    server, tokens = start_server(config)
    t0 = time.monotonic()
    resp = server.post("old", key=tokens["ci"])
    assert time.monotonic() - t0 < 0.8, "answered only after the run: not async"
    assert resp.status == 200 and "task_id" in resp.json and "exit_code" not in resp.json, resp
    assert re.search(r"warn.*blocking|blocking.*deprecat", server.log(), re.I | re.S), server.log()
    checked = _ck_check(tmp_path)
    assert checked.returncode == 0 and "blocking" in checked.stderr, checked


def test_deprecated_redirect_stderr_means_merged_stderr_with_a_warning(start_server, tmp_path):
    config = """
        [tasks.old]
        command = ["sh", "-c", "echo out; echo err >&2"]
        apiKeyNames = ["ci"]
        redirectStderr = true
    """
    server, tokens = start_server(config)
    result = server.post("old", key=tokens["ci"]).json
    assert result["stdout"] == "out\nerr\n" and "stderr" not in result, result
    assert "redirectStderr" in server.log(), server.log()
    checked = _ck_check(tmp_path)
    assert checked.returncode == 0 and "redirectStderr" in checked.stderr, checked


def test_webhook_secret_file_is_whitespace_trimmed(start_server, tmp_path):
    (tmp_path / "secret.txt").write_text("  \n\ttrimmed-secret-93b1 \n\n")
    server, _ = start_server(f"""
        [tasks.hook]
        command = ["sh", "-c", "echo ran"]
        webhookSecretFiles = {{ gh = "{tmp_path / 'secret.txt'}" }}
    """, keys=())
    resp = server.request("POST", "/wh/trimmed-secret-93b1")
    assert resp.status == 200 and resp.json["stdout"] == "ran\n", resp


def test_key_name_missing_from_keys_toml_is_a_warning_naming_task_and_command(start_server, tmp_path):
    config = """
        [tasks.deploy]
        command = ["true"]
        apiKeyNames = ["ci", "late"]
    """
    _ck_write(tmp_path, config)
    new_key(tmp_path, "ci")
    checked = _ck_check(tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "deploy" in checked.stderr and "add-key late" in checked.stderr, checked.stderr
    assert "warn" in checked.stderr.lower(), checked.stderr
    server, _ = start_server(config, keys=())  # run starts and logs the same warning
    assert "add-key late" in server.log(), server.log()


def test_unreachable_task_is_a_warning(tmp_path):
    checked = _ck_check(tmp_path, '[tasks.lonely]\ncommand = ["true"]\n')
    assert checked.returncode == 0, checked.stderr
    assert "lonely" in checked.stderr and "warn" in checked.stderr.lower(), checked.stderr


def test_check_config_clean_config_is_exit_0_without_problems(tmp_path):
    _ck_write(tmp_path, _CK_TASK)
    new_key(tmp_path, "ci")
    checked = _ck_check(tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "warn" not in checked.stderr.lower() and "error" not in checked.stderr.lower(), checked.stderr


def test_check_config_reports_every_problem(tmp_path):
    config = """
        [tasks.first]
        command = ["true"]
        apiKeyNames = ["ci"]
        rateLimit = -3

        [tasks.second]
        command = ["true"]
        apiKeyNames = ["ci"]
        maxInputBytes = "big"

        [tasks.third]
        command = ["true"]
        apiKeyNames = ["nobody"]
    """
    checked = _ck_check(tmp_path, config)
    assert checked.returncode == 1, checked
    stderr = checked.stderr
    assert re.search(r"first.*rateLimit", stderr), stderr
    assert re.search(r"second.*maxInputBytes", stderr), stderr
    assert "add-key nobody" in stderr, stderr  # the warnings are reported alongside the errors
    assert "Traceback" not in stderr


def test_check_config_reports_config_and_key_file_problems_together(tmp_path):
    (tmp_path / "keys.toml").write_text("ci = 42\n")
    checked = _ck_check(tmp_path, '[tasks.first]\ncommand = ["true"]\napiKeyNames = ["ci"]\nasnyc = 1\n')
    assert checked.returncode == 1, checked
    assert "asnyc" in checked.stderr and "keys.toml" in checked.stderr, checked.stderr


# =============================================================================================
# Key store (README §7)
# =============================================================================================


def test_add_key_prints_exactly_the_api_key_line(tmp_path):
    out = rtask_cli("add-key", "ci", cwd=tmp_path, env=_ck_env())
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"API-KEY: [A-Za-z0-9_-]+\n", out.stdout), out.stdout
    token = out.stdout.split()[1]
    assert token not in out.stderr


def test_api_key_token_is_base64url_cbor_of_id_and_40_byte_key(tmp_path):
    first = cbor2.loads(_ck_b64d(new_key(tmp_path, "zero")))
    second = cbor2.loads(_ck_b64d(new_key(tmp_path, "one")))
    assert list(first) == [2] and len(first[2]) == 40 and isinstance(first[2], bytes), first
    assert list(second) == [1, 2] and second[1] == 1 and len(second[2]) == 40, second
    assert first[2] != second[2]


def test_stored_entry_is_go_format_and_hash_recomputes(tmp_path):
    tokens = {name: new_key(tmp_path, name) for name in ("zero", "one")}
    entries = _ck_entries(tmp_path / "keys.toml")
    for name, expected_order, expected_id in (("zero", [2, 3, 4, 5, 6], 0), ("one", [1, 2, 3, 4, 5, 6], 1)):
        stored = _ck_stored_fields(entries[name])
        assert list(stored) == expected_order, stored
        assert stored.get(1, 0) == expected_id
        salt, time_cost, memory, threads, digest = (stored[i] for i in (2, 3, 4, 5, 6))
        assert isinstance(salt, bytes) and len(salt) == 16
        assert (time_cost, memory, threads) == (1, 64, 4)
        key = cbor2.loads(_ck_b64d(tokens[name]))[2]
        assert digest == _ck_argon2(key, salt)
    assert _ck_stored_fields(entries["zero"])[2] != _ck_stored_fields(entries["one"])[2]  # own salt


def test_keys_file_has_mode_0600(tmp_path):
    old_umask = os.umask(0)  # inherited by add-key: a plain open() would give 0666
    try:
        new_key(tmp_path, "a")
        assert (tmp_path / "keys.toml").stat().st_mode & 0o777 == 0o600
        (tmp_path / "keys.toml").chmod(0o644)  # as an operator's copy might be
        new_key(tmp_path, "b")
        assert rtask_cli("remove-key", "a", cwd=tmp_path, env=_ck_env()).returncode == 0
        assert (tmp_path / "keys.toml").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old_umask)


def test_key_ids_are_the_lowest_free(tmp_path):
    for name in ("a", "b", "c"):
        new_key(tmp_path, name)
    assert _ck_list_keys(tmp_path) == {"a": 0, "b": 1, "c": 2}
    removed = rtask_cli("remove-key", "b", cwd=tmp_path, env=_ck_env())
    assert removed.returncode == 0, removed.stderr
    token = new_key(tmp_path, "d")
    assert cbor2.loads(_ck_b64d(token))[1] == 1
    assert _ck_list_keys(tmp_path) == {"a": 0, "c": 2, "d": 1}


def _ck_handmade_keys_file(path: Path, ids):
    """keys.toml with Go-style entries for ``ids`` (valid format; the hashes open nothing)."""
    path.write_text("".join(
        f'h{i} = "{_ck_b64e(_ck_go_cbor({1: i, 2: bytes(16), 3: 1, 4: 64, 5: 4, 6: bytes(40)}))}"\n'
        for i in ids))


def test_add_key_takes_the_lowest_free_id_among_existing_entries(tmp_path):
    _ck_handmade_keys_file(tmp_path / "keys.toml", [0, 1, 2, 4, 7])
    assert cbor2.loads(_ck_b64d(new_key(tmp_path, "next")))[1] == 3
    assert _ck_list_keys(tmp_path)["next"] == 3


def test_add_key_fails_clearly_when_all_1000_ids_are_used(tmp_path):
    _ck_handmade_keys_file(tmp_path / "keys.toml", range(1000))
    before = (tmp_path / "keys.toml").read_bytes()
    out = rtask_cli("add-key", "one-too-many", cwd=tmp_path, env=_ck_env())
    _ck_assert_user_error(out.returncode, out.stderr, "keys.toml")
    assert "API-KEY" not in out.stdout
    assert (tmp_path / "keys.toml").read_bytes() == before


def test_key_name_with_a_dot_round_trips(start_server, tmp_path):
    server, tokens = start_server('[tasks.build]\ncommand = ["true"]\napiKeyNames = ["team.deploy"]\n',
                                  keys=("team.deploy",))
    assert set(_ck_entries(tmp_path / "keys.toml")) == {"team.deploy"}  # not a [team] table
    assert _ck_list_keys(tmp_path) == {"team.deploy": 0}
    assert server.post("build", key=tokens["team.deploy"]).status == 200


def test_add_key_with_existing_name_fails_and_keeps_the_file(tmp_path):
    new_key(tmp_path, "ci")
    before = (tmp_path / "keys.toml").read_bytes()
    out = rtask_cli("add-key", "ci", cwd=tmp_path, env=_ck_env())
    _ck_assert_user_error(out.returncode, out.stderr, "use remove-key first")
    assert out.returncode == 1
    assert "API-KEY" not in out.stdout
    assert (tmp_path / "keys.toml").read_bytes() == before


def test_list_keys_shows_names_and_ids_never_secrets(tmp_path):
    tokens = {name: new_key(tmp_path, name) for name in ("alpha", "beta")}
    out = rtask_cli("list-keys", cwd=tmp_path, env=_ck_env())
    assert out.returncode == 0, out.stderr
    assert _ck_list_keys(tmp_path) == {"alpha": 0, "beta": 1}, out.stdout
    everything = out.stdout + out.stderr
    for name, entry in _ck_entries(tmp_path / "keys.toml").items():
        assert entry not in everything and entry[:16] not in everything
        assert tokens[name] not in everything and tokens[name][:16] not in everything


def test_remove_key_of_a_missing_name_fails_clearly(tmp_path):
    new_key(tmp_path, "ci")
    before = (tmp_path / "keys.toml").read_bytes()
    out = rtask_cli("remove-key", "ghost", cwd=tmp_path, env=_ck_env())
    _ck_assert_user_error(out.returncode, out.stderr, "ghost")
    assert (tmp_path / "keys.toml").read_bytes() == before


def test_remove_key_revokes_it_from_the_file(tmp_path):
    new_key(tmp_path, "a")
    new_key(tmp_path, "b")
    out = rtask_cli("remove-key", "a", cwd=tmp_path, env=_ck_env())
    assert out.returncode == 0, out.stderr
    assert set(_ck_entries(tmp_path / "keys.toml")) == {"b"}


def test_go_written_entries_are_accepted_for_id_0_and_id_7(start_server, tmp_path):
    token0, entry0 = _ck_go_key(0)
    token7, entry7 = _ck_go_key(7)
    assert 1 not in cbor2.loads(_ck_b64d(entry0))  # the Go writer omits id 0
    (tmp_path / "keys.toml").write_text(f'gozero = "{entry0}"\ngoseven = "{entry7}"\n')
    (tmp_path / "keys.toml").chmod(0o600)
    assert _ck_list_keys(tmp_path) == {"gozero": 0, "goseven": 7}
    server, _ = start_server("""
        [tasks.build]
        command = ["sh", "-c", "echo \\"$RTASK_CALLER\\""]
        apiKeyNames = ["gozero", "goseven"]
    """, keys=())
    for token, name in ((token0, "gozero"), (token7, "goseven")):
        resp = server.post("build", key=token)
        assert resp.status == 200, resp
        assert resp.json["stdout"] == f"{name}\n", resp.json  # identified as that key


def test_right_id_with_wrong_key_bytes_is_401(start_server, tmp_path):
    token0, entry0 = _ck_go_key(0)
    token7, entry7 = _ck_go_key(7)
    (tmp_path / "keys.toml").write_text(f'gozero = "{entry0}"\ngoseven = "{entry7}"\n')
    server, _ = start_server('[tasks.build]\ncommand = ["true"]\napiKeyNames = ["gozero", "goseven"]\n',
                             keys=())
    for key_id in (0, 7):
        forged = _ck_b64e(_ck_go_cbor({1: key_id, 2: os.urandom(40)}))
        resp = server.post("build", key=forged)
        assert resp.status == 401 and resp.json["error"] == "unauthorized", resp
    assert server.post("build", key=token7).status == 200  # the genuine one still works


def test_add_key_output_is_byte_identical_to_the_go_encoding(tmp_path):
    tokens = {name: new_key(tmp_path, name) for name in ("zero", "one")}
    for name, entry in _ck_entries(tmp_path / "keys.toml").items():
        raw = _ck_b64d(entry)
        fields = cbor2.loads(raw)
        go = _ck_go_cbor({i: fields.get(i, 0) for i in range(1, 7)})
        assert raw == go, (raw.hex(), go.hex())
        assert entry == _ck_b64e(go)
        token_raw = _ck_b64d(tokens[name])
        token_fields = cbor2.loads(token_raw)
        assert token_raw == _ck_go_cbor({1: token_fields.get(1, 0), 2: token_fields[2]})


def test_add_key_keeps_other_entries_unchanged(tmp_path):
    new_key(tmp_path, "zero")
    new_key(tmp_path, "one")
    before = _ck_entries(tmp_path / "keys.toml")
    new_key(tmp_path, "two")
    after = _ck_entries(tmp_path / "keys.toml")
    assert {k: after[k] for k in before} == before


def test_concurrent_add_key_runs_all_land(tmp_path):
    names = [f"k{i}" for i in range(6)]
    procs = [subprocess.Popen([sys.executable, RTASK, "add-key", name], cwd=tmp_path, env=_ck_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in names]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, outputs
    tokens = {name: re.fullmatch(r"API-KEY: (\S+)\n", out).group(1) for name, (out, _) in zip(names, outputs)}
    entries = _ck_entries(tmp_path / "keys.toml")
    assert set(entries) == set(names)
    stored = {name: _ck_stored_fields(entries[name]) for name in names}
    assert sorted(s.get(1, 0) for s in stored.values()) == list(range(6))
    for name in names:  # every printed token matches what its own entry stores
        key_fields = cbor2.loads(_ck_b64d(tokens[name]))
        assert key_fields.get(1, 0) == stored[name].get(1, 0)
        assert _ck_argon2(key_fields[2], stored[name][2]) == stored[name][6]


def test_add_and_remove_leave_no_temporary_files(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    for name in ("a", "b", "c"):
        new_key(store, name)
    assert rtask_cli("remove-key", "b", cwd=store, env=_ck_env()).returncode == 0
    failed = rtask_cli("add-key", "a", cwd=store, env=_ck_env())
    assert failed.returncode == 1
    leftovers = {p.name for p in store.iterdir()} - {"keys.toml"}
    assert all(n.endswith(".lock") for n in leftovers), leftovers  # a lock file may stay


def test_killed_add_key_never_leaves_a_half_written_file(tmp_path):
    new_key(tmp_path, "base")
    for i, delay in enumerate((0.05, 0.15, 0.25, 0.3, 0.35, 0.45)):
        proc = subprocess.Popen([sys.executable, RTASK, "add-key", f"k{i}"], cwd=tmp_path,
                                env=_ck_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        entries = _ck_entries(tmp_path / "keys.toml")  # parses: old file or new one, never half
        assert "base" in entries
        for entry in entries.values():
            assert 6 in _ck_stored_fields(entry)
    assert _ck_list_keys(tmp_path)["base"] == 0


def test_missing_keys_file_is_an_empty_store(tmp_path):
    out = rtask_cli("list-keys", cwd=tmp_path, env=_ck_env())
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "keys.toml").exists() or _ck_entries(tmp_path / "keys.toml") == {}


_CK_GARBAGE = {
    "not_toml": b"this is = = not toml [[\n",
    "not_utf8": b'ci = "\xff\xfe"\n',
    "entry_not_a_string": b"ci = 42\n",
    "entry_is_a_table": b"[ci]\nkey = 1\n",
    "entry_not_base64": b'ci = "%%%not*base64%%%"\n',
    "entry_not_cbor": f'ci = "{_ck_b64e(bytes([0xff, 0xff, 0xff, 0x1c]))}"\n'.encode(),
    "entry_cbor_not_a_map": f'ci = "{_ck_b64e(cbor2.dumps([1, 2, 3]))}"\n'.encode(),
    "entry_wrong_field_types": f'ci = "{_ck_b64e(cbor2.dumps({1: "x", 2: 5}))}"\n'.encode(),
}


@pytest.mark.parametrize("garbage", list(_CK_GARBAGE))
def test_garbage_keys_file_is_a_clear_error_from_list_keys_and_check_config(tmp_path, garbage):
    _ck_write(tmp_path, _CK_TASK)
    (tmp_path / "keys.toml").write_bytes(_CK_GARBAGE[garbage])
    for command in ("list-keys", "check-config"):
        out = rtask_cli(command, cwd=tmp_path, env=_ck_env())
        _ck_assert_user_error(out.returncode, out.stdout + out.stderr, "keys.toml")
        assert out.returncode == 1, out


@pytest.mark.parametrize("garbage", ["not_toml", "entry_not_cbor"])
def test_garbage_keys_file_stops_run_and_is_never_overwritten_by_add_key(tmp_path, garbage):
    _ck_write(tmp_path, _CK_TASK)
    keys_path = tmp_path / "keys.toml"
    keys_path.write_bytes(_CK_GARBAGE[garbage])
    code, output = _ck_run_briefly(tmp_path, *_CK_RUN_ARGS)
    _ck_assert_user_error(code, output, "keys.toml")
    assert not _ck_listening(output), output
    added = rtask_cli("add-key", "other", cwd=tmp_path, env=_ck_env())
    _ck_assert_user_error(added.returncode, added.stderr, "keys.toml")
    assert "API-KEY" not in added.stdout
    assert keys_path.read_bytes() == _CK_GARBAGE[garbage]  # someone's keys are not thrown away


def test_added_key_works_in_a_running_server_without_restart(start_server, tmp_path):
    server, tokens = start_server('[tasks.build]\ncommand = ["true"]\napiKeyNames = ["ci", "late"]\n')
    late = new_key(tmp_path, "late")
    t0 = time.monotonic()
    wait_for(lambda: server.post("build", key=late).status == 200, timeout=5, interval=0.05)
    assert time.monotonic() - t0 < 2.5
    assert server.post("build", key=tokens["ci"]).status == 200


def test_removed_key_stops_working_in_a_running_server(start_server, tmp_path):
    server, tokens = start_server('[tasks.build]\ncommand = ["true"]\napiKeyNames = ["ci", "other"]\n',
                                  keys=("ci", "other"))
    assert server.post("build", key=tokens["ci"]).status == 200
    assert server.post("build", key=tokens["ci"]).status == 200  # now verified and cached
    out = rtask_cli("remove-key", "ci", cwd=tmp_path, env=_ck_env())
    assert out.returncode == 0, out.stderr
    t0 = time.monotonic()
    wait_for(lambda: server.post("build", key=tokens["ci"]).status == 401, timeout=5, interval=0.05)
    assert time.monotonic() - t0 < 2.5
    assert server.post("build", key=tokens["other"]).status == 200


def test_garbage_keys_file_while_running_keeps_the_previous_keys(start_server, tmp_path):
    server, tokens = start_server('[tasks.build]\ncommand = ["true"]\napiKeyNames = ["ci", "spare", "fresh"]\n',
                                  keys=("ci", "spare"))
    assert server.post("build", key=tokens["ci"]).status == 200
    good = (tmp_path / "keys.toml").read_text()
    (tmp_path / "keys.toml").write_text("garbage = = [\n")

    def error_logged():
        server.post("build", key=tokens["ci"])  # requests trigger the (throttled) file check
        return "keys.toml" in server.log().split("listening", 1)[-1]

    wait_for(error_logged, timeout=5, interval=0.1)
    assert re.search(r"error.*keys\.toml|keys\.toml.*error", server.log(), re.I), server.log()
    # "spare" was never used, so only the previous key set (not a cache) can accept it.
    assert server.post("build", key=tokens["spare"]).status == 200
    assert server.post("build", key=tokens["ci"]).status == 200
    # Once the file is repaired, its new content is used again.
    fresh_token, fresh_entry = _ck_go_key(5)
    (tmp_path / "keys.toml").write_text(good + f'fresh = "{fresh_entry}"\n')
    wait_for(lambda: server.post("build", key=fresh_token).status == 200, timeout=5, interval=0.1)


# =============================================================================================
# Logging (README §11)
# =============================================================================================


@pytest.mark.parametrize("level", ["info", "debug"])
def test_log_never_contains_keys_or_webhook_secrets(start_server, level):
    server, tokens = start_server("""
        [tasks.build]
        command = ["sh", "-c", "echo done"]
        apiKeyNames = ["ci"]
        webhookSecrets = { github = "wh-secret-c0ffee-42" }

        [tasks.other]
        command = ["true"]
        apiKeyNames = ["admin"]
    """, keys=("ci", "admin"), env={"RTASK_LOG": level})
    assert server.post("build", key=tokens["ci"]).status == 200
    assert server.request("POST", "/wh/wh-secret-c0ffee-42").status == 200
    assert server.post("other", key=tokens["ci"]).status == 403  # a rejection is logged too
    assert server.get("/tasks/build/aaaaaaaaaaaaaaaa", key=tokens["ci"]).status == 404
    wait_for(lambda: server.log().count("github") >= 1, timeout=5)
    server.stop()
    log_text = server.log()
    for secret in (tokens["ci"], tokens["admin"], "wh-secret-c0ffee-42"):
        assert secret not in log_text and secret[:20] not in log_text, log_text


def test_json_log_lines_are_valid_json_with_a_message(start_server):
    server, tokens = start_server(_CK_TASK + '\n[tasks.lonely]\ncommand = ["true"]\n',
                                  args=("--log-format", "json"))
    assert server.post("build", key=tokens["ci"]).status == 200
    assert server.post("build", key="not-a-key").status == 401
    wait_for(lambda: server.log().count("\n") >= 4, timeout=5)
    server.stop()
    lines = [line for line in server.log().splitlines() if line.strip()]
    assert len(lines) >= 4, lines  # warning, listening, run, rejection, shutdown
    for line in lines:
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        message = entry.get("msg", entry.get("message"))
        assert isinstance(message, str) and message, line


def _ck_run_log_entry(server, task_id):
    for line in server.log().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if task_id in [str(v) for v in entry.values()]:
            return entry
    return None


@pytest.mark.parametrize("via,fmt", [("key", "json"), ("webhook", "json"), ("key", "text")])
def test_execution_log_has_task_id_caller_status_exit_code_duration(start_server, via, fmt):
    server, tokens = start_server("""
        [tasks.build]
        command = ["sh", "-c", "sleep 0.1; exit 3"]
        apiKeyNames = ["ci"]
        webhookSecrets = { gitea = "hook-secret-77aa" }
    """, args=("--log-format", fmt))
    if via == "key":
        result, caller = server.post("build", key=tokens["ci"]).json, "ci"
    else:
        result, caller = server.request("POST", "/wh/hook-secret-77aa").json, "gitea"
    assert result["exit_code"] == 3 and result["status"] == "failure", result
    if fmt == "json":
        entry = wait_for(lambda: _ck_run_log_entry(server, result["task_id"]), timeout=5)
        values = [str(v) for v in entry.values()]
        durations = [v for k, v in entry.items() if "duration" in k]
    else:
        line = wait_for(lambda: next((ln for ln in server.log().splitlines()
                                      if result["task_id"] in ln), None), timeout=5)
        values = re.findall(r'[\w.-]+', line)
        durations = re.findall(r"duration\w*=\"?([\d.]+)", line)
        entry = line
    assert "build" in values and caller in values and "failure" in values and "3" in values, entry
    assert durations and 0.1 <= float(durations[0]) < 5, entry


# =============================================================================================
# Shared server for the HTTP API, execution and metrics sections
# =============================================================================================

_HX_TASK_ID_RE = re.compile(r"[a-z2-7]{16}")
_HX_RFC3339_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
_HX_WH_SYNC = "wh-sync-secret-" + "s" * 24
_HX_WH_ASYNC = "wh-async-secret-" + "a" * 24
_HX_WH_RATE = "wh-rate-secret-" + "r" * 24
_HX_WH_RATE_METRIC = "wh-rate-metric-secret-" + "m" * 24
_HX_WH_PROBE = "wh-probe-secret-" + "p" * 24
# A task that waits until the file named on its first stdin line exists, then says so: lets a
# test hold a run "running" for exactly as long as it needs.
_HX_GATE = ["sh", "-c", 'read f; while [ ! -e "$f" ]; do sleep 0.02; done; echo finished']
_HX_ENV_NAMES = ["HX_SERVER_ENV", "HX_OVERRIDE", "HX_EXTRA", "REQUEST_HEADER_X_FOO_BAR",
                 "REQUEST_HEADER_X_ABSENT", "RTASK_TASK_NAME", "RTASK_TASK_ID", "RTASK_CALLER"]
_HX_ENV_DUMP = "import json, os; print(json.dumps({k: os.environ.get(k) for k in %r}))" % _HX_ENV_NAMES


def _hx_q(value) -> str:
    """A TOML value (string or array of strings) written as JSON, which TOML accepts."""
    return json.dumps(value)


def _hx_py(code: str) -> str:
    """A command running ``code`` with this interpreter, as a TOML array."""
    return _hx_q([sys.executable, "-c", textwrap.dedent(code)])


def _hx_shared_config(d: Path) -> str:
    m = lambda name: _hx_q(str(d / name))  # noqa: E731 - a marker file path in TOML
    return f"""
[tasks.result]
command = ["sh", "-c", "printf out; printf err >&2"]
apiKeyNames = ["ci"]

[tasks.quiet]
command = ["true"]
apiKeyNames = ["ci"]

[tasks.exit3]
command = ["sh", "-c", "exit 3"]
apiKeyNames = ["ci"]

[tasks.only_other]
command = ["true"]
apiKeyNames = ["other"]

[tasks.gate]
command = {_hx_q(_HX_GATE)}
apiKeyNames = ["ci"]
async = true
executionTimeoutSeconds = 15

[tasks.retain]
command = ["true"]
apiKeyNames = ["ci"]
async = true
asyncResultRetentionSeconds = 1

[tasks.rate]
command = ["true"]
apiKeyNames = ["ci"]
rateLimit = 0.5

[tasks.conc]
command = {_hx_q(_HX_GATE)}
apiKeyNames = ["ci"]
async = true
maxConcurrentTasks = 1
executionTimeoutSeconds = 15

[tasks.small]
command = ["cat"]
apiKeyNames = ["ci"]
maxInputBytes = 10

[tasks.order_rate]
command = ["cat"]
apiKeyNames = ["ci"]
rateLimit = 0.5
maxInputBytes = 10

[tasks.marker]
command = ["sh", "-c", "touch \\"$0\\"", {m("marker-ran")}]
apiKeyNames = ["ci"]
maxInputBytes = 10

[tasks.free_token]
command = ["sh", "-c", "echo run >> \\"$0\\"", {m("free-token-runs")}]
apiKeyNames = ["ci"]
rateLimit = 0.5

[tasks.free_slot]
command = {_hx_q(_HX_GATE)}
apiKeyNames = ["ci"]
async = true
maxConcurrentTasks = 1
maxInputBytes = 300
executionTimeoutSeconds = 15

[tasks.spent_token]
command = {_hx_q(_HX_GATE)}
apiKeyNames = ["ci"]
async = true
rateLimit = 2
maxConcurrentTasks = 1
executionTimeoutSeconds = 15

[tasks.wh_sync]
command = ["sh", "-c", "echo \\"caller=$RTASK_CALLER\\"; cat"]
webhookSecrets = {{ github = {_hx_q(_HX_WH_SYNC)} }}

[tasks.wh_async]
command = ["sh", "-c", "echo \\"caller=$RTASK_CALLER\\""]
apiKeyNames = ["ci"]
async = true
webhookSecrets = {{ hookasync = {_hx_q(_HX_WH_ASYNC)} }}

[tasks.wh_rate]
command = ["true"]
rateLimit = 0.5
webhookSecrets = {{ limited = {_hx_q(_HX_WH_RATE)} }}

[tasks.wh_rate_metric]
command = ["true"]
rateLimit = 0.5
webhookSecrets = {{ limited2 = {_hx_q(_HX_WH_RATE_METRIC)} }}

[tasks.wh_probe]
command = ["sh", "-c", "touch \\"$0\\"", {m("wh-probe-ran")}]
webhookSecrets = {{ probe = {_hx_q(_HX_WH_PROBE)} }}

[tasks.stdin]
command = ["cat"]
apiKeyNames = ["ci"]

[tasks.noshell]
command = ["printf", "%s", "$HOME;echo pwned"]
apiKeyNames = ["ci"]

[tasks.env]
command = {_hx_py(_HX_ENV_DUMP)}
apiKeyNames = ["ci"]
passRequestHeaders = ["X-Foo-Bar", "X-Absent"]
environment = {{ HX_EXTRA = "extra value", HX_OVERRIDE = "from-the-task" }}

[tasks.workdir]
command = {_hx_py("import os; print(os.getcwd())")}
apiKeyNames = ["ci"]
workdir = {m("wd")}

[tasks.pgid]
command = {_hx_py("import os; print(os.getpgid(0) == os.getpid(), os.getpgid(0) != os.getppid())")}
apiKeyNames = ["ci"]

[tasks.caps]
command = {_hx_py('''
    import sys
    sys.stdout.write("x" * 1000000); sys.stdout.flush()
    sys.stderr.write("y" * 1000000); sys.stderr.flush()
''')}
apiKeyNames = ["ci"]
maxOutputBytes = 100

[tasks.merge]
command = ["sh", "-c", "echo out; echo err >&2"]
apiKeyNames = ["ci"]
mergeStderr = true

[tasks.nonutf8]
command = ["printf", "\\\\377ok\\\\376"]
apiKeyNames = ["ci"]

[tasks.notfound]
command = ["/nonexistent/hx-command"]
apiKeyNames = ["ci"]

[tasks.notexec]
command = [{m("not-executable.sh")}]
apiKeyNames = ["ci"]

[tasks.badworkdir]
command = ["true"]
apiKeyNames = ["ci"]
workdir = "/nonexistent/hx-workdir"

[tasks.sigkill]
command = ["sh", "-c", "kill -9 $$"]
apiKeyNames = ["ci"]

[tasks.timeout]
command = ["sh", "-c", "sh -c 'trap \\"\\" TERM; echo $$ >&2; exec sleep 30' & sleep 30"]
apiKeyNames = ["ci"]
executionTimeoutSeconds = 1

[tasks.term]
command = ["sh", "-c", "trap 'echo cleaned; exit 0' TERM; sleep 30 & wait"]
apiKeyNames = ["ci"]
executionTimeoutSeconds = 1

[tasks.escaped]
command = {_hx_py('''
    import subprocess, sys, time
    p = subprocess.Popen(["sleep", "30"], start_new_session=True)
    print(p.pid, file=sys.stderr, flush=True)
    time.sleep(30)
''')}
apiKeyNames = ["ci"]
executionTimeoutSeconds = 1

[tasks.daemon]
command = ["sh", "-c", "sleep 30 & echo $!"]
apiKeyNames = ["ci"]

[tasks.big]
command = ["cat"]
apiKeyNames = ["ci"]
maxInputBytes = 1000000
maxOutputBytes = 1000000

[tasks.noread]
command = ["sh", "-c", "sleep 0.3; echo ok"]
apiKeyNames = ["ci"]
maxInputBytes = 1000000

[tasks.durations]
command = ["sh", "-c", "read c; [ \\"$c\\" = sleep ] && exec sleep 5; exit $c"]
apiKeyNames = ["ci"]
executionTimeoutSeconds = 1

[tasks.buckets]
command = ["true"]
apiKeyNames = ["ci"]
durationHistogramBuckets = [0.1, 1.0, inf]
"""


@pytest.fixture(scope="module")
def _hx_shared(tmp_path_factory):
    """One server for the HTTP, execution and metrics tests: .server, .ci, .other, .dir."""
    d = tmp_path_factory.mktemp("hx_shared")
    (d / "wd").mkdir()
    (d / "not-executable.sh").write_text("#!/bin/sh\necho never\n")
    (d / "not-executable.sh").chmod(0o644)
    (d / "config.toml").write_text(_hx_shared_config(d))
    tokens = {name: new_key(d, name) for name in ("ci", "other")}
    server = Server(d, {"HX_SERVER_ENV": "from-the-server", "HX_OVERRIDE": "from-the-server"})
    try:
        yield types.SimpleNamespace(server=server, ci=tokens["ci"], other=tokens["other"], dir=d)
    finally:
        server.stop()


# =============================================================================================
# Helpers
# =============================================================================================


def _hx_json(r, status):
    """Assert the status and the JSON content type; return the parsed body."""
    assert r.status == status, r
    assert r.headers.get("Content-Type", "").startswith("application/json"), r.headers
    return json.loads(r.body)


def _hx_error(r, status, code):
    body = _hx_json(r, status)
    assert body["error"] == code, r
    assert isinstance(body.get("message"), str) and body["message"], r
    return body


def _hx_read_response(f) -> Response:
    """One HTTP response from a binary file object (its body framed by Content-Length)."""
    line = f.readline()
    assert line, "the connection closed without an answer"
    _, status, _ = line.decode("latin-1").split(" ", 2)
    headers = http.client.parse_headers(f)
    body = f.read(int(headers.get("Content-Length", "0")))
    return Response(int(status), headers, body)


def _hx_raw(server, data: bytes, *, shut_wr=False, timeout=5.0) -> Response:
    """Send raw bytes on a fresh connection (optionally half-closing it) and read one answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        s.sendall(data)
        if shut_wr:
            s.shutdown(socket.SHUT_WR)
        with s.makefile("rb") as f:
            return _hx_read_response(f)


def _hx_assert_serving(sh):
    """The server still answers a normal request after whatever the test threw at it."""
    body = _hx_json(sh.server.post("quiet", key=sh.ci, timeout=10), 200)
    assert body["status"] == "success"


def _hx_rejections(server, task, reason) -> float:
    return server.metric("task_rejection_total", handler=task, reason=reason)


def _hx_gate(sh):
    """(release file path, request body) for a run of a gate task."""
    path = sh.dir / f"gate-{uuid.uuid4().hex}"
    return path, f"{path}\n"


def _hx_wait_result(server, task, run_id, key):
    """Poll GET /tasks/<task>/<id> until the run is no longer running; return the result."""
    def done():
        body = _hx_json(server.get(f"/tasks/{task}/{run_id}", key=key), 200)
        return body if body["status"] != "running" else None
    return wait_for(done, timeout=15)


def _hx_connection_refused(port) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:  # queued just as the listener closed: ask again
        pass
    return False


def _hx_kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# =============================================================================================
# ===== HTTP API =====
# =============================================================================================


def test_sync_result_has_status_exit_code_output_and_times(_hx_shared):
    sh = _hx_shared
    body = _hx_json(sh.server.post("result", key=sh.ci), 200)
    assert {k: body[k] for k in ("status", "exit_code", "stdout", "stderr")} == \
        {"status": "success", "exit_code": 0, "stdout": "out", "stderr": "err"}
    assert set(body) == {"status", "exit_code", "stdout", "stderr", "task_id", "started_at",
                         "finished_at", "duration_seconds"}
    assert _HX_TASK_ID_RE.fullmatch(body["task_id"])
    assert _HX_RFC3339_RE.fullmatch(body["started_at"]) and _HX_RFC3339_RE.fullmatch(body["finished_at"])
    assert body["started_at"] <= body["finished_at"]
    assert 0 <= body["duration_seconds"] < 5


def test_sync_result_leaves_out_empty_stdout_and_stderr(_hx_shared):
    body = _hx_json(_hx_shared.server.post("quiet", key=_hx_shared.ci), 200)
    assert body["status"] == "success" and body["exit_code"] == 0
    assert "stdout" not in body and "stderr" not in body
    assert "stdout_truncated" not in body and "stderr_truncated" not in body


def test_failure_exit_code_is_passed_through(_hx_shared):
    body = _hx_json(_hx_shared.server.post("exit3", key=_hx_shared.ci), 200)
    assert (body["status"], body["exit_code"]) == ("failure", 3)


def test_async_answers_task_id_at_once_then_running_then_result(_hx_shared):
    sh = _hx_shared
    release, body = _hx_gate(sh)
    t0 = time.monotonic()
    answer = _hx_json(sh.server.post("gate", body, key=sh.ci), 200)
    assert time.monotonic() - t0 < 2  # the run cannot end before release: this is "at once"
    assert set(answer) <= {"task_id", "status"} and answer.get("status", "running") == "running"
    run_id = answer["task_id"]
    assert _HX_TASK_ID_RE.fullmatch(run_id)
    try:
        running = _hx_json(sh.server.get(f"/tasks/gate/{run_id}", key=sh.ci), 200)
        assert (running["status"], running["exit_code"]) == ("running", -1)
        assert "stdout" not in running and "finished_at" not in running
    finally:
        release.touch()
    result = _hx_wait_result(sh.server, "gate", run_id, sh.ci)
    assert (result["status"], result["exit_code"], result["stdout"]) == ("success", 0, "finished\n")
    assert result["task_id"] == run_id


def test_async_result_expires_after_retention(_hx_shared):
    sh = _hx_shared
    run_id = _hx_json(sh.server.post("retain", key=sh.ci), 200)["task_id"]
    result = _hx_wait_result(sh.server, "retain", run_id, sh.ci)
    seen_finished = time.monotonic()
    assert result["status"] == "success"
    wait_for(lambda: sh.server.get(f"/tasks/retain/{run_id}", key=sh.ci).status == 404, timeout=4)
    kept_for = time.monotonic() - seen_finished
    assert 0.7 < kept_for < 2.5, kept_for  # asyncResultRetentionSeconds = 1
    _hx_error(sh.server.get(f"/tasks/retain/{run_id}", key=sh.ci), 404, "not_found")


def test_unknown_or_malformed_task_id_is_404(_hx_shared):
    sh = _hx_shared
    release, body = _hx_gate(sh)
    release.touch()
    run_id = _hx_json(sh.server.post("gate", body, key=sh.ci), 200)["task_id"]
    _hx_wait_result(sh.server, "gate", run_id, sh.ci)  # the real id works
    for path in ("/tasks/gate/aaaaaaaaaaaaaaaa", f"/tasks/gate/{run_id.upper()}",
                 "/tasks/gate/ABC", f"/tasks/gate/{run_id}x", "/tasks/gate/..",
                 "/tasks/x/../..", "/tasks/gate/../.."):
        _hx_error(sh.server.get(path, key=sh.ci), 404, "not_found")


def test_get_result_needs_a_key_allowed_for_the_task(_hx_shared):
    sh = _hx_shared
    release, body = _hx_gate(sh)
    release.touch()
    run_id = _hx_json(sh.server.post("gate", body, key=sh.ci), 200)["task_id"]
    _hx_wait_result(sh.server, "gate", run_id, sh.ci)
    path = f"/tasks/gate/{run_id}"
    _hx_error(sh.server.get(path), 401, "unauthorized")
    _hx_error(sh.server.get(path, key=rtask.encode_api_key(777, os.urandom(40))), 401, "unauthorized")
    forbidden = _hx_error(sh.server.get(path, key=sh.other), 403, "forbidden")
    assert "gate" in forbidden["message"]
    assert _hx_json(sh.server.get(path, key=sh.ci), 200)["status"] == "success"


def test_webhook_async_result_is_readable_with_a_task_key(_hx_shared):
    sh = _hx_shared
    answer = _hx_json(sh.server.request("POST", f"/wh/{_HX_WH_ASYNC}"), 200)
    assert _HX_TASK_ID_RE.fullmatch(answer["task_id"])
    result = _hx_wait_result(sh.server, "wh_async", answer["task_id"], sh.ci)
    assert (result["status"], result["stdout"]) == ("success", "caller=hookasync\n")
    _hx_error(sh.server.get(f"/tasks/wh_async/{answer['task_id']}"), 401, "unauthorized")


_HX_AUTH_ROWS = [
    # (id, Authorization header built from the fixture, status, error code, reason)
    ("no-header", lambda sh: None, 401, "unauthorized", "missing_key"),
    ("basic", lambda sh: "Basic eHh4Onl5eQ==", 401, "unauthorized", "invalid_header"),
    ("bearer-alone", lambda sh: "Bearer", 401, "unauthorized", "invalid_header"),
    ("garbage-token", lambda sh: "Bearer not!a!key", 401, "unauthorized", "invalid_key_encoding"),
    ("unknown-id", lambda sh: "Bearer " + rtask.encode_api_key(777, os.urandom(40)),
     401, "unauthorized", "invalid_key"),
    ("right-id-wrong-key", lambda sh: "Bearer " + rtask.encode_api_key(
        rtask.decode_api_key(sh.ci)[0], os.urandom(40)), 401, "unauthorized", "invalid_key"),
    ("other-tasks-key", lambda sh: "Bearer " + sh.other, 403, "forbidden", "key_not_allowed"),
]


@pytest.mark.parametrize("header, status, code, reason", [row[1:] for row in _HX_AUTH_ROWS],
                         ids=[row[0] for row in _HX_AUTH_ROWS])
def test_credential_rejections_have_status_code_and_metric(_hx_shared, header, status, code, reason):
    sh = _hx_shared
    value = header(sh)
    before = _hx_rejections(sh.server, "quiet", reason)
    r = sh.server.post("quiet", headers={"Authorization": value} if value is not None else {})
    body = _hx_error(r, status, code)
    if reason == "key_not_allowed":
        assert body["message"] == "Missing required permission: tasks:run:quiet"
    assert _hx_rejections(sh.server, "quiet", reason) == before + 1
    _hx_assert_serving(sh)


def test_non_utf8_authorization_header_is_invalid_key_encoding(_hx_shared):
    sh = _hx_shared
    before = _hx_rejections(sh.server, "quiet", "invalid_key_encoding")
    r = _hx_raw(sh.server, b"POST /tasks/quiet HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Bearer \xff\xfe\xc3\x28abc\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    _hx_error(r, 401, "unauthorized")
    assert _hx_rejections(sh.server, "quiet", "invalid_key_encoding") == before + 1
    _hx_assert_serving(sh)


def test_rate_limit_rejection_is_429_with_retry_after(_hx_shared):
    sh = _hx_shared
    before = _hx_rejections(sh.server, "rate", "limit_exceeded")
    assert _hx_json(sh.server.post("rate", key=sh.ci), 200)["status"] == "success"
    r = sh.server.post("rate", key=sh.ci)
    _hx_error(r, 429, "rate_limited")
    assert r.headers["Retry-After"] == "2"  # ceil(1 / 0.5)
    assert _hx_rejections(sh.server, "rate", "limit_exceeded") == before + 1


def test_max_concurrent_rejection_is_429_with_retry_after_1(_hx_shared):
    sh = _hx_shared
    before = _hx_rejections(sh.server, "conc", "max_concurrent")
    release, body = _hx_gate(sh)
    run_id = _hx_json(sh.server.post("conc", body, key=sh.ci), 200)["task_id"]
    try:
        r = sh.server.post("conc", body, key=sh.ci)
        _hx_error(r, 429, "too_many_running")
        assert r.headers["Retry-After"] == "1"
        assert _hx_rejections(sh.server, "conc", "max_concurrent") == before + 1
    finally:
        release.touch()
    assert _hx_wait_result(sh.server, "conc", run_id, sh.ci)["status"] == "success"
    # The async run gave its slot back when its process ended.
    again = _hx_json(sh.server.post("conc", body, key=sh.ci), 200)["task_id"]
    assert _hx_wait_result(sh.server, "conc", again, sh.ci)["status"] == "success"


def test_body_larger_than_max_input_is_413(_hx_shared):
    sh = _hx_shared
    before = _hx_rejections(sh.server, "small", "input_too_large")
    _hx_error(sh.server.post("small", b"x" * 11, key=sh.ci), 413, "payload_too_large")
    assert _hx_rejections(sh.server, "small", "input_too_large") == before + 1
    body = _hx_json(sh.server.post("small", b"0123456789", key=sh.ci), 200)  # exactly the limit
    assert body["stdout"] == "0123456789"


def test_chunked_body_larger_than_max_input_is_413(_hx_shared):
    sh = _hx_shared
    before = _hx_rejections(sh.server, "small", "input_too_large")
    r = _hx_raw(sh.server, b"POST /tasks/small HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + sh.ci.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"8\r\n01234567\r\n8\r\n89abcdef\r\n0\r\n\r\n")
    _hx_error(r, 413, "payload_too_large")
    assert _hx_rejections(sh.server, "small", "input_too_large") == before + 1
    _hx_assert_serving(sh)


def test_body_shorter_than_content_length_is_400_invalid_content(_hx_shared):
    """Content-Length larger than the body sent, then a half-close (SHUT_WR)."""
    sh = _hx_shared
    before = _hx_rejections(sh.server, "small", "invalid_content")
    t0 = time.monotonic()
    r = _hx_raw(sh.server, b"POST /tasks/small HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + sh.ci.encode() + b"\r\nContent-Length: 10\r\n\r\nabc", shut_wr=True)
    _hx_error(r, 400, "bad_request")
    assert time.monotonic() - t0 < 3  # answered at the half-close, not at a read timeout
    assert _hx_rejections(sh.server, "small", "invalid_content") == before + 1
    _hx_assert_serving(sh)


@pytest.mark.parametrize("framing", [
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n",
    b"Content-Length: abc\r\n\r\n",
    b"Content-Length: -1\r\n\r\n",
    b"Content-Length: 3\r\nContent-Length: 5\r\n\r\nhello",
], ids=["bad-chunk-size", "chunk-longer-than-size", "content-length-not-a-number",
        "negative-content-length", "conflicting-content-lengths"])
def test_malformed_body_framing_is_400_invalid_content(_hx_shared, framing):
    sh = _hx_shared
    before = _hx_rejections(sh.server, "small", "invalid_content")
    r = _hx_raw(sh.server, b"POST /tasks/small HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + sh.ci.encode() + b"\r\n" + framing)
    _hx_error(r, 400, "bad_request")
    assert _hx_rejections(sh.server, "small", "invalid_content") == before + 1
    _hx_assert_serving(sh)


def test_credentials_are_checked_before_body_size(_hx_shared):
    sh = _hx_shared
    too_large = _hx_rejections(sh.server, "small", "input_too_large")
    missing = _hx_rejections(sh.server, "small", "missing_key")
    _hx_error(sh.server.post("small", b"x" * 100), 401, "unauthorized")
    _hx_error(sh.server.post("small", b"x" * 100, key=sh.other), 403, "forbidden")
    assert _hx_rejections(sh.server, "small", "missing_key") == missing + 1
    assert _hx_rejections(sh.server, "small", "input_too_large") == too_large


def test_rate_limit_is_checked_before_body_size(_hx_shared):
    sh = _hx_shared
    too_large = _hx_rejections(sh.server, "order_rate", "input_too_large")
    assert _hx_json(sh.server.post("order_rate", b"ok", key=sh.ci), 200)["stdout"] == "ok"
    r = sh.server.post("order_rate", b"x" * 100, key=sh.ci)
    _hx_error(r, 429, "rate_limited")
    assert _hx_rejections(sh.server, "order_rate", "input_too_large") == too_large


def test_refused_requests_start_no_process(_hx_shared):
    sh = _hx_shared
    marker = sh.dir / "marker-ran"
    head = b"POST /tasks/marker HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + sh.ci.encode() + b"\r\n"
    _hx_error(sh.server.post("marker", b"x"), 401, "unauthorized")
    _hx_error(sh.server.post("marker", b"x", key=rtask.encode_api_key(777, os.urandom(40))), 401, "unauthorized")
    _hx_error(sh.server.post("marker", b"x", key=sh.other), 403, "forbidden")
    _hx_error(sh.server.post("marker", b"x" * 11, key=sh.ci), 413, "payload_too_large")
    _hx_error(_hx_raw(sh.server, head + b"Content-Length: 5\r\n\r\nab", shut_wr=True), 400, "bad_request")
    _hx_error(_hx_raw(sh.server, head + b"Transfer-Encoding: chunked\r\n\r\nq\r\n"), 400, "bad_request")
    time.sleep(0.2)  # a wrongly started process would have touched it by now
    assert not marker.exists()
    assert _hx_json(sh.server.post("marker", b"x", key=sh.ci), 200)["status"] == "success"
    assert marker.exists()  # the marker does show a run


def test_refused_requests_cost_no_rate_token(_hx_shared):
    sh = _hx_shared
    runs = sh.dir / "free-token-runs"
    _hx_error(sh.server.post("free_token"), 401, "unauthorized")
    _hx_error(sh.server.post("free_token", key=rtask.encode_api_key(777, os.urandom(40))), 401, "unauthorized")
    _hx_error(sh.server.post("free_token", key=sh.other), 403, "forbidden")
    assert _hx_json(sh.server.post("free_token", key=sh.ci), 200)["status"] == "success"
    _hx_error(sh.server.post("free_token", key=sh.ci), 429, "rate_limited")  # the limit is on
    assert runs.read_text() == "run\n"


def test_refused_requests_hold_no_concurrency_slot(_hx_shared):
    sh = _hx_shared
    release, body = _hx_gate(sh)
    head = b"POST /tasks/free_slot HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + sh.ci.encode() + b"\r\n"
    _hx_error(sh.server.post("free_slot", body), 401, "unauthorized")
    _hx_error(sh.server.post("free_slot", b"x" * 301, key=sh.ci), 413, "payload_too_large")
    _hx_error(_hx_raw(sh.server, head + b"Content-Length: 50\r\n\r\nab", shut_wr=True), 400, "bad_request")
    _hx_error(_hx_raw(sh.server, head + b"Transfer-Encoding: chunked\r\n\r\nq\r\n"), 400, "bad_request")
    run_id = _hx_json(sh.server.post("free_slot", body, key=sh.ci), 200)["task_id"]
    try:
        _hx_error(sh.server.post("free_slot", body, key=sh.ci), 429, "too_many_running")  # limit is on
    finally:
        release.touch()
    assert _hx_wait_result(sh.server, "free_slot", run_id, sh.ci)["status"] == "success"


def test_concurrency_refusal_still_spends_the_rate_token(_hx_shared):
    sh = _hx_shared
    release, body = _hx_gate(sh)
    run_id = _hx_json(sh.server.post("spent_token", body, key=sh.ci), 200)["task_id"]
    t0 = time.monotonic()
    try:
        time.sleep(max(0.0, 0.6 - (time.monotonic() - t0)))  # rateLimit 2: a token is back
        r = sh.server.post("spent_token", body, key=sh.ci)
        _hx_error(r, 429, "too_many_running")
        r = sh.server.post("spent_token", body, key=sh.ci)  # at once: that token is gone
        _hx_error(r, 429, "rate_limited")
        assert r.headers["Retry-After"] == "1"
    finally:
        release.touch()
    assert _hx_wait_result(sh.server, "spent_token", run_id, sh.ci)["status"] == "success"


def test_webhook_runs_the_task_without_a_key(_hx_shared):
    sh = _hx_shared
    body = _hx_json(sh.server.request("POST", f"/wh/{_HX_WH_SYNC}", b"payload"), 200)
    assert (body["status"], body["stdout"]) == ("success", "caller=github\npayload")


def test_webhook_other_requests_are_404_and_run_nothing(_hx_shared):
    sh = _hx_shared
    marker = sh.dir / "wh-probe-ran"
    answers = []
    for method, path in (("GET", f"/wh/{_HX_WH_PROBE}"), ("PUT", f"/wh/{_HX_WH_PROBE}"),
                         ("DELETE", f"/wh/{_HX_WH_PROBE}"), ("POST", "/wh/wrong-secret"),
                         ("POST", f"/wh/{_HX_WH_PROBE}x"), ("POST", f"/wh/{_HX_WH_PROBE[:-1]}"),
                         ("POST", "/wh/"), ("POST", f"/wh/{_HX_WH_PROBE}/more")):
        r = sh.server.request(method, path)
        _hx_error(r, 404, "not_found")
        assert "Allow" not in r.headers  # a 405 would confirm the secret
        answers.append(r.json)
    assert all(a == answers[0] for a in answers), answers  # nothing tells a known secret apart
    time.sleep(0.2)
    assert not marker.exists()
    assert _hx_json(sh.server.request("POST", f"/wh/{_HX_WH_PROBE}"), 200)["status"] == "success"
    assert marker.exists()


def test_webhook_name_labels_duration_metric(_hx_shared):
    sh = _hx_shared
    labels = dict(handler="wh_sync", api_key_used="github", status="success")
    before = sh.server.metric("task_duration_seconds_count", **labels)
    _hx_json(sh.server.request("POST", f"/wh/{_HX_WH_SYNC}"), 200)
    wait_for(lambda: sh.server.metric("task_duration_seconds_count", **labels) == before + 1, timeout=5)
    assert _HX_WH_SYNC not in sh.server.metrics()


def test_webhook_requests_are_rate_limited(_hx_shared):
    sh = _hx_shared
    assert _hx_json(sh.server.request("POST", f"/wh/{_HX_WH_RATE}"), 200)["status"] == "success"
    r = sh.server.request("POST", f"/wh/{_HX_WH_RATE}")
    _hx_error(r, 429, "rate_limited")
    assert r.headers["Retry-After"] == "2"


def test_webhook_rejections_are_counted_in_metrics(_hx_shared):
    sh = _hx_shared
    before = _hx_rejections(sh.server, "wh_rate_metric", "limit_exceeded")
    _hx_json(sh.server.request("POST", f"/wh/{_HX_WH_RATE_METRIC}"), 200)
    _hx_error(sh.server.request("POST", f"/wh/{_HX_WH_RATE_METRIC}"), 429, "rate_limited")
    assert _hx_rejections(sh.server, "wh_rate_metric", "limit_exceeded") == before + 1


def test_unknown_path_is_404(_hx_shared):
    sh = _hx_shared
    for method, path in (("GET", "/"), ("GET", "/nope"), ("POST", "/taskss/quiet"),
                         ("POST", "/tasks/no-such-task"), ("GET", "/tasks/no-such-task/aaaaaaaaaaaaaaaa"),
                         ("POST", "/tasks/wh_sync")):  # a task without apiKeyNames has no /tasks route
        _hx_error(sh.server.request(method, path, key=sh.ci), 404, "not_found")


def test_wrong_method_on_known_path_is_405_with_allow(_hx_shared):
    sh = _hx_shared
    for method, path, allowed in (("PUT", "/tasks/quiet", "POST"),
                                  ("POST", "/tasks/gate/aaaaaaaaaaaaaaaa", "GET"),
                                  ("DELETE", "/health", "GET")):
        r = sh.server.request(method, path, key=sh.ci)
        _hx_error(r, 405, "method_not_allowed")
        assert allowed in [m.strip() for m in r.headers["Allow"].split(",")], r.headers


@pytest.mark.parametrize("data, statuses", [
    (b"GARBAGE\r\n\r\n", (400,)),
    (b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", (400, 431)),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", (400, 414)),
    (b"GET /health HTTP/1.1\r\n" + b"".join(b"X-H-%d: v\r\n" % i for i in range(300)) + b"\r\n", (400, 431)),
    (b"GET /tasks/\xff\xfe/x HTTP/1.1\r\nConnection: close\r\n\r\n", (400, 404)),
    (b"GET /tasks/%ff%fe HTTP/1.1\r\nConnection: close\r\n\r\n", (400, 404)),
    (b"GET /health HTTP/1.1\r\nno colon here\r\n\r\n", (400,)),
    (b"GET /health HTTP/1.1\r\nHost: x\r\n", (400,)),  # the client half-closes mid-headers
], ids=["garbage-line", "oversized-header", "oversized-line", "many-headers", "non-utf8-path",
        "non-utf8-percent-path", "malformed-header", "truncated-head"])
def test_protocol_errors_are_answered_as_json(_hx_shared, data, statuses):
    sh = _hx_shared
    r = _hx_raw(sh.server, data, shut_wr=True)
    assert r.status in statuses, r
    assert r.headers["Content-Type"].startswith("application/json")
    body = json.loads(r.body)
    assert set(body) == {"error", "message"} and body["error"] in ("bad_request", "not_found"), body
    _hx_assert_serving(sh)


def test_keep_alive_answers_two_requests_on_one_connection(_hx_shared):
    sh = _hx_shared
    auth = b"Authorization: Bearer " + sh.ci.encode() + b"\r\n"
    with socket.create_connection(("127.0.0.1", sh.server.port), timeout=10) as s, s.makefile("rb") as f:
        for word in (b"one", b"two"):
            s.sendall(b"POST /tasks/stdin HTTP/1.1\r\nHost: x\r\n" + auth
                      + b"Content-Length: %d\r\n\r\n%s" % (len(word), word))
            r = _hx_read_response(f)
            assert _hx_json(r, 200)["stdout"] == word.decode()
            assert r.headers.get("Connection", "").lower() != "close"


def test_keep_alive_survives_a_refused_request_with_a_body(_hx_shared):
    sh = _hx_shared
    with socket.create_connection(("127.0.0.1", sh.server.port), timeout=10) as s, s.makefile("rb") as f:
        # Without a key, with a body that looks like a request: it must be skipped, not run.
        smuggled = b"POST /tasks/marker HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
        s.sendall(b"POST /tasks/stdin HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(smuggled), smuggled))
        _hx_error(_hx_read_response(f), 401, "unauthorized")
        s.sendall(b"POST /tasks/stdin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + sh.ci.encode()
                  + b"\r\nContent-Length: 2\r\n\r\nhi")
        r = _hx_read_response(f)
        assert _hx_json(r, 200)["stdout"] == "hi"


def test_chunked_body_is_stdin(_hx_shared):
    sh = _hx_shared
    r = _hx_raw(sh.server, b"POST /tasks/stdin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + sh.ci.encode() + b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    assert _hx_json(r, 200)["stdout"] == "hello world"


def test_expect_100_continue_flow(_hx_shared):
    sh = _hx_shared
    with socket.create_connection(("127.0.0.1", sh.server.port), timeout=5) as s, s.makefile("rb") as f:
        s.sendall(b"POST /tasks/stdin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + sh.ci.encode()
                  + b"\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert f.readline().startswith(b"HTTP/1.1 100")
        assert f.readline() == b"\r\n"
        s.sendall(b"hello")
        assert _hx_json(_hx_read_response(f), 200)["stdout"] == "hello"


def test_expect_100_continue_refused_request_gets_final_answer(_hx_shared):
    sh = _hx_shared
    with socket.create_connection(("127.0.0.1", sh.server.port), timeout=5) as s, s.makefile("rb") as f:
        s.sendall(b"POST /tasks/stdin HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        _hx_error(_hx_read_response(f), 401, "unauthorized")  # no 100 Continue first
    _hx_assert_serving(sh)


# =============================================================================================
# ===== Execution =====
# =============================================================================================


def test_command_runs_without_a_shell(_hx_shared):
    body = _hx_json(_hx_shared.server.post("noshell", key=_hx_shared.ci), 200)
    assert body["stdout"] == "$HOME;echo pwned"


def test_request_body_is_stdin(_hx_shared):
    payload = "line one\nline two ünïcode\n"
    body = _hx_json(_hx_shared.server.post("stdin", payload, key=_hx_shared.ci), 200)
    assert body["stdout"] == payload


def test_environment_has_server_env_task_env_headers_and_run_identity(_hx_shared):
    sh = _hx_shared
    conn = http.client.HTTPConnection("127.0.0.1", sh.server.port, timeout=10)
    try:
        conn.putrequest("POST", "/tasks/env")
        conn.putheader("Authorization", f"Bearer {sh.ci}")
        conn.putheader("X-Foo-Bar", "first")
        conn.putheader("x-foo-bar", "second")
        conn.putheader("Content-Length", "0")
        conn.endheaders()
        resp = conn.getresponse()
        result = _hx_json(Response(resp.status, resp.headers, resp.read()), 200)
    finally:
        conn.close()
    env = json.loads(result["stdout"])
    assert env == {
        "HX_SERVER_ENV": "from-the-server",
        "HX_OVERRIDE": "from-the-task",
        "HX_EXTRA": "extra value",
        "REQUEST_HEADER_X_FOO_BAR": "first,second",
        "REQUEST_HEADER_X_ABSENT": "",
        "RTASK_TASK_NAME": "env",
        "RTASK_TASK_ID": result["task_id"],
        "RTASK_CALLER": "ci",
    }


def test_workdir_is_honoured(_hx_shared):
    body = _hx_json(_hx_shared.server.post("workdir", key=_hx_shared.ci), 200)
    assert os.path.realpath(body["stdout"].strip()) == os.path.realpath(_hx_shared.dir / "wd")


def test_command_runs_in_its_own_process_group(_hx_shared):
    body = _hx_json(_hx_shared.server.post("pgid", key=_hx_shared.ci), 200)
    assert body["stdout"] == "True True\n"


def test_output_is_capped_and_the_rest_drained(_hx_shared):
    t0 = time.monotonic()
    body = _hx_json(_hx_shared.server.post("caps", key=_hx_shared.ci), 200)
    assert time.monotonic() - t0 < 5  # not blocked on a full pipe until the timeout
    assert (body["status"], body["exit_code"]) == ("success", 0)
    assert body["stdout"] == "x" * 100 and body["stderr"] == "y" * 100
    assert body["stdout_truncated"] is True and body["stderr_truncated"] is True


def test_merge_stderr_puts_stderr_into_stdout(_hx_shared):
    body = _hx_json(_hx_shared.server.post("merge", key=_hx_shared.ci), 200)
    assert body["stdout"] == "out\nerr\n"
    assert "stderr" not in body


def test_non_utf8_output_is_decoded_with_replacement_characters(_hx_shared):
    body = _hx_json(_hx_shared.server.post("nonutf8", key=_hx_shared.ci), 200)
    assert body["stdout"] == "\ufffdok\ufffd"


@pytest.mark.parametrize("task, reason", [
    ("notfound", r"no such file|not found"),
    ("notexec", r"permission denied|not executable"),
    ("badworkdir", r"no such file|not found|workdir|directory"),
])
def test_command_that_cannot_start_is_exit_minus_2(_hx_shared, task, reason):
    body = _hx_json(_hx_shared.server.post(task, key=_hx_shared.ci), 200)
    assert (body["status"], body["exit_code"]) == ("failure", -2)
    assert re.search(reason, body["stderr"], re.I), body["stderr"]
    assert "Traceback" not in body["stderr"]
    _hx_assert_serving(_hx_shared)


def test_process_killed_by_a_signal_is_failure_minus_1(_hx_shared):
    body = _hx_json(_hx_shared.server.post("sigkill", key=_hx_shared.ci), 200)
    assert (body["status"], body["exit_code"]) == ("failure", -1)


def test_timeout_answers_promptly_and_kills_grandchildren(_hx_shared):
    t0 = time.monotonic()
    body = _hx_json(_hx_shared.server.post("timeout", key=_hx_shared.ci), 200)
    elapsed = time.monotonic() - t0
    grandchild = int(body["stderr"].split()[0])
    try:
        # The answer comes when the direct child is gone, not when the TERM-ignoring grandchild
        # that holds the pipes is killed (SIGKILL, 2 s later): at the answer it still lives.
        assert pid_alive(grandchild)
        assert (body["status"], body["exit_code"]) == ("timeout", -1)
        assert 0.9 <= elapsed < 1 + 3, elapsed
        wait_for(lambda: not pid_alive(grandchild), timeout=3.5)  # SIGKILL 2 s after SIGTERM
    finally:
        _hx_kill(grandchild)


def test_timeout_sends_sigterm_before_sigkill(_hx_shared):
    body = _hx_json(_hx_shared.server.post("term", key=_hx_shared.ci), 200)
    # The TERM trap ran (a chance to clean up) and exited 0: still a timeout.
    assert (body["status"], body["exit_code"], body["stdout"]) == ("timeout", -1, "cleaned\n")


def test_timeout_is_not_delayed_by_an_escaped_grandchild(_hx_shared):
    t0 = time.monotonic()
    body = _hx_json(_hx_shared.server.post("escaped", key=_hx_shared.ci), 200)
    elapsed = time.monotonic() - t0
    escaped = int(body["stderr"].split()[0])
    try:
        assert (body["status"], body["exit_code"]) == ("timeout", -1)
        assert 0.9 <= elapsed < 1 + 3, elapsed  # the escaped sleep holds the pipes for 30 s
    finally:
        _hx_kill(escaped)


def test_background_process_holding_stdout_neither_delays_answer_nor_is_killed(_hx_shared):
    t0 = time.monotonic()
    body = _hx_json(_hx_shared.server.post("daemon", key=_hx_shared.ci), 200)
    elapsed = time.monotonic() - t0
    daemon = int(body["stdout"].split()[0])
    try:
        assert (body["status"], body["exit_code"]) == ("success", 0)
        assert elapsed < 2, elapsed  # about half a second of grace; the sleep holds them 30 s
        time.sleep(0.3)
        assert pid_alive(daemon)  # a task may start a daemon on purpose
    finally:
        _hx_kill(daemon)


def test_big_body_round_trips(_hx_shared):
    payload = "".join(random.choices(string.ascii_letters, k=900_000))
    body = _hx_json(_hx_shared.server.post("big", payload, key=_hx_shared.ci, timeout=30), 200)
    assert body["status"] == "success"
    assert body["stdout"] == payload
    assert "stdout_truncated" not in body


def test_command_not_reading_stdin_completes_with_a_large_body(_hx_shared):
    t0 = time.monotonic()
    body = _hx_json(_hx_shared.server.post("noread", b"z" * 900_000, key=_hx_shared.ci), 200)
    assert (body["status"], body["exit_code"], body["stdout"]) == ("success", 0, "ok\n")
    assert time.monotonic() - t0 < 5


def test_many_sync_runs_at_once_each_get_their_own_result(start_server):
    """The first few sync runs of a worker are watched by their request threads, the rest (8
    and more running) by the reactor: every caller gets its own run's output either way, and
    a cancel reaches a run on either side. (Each echoes first, and the two long ones are
    cancelled once the others have answered: under load, a cancel sent as soon as two runs
    were listed running could come before a run had echoed, or while the others were still
    being spawned.)"""
    server, keys = start_server("""
        [tasks.own]
        command = ["sh", "-c", "echo \\"$RTASK_TASK_ID\\"; sleep 0.5; sleep \\"$(cat)\\""]
        apiKeyNames = ["ci"]
    """)
    key = keys["ci"]
    answers = {}

    def call(i):
        answers[i] = json.loads(server.post("own", "30" if i in (0, 15) else "0", key=key, timeout=20).body)
    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for i, thread in enumerate(threads):
        thread.start()
        if i in (0, 15):
            time.sleep(0.2)  # run 0 starts first (its own thread), run 15 last (the reactor)
    for thread in threads[1:15]:
        thread.join(20)
    running = wait_for(lambda: len(runs := [r for r in json.loads(server.get("/tasks/own", key=key).body)["runs"]
                                            if r["status"] == "running"]) == 2 and runs, timeout=15)
    for run in running:
        assert server.request("DELETE", f"/tasks/own/{run['task_id']}", key=key).status == 200
    for thread in threads:
        thread.join(20)
    assert sorted(answers) == list(range(16))
    for i, body in answers.items():
        expected = ("cancelled", -1) if i in (0, 15) else ("success", 0)
        assert (body["status"], body["exit_code"]) == expected, (i, body)
        assert body["stdout"] == body["task_id"] + "\n", (i, body)


def test_every_way_a_run_ends_gives_its_descriptors_back(start_server, tmp_path):
    """Pipes, pidfds and the event loop of a sync run's own thread are closed however the run
    ends: success, failure with input, a command that cannot start, a timeout, a cancel, and
    async runs (watched by the reactor instead)."""
    id_file = tmp_path / "run-id"
    server, keys = start_server(f"""
        [tasks.ok]
        command = ["echo", "hi"]
        apiKeyNames = ["ci"]
        [tasks.fails]
        command = ["sh", "-c", "cat; exit 3"]
        apiKeyNames = ["ci"]
        maxInputBytes = 200000
        [tasks.missing]
        command = [{_hx_q(str(tmp_path / "no-such-program"))}]
        apiKeyNames = ["ci"]
        [tasks.slow]
        command = ["sh", "-c", "trap '' TERM; sleep 5"]
        apiKeyNames = ["ci"]
        executionTimeoutSeconds = 1
        [tasks.held]
        command = ["sh", "-c", "echo $RTASK_TASK_ID > \\"$0.tmp\\"; mv \\"$0.tmp\\" \\"$0\\"; sleep 30", {_hx_q(str(id_file))}]
        apiKeyNames = ["ci"]
        [tasks.later]
        command = ["sh", "-c", "sleep 0.2; echo done"]
        apiKeyNames = ["ci"]
        async = true
    """)
    key = keys["ci"]
    worker = server.worker_pid()

    def cancel_held():
        run_id = wait_for(lambda: id_file.exists() and id_file.read_text().strip())
        id_file.unlink()
        assert server.request("DELETE", f"/tasks/held/{run_id}", key=key).status == 200

    def every_ending():
        assert json.loads(server.post("ok", key=key).body)["status"] == "success"
        assert json.loads(server.post("fails", b"x" * 200_000, key=key).body)["exit_code"] == 3
        assert json.loads(server.post("missing", key=key).body)["exit_code"] == -2
        assert json.loads(server.post("slow", key=key).body)["status"] == "timeout"
        canceller = threading.Thread(target=cancel_held)
        canceller.start()
        assert json.loads(server.post("held", key=key).body)["status"] == "cancelled"
        canceller.join(10)
        run_id = json.loads(server.post("later", key=key).body)["task_id"]
        assert json.loads(server.get(f"/tasks/later/{run_id}?wait=10", key=key).body)["status"] == "success"

    def descriptors():
        return len(os.listdir(f"/proc/{worker}/fd"))
    every_ending()  # the first round opens what stays open (the store, metric files)
    time.sleep(2.5)  # the SIGKILLs 2 s after the SIGTERMs
    baseline = descriptors()
    for _ in range(3):
        every_ending()
    time.sleep(2.5)
    assert descriptors() == baseline


# =============================================================================================
# ===== Metrics =====
# =============================================================================================


def _hx_le_values(text, handler) -> set:
    les = set()
    for line in text.splitlines():
        if line.startswith("task_duration_seconds_bucket{") and f'handler="{handler}"' in line:
            les.add(float(re.search(r'le="([^"]+)"', line).group(1)))
    return les


def test_duration_histogram_has_handler_key_and_status_labels(_hx_shared):
    sh = _hx_shared
    for payload, status in (("0\n", "success"), ("4\n", "failure"), ("sleep\n", "timeout")):
        assert _hx_json(sh.server.post("durations", payload, key=sh.ci), 200)["status"] == status
    m = sh.server

    def labels(status):
        return dict(handler="durations", api_key_used="ci", status=status)
    wait_for(lambda: all(m.metric("task_duration_seconds_count", **labels(s)) == 1
                         for s in ("success", "failure", "timeout")), timeout=5)
    for status in ("success", "failure", "timeout"):
        assert m.metric("task_duration_seconds_bucket", le="+Inf", **labels(status)) == 1
        assert m.metric("task_duration_seconds_sum", **labels(status)) > 0
    assert m.metric("task_duration_seconds_sum", **labels("timeout")) >= 0.9
    assert m.metric("task_duration_seconds_bucket", le="0.5", **labels("timeout")) == 0
    assert _hx_le_values(m.metrics(), "durations") == {
        .005, .01, .025, .05, .075, .1, .25, .5, .75, 1.0, 2.5, 5.0, 7.5, 10.0, float("inf")}


def test_custom_duration_buckets_are_used(_hx_shared):
    sh = _hx_shared
    _hx_json(sh.server.post("buckets", key=sh.ci), 200)
    wait_for(lambda: sh.server.metric("task_duration_seconds_count", handler="buckets", status="success") == 1,
             timeout=5)
    text = sh.server.metrics()
    assert _hx_le_values(text, "buckets") == {0.1, 1.0, float("inf")}  # a written inf is not doubled
    # One +Inf bucket per series (success, failure, timeout exist from the start).
    assert len(re.findall(r'^task_duration_seconds_bucket\{[^}]*handler="buckets"[^}]*le="\+Inf"'
                          r'[^}]*status="success"', text, re.M)) == 1
    assert sh.server.metric("task_duration_seconds_bucket", handler="buckets", le="+Inf", status="success") == 1


def test_default_process_collectors_are_on(_hx_shared):
    text = _hx_shared.server.metrics()
    assert re.search(r"^python_info\{", text, re.M)
    if Path("/proc/self/stat").exists():  # the process collector works where /proc does
        assert re.search(r"^process_resident_memory_bytes \d", text, re.M)


# =============================================================================================
# ===== Shutdown =====
# =============================================================================================


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_answers_inflight_sync_request_and_refuses_new_connections(start_server, tmp_path, sig):
    started, release = tmp_path / "started", tmp_path / "release"
    server, keys = start_server(f"""
        [tasks.slow]
        command = ["sh", "-c", "touch \\"$0\\"; while [ ! -e \\"$1\\" ]; do sleep 0.02; done; echo done",
                   {_hx_q(str(started))}, {_hx_q(str(release))}]
        apiKeyNames = ["ci"]
        executionTimeoutSeconds = 20
    """)
    answers = []
    client = threading.Thread(target=lambda: answers.append(server.post("slow", key=keys["ci"], timeout=30)))
    client.start()
    try:
        wait_for(started.exists, timeout=10)
        server.proc.send_signal(sig)
        wait_for(lambda: _hx_connection_refused(server.port), timeout=5)
        assert not answers and server.proc.poll() is None  # refused while the run still goes on
    finally:
        release.touch()
    client.join(15)
    assert answers, "the in-flight request got no answer"
    body = _hx_json(answers[0], 200)
    assert (body["status"], body["stdout"]) == ("success", "done\n")
    assert server.proc.wait(15) == 0


def test_shutdown_waits_for_running_async_execution(start_server, tmp_path):
    started, release, finished = tmp_path / "started", tmp_path / "release", tmp_path / "finished"
    server, keys = start_server(f"""
        [tasks.slow]
        command = ["sh", "-c", "touch \\"$0\\"; while [ ! -e \\"$1\\" ]; do sleep 0.02; done; sleep 0.2; touch \\"$2\\"",
                   {_hx_q(str(started))}, {_hx_q(str(release))}, {_hx_q(str(finished))}]
        apiKeyNames = ["ci"]
        async = true
        executionTimeoutSeconds = 20
    """)
    run_id = _hx_json(server.post("slow", key=keys["ci"]), 200)["task_id"]
    try:
        wait_for(started.exists, timeout=10)
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: _hx_connection_refused(server.port), timeout=5)
        time.sleep(0.3)
        assert server.proc.poll() is None  # still waiting for the run
    finally:
        release.touch()
    assert server.proc.wait(15) == 0
    assert finished.exists()  # the server exited only after the run ended
    assert re.search(r"task finished.*" + run_id, server.log()), server.log()


def test_shutdown_still_times_out_a_run_that_outlives_its_timeout(start_server, tmp_path):
    started = tmp_path / "started"
    server, keys = start_server(f"""
        [tasks.stuck]
        command = ["sh", "-c", "touch \\"$0\\"; exec sleep 30", {_hx_q(str(started))}]
        apiKeyNames = ["ci"]
        executionTimeoutSeconds = 1
    """)
    answers = []
    client = threading.Thread(target=lambda: answers.append(server.post("stuck", key=keys["ci"], timeout=20)))
    client.start()
    wait_for(started.exists, timeout=10)
    server.proc.send_signal(signal.SIGTERM)
    client.join(10)
    assert answers, "the in-flight request got no answer"
    body = _hx_json(answers[0], 200)
    assert (body["status"], body["exit_code"]) == ("timeout", -1)
    assert server.proc.wait(10) == 0


def test_shutdown_signal_delivered_to_any_thread_is_honoured(start_server):
    server, _ = start_server("""
        [tasks.quiet]
        command = ["true"]
        apiKeyNames = ["ci"]
    """, keys=("ci",))
    pid = server.proc.pid
    others = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    assert others, "the server runs no other thread"
    # kill() on a thread id sends the process-directed signal with that thread preferred:
    # what the kernel may do on its own for any SIGTERM sent to the server (it did, under load).
    os.kill(others[0], signal.SIGTERM)
    wait_for(lambda: _hx_connection_refused(server.port), timeout=5)
    assert server.proc.wait(10) == 0


@pytest.mark.parametrize("target", ["supervisor", "worker"])
def test_signals_in_a_burst_never_hang_the_server(start_server, target):
    """A signal handler that takes a lock (threading.Event.set) deadlocks when a second signal
    interrupts it, or when one lands while the main thread holds that lock: the process then
    never drains. systemd's default KillMode sends SIGTERM to every process of the unit and
    the supervisor passes it on too, so a worker gets two at once. After a burst of SIGHUPs
    the server still reloads, answers and stops on SIGTERM."""
    server, keys = start_server("""
        [tasks.quiet]
        command = ["true"]
        apiKeyNames = ["ci"]
    """, keys=("ci",))
    pid = server.proc.pid if target == "supervisor" else server.worker_pid()
    end = time.monotonic() + 0.5
    while time.monotonic() < end:  # signals faster than a handler runs: some interrupt it
        os.kill(pid, signal.SIGHUP)
    time.sleep(1)
    assert server.post("quiet", key=keys["ci"]).status == 200
    for _ in range(20):
        os.kill(pid, signal.SIGTERM)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(15) == 0


# =============================================================================================
# ===== Task lifecycle =====
# =============================================================================================

_LC_TASK_ID_RE = re.compile(r"[a-z2-7]{16}")
_LC_RFC3339_UTC_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
_LC_HOOK_SYNC = "lc-hook-sync-" + "s" * 30
_LC_HOOK_ASYNC = "lc-hook-async-" + "a" * 30
_LC_HOOK_LIST = "lc-hook-list-" + "l" * 30
# A task that runs its request body as a shell script: each test sends the script it needs.
_LC_EVAL = '["sh", "-c", "eval \\"$(cat)\\""]'


def _lc_config() -> str:
    return f"""
[auth.keyPermissions]
runner = ["tasks:run:lc_sh_async", "tasks:read:lc_sh_async", "tasks:list:lc_sh_async"]

[tasks.lc_sh]
command = {_LC_EVAL}
apiKeyNames = ["ci"]
executionTimeoutSeconds = 20
webhookSecrets = {{ lc_hook_sync = "{_LC_HOOK_SYNC}" }}
environment = {{ RTASK_CALLER = "forged", RTASK_TASK_ID = "forged", RTASK_TASK_NAME = "forged" }}

[tasks.lc_sh_async]
command = {_LC_EVAL}
apiKeyNames = ["ci"]
async = true
asyncResultRetentionSeconds = 300
executionTimeoutSeconds = 20
webhookSecrets = {{ lc_hook_async = "{_LC_HOOK_ASYNC}" }}

[tasks.lc_short]
command = {_LC_EVAL}
apiKeyNames = ["ci"]
async = true
executionTimeoutSeconds = 1

[tasks.lc_trunc]
command = {_LC_EVAL}
apiKeyNames = ["ci"]
maxOutputBytes = 10

[tasks.lc_nostart]
command = ["/nonexistent/lc-no-such-program"]
apiKeyNames = ["ci"]

[tasks.lc_timeout]
command = ["sleep", "5"]
apiKeyNames = ["ci"]
executionTimeoutSeconds = 0.5

[tasks.lc_other]
command = ["true"]
apiKeyNames = ["other"]
async = true
rateLimit = 2.5
maxConcurrentTasks = 3
queueSize = 4
maxInputBytes = 100
maxOutputBytes = 200
executionTimeoutSeconds = 7

[tasks.lc_list]
command = {_LC_EVAL}
apiKeyNames = ["ci"]
executionTimeoutSeconds = 20
webhookSecrets = {{ lc_hook_list = "{_LC_HOOK_LIST}" }}

[tasks.lc_sse]
command = {_LC_EVAL}
apiKeyNames = ["ci"]
async = true
executionTimeoutSeconds = 20

[tasks.lc_sse_sync]
command = {_LC_EVAL}
apiKeyNames = ["ci"]
executionTimeoutSeconds = 20

[tasks.lc_big]
command = {_LC_EVAL}
apiKeyNames = ["ci"]
async = true
maxOutputBytes = 100000
executionTimeoutSeconds = 20

[tasks.lc_q_sync]
command = ["sh", "-c", "sleep 1; echo ok"]
apiKeyNames = ["ci"]
maxConcurrentTasks = 1
queueSize = 2

[tasks.lc_q_timeout]
command = {_LC_EVAL}
apiKeyNames = ["ci"]
maxConcurrentTasks = 1
queueSize = 2
queueTimeoutSeconds = 1
executionTimeoutSeconds = 20

[tasks.lc_q_async]
command = {_LC_EVAL}
apiKeyNames = ["ci"]
async = true
maxConcurrentTasks = 1
queueSize = 1
executionTimeoutSeconds = 20

[tasks.lc_q_handover]
command = {_LC_EVAL}
apiKeyNames = ["ci"]
async = true
maxConcurrentTasks = 1
queueSize = 1
executionTimeoutSeconds = 20

[tasks.lc_q_fifo]
command = {_LC_EVAL}
apiKeyNames = ["ci"]
async = true
maxConcurrentTasks = 1
queueSize = 2
executionTimeoutSeconds = 20

[tasks.lc_q_cancel]
command = {_LC_EVAL}
apiKeyNames = ["ci"]
async = true
maxConcurrentTasks = 1
queueSize = 1
executionTimeoutSeconds = 20

[tasks.lc_q_none_async]
command = {_LC_EVAL}
apiKeyNames = ["ci"]
async = true
maxConcurrentTasks = 1
executionTimeoutSeconds = 20

[tasks.lc_q_none_sync]
command = {_LC_EVAL}
apiKeyNames = ["ci"]
maxConcurrentTasks = 1
executionTimeoutSeconds = 20
"""


# Tasks that name "ci" in apiKeyNames: exactly what GET /tasks must list for that key.
_LC_CI_TASKS = {"lc_sh", "lc_sh_async", "lc_short", "lc_trunc", "lc_nostart", "lc_timeout", "lc_list", "lc_sse",
                "lc_sse_sync", "lc_big", "lc_q_sync", "lc_q_timeout", "lc_q_async", "lc_q_fifo", "lc_q_cancel",
                "lc_q_none_async", "lc_q_none_sync", "lc_q_handover"}
_LC_ASYNC_TASKS = {"lc_sh_async", "lc_short", "lc_sse", "lc_big", "lc_q_async", "lc_q_fifo", "lc_q_cancel",
                   "lc_q_none_async", "lc_q_handover"}


@pytest.fixture(scope="module")
def _lc(tmp_path_factory):
    """One server for the lifecycle tests: .server, .ci, .other, .runner, .dir, .gates."""
    d = tmp_path_factory.mktemp("lc")
    (d / "config.toml").write_text(_lc_config())
    tokens = {name: new_key(d, name) for name in ("ci", "other", "runner")}
    server = Server(d)
    env = types.SimpleNamespace(server=server, dir=d, gates=[], **tokens)
    try:
        yield env
    finally:
        for gate in env.gates:  # release any run a failed test left waiting
            gate.touch()
        server.stop()


def _lc_gate(lc, name) -> tuple[Path, str]:
    """A gate file and a script line that waits for it: holds a run "running" until opened."""
    gate = lc.dir / f"gate-{name}-{secrets.token_hex(4)}"
    lc.gates.append(gate)
    return gate, f'while [ ! -e "{gate}" ]; do sleep 0.02; done'


def _lc_json(r, status) -> dict:
    assert r.status == status, r
    assert r.headers.get("Content-Type", "").startswith("application/json"), r.headers
    return json.loads(r.body)


def _lc_error(r, status, code) -> dict:
    body = _lc_json(r, status)
    assert body["error"] == code, r
    assert isinstance(body.get("message"), str) and body["message"], r
    return body


def _lc_time(text) -> datetime.datetime:
    assert isinstance(text, str) and _LC_RFC3339_UTC_RE.fullmatch(text), text
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _lc_post_async(lc, task, script, key=None) -> str:
    body = _lc_json(lc.server.post(task, script, key=key or lc.ci), 200)
    assert _LC_TASK_ID_RE.fullmatch(body["task_id"]), body
    return body["task_id"]


def _lc_result(lc, task, run_id, wait=None, key=None) -> dict:
    query = f"?wait={wait}" if wait is not None else ""
    return _lc_json(lc.server.get(f"/tasks/{task}/{run_id}{query}", key=key or lc.ci), 200)


def _lc_delete(lc, task, run_id, key=None, **kw):
    return lc.server.request("DELETE", f"/tasks/{task}/{run_id}", key=key, **kw)


def _lc_health(lc, task) -> dict:
    return _lc_json(lc.server.get("/health/detailed"), 200)["tasks"][task]


def _lc_check_finished(result, *, status, exit_code):
    """The fields every finished result has (README §5); returns the result."""
    assert result["status"] == status, result
    assert result["exit_code"] == exit_code, result
    assert _LC_TASK_ID_RE.fullmatch(result["task_id"]), result
    started, finished = _lc_time(result["started_at"]), _lc_time(result["finished_at"])
    assert finished >= started, result
    now = datetime.datetime.now(datetime.timezone.utc)
    assert abs((now - started).total_seconds()) < 60, result
    duration = result["duration_seconds"]
    assert isinstance(duration, (int, float)) and duration >= 0, result
    assert abs((finished - started).total_seconds() - duration) < 0.05, result
    for stream in ("stdout", "stderr"):
        if stream in result:
            assert isinstance(result[stream], str) and result[stream], result  # left out when empty
    return result


def _lc_truncated(result, stream) -> bool:
    flag = result.get(f"{stream}_truncated", False)
    assert isinstance(flag, bool), result
    return flag


def _lc_identity_script() -> str:
    return 'printf "%s|%s|%s" "$RTASK_TASK_NAME" "$RTASK_TASK_ID" "$RTASK_CALLER"'


# -- richer results ---------------------------------------------------------------------------


def test_sync_result_carries_task_id_times_and_duration(_lc):
    t0 = time.monotonic()
    r = _lc.server.post("lc_sh", _lc_identity_script() + "; sleep 0.5", key=_lc.ci)
    elapsed = time.monotonic() - t0
    body = _lc_check_finished(_lc_json(r, 200), status="success", exit_code=0)
    assert 0.45 <= body["duration_seconds"] <= min(elapsed, 1.5), (body, elapsed)
    assert body["stdout"] == f"lc_sh|{body['task_id']}|ci", body  # the task's own forged env loses
    assert not _lc_truncated(body, "stdout") and not _lc_truncated(body, "stderr")
    keys = {k for k, v in body.items() if not (k.endswith("_truncated") and v is False)}
    assert keys == {"status", "exit_code", "stdout", "task_id", "started_at", "finished_at",
                    "duration_seconds"}, body


def test_async_result_task_id_is_the_commands_rtask_task_id(_lc):
    run_id = _lc_post_async(_lc, "lc_sh_async", _lc_identity_script() + "; sleep 0.3")
    body = _lc_check_finished(_lc_result(_lc, "lc_sh_async", run_id, wait=10), status="success", exit_code=0)
    assert body["task_id"] == run_id
    assert body["stdout"] == f"lc_sh_async|{run_id}|ci", body
    assert 0.25 <= body["duration_seconds"] <= 1.5, body
    assert "stderr" not in body and not _lc_truncated(body, "stdout"), body


def test_a_polled_run_never_shows_an_end_without_its_output(_lc):
    """Polled as fast as the server answers, an async run is seen queued or running, then ended
    with all of its result: never an end status without the output and the end time."""
    for _ in range(25):
        run_id = _lc_post_async(_lc, "lc_sh_async", "echo ok")
        while (body := _lc_result(_lc, "lc_sh_async", run_id))["status"] in ("queued", "running"):
            assert body["exit_code"] == -1 and "finished_at" not in body, body
        _lc_check_finished(body, status="success", exit_code=0)
        assert body["stdout"] == "ok\n", body
        runs = _lc_json(_lc.server.get("/tasks/lc_sh_async", key=_lc.ci), 200)["runs"]
        listed = {run["task_id"]: run for run in runs}
        assert listed[run_id]["status"] == "success" and listed[run_id]["finished_at"], listed[run_id]


def test_webhook_run_sees_the_webhook_name_as_rtask_caller(_lc):
    r = _lc.server.request("POST", f"/wh/{_LC_HOOK_SYNC}", _lc_identity_script())
    body = _lc_check_finished(_lc_json(r, 200), status="success", exit_code=0)
    assert body["stdout"] == f"lc_sh|{body['task_id']}|lc_hook_sync", body

    r = _lc.server.request("POST", f"/wh/{_LC_HOOK_ASYNC}", _lc_identity_script())
    run_id = _lc_json(r, 200)["task_id"]
    body = _lc_check_finished(_lc_result(_lc, "lc_sh_async", run_id, wait=10), status="success", exit_code=0)
    assert body["stdout"] == f"lc_sh_async|{run_id}|lc_hook_async", body


def test_truncated_flags_are_set_only_for_the_stream_that_was_cut(_lc):
    # stdout exactly at the limit (10 bytes) is not cut; stderr one byte over is.
    r = _lc.server.post("lc_trunc", "printf 0123456789; printf abcdefghijk >&2; exit 3", key=_lc.ci)
    body = _lc_check_finished(_lc_json(r, 200), status="failure", exit_code=3)
    assert body["stdout"] == "0123456789" and not _lc_truncated(body, "stdout"), body
    assert body["stderr"] == "abcdefghij" and body["stderr_truncated"] is True, body

    r = _lc.server.post("lc_trunc", "printf 0123456789X; printf abc >&2", key=_lc.ci)
    body = _lc_check_finished(_lc_json(r, 200), status="success", exit_code=0)
    assert body["stdout"] == "0123456789" and body["stdout_truncated"] is True, body
    assert body["stderr"] == "abc" and not _lc_truncated(body, "stderr"), body


def test_unstartable_and_timed_out_runs_also_carry_the_lifecycle_fields(_lc):
    body = _lc_check_finished(_lc_json(_lc.server.post("lc_nostart", key=_lc.ci), 200),
                              status="failure", exit_code=-2)
    assert "lc-no-such-program" in body["stderr"], body
    assert "stdout" not in body, body

    t0 = time.monotonic()
    body = _lc_check_finished(_lc_json(_lc.server.post("lc_timeout", key=_lc.ci), 200),
                              status="timeout", exit_code=-1)
    assert 0.45 <= body["duration_seconds"] <= 1.5, body
    assert time.monotonic() - t0 < 2.5


# -- long-poll --------------------------------------------------------------------------------


def test_long_poll_answers_as_soon_as_the_run_ends(_lc):
    run_id = _lc_post_async(_lc, "lc_sh_async", "sleep 1; echo done")
    t0 = time.monotonic()
    body = _lc_result(_lc, "lc_sh_async", run_id, wait=5)
    elapsed = time.monotonic() - t0
    assert 0.7 <= elapsed <= 1.8, elapsed
    _lc_check_finished(body, status="success", exit_code=0)
    assert body["stdout"] == "done\n" and body["task_id"] == run_id, body


def test_long_poll_times_out_with_the_running_state(_lc):
    run_id = _lc_post_async(_lc, "lc_sh_async", "sleep 3")
    try:
        t0 = time.monotonic()
        body = _lc_result(_lc, "lc_sh_async", run_id, wait=0.5)
        elapsed = time.monotonic() - t0
        assert 0.45 <= elapsed <= 1.2, elapsed
        assert body["status"] == "running" and body["exit_code"] == -1, body
        assert not {"stdout", "stderr", "finished_at", "duration_seconds"} & set(body), body
    finally:
        _lc_delete(_lc, "lc_sh_async", run_id, key=_lc.ci)


def test_long_poll_waits_at_most_60_seconds(start_server):
    """?wait=S is capped at 60 s: a longer wait on a run still going answers with its running
    state after a minute (a connection is never held for the caller's number of seconds)."""
    server, keys = start_server("""
        [tasks.long]
        command = ["sleep", "90"]
        apiKeyNames = ["ci"]
        async = true
        executionTimeoutSeconds = 120
    """)
    run_id = json.loads(server.post("long", key=keys["ci"]).body)["task_id"]
    t0 = time.monotonic()
    r = server.get(f"/tasks/long/{run_id}?wait=600", key=keys["ci"], timeout=90)
    elapsed = time.monotonic() - t0
    assert 59.5 <= elapsed <= 64, elapsed
    assert (r.status, json.loads(r.body)["status"]) == (200, "running"), r
    assert server.request("DELETE", f"/tasks/long/{run_id}", key=keys["ci"]).status == 200


def test_long_poll_with_a_huge_wait_still_answers_when_the_run_ends(_lc):
    run_id = _lc_post_async(_lc, "lc_sh_async", "sleep 1; echo capped")
    t0 = time.monotonic()
    body = _lc_result(_lc, "lc_sh_async", run_id, wait=1000)
    assert time.monotonic() - t0 <= 2.5
    _lc_check_finished(body, status="success", exit_code=0)
    assert body["stdout"] == "capped\n", body


@pytest.mark.parametrize("wait", ["abc", "1s", "-", "nan"])
def test_long_poll_wait_that_is_not_a_number_of_seconds_is_400(_lc, wait):
    run_id = _lc_post_async(_lc, "lc_sh_async", "sleep 2")
    try:
        t0 = time.monotonic()
        r = _lc.server.get(f"/tasks/lc_sh_async/{run_id}?wait={wait}", key=_lc.ci)
        assert time.monotonic() - t0 < 1.0
        _lc_error(r, 400, "bad_request")
    finally:
        _lc_delete(_lc, "lc_sh_async", run_id, key=_lc.ci)


def test_long_poll_on_an_unknown_id_is_404_at_once(_lc):
    t0 = time.monotonic()
    _lc_error(_lc.server.get(f"/tasks/lc_sh_async/{'a' * 16}?wait=5", key=_lc.ci), 404, "not_found")
    assert time.monotonic() - t0 < 1.0


# -- cancel -----------------------------------------------------------------------------------


def test_cancel_a_running_async_run(_lc):
    pid_file = _lc.dir / "cancel-pid"
    run_id = _lc_post_async(_lc, "lc_sh_async", f'echo $$ > "{pid_file}.tmp"; mv "{pid_file}.tmp" "{pid_file}"; '
                                                'echo started; sleep 30')
    pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip()))
    assert _lc_result(_lc, "lc_sh_async", run_id)["status"] == "running"
    t0 = time.monotonic()
    r = _lc_delete(_lc, "lc_sh_async", run_id, key=_lc.ci)
    assert time.monotonic() - t0 < 1.0
    body = _lc_check_finished(_lc_json(r, 200), status="cancelled", exit_code=-1)
    assert body["task_id"] == run_id and body["stdout"] == "started\n", body
    assert body["duration_seconds"] < 2.0, body
    wait_for(lambda: not pid_alive(pid), timeout=3)
    assert _lc_result(_lc, "lc_sh_async", run_id) == body  # the kept result says cancelled
    # Cancelling again: the run has ended.
    _lc_error(_lc_delete(_lc, "lc_sh_async", run_id, key=_lc.ci), 409, "conflict")


def test_cancel_kills_a_child_and_grandchild_that_ignore_sigterm(_lc):
    child, grandchild = _lc.dir / "trap-child", _lc.dir / "trap-grandchild"
    script = (f"trap '' TERM; echo $$ > \"{child}\"; "
              f"sh -c 'trap \"\" TERM; echo $$ > \"{grandchild}\"; exec sleep 30' & wait; wait; sleep 30")
    run_id = _lc_post_async(_lc, "lc_sh_async", script)
    pids = [int(wait_for(lambda p=p: p.exists() and p.read_text().strip())) for p in (child, grandchild)]
    assert all(pid_alive(p) for p in pids)
    t0 = time.monotonic()
    r = _lc_delete(_lc, "lc_sh_async", run_id, key=_lc.ci)
    elapsed = time.monotonic() - t0
    assert 1.5 <= elapsed <= 4.5, elapsed  # TERM is ignored: the KILL 2 s later ends it
    body = _lc_check_finished(_lc_json(r, 200), status="cancelled", exit_code=-1)
    assert body["task_id"] == run_id
    wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=3)


def test_cancel_an_ended_run_is_409_and_keeps_its_result(_lc):
    run_id = _lc_post_async(_lc, "lc_sh_async", "echo finished")
    before = _lc_check_finished(_lc_result(_lc, "lc_sh_async", run_id, wait=5), status="success", exit_code=0)
    _lc_error(_lc_delete(_lc, "lc_sh_async", run_id, key=_lc.ci), 409, "conflict")
    assert _lc_result(_lc, "lc_sh_async", run_id) == before


@pytest.mark.parametrize("run_id", ["a" * 16, "not-a-task-id", "A" * 16])
def test_cancel_an_unknown_run_is_404(_lc, run_id):
    _lc_error(_lc_delete(_lc, "lc_sh_async", run_id, key=_lc.ci), 404, "not_found")


def test_cancel_needs_the_cancel_permission(_lc):
    run_id = _lc_post_async(_lc, "lc_sh_async", "sleep 30")
    try:
        _lc_error(_lc_delete(_lc, "lc_sh_async", run_id), 401, "unauthorized")
        _lc_error(_lc_delete(_lc, "lc_sh_async", run_id, key="garbage"), 401, "unauthorized")
        body = _lc_error(_lc_delete(_lc, "lc_sh_async", run_id, key=_lc.other), 403, "forbidden")
        assert body["message"] == "Missing required permission: tasks:cancel:lc_sh_async", body
        # runner may run and read this task, but not cancel it.
        body = _lc_error(_lc_delete(_lc, "lc_sh_async", run_id, key=_lc.runner), 403, "forbidden")
        assert body["message"] == "Missing required permission: tasks:cancel:lc_sh_async", body
        assert _lc_result(_lc, "lc_sh_async", run_id, key=_lc.runner)["status"] == "running"
    finally:
        body = _lc_json(_lc_delete(_lc, "lc_sh_async", run_id, key=_lc.ci), 200)
    assert body["status"] == "cancelled", body


def test_cancel_a_sync_run_from_another_connection(_lc):
    id_file = _lc.dir / "sync-cancel-id"
    script = f'echo "$RTASK_TASK_ID" > "{id_file}.tmp"; mv "{id_file}.tmp" "{id_file}"; sleep 30'
    answer = {}

    def call():
        t = time.monotonic()
        answer["r"] = _lc.server.post("lc_sh", script, key=_lc.ci)
        answer["t"] = time.monotonic()
        answer["elapsed"] = answer["t"] - t

    thread = threading.Thread(target=call)
    thread.start()
    run_id = wait_for(lambda: id_file.exists() and id_file.read_text().strip())
    runs = _lc_json(_lc.server.get("/tasks/lc_sh", key=_lc.ci), 200)["runs"]
    assert [(r["task_id"], r["status"]) for r in runs if r["task_id"] == run_id] == [(run_id, "running")]
    t0 = time.monotonic()
    r = _lc_delete(_lc, "lc_sh", run_id, key=_lc.ci)
    assert time.monotonic() - t0 < 1.0
    deleted = _lc_check_finished(_lc_json(r, 200), status="cancelled", exit_code=-1)
    thread.join(5)
    assert not thread.is_alive()
    assert answer["t"] - t0 < 1.5  # the sync caller got its answer right away, too
    body = _lc_check_finished(_lc_json(answer["r"], 200), status="cancelled", exit_code=-1)
    assert body["task_id"] == run_id == deleted["task_id"], body


def test_cancel_before_the_timeout_still_reports_cancelled(_lc):
    # The command ignores SIGTERM, so the run lives until the KILL 2 s after the DELETE; the
    # task's 1 s timeout passes meanwhile. The DELETE came first: the run was cancelled.
    run_id = _lc_post_async(_lc, "lc_short", "trap '' TERM; echo started; sleep 5")
    wait_for(lambda: _lc_result(_lc, "lc_short", run_id).get("started_at"))
    time.sleep(0.2)
    t0 = time.monotonic()
    r = _lc_delete(_lc, "lc_short", run_id, key=_lc.ci)
    assert 1.5 <= time.monotonic() - t0 <= 4.5
    body = _lc_check_finished(_lc_json(r, 200), status="cancelled", exit_code=-1)
    assert _lc_result(_lc, "lc_short", run_id)["status"] == "cancelled"
    assert body["task_id"] == run_id


def _lc_hold_in_pipe_grace(lc):
    """A run whose direct child has exited while a background process still holds its output
    pipe: for about half a second it is still running."""
    run_id = _lc_post_async(lc, "lc_sh_async", "sleep 3 & exit 0")
    time.sleep(0.1)
    return "lc_sh_async", run_id, {"cancelled"}


def _lc_hold_after_timeout(lc):
    """A run whose timeout has sent SIGTERM, which it ignores: running until the KILL."""
    run_id = _lc_post_async(lc, "lc_short", "trap '' TERM; sleep 5")
    time.sleep(1.3)
    return "lc_short", run_id, {"timeout", "cancelled"}


def _lc_hold_while_cancelling(lc):
    """A run an earlier DELETE is stopping (it ignores SIGTERM: running until the KILL)."""
    run_id = _lc_post_async(lc, "lc_sh_async", "trap '' TERM; sleep 5")
    time.sleep(0.2)
    threading.Thread(target=lambda: _lc_delete(lc, "lc_sh_async", run_id, key=lc.ci), daemon=True).start()
    time.sleep(0.3)
    return "lc_sh_async", run_id, {"cancelled"}


@pytest.mark.parametrize("hold", [
    pytest.param(_lc_hold_in_pipe_grace, id="pipe-grace"),
    pytest.param(_lc_hold_after_timeout, id="after-timeout-term"),
    pytest.param(_lc_hold_while_cancelling, id="second-delete"),
])
def test_delete_of_a_run_that_is_still_running_is_never_409(_lc, hold):
    task, run_id, statuses = hold(_lc)
    assert _lc_result(_lc, task, run_id)["status"] == "running"
    r = _lc_delete(_lc, task, run_id, key=_lc.ci)
    assert r.status == 200, r
    body = _lc_json(r, 200)
    assert body["status"] in statuses and body["exit_code"] == -1, body
    assert "finished_at" in body, body


def test_delete_just_as_a_queued_run_gets_its_slot_is_never_409(_lc):
    """The moment a queued run is handed its slot (its process being spawned), a DELETE must
    still stop it: polled on one keep-alive connection, the DELETE follows at once."""
    conn = http.client.HTTPConnection("127.0.0.1", _lc.server.port, timeout=30)
    auth = {"Authorization": f"Bearer {_lc.ci}"}

    def call(method, path, body=b""):
        conn.request(method, path, body=body, headers=auth)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    try:
        for _ in range(15):
            _, first = call("POST", "/tasks/lc_q_handover", b"sleep 0.1")
            _, queued = call("POST", "/tasks/lc_q_handover", b"sleep 10")
            assert queued["status"] == "queued", queued
            path = f"/tasks/lc_q_handover/{queued['task_id']}"
            while call("GET", path)[1]["status"] == "queued":
                pass
            status, body = call("DELETE", path)
            assert (status, body["status"]) == (200, "cancelled"), body
            assert call("GET", f"/tasks/lc_q_handover/{first['task_id']}?wait=5")[1]["status"] == "success"
    finally:
        conn.close()


def test_jwt_caller_is_the_token_subject(start_server, tmp_path):
    out = rtask_cli("generate-keys", "--output-dir", "keys", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    out = rtask_cli("generate-token", "--permissions", "tasks:run:lc_jwt,tasks:read:lc_jwt",
                    "--subject", "lc-robot", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    server, _ = start_server(f"""
        [auth.jwt]
        publicKeyPath = "keys/jwt-public-key.pem"

        [tasks.lc_jwt]
        command = {_LC_EVAL}
        """, keys=())
    body = _lc_check_finished(_lc_json(server.post("lc_jwt", _lc_identity_script(), key=token), 200),
                              status="success", exit_code=0)
    assert body["stdout"] == f"lc_jwt|{body['task_id']}|lc-robot", body
    runs = _lc_json(server.get("/tasks/lc_jwt", key=token), 403)
    assert runs["error"] == "forbidden", runs  # no tasks:list in the token


# -- list -------------------------------------------------------------------------------------


def test_list_tasks_shows_exactly_the_tasks_the_key_may_run(_lc):
    tasks = _lc_json(_lc.server.get("/tasks", key=_lc.ci), 200)["tasks"]
    assert sorted(t["name"] for t in tasks) == sorted(_LC_CI_TASKS)
    assert {t["name"]: t["async"] for t in tasks} == {n: n in _LC_ASYNC_TASKS for n in _LC_CI_TASKS}

    tasks = _lc_json(_lc.server.get("/tasks", key=_lc.other), 200)["tasks"]
    assert len(tasks) == 1, tasks
    other = tasks[0]
    assert other["name"] == "lc_other" and other["async"] is True, other
    assert (other["rateLimit"], other["maxConcurrentTasks"], other["queueSize"], other["maxInputBytes"],
            other["maxOutputBytes"], other["executionTimeoutSeconds"]) == (2.5, 3, 4, 100, 200, 7), other
    assert "command" not in other, other

    tasks = _lc_json(_lc.server.get("/tasks", key=_lc.runner), 200)["tasks"]
    assert [t["name"] for t in tasks] == ["lc_sh_async"], tasks

    _lc_error(_lc.server.get("/tasks"), 401, "unauthorized")
    _lc_error(_lc.server.get("/tasks", key="garbage"), 401, "unauthorized")


def test_list_runs_newest_first_with_id_status_caller_and_times(_lc):
    ids = []
    for script in ("echo one", "exit 4"):
        r = _lc.server.post("lc_list", script, key=_lc.ci)
        ids.append(_lc_json(r, 200)["task_id"])
        time.sleep(0.02)
    r = _lc.server.request("POST", f"/wh/{_LC_HOOK_LIST}", "echo three")
    ids.append(_lc_json(r, 200)["task_id"])
    time.sleep(0.02)
    gate, wait_gate = _lc_gate(_lc, "list")
    thread = threading.Thread(target=lambda: _lc.server.post("lc_list", wait_gate, key=_lc.ci))
    thread.start()
    try:
        def running_listed():
            runs = _lc_json(_lc.server.get("/tasks/lc_list", key=_lc.ci), 200)["runs"]
            return runs if len(runs) == 4 and runs[0]["status"] == "running" else None
        runs = wait_for(running_listed)
    finally:
        gate.touch()
        thread.join(5)
    listed_ids = [r.get("task_id", r.get("id")) for r in runs]
    assert listed_ids[1:] == ids[::-1], runs
    assert [(r["status"], r["caller"]) for r in runs] == [
        ("running", "ci"), ("success", "lc_hook_list"), ("failure", "ci"), ("success", "ci")], runs
    assert runs[0]["finished_at"] is None, runs[0]
    _lc_time(runs[0]["started_at"])
    starts = [_lc_time(r["started_at"]) for r in runs]
    assert starts == sorted(starts, reverse=True), runs
    for run in runs[1:]:
        assert _lc_time(run["finished_at"]) >= _lc_time(run["started_at"]), run
    assert "stdout" not in json.dumps(runs)

    _lc_error(_lc.server.get("/tasks/lc_list"), 401, "unauthorized")
    body = _lc_error(_lc.server.get("/tasks/lc_list", key=_lc.other), 403, "forbidden")
    assert body["message"] == "Missing required permission: tasks:list:lc_list", body
    _lc_error(_lc.server.get("/tasks/lc_no_such_task", key=_lc.ci), 404, "not_found")


# =============================================================================================
# ===== Live output =====
# =============================================================================================


class _LcStream:
    """A raw HTTP/1.1 request answered with Server-Sent Events, read event by event."""

    def __init__(self, server, method, path, key, body=b"", rcvbuf=None):
        if isinstance(body, str):
            body = body.encode()
        self.t0 = time.monotonic()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(15)
        self.sock.connect(("127.0.0.1", server.port))
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        self.sock.sendall((f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}"
                           f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
        self.buf = b""
        self.closed = False
        self.last_recv = self.t0
        self.status, self.headers = None, {}

    def read_head(self, timeout=15):
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            assert self._recv(deadline - time.monotonic()), self.buf
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return self

    def _recv(self, timeout) -> bool:
        if timeout <= 0:
            raise AssertionError("no event in time")
        self.sock.settimeout(timeout)
        chunk = self.sock.recv(65536)
        self.last_recv = time.monotonic()
        if not chunk:
            self.closed = True
            return False
        self.buf += chunk
        return True

    def next_event(self, timeout=15):
        """(name, decoded JSON data, time received) of the next event; None when the server
        has closed the connection. Comment lines (keep-alives) are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n\n" in self.buf:
                block, self.buf = self.buf.split(b"\n\n", 1)
                name, data = "message", []
                for line in block.decode().split("\n"):
                    if line.startswith(":"):
                        continue
                    field, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if field == "event":
                        name = value
                    elif field == "data":
                        data.append(value)
                if data:
                    return name, json.loads("\n".join(data)), self.last_recv
            if self.closed:
                assert not self.buf.strip(), self.buf
                return None
            self._recv(deadline - time.monotonic())

    def rest(self, timeout=15) -> list:
        events = []
        while (event := self.next_event(timeout)) is not None:
            events.append(event)
        return events

    def close(self):
        self.sock.close()


def _lc_output(events, name) -> str:
    chunks = [data for ev, data, _ in events if ev == name]
    assert all(isinstance(c, str) for c in chunks), chunks  # stdout/stderr data is a JSON string
    return "".join(chunks)


def _lc_check_stream_end(events) -> dict:
    """Exactly one result event, the last; only stdout/stderr before it. Returns the result."""
    names = [ev for ev, _, _ in events]
    assert names.count("result") == 1 and names[-1] == "result", names
    assert set(names[:-1]) <= {"stdout", "stderr"}, names
    return events[-1][1]


def test_events_stream_output_live_then_one_result_and_close(_lc):
    t0 = time.monotonic()
    run_id = _lc_post_async(_lc, "lc_sse", "echo one; echo oops >&2; sleep 1; echo two")
    stream = _LcStream(_lc.server, "GET", f"/tasks/lc_sse/{run_id}/events", _lc.ci).read_head()
    try:
        assert stream.status == 200
        assert stream.headers["content-type"].split(";")[0].strip() == "text/event-stream", stream.headers
        events = []
        while not any(ev == "stdout" for ev, _, _ in events):
            events.append(stream.next_event())
        first_stdout = next(e for e in events if e[0] == "stdout")
        assert first_stdout[2] - t0 < 0.8, first_stdout
        assert first_stdout[1] == "one\n", first_stdout
        assert _lc_result(_lc, "lc_sse", run_id)["status"] == "running"  # still running
        events += stream.rest()
        assert stream.closed
    finally:
        stream.close()
    result = _lc_check_stream_end(events)
    assert _lc_output(events, "stdout") == "one\ntwo\n", events
    assert _lc_output(events, "stderr") == "oops\n", events
    two = next(e for e in events if e[0] == "stdout" and "two" in e[1])
    assert two[2] - first_stdout[2] >= 0.7, events  # sent when written, not at the end
    _lc_check_finished(result, status="success", exit_code=0)
    assert result == _lc_result(_lc, "lc_sse", run_id), result
    assert (result["task_id"], result["stdout"], result["stderr"]) == (run_id, "one\ntwo\n", "oops\n")


def test_events_of_a_late_reader_start_with_the_bytes_already_written(_lc):
    run_id = _lc_post_async(_lc, "lc_sse", "echo early; echo early-err >&2; sleep 1; echo late")
    wait_for(lambda: _lc_result(_lc, "lc_sse", run_id)["status"] == "running")
    time.sleep(0.3)
    stream = _LcStream(_lc.server, "GET", f"/tasks/lc_sse/{run_id}/events", _lc.ci).read_head()
    try:
        assert stream.status == 200
        first = [stream.next_event(), stream.next_event()]
        assert sorted((ev, data) for ev, data, _ in first) == [("stderr", "early-err\n"), ("stdout", "early\n")]
        assert all(t - stream.t0 < 0.5 for _, _, t in first), first
        events = first + stream.rest()
    finally:
        stream.close()
    result = _lc_check_stream_end(events)
    assert _lc_output(events, "stdout") == "early\nlate\n", events
    assert _lc_output(events, "stderr") == "early-err\n", events
    assert (result["status"], result["stdout"]) == ("success", "early\nlate\n"), result

    # After the end: all the output, the result, and the connection closes at once.
    stream = _LcStream(_lc.server, "GET", f"/tasks/lc_sse/{run_id}/events", _lc.ci).read_head()
    try:
        events = stream.rest(timeout=3)
        assert time.monotonic() - stream.t0 < 1.0
    finally:
        stream.close()
    assert _lc_check_stream_end(events) == result
    assert _lc_output(events, "stdout") == "early\nlate\n" and _lc_output(events, "stderr") == "early-err\n"


def test_events_need_a_read_credential_and_a_known_run(_lc):
    run_id = _lc_post_async(_lc, "lc_sse", "echo x")
    _lc_error(_lc.server.get(f"/tasks/lc_sse/{run_id}/events", headers={"Accept": "text/event-stream"}),
              401, "unauthorized")
    _lc_error(_lc.server.get(f"/tasks/lc_sse/{run_id}/events", key=_lc.other,
                             headers={"Accept": "text/event-stream"}), 403, "forbidden")
    _lc_error(_lc.server.get(f"/tasks/lc_sse/{'b' * 16}/events", key=_lc.ci,
                             headers={"Accept": "text/event-stream"}), 404, "not_found")


def test_sync_post_with_event_stream_accept_streams_live(_lc):
    stream = _LcStream(_lc.server, "POST", "/tasks/lc_sse_sync", _lc.ci,
                       "echo one; sleep 1; echo two >&2; echo three").read_head()
    try:
        assert stream.status == 200
        assert stream.headers["content-type"].split(";")[0].strip() == "text/event-stream", stream.headers
        name, data, t_first = stream.next_event()
        assert (name, data) == ("stdout", "one\n")
        assert t_first - stream.t0 < 0.8
        events = [(name, data, t_first)] + stream.rest()
        assert stream.closed
    finally:
        stream.close()
    result = _lc_check_stream_end(events)
    assert events[-1][2] - t_first >= 0.7, events
    assert _lc_output(events, "stdout") == "one\nthree\n" and _lc_output(events, "stderr") == "two\n"
    _lc_check_finished(result, status="success", exit_code=0)
    assert (result["stdout"], result["stderr"]) == ("one\nthree\n", "two\n"), result
    assert result == _lc_result(_lc, "lc_sse_sync", result["task_id"])
    # Refusals before the run are plain JSON, not a stream.
    _lc_error(_lc.server.post("lc_sse_sync", "echo x", headers={"Accept": "text/event-stream"}),
              401, "unauthorized")


def _lc_rss_kib(pid) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_slow_event_reader_cannot_block_the_task_or_grow_the_server(_lc):
    pid = _lc.server.worker_pid()
    rss_before = _lc_rss_kib(pid)
    t0 = time.monotonic()
    run_id = _lc_post_async(_lc, "lc_big", "sleep 0.3; yes aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa | head -c 5000000; "
                                           "echo done >&2")
    # Connect with a tiny receive buffer and read nothing for 3 s.
    stream = _LcStream(_lc.server, "GET", f"/tasks/lc_big/{run_id}/events", _lc.ci, rcvbuf=4096)
    try:
        body = _lc_result(_lc, "lc_big", run_id, wait=5)  # another connection
        assert time.monotonic() - t0 < 3.0, body
        _lc_check_finished(body, status="success", exit_code=0)
        assert body["stdout_truncated"] is True and len(body["stdout"]) == 100000, len(body.get("stdout", ""))
        assert body["stderr"] == "done\n", body
        time.sleep(max(0.0, 3.0 - (time.monotonic() - t0)))
        assert _lc_rss_kib(pid) - rss_before < 50 * 1024
        assert _lc_json(_lc.server.get("/health"), 200) == {"status": "healthy"}
        stream.read_head()
        assert stream.status == 200
        events = stream.rest()
    finally:
        stream.close()
    result = _lc_check_stream_end(events)
    assert _lc_output(events, "stdout") == body["stdout"]
    assert result == body


def test_events_keep_a_character_split_across_writes_whole(_lc):
    run_id = _lc_post_async(_lc, "lc_sse", r"printf '\303'; sleep 0.4; printf '\251\n'")
    stream = _LcStream(_lc.server, "GET", f"/tasks/lc_sse/{run_id}/events", _lc.ci).read_head()
    try:
        events = stream.rest()
    finally:
        stream.close()
    result = _lc_check_stream_end(events)
    assert _lc_output(events, "stdout") == "\u00e9\n", events
    assert result["stdout"] == "\u00e9\n", result


def test_a_reader_that_disconnects_does_not_stop_the_run(_lc):
    marker = _lc.dir / "sse-disconnect-async"
    run_id = _lc_post_async(_lc, "lc_sse", f'echo one; sleep 0.8; echo two; touch "{marker}"')
    stream = _LcStream(_lc.server, "GET", f"/tasks/lc_sse/{run_id}/events", _lc.ci).read_head()
    assert stream.next_event()[:2] == ("stdout", "one\n")
    stream.close()
    body = _lc_result(_lc, "lc_sse", run_id, wait=5)
    _lc_check_finished(body, status="success", exit_code=0)
    assert body["stdout"] == "one\ntwo\n" and marker.exists(), body


def test_a_sync_streaming_caller_that_disconnects_does_not_stop_the_run(_lc):
    marker, id_file = _lc.dir / "sse-disconnect-sync", _lc.dir / "sse-disconnect-sync-id"
    stream = _LcStream(_lc.server, "POST", "/tasks/lc_sse_sync", _lc.ci,
                       f'echo "$RTASK_TASK_ID" > "{id_file}"; echo one; sleep 0.8; echo two; touch "{marker}"')
    stream.read_head()
    assert stream.next_event()[:2] == ("stdout", "one\n")
    stream.close()
    run_id = id_file.read_text().strip()
    body = _lc_result(_lc, "lc_sse_sync", run_id, wait=5)
    _lc_check_finished(body, status="success", exit_code=0)
    assert body["stdout"] == "one\ntwo\n" and marker.exists(), body


# =============================================================================================
# ===== Queue =====
# =============================================================================================


def _lc_concurrently(n, call) -> list:
    """Run call(i) in n threads released together; returns [(result, seconds taken)]."""
    results = [None] * n
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()
        t = time.monotonic()
        out = call(i)
        results[i] = (out, time.monotonic() - t)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert all(r is not None for r in results), results
    return results


def test_sync_queue_runs_waiting_requests_one_after_another(_lc):
    t0 = time.monotonic()
    results = _lc_concurrently(4, lambda i: _lc.server.post("lc_q_sync", key=_lc.ci))
    total = time.monotonic() - t0
    ok = [(r, e) for r, e in results if r.status == 200]
    refused = [(r, e) for r, e in results if r.status != 200]
    assert len(ok) == 3 and len(refused) == 1, results
    r, elapsed = refused[0]
    _lc_error(r, 429, "too_many_running")
    assert r.headers.get("Retry-After") == "1", r.headers
    assert elapsed < 0.5, elapsed
    bodies = sorted((_lc_check_finished(_lc_json(r, 200), status="success", exit_code=0) for r, _ in ok),
                    key=lambda b: b["started_at"])
    assert all(b["stdout"] == "ok\n" for b in bodies), bodies
    for earlier, later in zip(bodies, bodies[1:]):  # one at a time
        assert _lc_time(later["started_at"]) >= _lc_time(earlier["finished_at"]) - datetime.timedelta(seconds=0.05)
    assert 2.8 <= max(e for _, e in ok) <= 4.5 and total <= 5.0, results
    health = _lc_health(_lc, "lc_q_sync")
    assert (health["running"], health["queued"]) == (0, 0), health


def test_sync_request_waits_up_to_queue_timeout_then_gets_429(_lc):
    gate, wait_gate = _lc_gate(_lc, "qt")
    marker = _lc.dir / "queue-timeout-marker"
    holder = {}
    thread = threading.Thread(target=lambda: holder.update(
        r=_lc.server.post("lc_q_timeout", wait_gate + "; echo held", key=_lc.ci)))
    thread.start()
    try:
        wait_for(lambda: _lc_health(_lc, "lc_q_timeout")["running"] == 1)
        waiter = {}

        def queued_call():
            t = time.monotonic()
            waiter["r"] = _lc.server.post("lc_q_timeout", f'touch "{marker}"', key=_lc.ci)
            waiter["elapsed"] = time.monotonic() - t

        second = threading.Thread(target=queued_call)
        second.start()
        wait_for(lambda: _lc_health(_lc, "lc_q_timeout")["queued"] == 1, timeout=0.8)
        assert _lc.server.metric("task_queue_length", handler="lc_q_timeout") == 1.0
        second.join(5)
        r = waiter["r"]
        _lc_error(r, 429, "too_many_running")
        assert r.headers.get("Retry-After") == "1", r.headers
        assert 0.9 <= waiter["elapsed"] <= 1.8, waiter
        assert _lc_health(_lc, "lc_q_timeout")["queued"] == 0
        assert _lc.server.metric("task_queue_length", handler="lc_q_timeout") == 0.0
    finally:
        gate.touch()
        thread.join(5)
    body = _lc_check_finished(_lc_json(holder["r"], 200), status="success", exit_code=0)
    assert body["stdout"] == "held\n"
    time.sleep(0.2)
    assert not marker.exists()  # the refused request never ran


def test_async_queue_answers_queued_then_runs_in_turn(_lc):
    gate_a, wait_a = _lc_gate(_lc, "qa-a")
    gate_b, wait_b = _lc_gate(_lc, "qa-b")
    marker_c = _lc.dir / "queue-async-c"
    try:
        a = _lc_json(_lc.server.post("lc_q_async", wait_a + "; echo A", key=_lc.ci), 200)
        assert a["status"] == "running" and _LC_TASK_ID_RE.fullmatch(a["task_id"]), a
        t0 = time.monotonic()
        b = _lc_json(_lc.server.post("lc_q_async", wait_b + "; echo B", key=_lc.ci), 200)
        assert time.monotonic() - t0 < 0.5
        assert set(b) == {"task_id", "status"} and b["status"] == "queued", b
        assert _LC_TASK_ID_RE.fullmatch(b["task_id"]) and b["task_id"] != a["task_id"], b
        # Beyond the queue (queueSize = 1): refused at once, and it never runs.
        t0 = time.monotonic()
        r = _lc.server.post("lc_q_async", f'touch "{marker_c}"', key=_lc.ci)
        assert time.monotonic() - t0 < 0.5
        _lc_error(r, 429, "too_many_running")
        assert r.headers.get("Retry-After") == "1", r.headers

        queued = _lc_result(_lc, "lc_q_async", b["task_id"])
        assert (queued["status"], queued["exit_code"], queued["task_id"]) == ("queued", -1, b["task_id"]), queued
        assert not {"stdout", "finished_at", "duration_seconds"} & set(queued), queued
        health = _lc_health(_lc, "lc_q_async")
        assert (health["running"], health["queued"]) == (1, 1), health
        assert _lc.server.metric("task_queue_length", handler="lc_q_async") == 1.0
        runs = _lc_json(_lc.server.get("/tasks/lc_q_async", key=_lc.ci), 200)["runs"]
        assert [(r["task_id"], r["status"]) for r in runs] == [(b["task_id"], "queued"), (a["task_id"], "running")]

        gate_a.touch()
        done_a = _lc_result(_lc, "lc_q_async", a["task_id"], wait=5)
        _lc_check_finished(done_a, status="success", exit_code=0)
        wait_for(lambda: _lc_result(_lc, "lc_q_async", b["task_id"])["status"] == "running", timeout=3)
        health = _lc_health(_lc, "lc_q_async")
        assert (health["running"], health["queued"]) == (1, 0), health
        assert _lc.server.metric("task_queue_length", handler="lc_q_async") == 0.0
        gate_b.touch()
        done_b = _lc_check_finished(_lc_result(_lc, "lc_q_async", b["task_id"], wait=5),
                                    status="success", exit_code=0)
        assert done_b["stdout"] == "B\n", done_b
        # B started only after A finished (it waited for the slot).
        assert _lc_time(done_b["started_at"]) >= _lc_time(done_a["finished_at"]) - datetime.timedelta(seconds=0.05)
    finally:
        gate_a.touch()
        gate_b.touch()
    assert not marker_c.exists()


def test_async_queue_is_first_in_first_out_and_streams_a_queued_run(_lc):
    gate, wait_gate = _lc_gate(_lc, "fifo")
    try:
        a = _lc_post_async(_lc, "lc_q_fifo", wait_gate + "; echo A")
        b = _lc_post_async(_lc, "lc_q_fifo", "sleep 0.2; echo B")
        c = _lc_post_async(_lc, "lc_q_fifo", "echo C")
        assert [_lc_result(_lc, "lc_q_fifo", i)["status"] for i in (a, b, c)] == ["running", "queued", "queued"]
        assert _lc_health(_lc, "lc_q_fifo")["queued"] == 2
        assert _lc.server.metric("task_queue_length", handler="lc_q_fifo") == 2.0
        # A reader of a queued run gets its output once it runs, then its result.
        stream = _LcStream(_lc.server, "GET", f"/tasks/lc_q_fifo/{c}/events", _lc.ci).read_head()
        gate.touch()
        try:
            events = stream.rest()
        finally:
            stream.close()
    finally:
        gate.touch()
    result_c = _lc_check_stream_end(events)
    assert _lc_output(events, "stdout") == "C\n" and result_c["status"] == "success", events
    done = [_lc_check_finished(_lc_result(_lc, "lc_q_fifo", i, wait=5), status="success", exit_code=0)
            for i in (a, b, c)]
    assert [d["stdout"] for d in done] == ["A\n", "B\n", "C\n"]
    slack = datetime.timedelta(seconds=0.05)
    for earlier, later in zip(done, done[1:]):  # in the order they came, one at a time
        assert _lc_time(later["started_at"]) >= _lc_time(earlier["finished_at"]) - slack, done


def test_a_queued_async_run_can_be_cancelled_before_it_starts(_lc):
    gate, wait_gate = _lc_gate(_lc, "qc")
    marker = _lc.dir / "queue-cancel-marker"
    try:
        a = _lc_json(_lc.server.post("lc_q_cancel", wait_gate + "; echo A", key=_lc.ci), 200)
        b = _lc_json(_lc.server.post("lc_q_cancel", f'touch "{marker}"', key=_lc.ci), 200)
        assert b["status"] == "queued", b
        t0 = time.monotonic()
        r = _lc_delete(_lc, "lc_q_cancel", b["task_id"], key=_lc.ci)
        assert time.monotonic() - t0 < 1.0
        body = _lc_json(r, 200)
        assert (body["status"], body["exit_code"], body["task_id"]) == ("cancelled", -1, b["task_id"]), body
        assert "stdout" not in body, body
        assert _lc_result(_lc, "lc_q_cancel", b["task_id"])["status"] == "cancelled"
        assert _lc_health(_lc, "lc_q_cancel")["queued"] == 0
        _lc_error(_lc_delete(_lc, "lc_q_cancel", b["task_id"], key=_lc.ci), 409, "conflict")
        # The queue has room again: a new request waits in line instead of a 429.
        c = _lc_json(_lc.server.post("lc_q_cancel", "echo C", key=_lc.ci), 200)
        assert c["status"] == "queued", c
        gate.touch()
        _lc_check_finished(_lc_result(_lc, "lc_q_cancel", a["task_id"], wait=5), status="success", exit_code=0)
        done_c = _lc_check_finished(_lc_result(_lc, "lc_q_cancel", c["task_id"], wait=5),
                                    status="success", exit_code=0)
        assert done_c["stdout"] == "C\n", done_c
    finally:
        gate.touch()
    time.sleep(0.2)
    assert not marker.exists()  # the cancelled run never started
    assert _lc_result(_lc, "lc_q_cancel", b["task_id"])["status"] == "cancelled"
    health = _lc_health(_lc, "lc_q_cancel")
    assert (health["running"], health["queued"]) == (0, 0), health


@pytest.mark.parametrize("task", ["lc_q_none_async", "lc_q_none_sync"])
def test_without_queue_size_a_busy_task_answers_429_at_once(_lc, task):
    gate, wait_gate = _lc_gate(_lc, task)
    marker = _lc.dir / f"{task}-marker"
    holder = threading.Thread(target=lambda: _lc.server.post(task, wait_gate, key=_lc.ci))
    holder.start()
    try:
        wait_for(lambda: _lc_health(_lc, task)["running"] == 1)
        t0 = time.monotonic()
        r = _lc.server.post(task, f'touch "{marker}"', key=_lc.ci)
        assert time.monotonic() - t0 < 0.5
        _lc_error(r, 429, "too_many_running")
        assert r.headers.get("Retry-After") == "1", r.headers
        assert _lc_health(_lc, task)["queued"] == 0
    finally:
        gate.touch()
        holder.join(5)
    wait_for(lambda: _lc_health(_lc, task)["running"] == 0, timeout=3)
    assert not marker.exists()


# Tests that test_rtask.py itself may define must not be collected a second time from here.

# ===== Tokens and permissions =====


# ---------------------------------------------------------------------------------------------
# Helpers of this section (prefixed _au_)
# ---------------------------------------------------------------------------------------------

_AU_ISSUER, _AU_AUDIENCE = "rtask", "rtask-api"  # README §8 defaults of [auth.jwt]
_AU_JWKS_COOLDOWN = 10.0  # README §8: an unknown kid refreshes the JWKS at most once per 10 s
# A task whose stdout is the caller rtask reports (key name, JWT subject or webhook name).
_AU_CALLER_CMD = json.dumps(["sh", "-c", 'printf %s "$RTASK_CALLER"'])
_AU_NO_CREDENTIAL = ("unauthorized", "A credential is required: send 'Authorization: Bearer <key>'.")
# The JWKS server is on 127.0.0.1: a proxy from the CI environment must not get in the way.
_AU_ENV = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


class _AuRsa:
    """An RSA key pair for signing test tokens, with its public key as PEM text."""

    def __init__(self, kid: str):
        self.kid = kid
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public = self.private.public_key()
        self.public_pem = self.public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def jwk(self) -> dict:
        entry = jwt.algorithms.RSAAlgorithm.to_jwk(self.public, as_dict=True)
        return {**entry, "kid": self.kid, "alg": "RS256", "use": "sig"}


def _au_claims(permissions=("tasks:run:hello",), sub="ci-bot", claim="permissions", **changes) -> dict:
    """Valid claims for the default [auth.jwt]; a change to None removes that claim."""
    now = int(time.time())
    claims = {"sub": sub, "iss": _AU_ISSUER, "aud": _AU_AUDIENCE, "iat": now, "exp": now + 600,
              claim: list(permissions) if not isinstance(permissions, str) else permissions}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def _au_token(key: _AuRsa, permissions=("tasks:run:hello",), kid=None, alg="RS256", **changes) -> str:
    return jwt.encode(_au_claims(permissions, **changes), key.private, algorithm=alg,
                      headers={"kid": kid} if kid else None)


def _au_b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _au_segment(obj: dict) -> str:
    return _au_b64(json.dumps(obj, separators=(",", ":")).encode())


def _au_bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _au_assert_error(resp, status: int, code: str, message: str, token: str | None = None):
    """An exact JSON error answer that never echoes the credential it refuses."""
    assert resp.status == status, resp
    assert resp.headers["Content-Type"] == "application/json", resp.headers
    assert resp.json == {"error": code, "message": message}, resp
    if token:
        body = resp.body.decode()
        for part in [token, *[s for s in token.split(".") if len(s) >= 8]]:
            assert part not in body, f"the answer echoes the token: {body}"


def _au_forbidden(resp, permission: str):
    _au_assert_error(resp, 403, "forbidden", f"Missing required permission: {permission}")


def _au_ok(resp, stdout: str):
    assert resp.status == 200, resp
    assert resp.json["status"] == "success", resp
    assert resp.json.get("stdout", "") == stdout, resp


def _au_log_lines(server: Server, *fragments: str) -> list[str]:
    return [line for line in server.log().splitlines() if all(f in line for f in fragments)]


def _au_log_has(server: Server, *fragments: str, timeout=5.0) -> str:
    """Wait for a log line holding every fragment (field order is free); return it."""
    try:
        return wait_for(lambda: (_au_log_lines(server, *fragments) or [None])[0], timeout=timeout)
    except AssertionError:
        raise AssertionError(f"no log line holds {fragments}:\n{server.log()}") from None


def _au_start(directory: Path, config_text: str, keys=(), env=None) -> tuple[Server, dict]:
    """Write config.toml into ``directory``, add ``keys`` with the real add-key, start rtask."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.toml").write_text(textwrap.dedent(config_text))
    tokens = {name: new_key(directory, name) for name in keys}
    return Server(directory, {**_AU_ENV, **(env or {})}), tokens


def _au_free_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _au_wait_ready(server: Server, timeout=5.0):
    """Wait for the end of start-up (the first JWKS fetch): /health/ready answers 200."""
    wait_for(lambda: server.get("/health/ready").status == 200, timeout=timeout, interval=0.05)


class _AuJwks:
    """A local identity provider: serves ``{"keys": [...]}`` at /jwks.json and counts GETs."""

    def __init__(self, keys):
        self.fetches = 0  # every GET
        self.served = 0  # GETs answered with the key set
        self.hang = False
        self.delay = 0.0  # seconds to wait before each answer
        self.released = threading.Event()
        self.serve(keys)
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                owner.fetches += 1
                if owner.hang:  # an identity provider that accepts and never answers
                    owner.released.wait(60)
                    return
                time.sleep(owner.delay)
                if self.path == "/moved":  # a redirect to the real key set
                    self.send_response(302)
                    self.send_header("Location", "/jwks.json")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                owner.served += 1
                body = json.dumps(owner.document).encode()
                self.send_response(200 if self.path == "/jwks.json" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        self.stopped = False

    def serve(self, keys):
        self.document = {"keys": [k.jwk() for k in keys]}

    def stop(self):
        self.released.set()
        if not self.stopped:
            self.stopped = True
            self.httpd.shutdown()
            self.httpd.server_close()


def _au_jwks_config(url: str, extra: str = "") -> str:
    return f"""\
[tasks.hello]
command = {_AU_CALLER_CMD}

[auth.jwt]
verificationMethod = "jwks"
jwksUrl = {json.dumps(url)}
jwksAllowHttp = true
{extra}
"""


def _au_jwt_failure_counts(server: Server, reason: str) -> tuple[float, float, float]:
    return (server.metric("auth_requests_total", method="jwt", result="failure"),
            server.metric("auth_failures_total", reason=reason),
            server.metric("auth_jwt_verification_duration_seconds_count", result="failure"))


@pytest.fixture(scope="module")
def au_keys():
    """Three RSA key pairs, made once: the server's, a stranger's, and a rotated-in one."""
    return {"main": _AuRsa("k-main"), "other": _AuRsa("k-other"), "next": _AuRsa("k-next")}


# ---------------------------------------------------------------------------------------------
# Credentials, in priority order
# ---------------------------------------------------------------------------------------------

_AU_CRED_CONFIG = f"""\
[tasks.hello]
command = {_AU_CALLER_CMD}
apiKeyNames = ["ci"]

[tasks.internal]
command = ["echo", "internal"]
webhookSecrets = {{ cron = "au-internal-webhook-secret-0123456789" }}
"""


@pytest.fixture(scope="module")
def au_cred(tmp_path_factory):
    """A server with one key and no [auth] table (so no grants beyond apiKeyNames)."""
    server, tokens = _au_start(tmp_path_factory.mktemp("au-cred"), _AU_CRED_CONFIG, keys=("ci",))
    yield server, tokens["ci"]
    server.stop()


def test_auth_bearer_api_key_is_accepted(au_cred):
    server, key = au_cred
    before = server.metric("auth_requests_total", method="api_key", result="success")
    _au_ok(server.post("hello", headers={"Authorization": f"Bearer {key}"}), "ci")
    assert server.metric("auth_requests_total", method="api_key", result="success") == before + 1


def test_auth_x_api_key_header_is_accepted(au_cred):
    server, key = au_cred
    _au_ok(server.post("hello", headers={"X-API-Key": key}), "ci")


def test_auth_no_credential_is_401_missing_key(au_cred):
    server, _ = au_cred
    before = server.metric("auth_failures_total", reason="missing_key")
    resp = server.post("hello")
    _au_assert_error(resp, 401, *_AU_NO_CREDENTIAL)
    assert server.metric("auth_failures_total", reason="missing_key") == before + 1


def test_auth_bad_bearer_never_falls_back_to_good_x_api_key(au_cred):
    server, key = au_cred
    # a well-formed key of an id the store does not hold, then a string that is no key at all
    forged = _au_b64(cbor2.dumps({1: 998, 2: os.urandom(40)}))
    resp = server.post("hello", headers={"Authorization": f"Bearer {forged}", "X-API-Key": key})
    _au_assert_error(resp, 401, "unauthorized", "The API key is not valid.", token=forged)
    resp = server.post("hello", headers={"Authorization": "Bearer not-a-key", "X-API-Key": key})
    _au_assert_error(resp, 401, "unauthorized", "The API key is malformed.")
    resp = server.post("hello", headers={"Authorization": f"Basic {key}", "X-API-Key": key})
    _au_assert_error(resp, 401, "unauthorized", "The Authorization header must be 'Bearer <token>'.",
                     token=key)


def test_auth_three_part_bearer_is_a_jwt_even_without_auth_jwt(au_cred, au_keys):
    server, key = au_cred
    token = _au_token(au_keys["main"])
    requests_before, failures_before, _ = _au_jwt_failure_counts(server, "invalid_token")
    encoding_before = server.metric("auth_failures_total", reason="invalid_key_encoding")
    resp = server.post("hello", headers={**_au_bearer(token), "X-API-Key": key})
    _au_assert_error(resp, 401, "unauthorized", "Bearer tokens (JWT) are not enabled on this server.",
                     token=token)
    assert server.metric("auth_requests_total", method="jwt", result="failure") == requests_before + 1
    assert server.metric("auth_failures_total", reason="invalid_token") == failures_before + 1
    assert server.metric("auth_failures_total", reason="invalid_key_encoding") == encoding_before


def test_auth_task_without_api_key_names_has_no_route_without_grants(au_cred):
    server, key = au_cred
    for resp in (server.post("internal", key=key), server.get("/tasks/internal", key=key),
                 server.post("internal")):
        _au_assert_error(resp, 404, "not_found", "There is no task named 'internal'.")
    listed = server.get("/tasks", key=key)
    assert listed.status == 200 and [t["name"] for t in listed.json["tasks"]] == ["hello"], listed


def test_auth_webhook_secret_is_counted_as_webhook_auth(au_cred):
    server, _ = au_cred
    success = server.metric("auth_requests_total", method="webhook", result="success")
    failure = server.metric("auth_requests_total", method="webhook", result="failure")
    _au_ok(server.request("POST", "/wh/au-internal-webhook-secret-0123456789"), "internal\n")
    _au_assert_error(server.request("POST", "/wh/au-internal-webhook-secret-0123456788"), 404,
                     "not_found", "There is nothing at this path.")
    assert server.metric("auth_requests_total", method="webhook", result="success") == success + 1
    assert server.metric("auth_requests_total", method="webhook", result="failure") == failure + 1


def test_auth_cannot_be_disabled(tmp_path):
    (tmp_path / "config.toml").write_text(_AU_CRED_CONFIG + "\n[auth]\nenabled = false\n")
    checked = rtask_cli("check-config", cwd=tmp_path)
    assert checked.returncode == 1, checked
    assert "[auth]: unknown field 'enabled'" in checked.stderr, checked.stderr


def test_auth_custom_api_key_header_replaces_x_api_key(start_server):
    server, tokens = start_server(_AU_CRED_CONFIG + '\n[auth]\napiKeyHeader = "X-Token"\n')
    _au_ok(server.post("hello", headers={"X-Token": tokens["ci"]}), "ci")
    _au_assert_error(server.post("hello", headers={"X-API-Key": tokens["ci"]}), 401, *_AU_NO_CREDENTIAL)
    _au_ok(server.post("hello", key=tokens["ci"]), "ci")  # Bearer keeps working


# ---------------------------------------------------------------------------------------------
# Permissions of rtask keys
# ---------------------------------------------------------------------------------------------

_AU_PERM_CONFIG = f"""\
[tasks.hello]
command = {_AU_CALLER_CMD}
apiKeyNames = ["ci"]

[tasks.slow]
command = ["sleep", "30"]
apiKeyNames = ["ci"]
async = true
executionTimeoutSeconds = 60

[tasks.deploy]
command = ["echo", "deployed"]

[tasks.internal]
command = ["echo", "internal"]

[auth.keyPermissions]
admin = ["*"]
ops = ["tasks:*"]
reader = ["tasks:read"]
deployer = ["tasks:run:deploy"]
"""


@pytest.fixture(scope="module")
def au_perm(tmp_path_factory):
    server, tokens = _au_start(tmp_path_factory.mktemp("au-perm"), _AU_PERM_CONFIG,
                               keys=("ci", "admin", "ops", "reader", "deployer"))
    yield server, tokens
    server.stop()


def test_permission_named_key_runs_reads_lists_and_cancels_its_task(au_perm):
    server, keys = au_perm
    _au_ok(server.post("hello", key=keys["ci"]), "ci")
    started = server.post("slow", key=keys["ci"])
    assert started.status == 200, started
    run_id = started.json["task_id"]
    try:
        read = server.get(f"/tasks/slow/{run_id}", key=keys["ci"])
        assert (read.status, read.json["status"], read.json["exit_code"]) == (200, "running", -1), read
        runs = server.get("/tasks/slow", key=keys["ci"])
        assert runs.status == 200 and [r["task_id"] for r in runs.json["runs"]] == [run_id], runs
        listed = server.get("/tasks", key=keys["ci"])
        assert listed.status == 200 and sorted(t["name"] for t in listed.json["tasks"]) == ["hello", "slow"]
    finally:
        cancelled = server.request("DELETE", f"/tasks/slow/{run_id}", key=keys["ci"])
    assert (cancelled.status, cancelled.json["status"]) == (200, "cancelled"), cancelled


def test_permission_named_key_gets_403_on_another_task(au_perm):
    server, keys = au_perm
    before = server.metric("permission_denials_total", permission="tasks:run:deploy")
    rejections = server.metric("task_rejection_total", handler="deploy", reason="key_not_allowed")
    _au_forbidden(server.post("deploy", key=keys["ci"]), "tasks:run:deploy")
    assert server.metric("permission_denials_total", permission="tasks:run:deploy") == before + 1
    assert server.metric("task_rejection_total", handler="deploy", reason="key_not_allowed") == rejections + 1
    _au_log_has(server, "permission denied", " caller=ci ", " permission=tasks:run:deploy")
    some_id = "a" * 16
    _au_forbidden(server.get(f"/tasks/deploy/{some_id}", key=keys["ci"]), "tasks:read:deploy")
    _au_forbidden(server.get(f"/tasks/deploy/{some_id}/events", key=keys["ci"]), "tasks:read:deploy")
    _au_forbidden(server.get("/tasks/deploy", key=keys["ci"]), "tasks:list:deploy")
    _au_forbidden(server.request("DELETE", f"/tasks/deploy/{some_id}", key=keys["ci"]), "tasks:cancel:deploy")


def test_permission_star_runs_every_task_even_without_api_key_names(au_perm):
    server, keys = au_perm
    _au_ok(server.post("internal", key=keys["admin"]), "internal\n")
    _au_ok(server.post("deploy", key=keys["admin"]), "deployed\n")
    _au_ok(server.post("hello", key=keys["admin"]), "admin")
    listed = server.get("/tasks", key=keys["admin"])
    assert sorted(t["name"] for t in listed.json["tasks"]) == ["deploy", "hello", "internal", "slow"]


def test_permission_star_grant_is_warned_at_startup(au_perm):
    server, _ = au_perm
    _au_log_has(server, " warning ", "grants '*' (everything) to key 'admin'")


def test_permission_tasks_wildcard_runs_reads_and_lists_any_task(au_perm):
    server, keys = au_perm
    ran = server.post("deploy", key=keys["ops"])
    _au_ok(ran, "deployed\n")
    read = server.get(f"/tasks/deploy/{ran.json['task_id']}", key=keys["ops"])
    assert (read.status, read.json["stdout"]) == (200, "deployed\n"), read
    assert ran.json["task_id"] in [r["task_id"] for r in server.get("/tasks/deploy", key=keys["ops"]).json["runs"]]
    _au_ok(server.post("internal", key=keys["ops"]), "internal\n")


def test_permission_read_only_key_reads_any_result_but_cannot_run(au_perm):
    server, keys = au_perm
    ran = server.post("hello", key=keys["ci"])
    _au_ok(ran, "ci")
    read = server.get(f"/tasks/hello/{ran.json['task_id']}", key=keys["reader"])
    assert (read.status, read.json["stdout"], read.json["task_id"]) == (200, "ci", ran.json["task_id"]), read
    _au_forbidden(server.post("hello", key=keys["reader"]), "tasks:run:hello")
    _au_forbidden(server.get("/tasks", key=keys["reader"]), "tasks:list")


def test_permission_scoped_run_grant_runs_only_that_task(au_perm):
    server, keys = au_perm
    ran = server.post("deploy", key=keys["deployer"])
    _au_ok(ran, "deployed\n")
    _au_forbidden(server.post("hello", key=keys["deployer"]), "tasks:run:hello")
    _au_forbidden(server.post("internal", key=keys["deployer"]), "tasks:run:internal")
    _au_forbidden(server.get(f"/tasks/deploy/{ran.json['task_id']}", key=keys["deployer"]), "tasks:read:deploy")


def test_permission_config_endpoint_is_404_when_not_enabled(au_perm):
    server, keys = au_perm
    _au_assert_error(server.get("/config", key=keys["admin"]), 404, "not_found", "There is nothing at this path.")


def test_permission_unknown_string_in_key_permissions_is_a_config_error(tmp_path):
    (tmp_path / "config.toml").write_text(textwrap.dedent("""\
        [tasks.hello]
        command = ["echo", "hi"]
        apiKeyNames = ["ci"]
        [auth.keyPermissions]
        ops = ["tasks:read", "tasks:execute"]
        """))
    checked = rtask_cli("check-config", cwd=tmp_path)
    assert checked.returncode == 1, checked
    assert "keyPermissions entry 'ops' has an unknown permission 'tasks:execute'" in checked.stderr, checked.stderr
    assert "Traceback" not in checked.stderr
    run = rtask_cli("run", "--api-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0",
                    cwd=tmp_path, timeout=20)
    assert run.returncode == 1 and "'tasks:execute'" in run.stderr, run


# ---------------------------------------------------------------------------------------------
# JWT with a static public key
# ---------------------------------------------------------------------------------------------


def _au_jwt_config(key_line: str, extra_auth: str = "", extra_jwt: str = "") -> str:
    return f"""\
[tasks.hello]
command = {_AU_CALLER_CMD}

[tasks.deploy]
command = ["echo", "deployed"]

[auth]
{extra_auth}

[auth.jwt]
{key_line}
{extra_jwt}
"""


@pytest.fixture(scope="module")
def au_jwt(tmp_path_factory, au_keys):
    """A server verifying JWTs with au_keys["main"] (publicKeyPath), leeway 30 s, strict."""
    directory = tmp_path_factory.mktemp("au-jwt")
    (directory / "jwt-public-key.pem").write_text(au_keys["main"].public_pem)
    server, tokens = _au_start(directory, _au_jwt_config('publicKeyPath = "jwt-public-key.pem"',
                                                         extra_jwt="leewaySeconds = 30"), keys=("ci",))
    yield server, tokens["ci"]
    server.stop()


def test_jwt_valid_token_runs_with_subject_as_caller(au_jwt, au_keys):
    server, _ = au_jwt
    success = server.metric("auth_requests_total", method="jwt", result="success")
    verified = server.metric("auth_jwt_verification_duration_seconds_count", result="success")
    runs = server.metric("task_duration_seconds_count", handler="hello", api_key_used="ci-bot")
    _au_ok(server.post("hello", headers=_au_bearer(_au_token(au_keys["main"]))), "ci-bot")
    assert server.metric("auth_requests_total", method="jwt", result="success") == success + 1
    assert server.metric("auth_jwt_verification_duration_seconds_count", result="success") == verified + 1
    assert server.metric("task_duration_seconds_count", handler="hello", api_key_used="ci-bot",
                         status="success") == runs + 1


def test_jwt_without_the_permission_gets_403_and_is_logged(au_jwt, au_keys):
    server, _ = au_jwt
    before = server.metric("permission_denials_total", permission="tasks:run:deploy")
    token = _au_token(au_keys["main"], sub="reporter")
    _au_forbidden(server.post("deploy", headers=_au_bearer(token)), "tasks:run:deploy")
    assert server.metric("permission_denials_total", permission="tasks:run:deploy") == before + 1
    line = _au_log_has(server, "permission denied", " caller=reporter ", " permission=tasks:run:deploy")
    assert token.split(".")[2] not in line


def test_jwt_subject_cannot_forge_log_lines(au_jwt, au_keys):
    server, _ = au_jwt
    token = _au_token(au_keys["main"], sub="evil\nforged-line level=error caller=admin")
    _au_forbidden(server.post("deploy", headers=_au_bearer(token)), "tasks:run:deploy")
    _au_log_has(server, "permission denied", "forged-line")
    assert not [line for line in server.log().splitlines() if line.startswith("forged-line")], server.log()


def _au_hs256_with_public_pem(keys):
    """HS256 'signed' with the PEM public key as the HMAC secret (the key-confusion attack)."""
    signing_input = _au_segment({"alg": "HS256", "typ": "JWT"}) + "." + _au_segment(_au_claims())
    mac = hmac.new(keys["main"].public_pem.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _au_b64(mac)


def _au_tampered(keys):
    """A genuine token whose payload segment is swapped for one granting '*'."""
    header, _, signature = _au_token(keys["main"]).split(".")
    return ".".join([header, _au_segment(_au_claims(permissions=["*"])), signature])


_AU_BAD_TOKENS = {
    # name: (token from the keys, auth_failures_total reason, message after "not valid: ")
    "expired": (lambda k: _au_token(k["main"], exp=int(time.time()) - 120), "token_expired", "expired"),
    "nbf_in_future": (lambda k: _au_token(k["main"], nbf=int(time.time()) + 300), "invalid_token", "not yet valid"),
    "wrong_issuer": (lambda k: _au_token(k["main"], iss="someone-else"), "invalid_token", "wrong issuer"),
    # PyJWT 2.10.0 (CVE-2024-53861) accepted any part of the issuer
    "issuer_substring": (lambda k: _au_token(k["main"], iss=_AU_ISSUER[1:]), "invalid_token", "wrong issuer"),
    "wrong_audience": (lambda k: _au_token(k["main"], aud="other-api"), "invalid_token", "wrong audience"),
    "missing_exp": (lambda k: _au_token(k["main"], exp=None), "invalid_token", "a required claim is missing"),
    "alg_none": (lambda k: _au_segment({"alg": "none", "typ": "JWT"}) + "." + _au_segment(_au_claims()) + ".",
                 "invalid_token", "algorithm not allowed"),
    "hs256_with_public_key": (_au_hs256_with_public_pem, "invalid_token", "algorithm not allowed"),
    "rs512_not_allowed": (lambda k: _au_token(k["main"], alg="RS512"), "invalid_token", "algorithm not allowed"),
    "tampered_payload": (_au_tampered, "invalid_token", "bad signature"),
    "other_rsa_key": (lambda k: _au_token(k["other"]), "invalid_token", "bad signature"),
    "not_a_jws": (lambda k: "abc.def.ghi", "invalid_token", "malformed"),
}


@pytest.mark.parametrize("case", list(_AU_BAD_TOKENS))
def test_jwt_invalid_token_is_401_counted_and_not_echoed(au_jwt, au_keys, case):
    server, _ = au_jwt
    make, reason, problem = _AU_BAD_TOKENS[case]
    token = make(au_keys)
    before = _au_jwt_failure_counts(server, reason)
    resp = server.post("hello", headers=_au_bearer(token))
    _au_assert_error(resp, 401, "unauthorized", f"The bearer token is not valid: {problem}.", token=token)
    assert _au_jwt_failure_counts(server, reason) == tuple(v + 1 for v in before)


def test_jwt_expired_or_early_within_leeway_is_accepted(au_jwt, au_keys):
    server, _ = au_jwt  # leewaySeconds = 30
    now = int(time.time())
    _au_ok(server.post("hello", headers=_au_bearer(_au_token(au_keys["main"], exp=now - 10))), "ci-bot")
    _au_ok(server.post("hello", headers=_au_bearer(_au_token(au_keys["main"], nbf=now + 10))), "ci-bot")


def test_jwt_invalid_bearer_never_falls_back_to_x_api_key(au_jwt, au_keys):
    server, key = au_jwt
    token = _au_token(au_keys["main"], exp=int(time.time()) - 120)
    resp = server.post("hello", headers={**_au_bearer(token), "X-API-Key": key})
    _au_assert_error(resp, 401, "unauthorized", "The bearer token is not valid: expired.", token=token)


def test_jwt_unknown_permission_is_rejected_when_strict(au_jwt, au_keys):
    server, _ = au_jwt
    token = _au_token(au_keys["main"], permissions=["tasks:run:hello", "tasks:fly"], sub="strict-bot")
    before = server.metric("auth_failures_total", reason="unknown_permission")
    resp = server.post("hello", headers=_au_bearer(token))
    _au_assert_error(resp, 401, "unauthorized", "The token has an unknown permission: 'tasks:fly'.", token=token)
    assert server.metric("auth_failures_total", reason="unknown_permission") == before + 1
    _au_log_has(server, "token carries unknown permissions", " subject=strict-bot ", " unknown=tasks:fly")


def test_jwt_star_permission_runs_anything_and_is_warned(au_jwt, au_keys):
    server, _ = au_jwt
    _au_ok(server.post("deploy", headers=_au_bearer(_au_token(au_keys["main"], ["*"], sub="root-bot"))),
           "deployed\n")
    _au_log_has(server, " warning ", "token grants '*' (everything)", " subject=root-bot")
    # once per subject: the same pipeline calling again adds no line; another subject does
    _au_ok(server.post("deploy", headers=_au_bearer(_au_token(au_keys["main"], ["*"], sub="root-bot"))),
           "deployed\n")
    _au_ok(server.post("deploy", headers=_au_bearer(_au_token(au_keys["main"], ["*"], sub="other-root"))),
           "deployed\n")
    _au_log_has(server, " warning ", "token grants '*' (everything)", " subject=other-root")
    assert len(_au_log_lines(server, "token grants '*' (everything)", " subject=root-bot")) == 1


def test_jwt_inline_public_key_is_used(start_server, au_keys):
    pem = au_keys["main"].public_pem
    server, _ = start_server(_au_jwt_config(f'publicKey = """\n{pem}"""'), keys=())
    _au_ok(server.post("hello", headers=_au_bearer(_au_token(au_keys["main"]))), "ci-bot")
    token = _au_token(au_keys["other"])
    _au_assert_error(server.post("hello", headers=_au_bearer(token)), 401, "unauthorized",
                     "The bearer token is not valid: bad signature.", token=token)


def test_jwt_public_key_path_env_supplies_the_key(start_server, tmp_path, au_keys):
    (tmp_path / "new.pem").write_text(au_keys["main"].public_pem)
    server, _ = start_server(_au_jwt_config('issuer = "rtask"'), keys=(),
                             env={"RTASK_JWT_PUBLIC_KEY_PATH": str(tmp_path / "new.pem")})
    _au_ok(server.post("hello", headers=_au_bearer(_au_token(au_keys["main"]))), "ci-bot")
    token = _au_token(au_keys["other"])
    _au_assert_error(server.post("hello", headers=_au_bearer(token)), 401, "unauthorized",
                     "The bearer token is not valid: bad signature.", token=token)


def test_jwt_public_key_path_env_overrides_config_path(start_server, tmp_path, au_keys):
    (tmp_path / "old.pem").write_text(au_keys["other"].public_pem)
    (tmp_path / "new.pem").write_text(au_keys["main"].public_pem)
    server, _ = start_server(_au_jwt_config('publicKeyPath = "old.pem"'), keys=(),
                             env={"RTASK_JWT_PUBLIC_KEY_PATH": str(tmp_path / "new.pem")})
    _au_ok(server.post("hello", headers=_au_bearer(_au_token(au_keys["main"]))), "ci-bot")
    token = _au_token(au_keys["other"])
    _au_assert_error(server.post("hello", headers=_au_bearer(token)), 401, "unauthorized",
                     "The bearer token is not valid: bad signature.", token=token)


def test_jwt_public_key_env_overrides_config_key(start_server, tmp_path, au_keys):
    (tmp_path / "old.pem").write_text(au_keys["other"].public_pem)
    server, _ = start_server(_au_jwt_config('publicKeyPath = "old.pem"'), keys=(),
                             env={"RTASK_JWT_PUBLIC_KEY": au_keys["main"].public_pem})
    _au_ok(server.post("hello", headers=_au_bearer(_au_token(au_keys["main"]))), "ci-bot")
    _au_assert_error(server.post("hello", headers=_au_bearer(_au_token(au_keys["other"]))), 401,
                     "unauthorized", "The bearer token is not valid: bad signature.")


def test_jwt_public_key_path_env_overrides_inline_config_key(start_server, tmp_path, au_keys):
    (tmp_path / "new.pem").write_text(au_keys["main"].public_pem)
    pem = au_keys["other"].public_pem
    server, _ = start_server(_au_jwt_config(f'publicKey = """\n{pem}"""'), keys=(),
                             env={"RTASK_JWT_PUBLIC_KEY_PATH": str(tmp_path / "new.pem")})
    _au_assert_error(server.post("hello", headers=_au_bearer(_au_token(au_keys["other"]))), 401,
                     "unauthorized", "The bearer token is not valid: bad signature.")
    _au_ok(server.post("hello", headers=_au_bearer(_au_token(au_keys["main"]))), "ci-bot")


def test_jwt_renamed_permissions_claim_with_space_separated_scope(start_server, tmp_path, au_keys):
    (tmp_path / "pub.pem").write_text(au_keys["main"].public_pem)
    server, _ = start_server(_au_jwt_config('publicKeyPath = "pub.pem"', extra_jwt='permissionsClaim = "scope"'),
                             keys=())
    token = _au_token(au_keys["main"], permissions="tasks:run:hello tasks:read", claim="scope", sub="oauth-app")
    ran = server.post("hello", headers=_au_bearer(token))
    _au_ok(ran, "oauth-app")
    read = server.get(f"/tasks/hello/{ran.json['task_id']}", headers=_au_bearer(token))
    assert (read.status, read.json["stdout"]) == (200, "oauth-app"), read
    _au_forbidden(server.post("deploy", headers=_au_bearer(token)), "tasks:run:deploy")
    # the default claim name no longer counts
    _au_forbidden(server.post("hello", headers=_au_bearer(_au_token(au_keys["main"]))), "tasks:run:hello")


@pytest.mark.parametrize("log_unknown", [True, False])
def test_jwt_unknown_permission_is_accepted_when_not_strict(start_server, tmp_path, au_keys, log_unknown):
    (tmp_path / "pub.pem").write_text(au_keys["main"].public_pem)
    auth = f"strictValidation = false\nlogUnknownPermissions = {str(log_unknown).lower()}"
    server, _ = start_server(_au_jwt_config('publicKeyPath = "pub.pem"', extra_auth=auth), keys=())
    token = _au_token(au_keys["main"], permissions=["tasks:run:hello", "tasks:fly"], sub="lax-bot")
    _au_ok(server.post("hello", headers=_au_bearer(token)), "lax-bot")
    _au_forbidden(server.post("deploy", headers=_au_bearer(token)), "tasks:run:deploy")
    if log_unknown:
        _au_log_has(server, "token carries unknown permissions", " subject=lax-bot", " unknown=tasks:fly")
    else:
        _au_log_has(server, "task finished", " caller=lax-bot")
        assert not _au_log_lines(server, "tasks:fly"), server.log()


def test_jwt_public_key_that_is_not_a_pem_public_key_stops_run(tmp_path, au_keys):
    (tmp_path / "bad.pem").write_text("not a key\n")
    (tmp_path / "config.toml").write_text(_au_jwt_config('publicKeyPath = "bad.pem"'))
    run = rtask_cli("run", "--api-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0",
                    cwd=tmp_path, timeout=20)
    assert run.returncode == 1, run
    assert "[auth.jwt]: publicKeyPath is not a PEM public key" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_jwt_public_key_that_is_not_a_pem_public_key_fails_check_config(tmp_path):
    (tmp_path / "bad.pem").write_text("not a key\n")
    (tmp_path / "config.toml").write_text(_au_jwt_config('publicKeyPath = "bad.pem"'))
    checked = rtask_cli("check-config", cwd=tmp_path)
    assert checked.returncode == 1, checked
    assert "[auth.jwt]: publicKeyPath is not a PEM public key" in checked.stderr, checked.stderr


def _au_without_pyjwt(*argv, cwd):
    """``rtask ARGV`` in an interpreter where PyJWT and cryptography cannot be imported."""
    code = ("import runpy, sys; sys.modules['jwt'] = sys.modules['cryptography'] = None; "
            f"sys.argv = [{RTASK!r}, *{list(argv)!r}]; runpy.run_path({RTASK!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_without_pyjwt_a_key_only_server_serves_everything_else(tmp_path):
    """README §2: PyJWT is optional; without it, keys, webhooks, health and metrics all work."""
    blocked = tmp_path / "no-pyjwt"
    for package in ("jwt", "cryptography"):
        (blocked / package).mkdir(parents=True)
        (blocked / package / "__init__.py").write_text(f"raise ImportError('no {package} here')\n")
    env = {**os.environ, "PYTHONPATH": str(blocked)}
    probe = subprocess.run([sys.executable, "-c", "import jwt"], env=env, capture_output=True, text=True)
    assert probe.returncode == 1 and "no jwt here" in probe.stderr, probe
    (tmp_path / "config.toml").write_text(
        '[tasks.hello]\ncommand = ["echo", "hi"]\napiKeyNames = ["ci"]\nwebhookSecrets = { ci_hook = "'
        + "h" * 40 + '" }\n[auth.keyPermissions]\nci = ["tasks:list"]\n')
    added = rtask_cli("add-key", "ci", cwd=tmp_path, env=env)
    assert added.returncode == 0, added
    key = added.stdout.split("API-KEY: ")[1].strip()
    server = Server(tmp_path, {"PYTHONPATH": str(blocked)})
    try:
        _au_ok(server.post("hello", key=key), "hi\n")
        _au_ok(server.request("POST", "/wh/" + "h" * 40), "hi\n")
        assert [t["name"] for t in server.get("/tasks", key=key).json["tasks"]] == ["hello"]
        assert server.get("/health/ready").json == {"status": "ready"}
        assert server.metric("task_duration_seconds_count", handler="hello", api_key_used="ci", status="success") == 1
    finally:
        server.stop()
    assert rtask_cli("check-config", cwd=tmp_path, env=env).returncode == 0


def test_jwt_config_without_pyjwt_fails_check_config_like_run(tmp_path, au_keys):
    (tmp_path / "pub.pem").write_text(au_keys["main"].public_pem)
    (tmp_path / "config.toml").write_text(_au_jwt_config('publicKeyPath = "pub.pem"'))
    run = _au_without_pyjwt("run", "--api-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0",
                            cwd=tmp_path)
    assert run.returncode == 1 and "pip install 'PyJWT[crypto]'" in run.stderr, run
    checked = _au_without_pyjwt("check-config", cwd=tmp_path)
    assert checked.returncode == 1, checked
    assert "pip install 'PyJWT[crypto]'" in checked.stderr, checked.stderr


def test_jwt_public_key_and_public_key_path_together_are_refused(tmp_path, au_keys):
    (tmp_path / "pub.pem").write_text(au_keys["main"].public_pem)
    pem = au_keys["main"].public_pem
    (tmp_path / "config.toml").write_text(_au_jwt_config(f'publicKey = """\n{pem}"""\npublicKeyPath = "pub.pem"'))
    checked = rtask_cli("check-config", cwd=tmp_path)
    assert checked.returncode == 1, checked
    assert "[auth.jwt]: give either 'publicKey' or 'publicKeyPath', not both" in checked.stderr, checked.stderr


def test_jwt_hmac_or_none_algorithm_in_config_is_refused(tmp_path, au_keys):
    (tmp_path / "pub.pem").write_text(au_keys["main"].public_pem)
    for alg in ("HS256", "none"):
        (tmp_path / "config.toml").write_text(
            _au_jwt_config('publicKeyPath = "pub.pem"', extra_jwt=f'allowedAlgorithms = ["{alg}"]'))
        checked = rtask_cli("check-config", cwd=tmp_path)
        assert checked.returncode == 1, checked
        assert f"field 'allowedAlgorithms' has '{alg}'" in checked.stderr, checked.stderr


# ---------------------------------------------------------------------------------------------
# JWT from a JWKS endpoint
# ---------------------------------------------------------------------------------------------


def test_jwks_token_with_served_kid_is_accepted(start_server, au_keys):
    idp = _AuJwks([au_keys["main"]])
    try:
        server, _ = start_server(_au_jwks_config(idp.url), keys=(), env=_AU_ENV)
        _au_wait_ready(server)
        assert idp.fetches == 1  # fetched at start
        token = _au_token(au_keys["main"], kid="k-main", sub="idp-user")
        _au_ok(server.post("hello", headers=_au_bearer(token)), "idp-user")
        unknown = _au_token(au_keys["main"], kid="k-unknown")
        _au_assert_error(server.post("hello", headers=_au_bearer(unknown)), 401, "unauthorized",
                         "The bearer token is not valid: unknown signing key id.", token=unknown)
        forged = _au_token(au_keys["other"], kid="k-main")
        _au_assert_error(server.post("hello", headers=_au_bearer(forged)), 401, "unauthorized",
                         "The bearer token is not valid: bad signature.", token=forged)
    finally:
        idp.stop()


class _AuEc:
    """An EC P-256 key pair for ES256 tokens, served in a JWKS like _AuRsa."""

    def __init__(self, kid: str):
        from cryptography.hazmat.primitives.asymmetric import ec
        self.kid = kid
        self.private = ec.generate_private_key(ec.SECP256R1())

    def jwk(self) -> dict:
        entry = jwt.algorithms.ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**entry, "kid": self.kid, "use": "sig"}


def test_jwks_tokens_of_every_configured_algorithm_are_accepted(start_server, au_keys):
    """README §8: allowedAlgorithms may name RS384/512, PS256/384/512, ES256/384 besides RS256."""
    ec_key = _AuEc("k-ec")
    idp = _AuJwks([au_keys["main"], ec_key])
    try:
        server, _ = start_server(_au_jwks_config(idp.url, 'allowedAlgorithms = ["ES256", "PS256", "RS384"]'),
                                 keys=(), env=_AU_ENV)
        for alg, key in (("ES256", ec_key), ("PS256", au_keys["main"]), ("RS384", au_keys["main"])):
            token = _au_token(key, kid=key.kid, alg=alg, sub=f"by-{alg}")
            _au_ok(server.post("hello", headers=_au_bearer(token)), f"by-{alg}")
        refused = _au_token(au_keys["main"], kid="k-main")  # RS256: not in this list
        _au_assert_error(server.post("hello", headers=_au_bearer(refused)), 401, "unauthorized",
                         "The bearer token is not valid: algorithm not allowed.", token=refused)
    finally:
        idp.stop()


def test_ready_is_503_starting_until_the_first_jwks_fetch_and_tokens_wait_for_it(start_server, au_keys):
    idp = _AuJwks([au_keys["main"]])
    idp.delay = 2.0
    try:
        server, _ = start_server(_au_jwks_config(idp.url), keys=(), env=_AU_ENV)
        t0 = time.monotonic()
        ready = server.get("/health/ready")
        assert (ready.status, ready.json) == (503, {"status": "starting"}), ready
        assert server.get("/health/detailed").json["status"] == "starting"
        assert server.get("/health").json == {"status": "healthy"}  # alive meanwhile
        token = _au_token(au_keys["main"], kid="k-main", sub="early")
        _au_ok(server.post("hello", headers=_au_bearer(token)), "early")  # waited for the keys
        assert 1.0 <= time.monotonic() - t0 < 5
        assert server.get("/health/ready").json == {"status": "ready"}
        assert server.get("/health/detailed").json["status"] == "healthy"
        assert idp.fetches == 1
        _au_log_has(server, "rtask ready")
    finally:
        idp.stop()


@pytest.fixture(scope="module")
def au_jwks_later(tmp_path_factory, au_keys):
    """JWKS set-ups started together, for tests that must outlive the 10-second refresh
    cooldown that the start-up fetch begins: one identity provider goes down, one rotates its
    key, one is flooded with unknown kids, one refreshes every second when asked for a key.
    ``ready_at`` is when the cooldown is over. And a server whose provider never answers, so
    that its start-up fetch must give up after 10 s: ``hung``, with its /health/ready answer
    just after the start and the time of the start."""
    setups = {}
    hung = {"idp": _AuJwks([au_keys["main"]])}
    hung["idp"].hang = True
    hung["started"] = time.monotonic()
    hung["server"] = _au_start(tmp_path_factory.mktemp("au-jwks-hung"), _au_jwks_config(hung["idp"].url))[0]
    hung["ready_at_start"] = hung["server"].get("/health/ready")
    extra = {"down": "jwksRefreshIntervalSeconds = 1\njwksMaxStaleSeconds = 30", "rotate": "", "flood": "",
             "lazy": "jwksRefreshIntervalSeconds = 1"}
    try:
        for name, more in extra.items():
            idp = _AuJwks([au_keys["main"]])
            setups[name] = (idp, None)
            server, _ = _au_start(tmp_path_factory.mktemp(f"au-jwks-{name}"), _au_jwks_config(idp.url, more))
            setups[name] = (idp, server)
            _au_wait_ready(server)
        ready_at = time.monotonic() + _AU_JWKS_COOLDOWN + 0.5
        yield setups, ready_at, hung
    finally:
        for idp, server in [*setups.values(), (hung["idp"], hung.get("server"))]:
            if server:
                server.stop()
            idp.stop()


def _au_sleep_until(deadline: float):
    time.sleep(max(0.0, deadline - time.monotonic()))


def test_jwks_identity_provider_down_cached_keys_serve_within_max_stale(au_jwks_later, au_keys):
    (idp, server), ready_at = au_jwks_later[0]["down"], au_jwks_later[1]
    token = _au_token(au_keys["main"], kid="k-main", sub="idp-user")
    _au_ok(server.post("hello", headers=_au_bearer(token)), "idp-user")
    idp.stop()
    _au_sleep_until(ready_at)  # the key set is now older than its 1 s interval: a refresh is due
    _au_ok(server.post("hello", headers=_au_bearer(token)), "idp-user")
    _au_log_has(server, "JWKS fetch failed; keeping the previous keys")


def test_jwks_rotation_new_kid_is_accepted_after_refresh(au_jwks_later, au_keys):
    (idp, server), ready_at = au_jwks_later[0]["rotate"], au_jwks_later[1]
    idp.serve([au_keys["next"]])  # the provider rotates: k-main is gone, k-next is new
    _au_sleep_until(ready_at)
    fetches = idp.fetches
    _au_ok(server.post("hello", headers=_au_bearer(_au_token(au_keys["next"], kid="k-next", sub="rotated"))),
           "rotated")
    assert idp.fetches == fetches + 1
    old = _au_token(au_keys["main"], kid="k-main")
    _au_assert_error(server.post("hello", headers=_au_bearer(old)), 401, "unauthorized",
                     "The bearer token is not valid: unknown signing key id.", token=old)


def test_jwks_flood_of_unknown_kids_costs_one_fetch(au_jwks_later, au_keys):
    (idp, server), ready_at = au_jwks_later[0]["flood"], au_jwks_later[1]
    _au_sleep_until(ready_at)
    fetches = idp.fetches
    tokens = [_au_token(au_keys["main"], kid=secrets.token_hex(8)) for _ in range(100)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda t: server.post("hello", headers=_au_bearer(t)), tokens))
    assert [a.status for a in answers] == [401] * 100
    assert {a.json["message"] for a in answers} == {"The bearer token is not valid: unknown signing key id."}
    assert idp.fetches == fetches + 1, f"{idp.fetches - fetches} fetches for 100 unknown kids"
    _au_ok(server.post("hello", headers=_au_bearer(_au_token(au_keys["main"], kid="k-main"))), "ci-bot")
    assert idp.fetches == fetches + 1


def test_jwks_key_set_older_than_the_interval_is_refreshed_on_use(au_jwks_later, au_keys):
    (idp, server), ready_at = au_jwks_later[0]["lazy"], au_jwks_later[1]
    _au_sleep_until(ready_at)
    fetches = idp.fetches
    token = _au_token(au_keys["main"], kid="k-main")
    _au_ok(server.post("hello", headers=_au_bearer(token)), "ci-bot")
    assert idp.fetches == fetches + 1
    _au_ok(server.post("hello", headers=_au_bearer(token)), "ci-bot")
    assert idp.fetches == fetches + 1  # the next refresh waits for the cooldown


def test_jwks_fetch_gives_up_after_10_seconds_and_the_server_still_starts(au_jwks_later, au_keys):
    hung = au_jwks_later[2]
    server = hung["server"]
    assert (hung["ready_at_start"].status, hung["ready_at_start"].json) == (503, {"status": "starting"})
    _au_log_has(server, "JWKS fetch failed; keeping the previous keys", "timed out", timeout=25)
    _au_wait_ready(server)
    seconds = time.monotonic() - hung["started"]
    assert 9.5 <= seconds < 25, f"start-up took {seconds:.1f} s"
    assert hung["idp"].fetches == 1
    hung["idp"].hang = False  # the provider recovers: the next unknown kid fetches the keys
    _au_ok(server.post("hello", headers=_au_bearer(_au_token(au_keys["main"], kid="k-main"))), "ci-bot")
    assert hung["idp"].served == 1


def test_jwks_keys_beyond_max_stale_are_no_longer_used(start_server, au_keys):
    idp = _AuJwks([au_keys["main"]])
    try:
        server, _ = start_server(_au_jwks_config(idp.url, "jwksRefreshIntervalSeconds = 1\njwksMaxStaleSeconds = 1"),
                                 keys=(), env=_AU_ENV)
        started = time.monotonic()
        token = _au_token(au_keys["main"], kid="k-main")
        _au_ok(server.post("hello", headers=_au_bearer(token)), "ci-bot")
        idp.stop()
        _au_sleep_until(started + 2.5)
        _au_assert_error(server.post("hello", headers=_au_bearer(token)), 401, "unauthorized",
                         "The bearer token is not valid: no current signing keys from the identity provider.",
                         token=token)
    finally:
        idp.stop()


def test_jwks_unreachable_at_startup_server_starts_and_refuses_tokens(start_server, au_keys):
    url = f"http://127.0.0.1:{_au_free_port()}/jwks.json"
    server, _ = start_server(_au_jwks_config(url), keys=(), env=_AU_ENV)
    _au_log_has(server, "JWKS fetch failed; keeping the previous keys")
    assert server.get("/health").json == {"status": "healthy"}
    token = _au_token(au_keys["main"], kid="k-main")
    _au_assert_error(server.post("hello", headers=_au_bearer(token)), 401, "unauthorized",
                     "The bearer token is not valid: no current signing keys from the identity provider.",
                     token=token)


def test_jwks_redirect_is_not_followed(start_server, au_keys):
    idp = _AuJwks([au_keys["main"]])
    try:
        server, _ = start_server(_au_jwks_config(idp.url.replace("/jwks.json", "/moved")), keys=(), env=_AU_ENV)
        _au_log_has(server, "JWKS fetch failed; keeping the previous keys", "redirects")
        assert (idp.fetches, idp.served) == (1, 0)
        token = _au_token(au_keys["main"], kid="k-main")
        _au_assert_error(server.post("hello", headers=_au_bearer(token)), 401, "unauthorized",
                         "The bearer token is not valid: no current signing keys from the identity provider.")
    finally:
        idp.stop()


def test_jwks_plain_http_url_needs_jwks_allow_http(tmp_path):
    (tmp_path / "config.toml").write_text(
        _au_jwks_config("http://127.0.0.1:1/jwks.json").replace("jwksAllowHttp = true", ""))
    checked = rtask_cli("check-config", cwd=tmp_path)
    assert checked.returncode == 1, checked
    assert "[auth.jwt]: field 'jwksUrl' must be https" in checked.stderr, checked.stderr


# ---------------------------------------------------------------------------------------------
# Health
# ---------------------------------------------------------------------------------------------

_AU_SECRET_WEBHOOK = "au-health-webhook-secret-9f8e7d6c5b4a"
_AU_SECRET_ENV = "au-env-value-do-not-show-31337"


def test_health_endpoints_are_public(start_server):
    server, _ = start_server(_AU_CRED_CONFIG)
    for path, body in [("/health", {"status": "healthy"}), ("/health/live", {"status": "alive"}),
                       ("/health/ready", {"status": "ready"})]:
        resp = server.get(path)
        assert (resp.status, resp.json) == (200, body), (path, resp)
        assert resp.headers["Content-Type"] == "application/json"
    assert server.get("/health", headers={"Authorization": "Bearer nonsense"}).status == 200


def _au_counts(task: dict) -> dict:
    return {k: task.get(k) for k in ("running", "queued", "results_kept")}


def test_health_detailed_counts_runs_and_shows_no_secrets(start_server):
    config = f"""\
[tasks.hello]
command = ["echo", "hi"]
apiKeyNames = ["ci"]
webhookSecrets = {{ github = "{_AU_SECRET_WEBHOOK}" }}
environment = {{ DB_PASSWORD = "{_AU_SECRET_ENV}" }}

[tasks.bg]
command = ["sleep", "30"]
apiKeyNames = ["ci"]
async = true
executionTimeoutSeconds = 60
"""
    server, tokens = start_server(config)
    key = tokens["ci"]
    assert server.post("hello", key=key).status == 200
    run_id = server.post("bg", key=key).json["task_id"]
    try:
        detailed = server.get("/health/detailed")
        assert detailed.status == 200, detailed
        body = detailed.json
        assert body["version"] == rtask.__version__
        assert isinstance(body["uptime_seconds"], (int, float)) and 0 <= body["uptime_seconds"] < 120
        assert sorted(body["tasks"]) == ["bg", "hello"]
        assert _au_counts(body["tasks"]["hello"]) == {"running": 0, "queued": 0, "results_kept": 1}
        assert _au_counts(body["tasks"]["bg"]) == {"running": 1, "queued": 0, "results_kept": 0}
        for secret in (_AU_SECRET_WEBHOOK, _AU_SECRET_ENV, key):
            assert secret not in detailed.body.decode()
    finally:
        assert server.request("DELETE", f"/tasks/bg/{run_id}", key=key).status == 200
    assert _au_counts(server.get("/health/detailed").json["tasks"]["bg"]) == \
        {"running": 0, "queued": 0, "results_kept": 1}


def test_health_ready_is_503_while_draining(start_server):
    config = """\
[tasks.sleepy]
command = ["sh", "-c", "sleep 2; echo slept"]
apiKeyNames = ["ci"]
executionTimeoutSeconds = 20
"""
    server, tokens = start_server(config)
    # a keep-alive connection opened before the signal: the listener closes at SIGTERM, so a
    # new connection could not observe the draining state
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/health/ready")
    first = conn.getresponse()
    assert (first.status, json.loads(first.read())) == (200, {"status": "ready"})
    answers = []
    in_flight = threading.Thread(target=lambda: answers.append(server.post("sleepy", key=tokens["ci"])))
    in_flight.start()
    try:
        wait_for(lambda: server.get("/health/detailed").json["tasks"]["sleepy"]["running"] == 1)
        server.proc.send_signal(signal.SIGTERM)

        def ready_status():
            conn.request("GET", "/health/ready")
            resp = conn.getresponse()
            payload = json.loads(resp.read())
            return (resp.status, payload, resp.getheader("Connection")) if resp.status != 200 else None
        assert wait_for(ready_status, timeout=5) == (503, {"status": "draining"}, "close")
    finally:
        conn.close()
        in_flight.join(20)
    assert len(answers) == 1 and answers[0].status == 200 and answers[0].json["stdout"] == "slept\n", answers
    assert server.proc.wait(15) == 0


# ---------------------------------------------------------------------------------------------
# GET /config
# ---------------------------------------------------------------------------------------------

_AU_INLINE_SECRET = "au-inline-webhook-secret-5a5a5a5a5a"
_AU_FILE_SECRET = "au-file-webhook-secret-6b6b6b6b6b"


def _au_strings(value) -> list[str]:
    """Every string (keys and values) in a decoded JSON document."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *_au_strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in _au_strings(v)]
    return [value] if isinstance(value, str) else []


def test_config_endpoint_needs_config_read_and_shows_no_secrets(start_server, tmp_path, au_keys):
    (tmp_path / "gitlab.secret").write_text(_AU_FILE_SECRET + "\n")
    (tmp_path / "jwt-public-key.pem").write_text(au_keys["main"].public_pem)
    config = f"""\
[tasks.deploy]
command = ["echo", "deploying"]
apiKeyNames = ["ci"]
webhookSecrets = {{ github = "{_AU_INLINE_SECRET}" }}
webhookSecretFiles = {{ gitlab = "gitlab.secret" }}
rateLimit = 2.0

[tasks.deploy.environment]
DB_PASSWORD = "{_AU_SECRET_ENV}"

[auth]
configEndpointEnabled = true

[auth.keyPermissions]
auditor = ["system:config_read"]
sysop = ["system:*"]

[auth.jwt]
publicKeyPath = "jwt-public-key.pem"
"""
    server, keys = start_server(config, keys=("ci", "auditor", "sysop"))
    _au_assert_error(server.get("/config"), 401, *_AU_NO_CREDENTIAL)
    before = server.metric("permission_denials_total", permission="system:config_read")
    _au_forbidden(server.get("/config", key=keys["ci"]), "system:config_read")
    assert server.metric("permission_denials_total", permission="system:config_read") == before + 1
    assert server.get("/config", key=keys["sysop"]).status == 200
    token = _au_token(au_keys["main"], ["system:config_read"])
    assert server.get("/config", headers=_au_bearer(token)).status == 200
    # a JWT holds what its claim lists, not the grants of a key that has its subject's name
    token = _au_token(au_keys["main"], ["tasks:list"], sub="auditor")
    _au_forbidden(server.get("/config", headers=_au_bearer(token)), "system:config_read")

    resp = server.get("/config", key=keys["auditor"])
    assert resp.status == 200, resp
    text = resp.body.decode()
    stored = tomllib.loads((tmp_path / "keys.toml").read_text())
    pem_body = [line for line in au_keys["main"].public_pem.splitlines() if not line.startswith("-----")]
    forbidden = [_AU_INLINE_SECRET, _AU_FILE_SECRET, _AU_SECRET_ENV, *keys.values(), *stored.values(),
                 "".join(pem_body), *pem_body, "BEGIN PUBLIC KEY"]
    for entry in stored.values():  # the Argon2 hash and salt, in any usual spelling
        fields = cbor2.loads(base64.urlsafe_b64decode(entry + "=" * (-len(entry) % 4)))
        for raw in (fields[2], fields[6]):
            forbidden += [raw.hex(), base64.b64encode(raw).decode().rstrip("="), _au_b64(raw), repr(raw)[2:-1]]
    text += "\n" + "\n".join(_au_strings(resp.json))  # JSON escapes undone
    leaked = [s for s in forbidden if s in text]
    assert not leaked, f"/config shows secrets {leaked}:\n{text}"
    deploy = resp.json["tasks"]["deploy"]
    assert deploy["apiKeyNames"] == ["ci"] and deploy["rateLimit"] == 2.0
    assert sorted(deploy["webhooks"]) == ["github", "gitlab"]
    assert deploy["environment"] == ["DB_PASSWORD"]
    assert resp.json["auth"]["keys"] == ["auditor", "ci", "sysop"]
    assert resp.json["auth"]["keyPermissions"] == {"auditor": ["system:config_read"], "sysop": ["system:*"]}


# ---------------------------------------------------------------------------------------------
# Auth commands: generate-keys, generate-token, validate-token, show-permissions
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def au_generated(tmp_path_factory):
    """``rtask generate-keys --output-dir keys`` run once: (working dir, key dir, result)."""
    cwd = tmp_path_factory.mktemp("au-cli")
    out = rtask_cli("generate-keys", "--output-dir", "keys", cwd=cwd)
    return cwd, cwd / "keys", out


def test_generate_keys_writes_a_private_key_0600_and_its_public_key(au_generated):
    _, key_dir, out = au_generated
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    private_path, public_path = key_dir / "jwt-private-key.pem", key_dir / "jwt-public-key.pem"
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    private = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
    public = serialization.load_pem_public_key(public_path.read_bytes())
    assert isinstance(private, rsa.RSAPrivateKey) and private.key_size == 2048
    assert public.public_numbers() == private.public_key().public_numbers()


def test_generate_keys_never_overwrites_a_key_pair(au_generated):
    cwd, key_dir, _ = au_generated
    before = {p.name: p.read_bytes() for p in key_dir.iterdir()}
    out = rtask_cli("generate-keys", "--output-dir", "keys", cwd=cwd)
    assert out.returncode == 1, out
    assert out.stderr == "rtask: keys/jwt-private-key.pem already exists; move it away first or use another " \
                         "--output-dir\n"
    assert {p.name: p.read_bytes() for p in key_dir.iterdir()} == before


@pytest.mark.parametrize("size", ["1024", "100000000"])
def test_generate_keys_refuses_a_key_size_out_of_range(tmp_path, size):
    out = rtask_cli("generate-keys", "--output-dir", "odd", "--key-size", size, cwd=tmp_path, timeout=20)
    assert out.returncode == 1, out
    assert out.stderr == f"rtask: --key-size {size} is out of range; use 2048 to 16384 (4096 is plenty)\n"
    assert not (tmp_path / "odd" / "jwt-private-key.pem").exists()


def test_generate_token_prints_the_token_alone(au_generated):
    cwd, key_dir, _ = au_generated
    out = rtask_cli("generate-token", "--permissions", "tasks:run:hello,tasks:read", "--subject", "deploy-bot",
                    "--private-key", str(key_dir / "jwt-private-key.pem"), cwd=cwd)
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\n", out.stdout), out.stdout
    public = (key_dir / "jwt-public-key.pem").read_bytes()
    claims = jwt.decode(out.stdout.strip(), public, algorithms=["RS256"], audience=_AU_AUDIENCE, issuer=_AU_ISSUER)
    assert claims["sub"] == "deploy-bot" and claims["permissions"] == ["tasks:run:hello", "tasks:read"]
    assert abs(claims["exp"] - time.time() - 24 * 3600) < 120
    assert "kid" not in jwt.get_unverified_header(out.stdout.strip())
    out = rtask_cli("generate-token", "--permissions", "tasks:list", "--kid", "key-2024", "--expiry-hours", "1",
                    "--issuer", "https://idp.example", "--audience", "ops-api",
                    "--private-key", str(key_dir / "jwt-private-key.pem"), cwd=cwd)
    assert out.returncode == 0, out.stderr
    assert jwt.get_unverified_header(out.stdout.strip())["kid"] == "key-2024"
    claims = jwt.decode(out.stdout.strip(), public, algorithms=["RS256"], audience="ops-api",
                        issuer="https://idp.example")
    assert claims["permissions"] == ["tasks:list"] and abs(claims["exp"] - time.time() - 3600) < 120


def test_generate_token_refuses_an_unknown_permission(au_generated):
    cwd, key_dir, _ = au_generated
    out = rtask_cli("generate-token", "--permissions", "tasks:run:hello,tasks:fly",
                    "--private-key", str(key_dir / "jwt-private-key.pem"), cwd=cwd)
    assert out.returncode == 1, out
    assert out.stdout == ""
    assert out.stderr == "rtask: unknown permission 'tasks:fly' (see rtask show-permissions)\n"


def test_generated_token_is_accepted_by_a_server_with_the_generated_public_key(au_generated, start_server):
    cwd, key_dir, _ = au_generated
    token = rtask_cli("generate-token", "--permissions", "tasks:run:hello", "--subject", "round-trip",
                      "--private-key", str(key_dir / "jwt-private-key.pem"), cwd=cwd).stdout.strip()
    public_path = json.dumps(str(key_dir / "jwt-public-key.pem"))
    server, _ = start_server(_au_jwt_config(f"publicKeyPath = {public_path}"), keys=())
    _au_ok(server.post("hello", headers=_au_bearer(token)), "round-trip")
    _au_forbidden(server.post("deploy", headers=_au_bearer(token)), "tasks:run:deploy")


def test_validate_token_shows_subject_expiry_and_permissions(au_generated, au_keys):
    cwd, key_dir, _ = au_generated
    public = str(key_dir / "jwt-public-key.pem")
    token = rtask_cli("generate-token", "--permissions", "tasks:run:hello", "--subject", "checker",
                      "--expiry-hours", "2", "--private-key", str(key_dir / "jwt-private-key.pem"),
                      cwd=cwd).stdout.strip()
    out = rtask_cli("validate-token", "--token", token, "--public-key", public, cwd=cwd)
    assert out.returncode == 0, out.stderr
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    expiry = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(exp))
    assert "valid token for subject 'checker'" in out.stdout, out.stdout
    assert re.search(rf"expires: {expiry}(\.0+)?Z", out.stdout), out.stdout
    assert re.search(r"^issuer: rtask$", out.stdout, re.M) and re.search(r"^audience: rtask-api$", out.stdout, re.M)
    assert re.search(r"^issued: \d{4}-\d\d-\d\dT", out.stdout, re.M), out.stdout
    assert re.search(r"^\s+tasks:run:hello$", out.stdout, re.M), out.stdout
    # a token from elsewhere with an unknown permission is shown, the permission marked
    private = serialization.load_pem_private_key((key_dir / "jwt-private-key.pem").read_bytes(), None)
    odd = jwt.encode(_au_claims(["tasks:run:hello", "tasks:fly"]), private, algorithm="RS256")
    out = rtask_cli("validate-token", "--token", odd, "--public-key", public, cwd=cwd)
    assert out.returncode == 0, out.stderr
    assert re.search(r"tasks:fly\s+\(unknown permission\)", out.stdout), out.stdout
    # a token signed by another key, or expired, is refused
    out = rtask_cli("validate-token", "--token", _au_token(au_keys["other"]), "--public-key", public, cwd=cwd)
    assert out.returncode == 1 and out.stdout == "", out
    assert out.stderr == "invalid: The bearer token is not valid: bad signature.\n"
    expired = jwt.encode(_au_claims(exp=int(time.time()) - 3600), private, algorithm="RS256")
    out = rtask_cli("validate-token", "--token", expired, "--public-key", public, cwd=cwd)
    assert (out.returncode, out.stderr) == (1, "invalid: The bearer token is not valid: expired.\n"), out
    # without --public-key, the [auth.jwt] of the config is used
    (cwd / "config.toml").write_text(_au_jwt_config('publicKeyPath = "keys/jwt-public-key.pem"'))
    out = rtask_cli("validate-token", "--token", token, cwd=cwd)
    assert out.returncode == 0 and "valid token for subject 'checker'" in out.stdout, out


def test_validate_token_fetches_the_jwks_of_the_config(tmp_path, au_keys):
    idp = _AuJwks([au_keys["main"]])
    try:
        (tmp_path / "config.toml").write_text(_au_jwks_config(idp.url))
        token = _au_token(au_keys["main"], kid="k-main", sub="from-idp")
        out = rtask_cli("validate-token", "--token", token, cwd=tmp_path, env={**os.environ, **_AU_ENV})
        assert out.returncode == 0 and "valid token for subject 'from-idp'" in out.stdout, out
        assert idp.fetches == 1
    finally:
        idp.stop()


def test_show_permissions_prints_the_table_and_grants_without_pyjwt(tmp_path):
    (tmp_path / "config.toml").write_text(_AU_PERM_CONFIG)
    out = _au_without_pyjwt("show-permissions", cwd=tmp_path)  # must not need PyJWT
    assert out.returncode == 0, out.stderr
    for permission in ("tasks:run", "tasks:read", "tasks:list", "tasks:cancel", "system:config_read",
                       "tasks:*", "system:*"):
        assert permission in out.stdout, (permission, out.stdout)
    assert re.search(r"^\*\s+everything", out.stdout, re.M), out.stdout
    assert "  key ci: tasks:cancel:hello, tasks:cancel:slow, tasks:list:hello, tasks:list:slow, " \
           "tasks:read:hello, tasks:read:slow, tasks:run:hello, tasks:run:slow\n" in out.stdout, out.stdout
    for line in ("  key admin: *\n", "  key ops: tasks:*\n", "  key reader: tasks:read\n",
                 "  key deployer: tasks:run:deploy\n"):
        assert line in out.stdout, (line, out.stdout)
    # the JWT commands, on the contrary, say what to install
    out = _au_without_pyjwt("generate-keys", cwd=tmp_path)
    assert out.returncode == 1 and "pip install 'PyJWT[crypto]'" in out.stderr, out


# Tests that test_rtask.py itself may define must not be collected a second time from here.


# =============================================================================================
# ===== Integrations: shared helpers =====
# =============================================================================================

_IG_TASK_ID_RE = re.compile(r"[a-z2-7]{16}")


class _IgServer(Server):
    """A ``rtask run`` like the shared Server fixture, with options after ``run`` (--tls-cert,
    --tls-key) and HTTPS requests when given an ``ssl_context``."""

    def __init__(self, workdir: Path, extra_env=None, run_args=(), ssl_context=None):
        self.workdir = workdir
        self.ssl_context = ssl_context
        self.log_path = workdir / "server.log"
        self._log = open(self.log_path, "wb")
        env = {**os.environ, **(extra_env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, RTASK, "run", "--api-address", "127.0.0.1:0",
             "--metrics-address", "127.0.0.1:0", *run_args],
            cwd=workdir, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self.port, self.metrics_port = self._wait_for_ports()
        except BaseException:
            self.stop()
            raise

    def _connection(self, port, timeout):
        if self.ssl_context is not None:
            return http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=self.ssl_context)
        return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def request(self, method, path, body=b"", key=None, headers=None, timeout=30) -> Response:
        conn = self._connection(self.port, timeout)
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

    def metrics(self) -> str:
        conn = self._connection(self.metrics_port, 10)
        try:
            conn.request("GET", "/metrics")
            return conn.getresponse().read().decode()
        finally:
            conn.close()


def _ig_error(resp: Response, status: int, code: str) -> dict:
    """Assert an error answer of README §5: status, JSON content type, error code, a message."""
    assert resp.status == status, resp
    assert resp.headers["Content-Type"] == "application/json", resp.headers
    payload = resp.json
    assert payload["error"] == code, payload
    assert isinstance(payload.get("message"), str) and payload["message"], payload
    return payload


def _ig_runs(workdir: Path, task: str) -> int:
    """How many times ``task`` started: each run of the test commands appends a line."""
    path = workdir / f"runs-{task}.log"
    return len(path.read_text().splitlines()) if path.exists() else 0


# =============================================================================================
# ===== Signed webhooks =====
# =============================================================================================

_IG_GH_SECRET = "ig-github-" + secrets.token_hex(16)
_IG_GH_PUSH_SECRET = "ig-github-push-" + secrets.token_hex(16)
_IG_GL_SECRET = "ig-gitlab-" + secrets.token_hex(16)
_IG_HM_SECRET = "ig-hmac-" + secrets.token_hex(16)
_IG_HM_DEFAULT_SECRET = "ig-hmac-default-" + secrets.token_hex(16)
_IG_FILE_SECRET = "ig-file-" + secrets.token_hex(16)
_IG_CAP_SECRET = "ig-cap-" + secrets.token_hex(16)
_IG_RATE_SECRET = "ig-rate-" + secrets.token_hex(16)

# Every hook task: count the run, then print what it got (body, event headers, caller).
_IG_HOOK_COMMAND = json.dumps([
    "sh", "-c",
    'echo run >> "runs-$RTASK_TASK_NAME.log"; '
    "printf 'body=%s;gh=%s;gl=%s;caller=%s\\n' \"$(cat)\" \"$REQUEST_HEADER_X_GITHUB_EVENT\" "
    '"$REQUEST_HEADER_X_GITLAB_EVENT" "$RTASK_CALLER"'])


def _ig_hooks_config() -> str:
    common = f'command = {_IG_HOOK_COMMAND}\npassRequestHeaders = ["X-GitHub-Event", "X-Gitlab-Event"]'
    return textwrap.dedent(f"""\
        [tasks.ig_gh]
        {common}
        [tasks.ig_gh.signedWebhook]
        provider = "github"
        secret = "{_IG_GH_SECRET}"

        [tasks.ig_gh_push]
        {common}
        [tasks.ig_gh_push.signedWebhook]
        provider = "github"
        secret = "{_IG_GH_PUSH_SECRET}"
        events = ["push"]

        [tasks.ig_gl]
        {common}
        [tasks.ig_gl.signedWebhook]
        provider = "gitlab"
        secret = "{_IG_GL_SECRET}"
        events = ["Push Hook"]

        [tasks.ig_hm]
        {common}
        [tasks.ig_hm.signedWebhook]
        provider = "hmac-sha256"
        secret = "{_IG_HM_SECRET}"
        signatureHeader = "X-Sig"

        [tasks.ig_hm_default]
        {common}
        [tasks.ig_hm_default.signedWebhook]
        provider = "hmac-sha256"
        secret = "{_IG_HM_DEFAULT_SECRET}"

        [tasks.ig_file]
        {common}
        [tasks.ig_file.signedWebhook]
        provider = "github"
        secretFile = "ig-secret.txt"

        [tasks.ig_cap]
        {common}
        maxInputBytes = 64
        [tasks.ig_cap.signedWebhook]
        provider = "github"
        secret = "{_IG_CAP_SECRET}"

        [tasks.ig_rate]
        {common}
        rateLimit = 0.5
        [tasks.ig_rate.signedWebhook]
        provider = "github"
        secret = "{_IG_RATE_SECRET}"

        [tasks.ig_plain]
        {common}
        apiKeyNames = ["ci"]
        """)


@pytest.fixture(scope="module")
def _ig_hooks(tmp_path_factory):
    """One server for the signed-webhook tests (log level debug, so that a secret in any log
    line is caught): .server, .dir, .ci. Each behaviour has its own task."""
    d = tmp_path_factory.mktemp("ig_hooks")
    (d / "ig-secret.txt").write_text(f"  \t{_IG_FILE_SECRET} \n\n")
    (d / "config.toml").write_text(_ig_hooks_config())
    ci = new_key(d, "ci")
    server = _IgServer(d, extra_env={"RTASK_LOG": "debug"})
    try:
        yield types.SimpleNamespace(server=server, dir=d, ci=ci)
    finally:
        server.stop()


def _ig_github_signature(secret: str, body: bytes) -> str:
    """As GitHub documents it: 'sha256=' + hex HMAC-SHA256 of the raw body, keyed by the secret."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _ig_hook(hooks, task, body=b"", headers=None, method="POST") -> Response:
    return hooks.server.request(method, f"/hooks/{task}", body, headers=headers)


def _ig_success(resp: Response, stdout: str) -> dict:
    assert resp.status == 200, resp
    result = resp.json
    assert result["status"] == "success" and result["exit_code"] == 0, result
    assert result["stdout"] == stdout, result
    return result


def test_ig_github_signed_push_runs_the_task_with_body_and_event(_ig_hooks):
    body = b'{"ref": "refs/heads/main", "after": "0123abcd"}'
    resp = _ig_hook(_ig_hooks, "ig_gh", body, {
        "X-Hub-Signature-256": _ig_github_signature(_IG_GH_SECRET, body),
        "X-GitHub-Event": "push", "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        "Content-Type": "application/json"})
    result = _ig_success(resp, f"body={body.decode()};gh=push;gl=;caller=github\n")
    assert _IG_TASK_ID_RE.fullmatch(result["task_id"]), result
    assert _ig_runs(_ig_hooks.dir, "ig_gh") == 1


def test_ig_github_signature_is_over_the_raw_bytes(_ig_hooks):
    """Whitespace and key order matter: the HMAC is of the bytes as sent, not of parsed JSON."""
    body = b'{ "zeta" : 1,\n  "alpha":"\xc3\xa9" }'
    before = _ig_runs(_ig_hooks.dir, "ig_gh")
    resp = _ig_hook(_ig_hooks, "ig_gh", body, {"X-Hub-Signature-256": _ig_github_signature(_IG_GH_SECRET, body),
                                               "X-GitHub-Event": "push"})
    _ig_success(resp, f"body={body.decode()};gh=push;gl=;caller=github\n")
    assert _ig_runs(_ig_hooks.dir, "ig_gh") == before + 1
    reparsed = json.dumps(json.loads(body)).encode()
    resp = _ig_hook(_ig_hooks, "ig_gh", body, {"X-Hub-Signature-256": _ig_github_signature(_IG_GH_SECRET, reparsed),
                                               "X-GitHub-Event": "push"})
    _ig_error(resp, 401, "unauthorized")
    assert _ig_runs(_ig_hooks.dir, "ig_gh") == before + 1


_IG_BAD_BODY = b'{"ref": "refs/heads/attack", "n": "' + secrets.token_hex(8).encode() + b'"}'
_IG_BAD_SIGNATURES = {
    "wrong-secret": {"X-Hub-Signature-256": _ig_github_signature("not-the-secret", _IG_BAD_BODY)},
    "missing-header": {},
    "empty-header": {"X-Hub-Signature-256": ""},
    "no-sha256-prefix": {"X-Hub-Signature-256": _ig_github_signature(_IG_GH_SECRET, _IG_BAD_BODY)[7:]},
    "sha1-prefix": {"X-Hub-Signature-256": "sha1=" + _ig_github_signature(_IG_GH_SECRET, _IG_BAD_BODY)[7:]},
    "other-body": {"X-Hub-Signature-256": _ig_github_signature(_IG_GH_SECRET, _IG_BAD_BODY + b" ")},
    "truncated": {"X-Hub-Signature-256": _ig_github_signature(_IG_GH_SECRET, _IG_BAD_BODY)[:-2]},
    "old-sha1-header-only": {"X-Hub-Signature": "sha1=" + hmac.new(_IG_GH_SECRET.encode(), _IG_BAD_BODY,
                                                                   hashlib.sha1).hexdigest()},
}


@pytest.mark.parametrize("variant", list(_IG_BAD_SIGNATURES))
def test_ig_github_bad_signature_is_401_runs_nothing_and_reveals_nothing(_ig_hooks, variant):
    expected_hex = hmac.new(_IG_GH_SECRET.encode(), _IG_BAD_BODY, hashlib.sha256).hexdigest()
    failures = _ig_hooks.server.metric("auth_requests_total", method="webhook", result="failure")
    before = _ig_runs(_ig_hooks.dir, "ig_gh")
    resp = _ig_hook(_ig_hooks, "ig_gh", _IG_BAD_BODY, {**_IG_BAD_SIGNATURES[variant], "X-GitHub-Event": "push"})
    _ig_error(resp, 401, "unauthorized")
    raw = bytes(resp.body) + str(resp.headers).encode()
    assert expected_hex.encode() not in raw.lower(), resp
    assert expected_hex[:16].encode() not in raw.lower(), resp
    assert _IG_GH_SECRET.encode() not in raw, resp
    time.sleep(0.2)  # a run started by mistake would have written its line by now
    assert _ig_runs(_ig_hooks.dir, "ig_gh") == before
    assert _ig_hooks.server.metric("auth_requests_total", method="webhook", result="failure") == failures + 1
    log = _ig_hooks.server.log()
    assert expected_hex not in log.lower() and expected_hex[:16] not in log.lower()
    assert _IG_GH_SECRET not in log


def test_ig_github_ping_is_200_without_running(_ig_hooks):
    body = b'{"zen": "Keep it logically awesome.", "hook_id": 42}'
    before = _ig_runs(_ig_hooks.dir, "ig_gh")
    resp = _ig_hook(_ig_hooks, "ig_gh", body, {"X-Hub-Signature-256": _ig_github_signature(_IG_GH_SECRET, body),
                                               "X-GitHub-Event": "ping"})
    assert resp.status == 200, resp
    assert resp.headers["Content-Type"] == "application/json"
    assert "exit_code" not in resp.json and "task_id" not in resp.json, resp
    time.sleep(0.2)
    assert _ig_runs(_ig_hooks.dir, "ig_gh") == before
    # A ping is not a way around the signature.
    resp = _ig_hook(_ig_hooks, "ig_gh", body, {"X-Hub-Signature-256": _ig_github_signature("guess", body),
                                               "X-GitHub-Event": "ping"})
    _ig_error(resp, 401, "unauthorized")


def test_ig_github_events_filter(_ig_hooks):
    body = b'{"action": "opened"}'
    sig = {"X-Hub-Signature-256": _ig_github_signature(_IG_GH_PUSH_SECRET, body)}
    resp = _ig_hook(_ig_hooks, "ig_gh_push", body, {**sig, "X-GitHub-Event": "issues"})
    assert resp.status == 202, resp
    assert resp.headers["Content-Type"] == "application/json"
    assert "exit_code" not in resp.json and "task_id" not in resp.json, resp
    resp = _ig_hook(_ig_hooks, "ig_gh_push", body, sig)  # no event header at all: not "push"
    assert resp.status == 202, resp
    time.sleep(0.2)
    assert _ig_runs(_ig_hooks.dir, "ig_gh_push") == 0
    resp = _ig_hook(_ig_hooks, "ig_gh_push", body, {**sig, "X-GitHub-Event": "push"})
    _ig_success(resp, f"body={body.decode()};gh=push;gl=;caller=github\n")
    assert _ig_runs(_ig_hooks.dir, "ig_gh_push") == 1
    # A ping is answered even when "ping" is not among the events.
    ping = b'{"zen": "ping"}'
    resp = _ig_hook(_ig_hooks, "ig_gh_push", ping, {"X-Hub-Signature-256": _ig_github_signature(_IG_GH_PUSH_SECRET, ping),
                                                    "X-GitHub-Event": "ping"})
    assert resp.status == 200, resp
    assert _ig_runs(_ig_hooks.dir, "ig_gh_push") == 1
    # The filter comes after the signature: a bad signature on a filtered event is still 401.
    resp = _ig_hook(_ig_hooks, "ig_gh_push", body, {"X-Hub-Signature-256": _ig_github_signature("x", body),
                                                    "X-GitHub-Event": "issues"})
    _ig_error(resp, 401, "unauthorized")


def test_ig_gitlab_token_and_event_filter(_ig_hooks):
    d, server = _ig_hooks.dir, _ig_hooks.server
    body = b'{"object_kind": "push"}'
    resp = _ig_hook(_ig_hooks, "ig_gl", body, {"X-Gitlab-Token": _IG_GL_SECRET, "X-Gitlab-Event": "Push Hook"})
    _ig_success(resp, f"body={body.decode()};gh=;gl=Push Hook;caller=gitlab\n")
    assert _ig_runs(d, "ig_gl") == 1
    for headers in ({"X-Gitlab-Token": _IG_GL_SECRET + "x", "X-Gitlab-Event": "Push Hook"},
                    {"X-Gitlab-Token": _IG_GL_SECRET[:-1], "X-Gitlab-Event": "Push Hook"},
                    {"X-Gitlab-Event": "Push Hook"},
                    # GitLab does not sign: an HMAC of the body in GitHub's header is no proof.
                    {"X-Hub-Signature-256": _ig_github_signature(_IG_GL_SECRET, body), "X-Gitlab-Event": "Push Hook"}):
        resp = _ig_hook(_ig_hooks, "ig_gl", body, headers)
        _ig_error(resp, 401, "unauthorized")
        assert _IG_GL_SECRET.encode() not in resp.body
    resp = _ig_hook(_ig_hooks, "ig_gl", body, {"X-Gitlab-Token": _IG_GL_SECRET, "X-Gitlab-Event": "Tag Push Hook"})
    assert resp.status == 202, resp
    time.sleep(0.2)
    assert _ig_runs(d, "ig_gl") == 1
    assert wait_for(lambda: server.metric("task_duration_seconds_count", handler="ig_gl",
                                          api_key_used="gitlab", status="success") == 1, timeout=5)
    assert _IG_GL_SECRET not in server.log()


@pytest.mark.parametrize("prefix", ["", "sha256="])
def test_ig_hmac_sha256_provider_with_custom_header(_ig_hooks, prefix):
    body = b"payload-" + prefix.encode()
    digest = hmac.new(_IG_HM_SECRET.encode(), body, hashlib.sha256).hexdigest()
    before = _ig_runs(_ig_hooks.dir, "ig_hm")
    resp = _ig_hook(_ig_hooks, "ig_hm", body, {"X-Sig": prefix + digest})
    _ig_success(resp, f"body={body.decode()};gh=;gl=;caller=hmac-sha256\n")
    assert _ig_runs(_ig_hooks.dir, "ig_hm") == before + 1
    wrong = hmac.new(b"wrong", body, hashlib.sha256).hexdigest()
    for headers in ({"X-Sig": prefix + wrong},
                    {"X-Signature-256": prefix + digest},  # the right proof in another header
                    {"X-Hub-Signature-256": "sha256=" + digest},
                    {}):
        _ig_error(_ig_hook(_ig_hooks, "ig_hm", body, headers), 401, "unauthorized")
    time.sleep(0.2)
    assert _ig_runs(_ig_hooks.dir, "ig_hm") == before + 1


def test_ig_hmac_sha256_provider_default_header_is_x_signature_256(_ig_hooks):
    body = b"payload-default-header"
    digest = hmac.new(_IG_HM_DEFAULT_SECRET.encode(), body, hashlib.sha256).hexdigest()
    _ig_error(_ig_hook(_ig_hooks, "ig_hm_default", body, {"X-Sig": digest}), 401, "unauthorized")
    resp = _ig_hook(_ig_hooks, "ig_hm_default", body, {"X-Signature-256": "sha256=" + digest})
    _ig_success(resp, f"body={body.decode()};gh=;gl=;caller=hmac-sha256\n")


def test_ig_secret_file_is_trimmed(_ig_hooks):
    body = b'{"from": "secretFile"}'
    resp = _ig_hook(_ig_hooks, "ig_file", body, {"X-Hub-Signature-256": _ig_github_signature(_IG_FILE_SECRET, body)})
    _ig_success(resp, f"body={body.decode()};gh=;gl=;caller=github\n")
    raw_content = (_ig_hooks.dir / "ig-secret.txt").read_text()
    resp = _ig_hook(_ig_hooks, "ig_file", body, {"X-Hub-Signature-256": _ig_github_signature(raw_content, body)})
    _ig_error(resp, 401, "unauthorized")
    assert _ig_runs(_ig_hooks.dir, "ig_file") == 1
    assert _IG_FILE_SECRET not in _ig_hooks.server.log()


def test_ig_body_over_max_input_is_413_before_the_signature_check(_ig_hooks):
    server = _ig_hooks.server
    failures = server.metric("auth_requests_total", method="webhook", result="failure")
    successes = server.metric("auth_requests_total", method="webhook", result="success")
    big = b"x" * 65
    for headers in ({"X-Hub-Signature-256": _ig_github_signature(_IG_CAP_SECRET, big)},
                    {"X-Hub-Signature-256": _ig_github_signature("wrong", big)},
                    {}):
        _ig_error(_ig_hook(_ig_hooks, "ig_cap", big, headers), 413, "payload_too_large")
    assert server.metric("auth_requests_total", method="webhook", result="failure") == failures
    assert server.metric("auth_requests_total", method="webhook", result="success") == successes
    assert server.metric("task_rejection_total", handler="ig_cap", reason="input_too_large") == 3
    time.sleep(0.2)
    assert _ig_runs(_ig_hooks.dir, "ig_cap") == 0
    exact = b"y" * 64
    resp = _ig_hook(_ig_hooks, "ig_cap", exact, {"X-Hub-Signature-256": _ig_github_signature(_IG_CAP_SECRET, exact)})
    _ig_success(resp, f"body={exact.decode()};gh=;gl=;caller=github\n")
    # Chunked: the cap holds without a Content-Length, and the signature is over the de-chunked bytes.
    def chunked(body):
        head = (f"POST /hooks/ig_cap HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
                f"X-Hub-Signature-256: {_ig_github_signature(_IG_CAP_SECRET, body)}\r\n\r\n").encode()
        return server.raw(head + b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 20]), body[i:i + 20])
                                          for i in range(0, len(body), 20)) + b"0\r\n\r\n")
    answer = chunked(b"z" * 65)
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    answer = chunked(b"w" * 50)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert b'"stdout": "body=' + b"w" * 50 in answer, answer
    assert _ig_runs(_ig_hooks.dir, "ig_cap") == 2


def test_ig_hooks_routes_404_and_405(_ig_hooks):
    body = b"{}"
    # A task without signedWebhook has no /hooks route, whatever is sent.
    resp = _ig_hook(_ig_hooks, "ig_plain", body, {"X-Hub-Signature-256": _ig_github_signature(_IG_GH_SECRET, body)})
    _ig_error(resp, 404, "not_found")
    _ig_error(_ig_hook(_ig_hooks, "ig_nosuchtask", body, {}), 404, "not_found")
    time.sleep(0.2)
    assert _ig_runs(_ig_hooks.dir, "ig_plain") == 0
    resp = _ig_hook(_ig_hooks, "ig_gh", method="GET")
    _ig_error(resp, 405, "method_not_allowed")
    assert resp.headers["Allow"] == "POST", resp.headers
    # A signed-webhook task is not reachable through /tasks without apiKeyNames either.
    _ig_error(_ig_hooks.server.post("ig_gh", body, key=_ig_hooks.ci), 404, "not_found")


def test_ig_signed_hooks_are_rate_limited_and_labelled_by_provider(_ig_hooks):
    server, d = _ig_hooks.server, _ig_hooks.dir
    body = b'{"n": 1}'
    good = {"X-Hub-Signature-256": _ig_github_signature(_IG_RATE_SECRET, body), "X-GitHub-Event": "push"}
    # A refused signature costs no rate token: the next good request still runs.
    _ig_error(_ig_hook(_ig_hooks, "ig_rate", body, {"X-Hub-Signature-256": _ig_github_signature("no", body)}),
              401, "unauthorized")
    _ig_success(_ig_hook(_ig_hooks, "ig_rate", body, good), f"body={body.decode()};gh=push;gl=;caller=github\n")
    resp = _ig_hook(_ig_hooks, "ig_rate", body, good)
    _ig_error(resp, 429, "rate_limited")
    assert resp.headers["Retry-After"] == "2", resp.headers
    time.sleep(0.2)
    assert _ig_runs(d, "ig_rate") == 1
    assert server.metric("task_rejection_total", handler="ig_rate", reason="limit_exceeded") == 1
    assert wait_for(lambda: server.metric("task_duration_seconds_count", handler="ig_rate",
                                          api_key_used="github", status="success") == 1, timeout=5)


_IG_BAD_HOOK_CONFIGS = {
    "unknown-provider": ('provider = "bitbucket"\nsecret = "s3cret-value"', ["provider"]),
    "secret-and-secretFile": ('provider = "github"\nsecret = "s3cret-value"\nsecretFile = "ig-secret.txt"',
                              ["secret", "secretFile"]),
    "missing-secretFile": ('provider = "github"\nsecretFile = "ig-no-such-file.txt"',
                           ["secretFile", "ig-no-such-file.txt"]),
    "signatureHeader-with-github": ('provider = "github"\nsecret = "s3cret-value"\nsignatureHeader = "X-Sig"',
                                    ["signatureHeader"]),
    "signatureHeader-with-gitlab": ('provider = "gitlab"\nsecret = "s3cret-value"\nsignatureHeader = "X-Sig"',
                                    ["signatureHeader"]),
    "typo-field": ('provider = "github"\nsecret = "s3cret-value"\nevent = ["push"]', ["event"]),
    "no-secret": ('provider = "github"', ["secret"]),
    "empty-secretFile": ('provider = "github"\nsecretFile = "ig-empty.txt"', ["secretFile"]),
    "events-not-a-list": ('provider = "github"\nsecret = "s3cret-value"\nevents = "push"', ["events"]),
}


@pytest.mark.parametrize("variant", list(_IG_BAD_HOOK_CONFIGS))
def test_ig_signed_webhook_config_errors(tmp_path, variant):
    table, words = _IG_BAD_HOOK_CONFIGS[variant]
    (tmp_path / "ig-secret.txt").write_text("file-secret\n")
    (tmp_path / "ig-empty.txt").write_text("  \n")
    (tmp_path / "config.toml").write_text(
        f'[tasks.deploy]\ncommand = ["true"]\n[tasks.deploy.signedWebhook]\n{table}\n')
    out = rtask_cli("check-config", cwd=tmp_path)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    assert "deploy" in out.stderr and "signedWebhook" in out.stderr, out.stderr
    for word in words:
        assert f"'{word}'" in out.stderr or f'"{word}"' in out.stderr or word in out.stderr, out.stderr
    assert "s3cret-value" not in out.stderr and "file-secret" not in out.stderr


def test_ig_signed_webhook_valid_config_is_accepted(tmp_path):
    (tmp_path / "gh.txt").write_text("  file-secret \n")
    (tmp_path / "config.toml").write_text(textwrap.dedent("""\
        [tasks.a]
        command = ["true"]
        [tasks.a.signedWebhook]
        provider = "github"
        secretFile = "gh.txt"
        events = ["push", "release"]
        [tasks.b]
        command = ["true"]
        [tasks.b.signedWebhook]
        provider = "hmac-sha256"
        secret = "abc"
        signatureHeader = "X-Sig"
        """))
    out = rtask_cli("check-config", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    # A task reachable only by its signed webhook is not "unreachable".
    assert "nothing can call it" not in out.stderr, out.stderr


# =============================================================================================
# ===== rtask call =====
# =============================================================================================

_IG_SLOW_PRINT = json.dumps([sys.executable, "-u", "-c",
                             "import time; print('first', flush=True); time.sleep(1.5); print('second')"])


def _ig_call_config() -> str:
    return textwrap.dedent(f"""\
        [auth]
        apiKeyHeader = "X-Rtask-Key"

        [tasks.ig_io]
        command = ["sh", "-c", "printf 'out:'; cat; printf 'err-text\\\\n' >&2"]
        apiKeyNames = ["ci"]

        [tasks.ig_exit3]
        command = ["sh", "-c", "echo before-exit; echo oops >&2; exit 3"]
        apiKeyNames = ["ci"]

        [tasks.ig_async]
        command = ["sh", "-c", "sleep 0.5; printf 'async-out:'; cat; echo async-err >&2; exit 4"]
        apiKeyNames = ["ci"]
        async = true

        [tasks.ig_async_ok]
        command = ["sh", "-c", "sleep 0.3; echo async-done"]
        apiKeyNames = ["ci"]
        async = true

        [tasks.ig_slow]
        command = {_IG_SLOW_PRINT}
        apiKeyNames = ["ci"]

        [tasks.ig_slow_async]
        command = {_IG_SLOW_PRINT}
        apiKeyNames = ["ci"]
        async = true

        [tasks.ig_timeout]
        command = ["sleep", "5"]
        apiKeyNames = ["ci"]
        executionTimeoutSeconds = 0.5

        [tasks.ig_nostart]
        command = ["/nonexistent/ig-no-such-program"]
        apiKeyNames = ["ci"]

        [tasks.ig_long_async]
        command = ["sleep", "5"]
        apiKeyNames = ["ci"]
        async = true
        """)


@pytest.fixture(scope="module")
def _ig_callsrv(tmp_path_factory):
    """One server for the rtask call tests: .server, .dir, .ci, .other, .url."""
    d = tmp_path_factory.mktemp("ig_call")
    (d / "config.toml").write_text(_ig_call_config())
    tokens = {name: new_key(d, name) for name in ("ci", "other")}
    server = _IgServer(d)
    try:
        yield types.SimpleNamespace(server=server, dir=d, url=f"http://127.0.0.1:{server.port}", **tokens)
    finally:
        server.stop()


def _ig_call_env(url=None, **env) -> dict:
    """The CLI's environment: ours without any RTASK_* or SSL_CERT_* leftovers, plus ``env``.
    PYTHONUNBUFFERED goes too: a CI runner need not set it, so live output must not rely on it."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("RTASK_", "SSL_CERT_")) and k != "PYTHONUNBUFFERED"}
    if url:
        clean["RTASK_URL"] = url
    clean.update({k: v for k, v in env.items() if v is not None})
    return clean


def _ig_call(*args, env, cwd, input=None, timeout=30) -> subprocess.CompletedProcess:
    """Run ``rtask call ARGS`` (stdin not a terminal: /dev/null unless ``input`` is given)."""
    return subprocess.run([sys.executable, RTASK, "call", *args], env=env, cwd=cwd, input=input,
                          stdin=None if input is not None else subprocess.DEVNULL,
                          capture_output=True, timeout=timeout)


def _ig_key_env(c, **more) -> dict:
    return _ig_call_env(c.url, **{"RTASK_API_KEY": c.ci, "RTASK_API_KEY_HEADER": "X-Rtask-Key", **more})


def test_ig_call_sync_prints_streams_and_exits_0(_ig_callsrv):
    c = _ig_callsrv
    out = _ig_call("ig_io", "--data", "hello", env=_ig_call_env(c.url, RTASK_AUTH_TOKEN=c.ci), cwd=c.dir)
    assert out.returncode == 0, out
    assert out.stdout == b"out:hello"
    assert out.stderr == b"err-text\n"


def test_ig_call_exit_code_passthrough(_ig_callsrv):
    c = _ig_callsrv
    out = _ig_call("ig_exit3", env=_ig_call_env(c.url, RTASK_AUTH_TOKEN=c.ci), cwd=c.dir)
    assert out.returncode == 3, out
    assert out.stdout == b"before-exit\n"
    assert out.stderr == b"oops\n"


def test_ig_call_body_from_stdin_dash(_ig_callsrv):
    c = _ig_callsrv
    payload = b"line one\nline two \xc3\xa9\n"
    out = _ig_call("ig_io", "-", env=_ig_call_env(c.url, RTASK_AUTH_TOKEN=c.ci), cwd=c.dir, input=payload)
    assert out.returncode == 0, out
    assert out.stdout == b"out:" + payload
    assert out.stderr == b"err-text\n"


def test_ig_call_body_from_data_file(_ig_callsrv, tmp_path):
    c = _ig_callsrv
    data = tmp_path / "body.bin"
    data.write_bytes(b"from-a-file\n")
    out = _ig_call("ig_io", "--data-file", str(data), env=_ig_call_env(c.url, RTASK_AUTH_TOKEN=c.ci), cwd=c.dir)
    assert out.returncode == 0, out
    assert out.stdout == b"out:from-a-file\n"
    missing = tmp_path / "ig-missing.bin"
    out = _ig_call("ig_io", "--data-file", str(missing), env=_ig_call_env(c.url, RTASK_AUTH_TOKEN=c.ci), cwd=c.dir)
    assert out.returncode != 0, out
    assert str(missing).encode() in out.stderr and b"Traceback" not in out.stderr, out.stderr


def test_ig_call_api_key_with_custom_header(_ig_callsrv):
    c = _ig_callsrv
    out = _ig_call("ig_io", "--data", "k", env=_ig_key_env(c), cwd=c.dir)
    assert out.returncode == 0, out
    assert out.stdout == b"out:k"
    # The same key in the default X-API-Key header is not a credential on this server.
    out = _ig_call("ig_io", "--data", "k", env=_ig_call_env(c.url, RTASK_API_KEY=c.ci), cwd=c.dir)
    assert out.returncode == 2, out
    assert b"401" in out.stderr and b"A credential is required" in out.stderr, out.stderr
    assert out.stdout == b""


def test_ig_call_auth_token_wins_over_api_key(_ig_callsrv):
    c = _ig_callsrv
    out = _ig_call("ig_io", "--data", "t", env=_ig_key_env(c, RTASK_API_KEY="garbage", RTASK_AUTH_TOKEN=c.ci),
                   cwd=c.dir)
    assert out.returncode == 0, out
    assert out.stdout == b"out:t"
    out = _ig_call("ig_io", "--data", "t", env=_ig_key_env(c, RTASK_AUTH_TOKEN=c.other), cwd=c.dir)
    assert out.returncode == 2, out
    assert b"Missing required permission: tasks:run:ig_io" in out.stderr, out.stderr


def test_ig_call_async_long_poll_to_completion(_ig_callsrv):
    c = _ig_callsrv
    started = time.monotonic()
    out = _ig_call("ig_async", "--data", "abc", env=_ig_call_env(c.url, RTASK_AUTH_TOKEN=c.ci), cwd=c.dir)
    assert out.returncode == 4, out
    assert out.stdout == b"async-out:abc"
    assert out.stderr == b"async-err\n"  # and no elapsed-time display: not a terminal
    assert time.monotonic() - started >= 0.5


def test_ig_call_no_progress_display_when_not_a_terminal(_ig_callsrv):
    c = _ig_callsrv
    out = _ig_call("ig_async_ok", env=_ig_call_env(c.url, RTASK_AUTH_TOKEN=c.ci), cwd=c.dir)
    assert out.returncode == 0, out
    assert out.stdout == b"async-done\n"
    assert b"\r" not in out.stderr and b"\x1b" not in out.stderr
    assert out.stderr == b""


def test_ig_call_shows_elapsed_time_on_a_terminal(_ig_callsrv):
    """The counterpart of the test above: with stderr on a terminal, the wait is shown."""
    import pty
    c = _ig_callsrv
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, RTASK, "call", "ig_slow_async"],
                                env=_ig_call_env(c.url, RTASK_AUTH_TOKEN=c.ci), cwd=c.dir,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        slave = None
        stdout, _ = proc.communicate(timeout=20)
        shown = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
        if slave is not None:
            os.close(slave)
    assert proc.returncode == 0, shown
    assert stdout == b"first\nsecond\n"
    assert b"\r" in shown and re.search(rb"\d+s", shown), shown


def test_ig_call_no_wait_prints_only_the_task_id(_ig_callsrv):
    c = _ig_callsrv
    out = _ig_call("ig_async_ok", "--no-wait", env=_ig_call_env(c.url, RTASK_AUTH_TOKEN=c.ci), cwd=c.dir)
    assert out.returncode == 0, out
    assert re.fullmatch(rb"[a-z2-7]{16}\n", out.stdout), out.stdout
    assert out.stderr == b""
    task_id = out.stdout.decode().strip()
    resp = c.server.get(f"/tasks/ig_async_ok/{task_id}?wait=10", key=c.ci)
    assert resp.status == 200, resp
    assert resp.json["status"] == "success" and resp.json["stdout"] == "async-done\n", resp.json


def _ig_follow(c, task) -> tuple[float, float, bytes, bytes, int]:
    """Run ``rtask call TASK --follow``; returns (seconds between the first line and the end,
    whether the first line came before the process ended, stdout, stderr, exit code)."""
    proc = subprocess.Popen([sys.executable, RTASK, "call", task, "--follow"],
                            env=_ig_call_env(c.url, RTASK_AUTH_TOKEN=c.ci), cwd=c.dir,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = proc.stdout.readline()
        first_at = time.monotonic()
        still_running = proc.poll() is None
        rest = proc.stdout.read()
        proc.wait(20)
        gap = time.monotonic() - first_at
        return gap, still_running, first + rest, proc.stderr.read(), proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize("task", ["ig_slow", "ig_slow_async"])
def test_ig_call_follow_prints_output_live(_ig_callsrv, task):
    gap, still_running, stdout, stderr, code = _ig_follow(_ig_callsrv, task)
    assert code == 0, stderr
    assert stdout == b"first\nsecond\n"
    assert stderr == b""
    assert still_running, "the first line only arrived when the client ended"
    assert gap >= 1.0, f"the first line came only {gap:.2f} s before the end: not live"


def test_ig_call_follow_passes_exit_code(_ig_callsrv):
    c = _ig_callsrv
    out = _ig_call("ig_exit3", "--follow", env=_ig_call_env(c.url, RTASK_AUTH_TOKEN=c.ci), cwd=c.dir)
    assert out.returncode == 3, out
    assert out.stdout == b"before-exit\n" and out.stderr == b"oops\n"
    out = _ig_call("ig_async", "--follow", "--data", "f", env=_ig_call_env(c.url, RTASK_AUTH_TOKEN=c.ci), cwd=c.dir)
    assert out.returncode == 4, out
    assert out.stdout == b"async-out:f" and out.stderr == b"async-err\n"


@pytest.mark.parametrize("follow", [(), ("--follow",)], ids=["plain", "follow"])
def test_ig_call_task_timeout_exits_124(_ig_callsrv, follow):
    c = _ig_callsrv
    out = _ig_call("ig_timeout", *follow, env=_ig_call_env(c.url, RTASK_AUTH_TOKEN=c.ci), cwd=c.dir)
    assert out.returncode == 124, out
    assert b"Traceback" not in out.stderr


@pytest.mark.parametrize("follow", [(), ("--follow",)], ids=["plain", "follow"])
def test_ig_call_command_not_found_exits_125(_ig_callsrv, follow):
    c = _ig_callsrv
    out = _ig_call("ig_nostart", *follow, env=_ig_call_env(c.url, RTASK_AUTH_TOKEN=c.ci), cwd=c.dir)
    assert out.returncode == 125, out
    assert b"/nonexistent/ig-no-such-program" in out.stderr, out.stderr
    assert out.stdout == b""


@pytest.mark.parametrize("follow", [(), ("--follow",)], ids=["plain", "follow"])
def test_ig_call_refused_exits_2_with_the_server_message(_ig_callsrv, tmp_path, follow):
    c = _ig_callsrv
    # A well-formed key with a known id (0) that this server never issued: 401.
    stranger = new_key(tmp_path, "ci")
    out = _ig_call("ig_io", *follow, env=_ig_call_env(c.url, RTASK_AUTH_TOKEN=stranger), cwd=c.dir)
    assert out.returncode == 2, out
    assert b"401" in out.stderr and b"The API key is not valid." in out.stderr, out.stderr
    assert out.stdout == b""
    # An unknown task: 404 with the server's sentence.
    out = _ig_call("ig_nope", *follow, env=_ig_call_env(c.url, RTASK_AUTH_TOKEN=c.ci), cwd=c.dir)
    assert out.returncode == 2, out
    assert b"404" in out.stderr and b"There is no task named 'ig_nope'." in out.stderr, out.stderr
    assert out.stdout == b"" and b"Traceback" not in out.stderr


def test_ig_call_without_credentials_is_refused(_ig_callsrv):
    c = _ig_callsrv
    out = _ig_call("ig_io", env=_ig_call_env(c.url), cwd=c.dir)
    assert out.returncode == 2, out
    assert b"401" in out.stderr and b"A credential is required" in out.stderr, out.stderr


def _ig_cancel_running(c, task):
    """Stop what a test left running so the server's shutdown does not wait for it."""
    resp = c.server.get(f"/tasks/{task}", key=c.ci)
    for run in resp.json.get("runs", []):
        if run["status"] in ("running", "queued"):
            c.server.request("DELETE", f"/tasks/{task}/{run['task_id']}", key=c.ci)


@pytest.mark.parametrize("task,follow", [("ig_long_async", ()), ("ig_long_async", ("--follow",)),
                                         ("ig_slow", ()), ("ig_slow", ("--follow",))],
                         ids=["async", "async-follow", "sync", "sync-follow"])
def test_ig_call_client_timeout_exits_124(_ig_callsrv, task, follow):
    c = _ig_callsrv
    try:
        started = time.monotonic()
        out = _ig_call("--timeout", "0.5", task, *follow, env=_ig_call_env(c.url, RTASK_AUTH_TOKEN=c.ci),
                       cwd=c.dir)
        elapsed = time.monotonic() - started
        assert out.returncode == 124, out
        assert elapsed < 3.0, f"gave up only after {elapsed:.2f} s"
        assert b"Traceback" not in out.stderr and b"--timeout" in out.stderr, out.stderr
    finally:
        _ig_cancel_running(c, "ig_long_async")


def test_ig_call_client_timeout_does_not_flood_the_server(_ig_callsrv):
    c = _ig_callsrv
    try:
        before = c.server.metric("auth_requests_total", method="api_key", result="success")
        out = _ig_call("--timeout", "1.5", "ig_long_async", env=_ig_call_env(c.url, RTASK_AUTH_TOKEN=c.ci),
                       cwd=c.dir)
        assert out.returncode == 124, out
        polls = c.server.metric("auth_requests_total", method="api_key", result="success") - before
        # One POST and a few long-polls: a long-poll of up to 1.5 s needs no more than that.
        assert polls <= 6, f"{polls:.0f} authenticated requests in 1.5 s"
    finally:
        _ig_cancel_running(c, "ig_long_async")


def test_ig_call_unreachable_url_exits_2(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again at once: nobody listens there
    out = _ig_call("anything", env=_ig_call_env(f"http://127.0.0.1:{port}", RTASK_AUTH_TOKEN="x"), cwd=tmp_path)
    assert out.returncode == 2, out
    assert f"127.0.0.1:{port}".encode() in out.stderr, out.stderr
    assert b"cannot reach" in out.stderr and b"Traceback" not in out.stderr
    assert out.stdout == b""
    # --url overrides RTASK_URL.
    out = _ig_call("anything", "--url", f"http://127.0.0.1:{port}",
                   env=_ig_call_env("http://192.0.2.1:1", RTASK_AUTH_TOKEN="x"), cwd=tmp_path, timeout=20)
    assert out.returncode == 2, out
    assert f"127.0.0.1:{port}".encode() in out.stderr, out.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-3", "0", "soon"])
@pytest.mark.parametrize("command", [("call", "x", "--timeout"), ("generate-token", "--permissions", "tasks:run",
                                                                  "--expiry-hours")])
def test_ig_numbers_on_the_command_line_must_be_positive_and_finite(tmp_path, command, value):
    out = rtask_cli(*command, value, cwd=tmp_path)
    assert out.returncode == 2, out
    assert f"argument {command[-1]}: {value!r} is not a positive number" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


# =============================================================================================
# ===== TLS =====
# =============================================================================================


def _ig_make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost (SAN IP and DNS), EC P-256."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def _ig_tls(tmp_path_factory):
    """One HTTPS server: .server (requests verify the certificate), .cert, .key, .ci, .dir, .url."""
    d = tmp_path_factory.mktemp("ig_tls")
    cert, key = _ig_make_certificate(d)
    (d / "config.toml").write_text(textwrap.dedent("""\
        [tasks.ig_echo]
        command = ["sh", "-c", "printf 'tls:'; cat"]
        apiKeyNames = ["ci"]
        """))
    ci = new_key(d, "ci")
    server = _IgServer(d, run_args=("--tls-cert", str(cert), "--tls-key", str(key)),
                       ssl_context=ssl.create_default_context(cafile=str(cert)))
    try:
        yield types.SimpleNamespace(server=server, dir=d, cert=cert, key=key, ci=ci,
                                    url=f"https://127.0.0.1:{server.port}")
    finally:
        server.stop()


def _ig_tls11_client(cert: Path) -> ssl.SSLContext:
    """A client that offers TLS 1.0/1.1 only (security level 0, so that OpenSSL 3 will)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(str(cert))
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def _ig_tls11_possible(cert: Path, key: Path) -> bool:
    """Control: can this OpenSSL speak TLS 1.1 at all, to a server that allows it? (In memory.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(str(cert), str(key))
        server_ctx.minimum_version = ssl.TLSVersion.TLSv1
        server_ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    bios = [ssl.MemoryBIO() for _ in range(4)]
    server = server_ctx.wrap_bio(bios[0], bios[1], server_side=True)
    client = _ig_tls11_client(cert).wrap_bio(bios[2], bios[3], server_hostname="localhost")
    try:
        for _ in range(10):
            for end in (client, server):
                try:
                    end.do_handshake()
                except ssl.SSLWantReadError:
                    pass
            bios[0].write(bios[3].read())
            bios[2].write(bios[1].read())
        return client.version() == "TLSv1.1"
    except ssl.SSLError:
        return False


def _ig_handshake(port, ctx) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.version()


def test_ig_tls_verified_client_gets_health_and_runs_a_task(_ig_tls):
    server = _ig_tls.server
    resp = server.get("/health")
    assert resp.status == 200 and resp.json == {"status": "healthy"}, resp
    resp = server.post("ig_echo", b"secure", key=_ig_tls.ci)
    assert resp.status == 200, resp
    assert resp.json["status"] == "success" and resp.json["stdout"] == "tls:secure", resp.json
    # TLS 1.2 is still accepted; the listener announces https.
    ctx = ssl.create_default_context(cafile=str(_ig_tls.cert))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    assert _ig_handshake(server.port, ctx) == "TLSv1.2"
    assert re.search(r"api=https://127\.0\.0\.1:\d+", server.log()), server.log()
    # The certificate really is checked: a client trusting nothing refuses it.
    with pytest.raises(ssl.SSLCertVerificationError):
        _ig_handshake(server.port, ssl.create_default_context())


@pytest.mark.parametrize("listener", ["api", "metrics"])
def test_ig_tls11_is_refused(_ig_tls, listener):
    if not _ig_tls11_possible(_ig_tls.cert, _ig_tls.key):
        pytest.skip("this OpenSSL cannot speak TLS 1.1 even to a server that allows it")
    port = _ig_tls.server.port if listener == "api" else _ig_tls.server.metrics_port
    with pytest.raises(ssl.SSLError):
        _ig_handshake(port, _ig_tls11_client(_ig_tls.cert))
    # The listener is fine afterwards.
    if listener == "api":
        assert _ig_tls.server.get("/health").status == 200
    else:
        assert "task_duration_seconds" in _ig_tls.server.metrics()


def test_ig_tls_plain_http_client_does_not_hurt_the_server(_ig_tls):
    server = _ig_tls.server
    answer = server.raw(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", read_timeout=5)
    assert b"healthy" not in answer  # no cleartext service on the TLS port
    # A client that connects and says nothing does not block anybody else either.
    with socket.create_connection(("127.0.0.1", server.port)):
        resp = server.get("/health", timeout=5)
        assert resp.status == 200 and resp.json == {"status": "healthy"}, resp
    assert server.proc.poll() is None
    resp = server.post("ig_echo", b"after", key=_ig_tls.ci)
    assert resp.status == 200 and resp.json["stdout"] == "tls:after", resp


def test_ig_tls_metrics_listener_serves_https(_ig_tls):
    server = _ig_tls.server
    text = server.metrics()
    assert "task_duration_seconds" in text and "task_rejection_total" in text
    # Plain HTTP gets no metrics.
    with socket.create_connection(("127.0.0.1", server.metrics_port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (socket.timeout, ConnectionResetError):
            pass
    assert b"task_duration_seconds" not in b"".join(chunks)
    assert "task_duration_seconds" in server.metrics()  # and the listener still serves


def test_ig_tls_metrics_listener_survives_an_idle_connection(_ig_tls):
    server = _ig_tls.server
    with socket.create_connection(("127.0.0.1", server.metrics_port)):
        time.sleep(0.2)
        conn = http.client.HTTPSConnection("127.0.0.1", server.metrics_port, timeout=3,
                                           context=server.ssl_context)
        try:
            conn.request("GET", "/metrics")
            assert conn.getresponse().status == 200
        except (TimeoutError, OSError) as e:
            pytest.fail(f"metrics scrape blocked by an idle connection: {e!r}")
        finally:
            conn.close()


@pytest.mark.parametrize("given", ["cert-only", "key-only"])
def test_ig_tls_cert_and_key_go_together(tmp_path, given):
    cert, key = _ig_make_certificate(tmp_path)
    (tmp_path / "config.toml").write_text('[tasks.t]\ncommand = ["true"]\napiKeyNames = ["ci"]\n')
    option = ("--tls-cert", str(cert)) if given == "cert-only" else ("--tls-key", str(key))
    out = rtask_cli("run", "--api-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0", *option,
                    cwd=tmp_path, timeout=15)
    assert out.returncode == 1, out
    assert "--tls-cert" in out.stderr and "--tls-key" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert "rtask listening" not in out.stderr


def test_ig_tls_unusable_certificate_is_a_clear_error(tmp_path):
    cert, key = _ig_make_certificate(tmp_path)
    (tmp_path / "config.toml").write_text('[tasks.t]\ncommand = ["true"]\napiKeyNames = ["ci"]\n')
    missing = tmp_path / "ig-missing.pem"
    out = rtask_cli("run", "--api-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0",
                    "--tls-cert", str(missing), "--tls-key", str(key), cwd=tmp_path, timeout=15)
    assert out.returncode == 1, out
    assert str(missing) in out.stderr and "Traceback" not in out.stderr, out.stderr
    # The key of another certificate does not fit.
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    _, other_key = _ig_make_certificate(other_dir)
    out = rtask_cli("run", "--api-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0",
                    "--tls-cert", str(cert), "--tls-key", str(other_key), cwd=tmp_path, timeout=15)
    assert out.returncode == 1, out
    assert str(cert) in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_ig_tls_rtask_call_over_https(_ig_tls):
    t = _ig_tls
    env = _ig_call_env(t.url, RTASK_API_KEY=t.ci, SSL_CERT_FILE=str(t.cert))
    out = _ig_call("ig_echo", "--data", "via-call", env=env, cwd=t.dir)
    assert out.returncode == 0, out
    assert out.stdout == b"tls:via-call" and out.stderr == b""
    out = _ig_call("ig_echo", "--data", "via-follow", "--follow", env=env, cwd=t.dir)
    assert out.returncode == 0, out
    assert out.stdout == b"tls:via-follow"
    # Without the certificate trusted, the client refuses the server (exit 2, no traceback).
    out = _ig_call("ig_echo", "--data", "x", env=_ig_call_env(t.url, RTASK_API_KEY=t.ci,
                                                             SSL_CERT_FILE=os.devnull), cwd=t.dir)
    assert out.returncode == 2, out
    assert b"CERTIFICATE_VERIFY_FAILED" in out.stderr or b"certificate verify failed" in out.stderr, out.stderr
    assert b"Traceback" not in out.stderr and out.stdout == b""


# =============================================================================================
# ===== Behind a reverse proxy: the client address in logs =====
# =============================================================================================


def _ig_proxy_server(d: Path, *trusted: str) -> tuple[_IgServer, str]:
    (d / "config.toml").write_text(_ig_task("t", ["echo", "ok"]))
    key = new_key(d, "ci")
    run_args = ["--log-format", "json"]
    for network in trusted:
        run_args += ["--trusted-proxy", network]
    return _IgServer(d, run_args=run_args), key


def _ig_logged_clients(server, message: str) -> list[str]:
    entries = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    return [e["client"] for e in entries if e.get("msg", e.get("message")) == message]


def test_ig_trusted_proxy_forwarded_address_is_the_logged_client(tmp_path):
    server, key = _ig_proxy_server(tmp_path, "127.0.0.0/8", "10.0.0.0/8")
    try:
        cases = [("198.51.100.1, 203.0.113.7", "203.0.113.7"),  # the hop the proxy added counts
                 ("203.0.113.7, 10.1.2.3", "203.0.113.7"),  # a second trusted proxy is skipped
                 ("2001:db8::5", "2001:db8::5"),
                 ("not-an-address", "127.0.0.1")]  # garbled: the proxy itself
        for forwarded, client in cases:
            headers = {"X-Forwarded-For": forwarded}
            assert server.request("POST", "/tasks/t", headers=headers, key=key).status == 200
            assert server.request("POST", "/tasks/t", headers=headers, key="wrong").status == 401
            finished = wait_for(lambda: _ig_logged_clients(server, "task finished"), timeout=5)
            assert wait_for(lambda: len(_ig_logged_clients(server, "request rejected")) == len(finished))
            assert _ig_logged_clients(server, "task finished")[-1] == client, (forwarded, server.log())
            assert _ig_logged_clients(server, "request rejected")[-1] == client, (forwarded, server.log())
    finally:
        server.stop()


def test_ig_forwarded_address_from_an_untrusted_peer_is_ignored(tmp_path):
    for trusted in [(), ("192.0.2.0/24",)]:  # no proxy trusted, or not this peer
        d = tmp_path / str(len(trusted))
        d.mkdir()
        server, key = _ig_proxy_server(d, *trusted)
        try:
            resp = server.request("POST", "/tasks/t", headers={"X-Forwarded-For": "203.0.113.7"}, key=key)
            assert resp.status == 200, resp
            assert wait_for(lambda: _ig_logged_clients(server, "task finished")) == ["127.0.0.1"]
        finally:
            server.stop()


def test_ig_trusted_proxy_that_is_not_an_address_is_refused_at_start(tmp_path):
    (tmp_path / "config.toml").write_text(_ig_task("t", ["echo", "ok"]))
    out = rtask_cli("run", "--api-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0",
                    "--trusted-proxy", "proxy.example", cwd=tmp_path, timeout=15)
    assert out.returncode == 1, out
    assert out.stderr.strip().splitlines()[-1].endswith(
        "--trusted-proxy 'proxy.example' must be an IP address or network, like 127.0.0.1 or 10.0.0.0/8"), out.stderr
    assert "Traceback" not in out.stderr


# =============================================================================================
# ===== Reload (SIGHUP) =====
# =============================================================================================


def _ig_sighup(server) -> bool:
    """Send SIGHUP and wait for the outcome: True when the reload took, False when it failed."""
    log = server.log()
    done, failed = log.count("configuration reloaded"), log.count("reload failed")
    server.proc.send_signal(signal.SIGHUP)

    def outcome():
        text = server.log()
        if text.count("configuration reloaded") > done:
            return "ok"
        if text.count("reload failed") > failed:
            return "failed"
        return None

    result = wait_for(outcome, timeout=10)
    assert server.proc.poll() is None, server.log()
    return result == "ok"


def _ig_task(name, command, extra="") -> str:
    return f'[tasks.{name}]\ncommand = {json.dumps(command)}\napiKeyNames = ["ci"]\n{extra}\n'


def _ig_stdout(server, task, key, body=b"") -> str:
    resp = server.post(task, body, key=key)
    assert resp.status == 200, resp
    assert resp.json["status"] == "success", resp.json
    return resp.json.get("stdout", "")


def test_ig_sighup_changes_a_command(start_server):
    server, tokens = start_server(_ig_task("t", ["echo", "v1"]))
    assert _ig_stdout(server, "t", tokens["ci"]) == "v1\n"
    (server.workdir / "config.toml").write_text(_ig_task("t", ["echo", "v2"]))
    assert _ig_sighup(server)
    assert _ig_stdout(server, "t", tokens["ci"]) == "v2\n"
    assert server.proc.poll() is None


@pytest.mark.parametrize("broken", ["bad-toml", "typo-field", "bad-value", "missing-file"])
def test_ig_sighup_with_an_invalid_config_keeps_the_old_one(start_server, broken):
    server, tokens = start_server(_ig_task("t", ["echo", "old"]))
    config = server.workdir / "config.toml"
    if broken == "bad-toml":
        config.write_text('[tasks.t]\ncommand = ["echo", "new"\napiKeyNames = ["ci"]\n')
        clue = "TOML"
    elif broken == "typo-field":
        config.write_text(_ig_task("t", ["echo", "new"], "asnyc = true"))
        clue = "asnyc"
    elif broken == "bad-value":
        config.write_text(_ig_task("t", ["echo", "new"], "rateLimit = -1"))
        clue = "rateLimit"
    else:
        config.unlink()
        clue = "config.toml"
    log_before = len(server.log())
    assert not _ig_sighup(server)
    new_lines = server.log()[log_before:]
    error_lines = [line for line in new_lines.splitlines() if " error " in line or '"level": "error"' in line]
    assert error_lines, new_lines
    assert any(clue in line for line in error_lines), new_lines
    assert _ig_stdout(server, "t", tokens["ci"]) == "old\n"
    assert server.proc.poll() is None
    # Once fixed, the next SIGHUP takes it.
    config.write_text(_ig_task("t", ["echo", "fixed"]))
    assert _ig_sighup(server)
    assert _ig_stdout(server, "t", tokens["ci"]) == "fixed\n"


def test_ig_sighup_leaves_a_running_execution_alone(start_server):
    server, tokens = start_server(_ig_task("t", ["sh", "-c", "sleep 2; echo original"]))
    answers = []
    thread = threading.Thread(target=lambda: answers.append(server.post("t", key=tokens["ci"])))
    thread.start()
    try:
        wait_for(lambda: server.get("/health/detailed").json["tasks"]["t"]["running"] == 1, timeout=5)
        (server.workdir / "config.toml").write_text(_ig_task("t", ["echo", "replacement"]))
        assert _ig_sighup(server)
        assert thread.is_alive(), "the request ended before the reload: the test proves nothing"
    finally:
        thread.join(15)
    assert len(answers) == 1
    resp = answers[0]
    assert resp.status == 200, resp
    assert resp.json["status"] == "success" and resp.json["stdout"] == "original\n", resp.json
    assert resp.json["duration_seconds"] >= 1.9, resp.json
    assert _ig_stdout(server, "t", tokens["ci"]) == "replacement\n"


def test_ig_sighup_picks_up_keys_at_once(start_server):
    server, tokens = start_server(_ig_task("t", ["echo", "ok"]).replace('["ci"]', '["ci", "later"]'))
    assert _ig_stdout(server, "t", tokens["ci"]) == "ok\n"
    later = new_key(server.workdir, "later")
    assert _ig_sighup(server)
    assert _ig_stdout(server, "t", later) == "ok\n"
    out = rtask_cli("remove-key", "later", cwd=server.workdir)
    assert out.returncode == 0, out.stderr
    assert _ig_sighup(server)
    _ig_error(server.post("t", key=later), 401, "unauthorized")
    assert _ig_stdout(server, "t", tokens["ci"]) == "ok\n"


def test_ig_sighup_adds_and_removes_routes(start_server):
    secret = "ig-reload-" + secrets.token_hex(12)
    server, tokens = start_server(_ig_task("t", ["echo", "t"]), keys=("ci", "other"))
    hook = lambda sec, body=b"{}": server.request(  # noqa: E731
        "POST", "/hooks/fresh", body, headers={"X-Hub-Signature-256": _ig_github_signature(sec, body)})
    _ig_error(server.post("fresh", key=tokens["ci"]), 404, "not_found")
    _ig_error(server.post("t", key=tokens["other"]), 403, "forbidden")
    _ig_error(hook(secret), 404, "not_found")
    (server.workdir / "hook-secret.txt").write_text(secret + "\n")
    fresh = _ig_task("fresh", ["echo", "fresh"],
                     '[tasks.fresh.signedWebhook]\nprovider = "github"\nsecretFile = "hook-secret.txt"')
    (server.workdir / "config.toml").write_text(
        fresh + '[tasks.t]\ncommand = ["echo", "t2"]\napiKeyNames = ["ci", "other"]\n')
    assert _ig_sighup(server)
    assert _ig_stdout(server, "fresh", tokens["ci"]) == "fresh\n"
    _ig_success(hook(secret), "fresh\n")
    assert _ig_stdout(server, "t", tokens["other"]) == "t2\n"  # apiKeyNames changed too
    # A rotated secretFile is read again on SIGHUP: the new secret works, the old one no more.
    rotated = "ig-rotated-" + secrets.token_hex(12)
    (server.workdir / "hook-secret.txt").write_text(rotated + "\n")
    assert _ig_sighup(server)
    _ig_success(hook(rotated), "fresh\n")
    _ig_error(hook(secret), 401, "unauthorized")
    assert secret not in server.log() and rotated not in server.log()
    # Removing a task removes its routes; dropping signedWebhook removes /hooks.
    (server.workdir / "config.toml").write_text(_ig_task("fresh", ["echo", "fresh"]))
    assert _ig_sighup(server)
    _ig_error(server.post("t", key=tokens["ci"]), 404, "not_found")
    _ig_error(hook(rotated), 404, "not_found")
    assert _ig_stdout(server, "fresh", tokens["ci"]) == "fresh\n"


# Tests that test_rtask.py itself may define must not be collected a second time from here.

# ===== Resilience =====


# ---------------------------------------------------------------------------------------------
# Helpers of this section (prefixed _rs_)
# ---------------------------------------------------------------------------------------------

_RS_MIB = 1024 * 1024
_RS_ARGON2_MEMORY = rtask.ARGON2_MEMORY_MIB * _RS_MIB  # what one verification may allocate
# A trivial task: what a request costs beyond authentication is one short process.
_RS_CONFIG = """
[tasks.hello]
command = ["true"]
apiKeyNames = ["ci", "other"]
"""
_RS_FIGURES: dict[str, object] = {}  # measured figures, printed at the end with -s


def _rs_note(name: str, value):
    _RS_FIGURES[name] = value
    print(f"[resilience] {name} = {value}")


def _rs_proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in bytes and Threads, from /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) * 1024
        elif name == "Threads":
            out[name] = int(value)
    return out


def _rs_wrong_key(key_id: int) -> str:
    """A well-formed token for ``key_id`` whose 40 key bytes are random: it costs an Argon2
    run when the id is known, and is refused."""
    return rtask.encode_api_key(key_id, os.urandom(rtask.KEY_BYTES))


def _rs_post(port: int, task: str, token: str, timeout=30.0, close=True, source=None):
    """One POST on a fresh connection (from address ``source``, default 127.0.0.1) →
    (status, headers, body dict, seconds)."""
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                      source_address=(source, 0) if source else None)
    try:
        headers = {"Authorization": f"Bearer {token}", "Content-Length": "0"}
        if close:
            headers["Connection"] = "close"
        conn.request("POST", f"/tasks/{task}", body=b"", headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, resp.headers, json.loads(body), time.monotonic() - start
    finally:
        conn.close()


def _rs_flood(port: int, tokens: list[str], task="hello", timeout=30.0):
    """Fire one POST per token, each from its own thread on its own connection, all released
    together by a barrier. Returns (results, release_time, pending) where results[i] is
    (status, retry_after, error code, seconds) or ("error", repr) and pending() is how many
    requests have not been answered yet."""
    n = len(tokens)
    results: list = [None] * n
    barrier = threading.Barrier(n + 1, timeout=timeout)
    done = threading.Semaphore(0)
    finished = [0]
    lock = threading.Lock()

    def one(i: int):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            try:
                conn.connect()
                barrier.wait()
                start = time.monotonic()
                conn.request("POST", f"/tasks/{task}", body=b"",
                             headers={"Authorization": f"Bearer {tokens[i]}", "Connection": "close"})
                resp = conn.getresponse()
                body = json.loads(resp.read())
                results[i] = (resp.status, resp.headers.get("Retry-After"), body.get("error"),
                              time.monotonic() - start)
            finally:
                conn.close()
        except Exception as e:  # noqa: BLE001  (recorded and asserted on by the caller)
            results[i] = ("error", repr(e))
        finally:
            with lock:
                finished[0] += 1
            done.release()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    released = time.monotonic()

    def pending() -> int:
        with lock:
            return n - finished[0]

    def join(deadline: float):
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "flood threads still running after their timeout"

    return results, released, pending, join


def _rs_connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _rs_raise_nofile(needed: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        pytest.skip(f"RLIMIT_NOFILE is {soft}, {needed} descriptors are needed")


def _rs_wait_closed(socks: dict[socket.socket, str], deadline: float) -> dict[socket.socket, float]:
    """Watch ``socks`` until each is closed by the server (EOF or reset) or ``deadline``;
    returns {sock: monotonic time it was seen closed}. Bytes the server sends are read and
    ignored (a half-sent request may be answered 400 before the close)."""
    closed: dict[socket.socket, float] = {}
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    try:
        while len(closed) < len(socks) and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=min(0.2, max(0.0, deadline - time.monotonic()))):
                s = key.fileobj
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    closed[s] = time.monotonic()
                    sel.unregister(s)
    finally:
        sel.close()
    return closed


# ---------------------------------------------------------------------------------------------
# Argon2 bound: a flood of wrong keys of a known id
# ---------------------------------------------------------------------------------------------


def test_resilience_wrong_key_flood_bounds_memory_and_serves_a_cached_key(start_server):
    """500 concurrent POSTs with wrong keys of the known id 0: each needs an Argon2 run
    (64 MiB, ~65 ms), at most ARGON2_MAX_CONCURRENT at once, the rest 503 + Retry-After once
    they waited ARGON2_SLOT_WAIT_SECONDS. Peak RSS stays under baseline + bound × 64 MiB +
    50 MiB; a cached valid key is served during the flood; the server is fine afterwards."""
    server, tokens = start_server(_RS_CONFIG, keys=("ci",))
    pid = server.worker_pid()
    known_id = rtask.decode_api_key(tokens["ci"])[0]
    assert known_id == 0

    first = _rs_post(server.port, "hello", tokens["ci"])  # pays Argon2 once, then cached
    assert first[0] == 200, first
    time.sleep(0.3)
    baseline = _rs_proc_status(pid)["VmRSS"]
    _rs_note("baseline RSS MiB", round(baseline / _RS_MIB, 1))

    samples = []
    stop_sampling = threading.Event()

    def sample():
        while not stop_sampling.is_set():
            try:
                samples.append(_rs_proc_status(pid))
            except OSError:
                return
            stop_sampling.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    n = 500
    results, released, pending, join = _rs_flood(server.port, [_rs_wrong_key(known_id) for _ in range(n)])
    try:
        time.sleep(0.3)  # the flood is in the server: Argon2 slots taken, hundreds waiting
        pending_at_send = pending()
        # (from another address: the flood's holds its share of the connections)
        valid = _rs_post(server.port, "hello", tokens["ci"], timeout=30, source="127.0.0.2")
        pending_at_answer = pending()
    finally:
        join(time.monotonic() + 60)
        flood_seconds = time.monotonic() - released
        stop_sampling.set()
        sampler.join(5)

    errors = [r for r in results if r[0] == "error"]
    assert not errors, f"{len(errors)} flood requests got no answer, e.g. {errors[:3]}"
    n401 = sum(r[0] == 401 for r in results)
    n503 = sum(r[0] == 503 for r in results)
    slowest = max(r[3] for r in results)
    _rs_note("flood duration s", round(flood_seconds, 2))
    _rs_note("flood 401 / 503", (n401, n503))
    _rs_note("flood slowest answer s", round(slowest, 2))
    _rs_note("valid request latency during flood s", round(valid[3], 3))
    _rs_note("flood requests pending when valid sent / answered", (pending_at_send, pending_at_answer))
    peak_hwm = _rs_proc_status(pid)["VmHWM"]
    peak_sampled = max(s["VmRSS"] for s in samples) if samples else 0
    _rs_note("peak RSS (VmHWM) MiB", round(peak_hwm / _RS_MIB, 1))
    _rs_note("peak RSS (sampled VmRSS) MiB", round(peak_sampled / _RS_MIB, 1))
    _rs_note("peak server threads (sampled)", max((s["Threads"] for s in samples), default=0))

    # Every flood request was refused the right way.
    assert n401 + n503 == n, sorted({r[:3] for r in results if r[0] not in (401, 503)})
    for status, retry_after, code, _ in results:
        if status == 401:
            assert code == "unauthorized"
        else:
            assert retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1, retry_after
    assert n401 >= 1, "no wrong key was ever verified: the bound refuses everything"
    # No request waited (much) longer than the slot wait: waiting requests do not pile up.
    assert slowest < rtask.ARGON2_SLOT_WAIT_SECONDS + 10, slowest

    # The valid key (verified once before, so cached) is answered during the flood.
    assert pending_at_send > 0, "the flood was over before the valid request was sent"
    assert valid[0] == 200, valid
    assert valid[3] < 5.0, f"a cached valid key took {valid[3]:.2f} s during the flood"

    # Memory is bounded by the Argon2 bound, not by the number of requests.
    limit = baseline + rtask.ARGON2_MAX_CONCURRENT * _RS_ARGON2_MEMORY + 50 * _RS_MIB
    assert peak_hwm <= limit, (f"peak RSS {peak_hwm / _RS_MIB:.1f} MiB > baseline {baseline / _RS_MIB:.1f} MiB "
                               f"+ {rtask.ARGON2_MAX_CONCURRENT} × 64 MiB + 50 MiB")

    # Afterwards: the server answers, and the Argon2 slots were all given back (a wrong key of
    # the known id is verified and refused 401, not 503 for want of a slot).
    assert server.proc.poll() is None
    assert server.get("/health").status == 200
    after = _rs_post(server.port, "hello", tokens["ci"])
    assert after[0] == 200, after
    for _ in range(3):
        wrong = _rs_post(server.port, "hello", _rs_wrong_key(known_id))
        assert wrong[0] == 401 and wrong[2]["error"] == "unauthorized", wrong
    assert server.metric("task_rejection_total", handler="hello", reason="invalid_key") >= n401 + 3


# ---------------------------------------------------------------------------------------------
# The verified-key cache, and unknown ids
# ---------------------------------------------------------------------------------------------


def test_resilience_cached_key_does_not_pay_argon2_again(start_server):
    """50 sequential keep-alive requests repeating a known-good key take far less than 50
    Argon2 runs (50 × 60 ms): only the first verification is paid."""
    server, tokens = start_server(_RS_CONFIG, keys=("ci",))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    headers = {"Authorization": f"Bearer {tokens['ci']}", "Content-Length": "0"}
    try:
        times = []
        for _ in range(51):
            start = time.monotonic()
            conn.request("POST", "/tasks/hello", body=b"", headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            times.append(time.monotonic() - start)
            assert resp.status == 200, body
            assert json.loads(body)["status"] == "success"
    finally:
        conn.close()
    first, rest = times[0], times[1:]
    _rs_note("first (uncached) request s", round(first, 4))
    _rs_note("50 cached keep-alive requests total s", round(sum(rest), 3))
    _rs_note("cached request median s", round(statistics.median(rest), 4))
    assert sum(rest) < 50 * 0.060 / 3, f"50 cached requests took {sum(rest):.2f} s"

    # The same, without the process: an authenticated GET of an unknown run (404) costs only
    # the credential check, which for a cached key is far below one Argon2 run.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        start = time.monotonic()
        for _ in range(50):
            conn.request("GET", "/tasks/hello/aaaaaaaaaaaaaaaa", headers=headers)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 404
        total = time.monotonic() - start
    finally:
        conn.close()
    _rs_note("50 cached authenticated GETs total s", round(total, 3))
    assert total < 50 * 0.060 / 5, f"50 cached GETs took {total:.2f} s"


def test_resilience_unknown_key_id_never_reaches_argon2(start_server):
    """200 concurrent tokens with an id no key has are all refused 401 quickly (no Argon2
    run, so no 503 either), while wrong keys of the known id are each slowed by one."""
    server, tokens = start_server(_RS_CONFIG, keys=("ci",))
    assert _rs_post(server.port, "hello", tokens["ci"])[0] == 200
    unused_id = 777
    results, released, pending, join = _rs_flood(server.port, [_rs_wrong_key(unused_id) for _ in range(200)])
    join(time.monotonic() + 40)
    total = time.monotonic() - released
    errors = [r for r in results if r[0] == "error"]
    assert not errors, errors[:3]
    _rs_note("200 unknown-id tokens: total s", round(total, 3))
    _rs_note("200 unknown-id tokens: statuses", sorted({r[0] for r in results}))
    assert all(r[0] == 401 and r[2] == "unauthorized" for r in results), sorted({r[:3] for r in results})
    assert total < 2.0, f"200 unknown-id tokens took {total:.2f} s"

    # For contrast, 10 sequential keep-alive requests each: a wrong key of the known id costs an
    # Argon2 run, a token with the unused id costs next to nothing.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    seq = {0: [], unused_id: []}
    try:
        for key_id in [0, unused_id] * 10:
            start = time.monotonic()
            conn.request("POST", "/tasks/hello", body=b"",
                         headers={"Authorization": f"Bearer {_rs_wrong_key(key_id)}", "Content-Length": "0"})
            resp = conn.getresponse()
            resp.read()
            seq[key_id].append(time.monotonic() - start)
            assert resp.status == 401
    finally:
        conn.close()
    known, unknown = statistics.median(seq[0]), statistics.median(seq[unused_id])
    _rs_note("sequential wrong key: median s known id / unused id", (round(known, 4), round(unknown, 4)))
    assert known >= 0.02, seq[0]  # one Argon2 run (~65 ms) each
    assert known > 5 * unknown, seq


# ---------------------------------------------------------------------------------------------
# Removed keys: the cache never outlives the key
# ---------------------------------------------------------------------------------------------


def test_resilience_removed_key_is_refused_within_a_second_under_load(start_server, tmp_path):
    """Two loops (keep-alive, and a new connection per request) keep using a cached key while
    `remove-key` runs: every request sent more than 1.1 s after remove-key returned gets 401,
    none is answered 200 after 1.5 s; another key keeps working."""
    server, tokens = start_server(_RS_CONFIG, keys=("ci", "other"))
    key = tokens["ci"]
    assert _rs_post(server.port, "hello", key)[0] == 200
    records: list[tuple[float, float, object]] = []  # (sent, answered, status)
    lock = threading.Lock()
    stop = threading.Event()
    hard_deadline = time.monotonic() + 30

    def loop(keep_alive: bool):
        conn = None
        for _ in range(5000):
            if stop.is_set() or time.monotonic() > hard_deadline:
                break
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            sent = time.monotonic()
            try:
                conn.request("POST", "/tasks/hello", body=b"",
                             headers={"Authorization": f"Bearer {key}", "Content-Length": "0"})
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                if not keep_alive or resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                status = repr(e)
                conn.close()
                conn = None
            with lock:
                records.append((sent, time.monotonic(), status))
            time.sleep(0.005)
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=loop, args=(ka,), daemon=True) for ka in (True, False)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: sum(r[2] == 200 for r in records) >= 20, timeout=10)
        out = rtask_cli("remove-key", "ci", cwd=tmp_path)
        removed = time.monotonic()
        assert out.returncode == 0, out.stderr
        time.sleep(3.0)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert not any(t.is_alive() for t in threads)

    with lock:
        recs = list(records)
    errors = [r for r in recs if not isinstance(r[2], int)]
    assert not errors, errors[:3]
    late_sent = [r for r in recs if r[0] > removed + 1.1]
    late_200 = [r for r in recs if r[2] == 200 and r[1] > removed + 1.5]
    last_200 = max((r[1] for r in recs if r[2] == 200), default=removed) - removed
    first_401 = min((r[1] for r in recs if r[2] == 401), default=float("nan")) - removed
    _rs_note("removed key: requests in total", len(recs))
    _rs_note("removed key: last 200 after remove-key returned s", round(last_200, 3))
    _rs_note("removed key: first 401 after remove-key returned s", round(first_401, 3))
    assert len(late_sent) >= 20, f"only {len(late_sent)} requests after the removal: the test proves nothing"
    assert all(r[2] == 401 for r in late_sent), sorted({r[2] for r in late_sent})
    assert not late_200, f"{len(late_200)} requests answered 200 more than 1.5 s after the removal"
    assert set(r[2] for r in recs) <= {200, 401}, set(r[2] for r in recs)

    # The other key is untouched, and the removed one stays refused on a fresh connection.
    assert _rs_post(server.port, "hello", tokens["other"])[0] == 200
    gone = _rs_post(server.port, "hello", key)
    assert gone[0] == 401 and gone[2]["error"] == "unauthorized", gone


class _RsRemovedKeyAccepted(AssertionError):
    """The exact failure the xfail below expects (any other failure is reported as such)."""


def test_resilience_removed_key_in_flight_verification_is_refused(tmp_path):
    """A verification that started before remove-key and ends after the server reloaded
    keys.toml must not accept the removed key. keys.toml may carry any Argon2 cost (the Go
    format stores it per key); a costly entry (time=50, ~3 s) makes the window deterministic.
    Under load the same window is the Argon2 slot wait (ARGON2_SLOT_WAIT_SECONDS) + one hash."""
    (tmp_path / "config.toml").write_text(_RS_CONFIG.replace('["ci", "other"]', '["ci", "slow"]'))
    ci = new_key(tmp_path, "ci")
    secret, salt = os.urandom(rtask.KEY_BYTES), os.urandom(rtask.SALT_BYTES)
    stored = rtask.StoredKey("slow", 1, salt, 50, rtask.ARGON2_MEMORY_MIB, rtask.ARGON2_THREADS,
                             rtask.argon2id(secret, salt, 50, rtask.ARGON2_MEMORY_MIB, rtask.ARGON2_THREADS,
                                            rtask.KEY_BYTES))
    with open(tmp_path / "keys.toml", "a") as f:
        f.write(f'slow = "{rtask.encode_stored_key(stored)}"\n')
    slow = rtask.encode_api_key(1, secret)
    server = Server(tmp_path)
    try:
        assert _rs_post(server.port, "hello", ci)[0] == 200
        in_flight: list = []
        sent = time.monotonic()
        worker = threading.Thread(target=lambda: in_flight.append(_rs_post(server.port, "hello", slow, timeout=20)),
                                  daemon=True)
        worker.start()
        time.sleep(0.1)  # the request is in the server, hashing against the current key set
        out = rtask_cli("remove-key", "slow", cwd=tmp_path)
        removed = time.monotonic()
        assert out.returncode == 0, out.stderr
        # Requests make the server notice the change (keys.toml is checked at most once a second).
        for _ in range(50):
            assert _rs_post(server.port, "hello", ci)[0] == 200
            if "keys reloaded" in server.log():
                break
            time.sleep(0.1)
        assert "keys reloaded" in server.log()
        reloaded = time.monotonic()
        _rs_note("in-flight removed key: remove-key returned / reload seen after send s",
                 (round(removed - sent, 2), round(reloaded - sent, 2)))
        fresh = _rs_post(server.port, "hello", slow)
        assert fresh[0] == 401, fresh  # a new request with the removed key is refused at once
        worker.join(20)
        assert in_flight, "the in-flight request got no answer"
        status, _, body, seconds = in_flight[0]
        answered = sent + seconds
        _rs_note("in-flight removed key: status / answered after remove-key returned s",
                 (status, round(answered - removed, 2)))
        assert answered > reloaded or status == 401  # it really was in flight across the reload
        if status == 200 and answered > removed + 1.5:
            raise _RsRemovedKeyAccepted(
                f"removed key accepted {answered - removed:.2f} s after remove-key returned and "
                f"{answered - reloaded:.2f} s after the server reloaded keys.toml: {body}")
        assert status == 401, in_flight
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# Connections: idle, half-sent, the cap, a slow body
# ---------------------------------------------------------------------------------------------


def test_resilience_1000_idle_and_half_sent_connections(start_server):
    """500 idle connections and 500 with a half-sent head do not stop a valid request; the
    half-sent ones are closed after REQUEST_READ_TIMEOUT, the idle ones after
    KEEPALIVE_IDLE_TIMEOUT, and the server's threads go back down. (They come from five
    addresses, 200 each: one address may hold only a share of the cap.)"""
    _rs_raise_nofile(1300)
    server, tokens = start_server(_RS_CONFIG, keys=("ci",))
    pid = server.worker_pid()
    assert _rs_post(server.port, "hello", tokens["ci"])[0] == 200  # cached from here on
    threads_before = _rs_proc_status(pid)["Threads"]
    socks: dict[socket.socket, str] = {}
    opened: dict[socket.socket, float] = {}
    try:
        for i in range(1000):
            s = _av_connect(server.port, f"127.0.0.{2 + i % 5}")
            if i % 2:
                s.sendall(b"POST /tasks/hello HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Partial: ab")
                socks[s] = "half"
            else:
                socks[s] = "idle"
            opened[s] = time.monotonic()
        all_open = time.monotonic()
        # (a few threads of earlier requests may still be ending: allow for them)
        wait_for(lambda: _rs_proc_status(pid)["Threads"] >= threads_before + 990, timeout=10, interval=0.1)
        _rs_note("server threads with 1000 connections", _rs_proc_status(pid)["Threads"])

        valid = _rs_post(server.port, "hello", tokens["ci"], timeout=10)
        _rs_note("valid request latency with 1000 open connections s", round(valid[3], 3))
        assert valid[0] == 200, valid
        assert valid[3] < 3.0, valid[3]
        assert server.get("/health").status == 200

        closed = _rs_wait_closed(socks, all_open + rtask.KEEPALIVE_IDLE_TIMEOUT + 5)
        half = [s for s, kind in socks.items() if kind == "half"]
        idle = [s for s, kind in socks.items() if kind == "idle"]
        half_open = [s for s in half if s not in closed]
        idle_open = [s for s in idle if s not in closed]
        half_late = [closed[s] - opened[s] for s in half if s in closed
                     and closed[s] - opened[s] > rtask.REQUEST_READ_TIMEOUT + 5]
        idle_late = [closed[s] - opened[s] for s in idle if s in closed
                     and closed[s] - opened[s] > rtask.KEEPALIVE_IDLE_TIMEOUT + 5]
        if half and len(half_open) < len(half):
            ages = [closed[s] - opened[s] for s in half if s in closed]
            _rs_note("half-sent closed after s (min/max)", (round(min(ages), 2), round(max(ages), 2)))
        if idle and len(idle_open) < len(idle):
            ages = [closed[s] - opened[s] for s in idle if s in closed]
            _rs_note("idle closed after s (min/max)", (round(min(ages), 2), round(max(ages), 2)))
        assert not half_open, f"{len(half_open)} of 500 half-sent connections still open"
        assert not half_late, f"half-sent connections closed only after {max(half_late):.1f} s"
        assert not idle_open, f"{len(idle_open)} of 500 idle connections still open"
        assert not idle_late, f"idle connections closed only after {max(idle_late):.1f} s"

        # The handler threads of the closed connections are gone.
        wait_for(lambda: _rs_proc_status(pid)["Threads"] <= threads_before + 10, timeout=10, interval=0.1)
        assert _rs_post(server.port, "hello", tokens["ci"])[0] == 200
    finally:
        for s in socks:
            s.close()


def test_resilience_connection_cap_answers_503_then_recovers(start_server):
    """Beyond MAX_CONNECTIONS open connections a new one gets 503 + Retry-After at once
    (instead of one more thread); once connections close, requests are served again. The
    connections come from five addresses (one may hold only a share of the cap) and have a
    request half sent (idle ones would be closed to make room)."""
    cap = rtask.MAX_CONNECTIONS
    _rs_raise_nofile(cap + 300)
    server, tokens = start_server(_RS_CONFIG, keys=("ci",))
    pid = server.worker_pid()
    assert _rs_post(server.port, "hello", tokens["ci"])[0] == 200
    threads_before = _rs_proc_status(pid)["Threads"]
    socks = []
    try:
        for i in range(cap):
            socks.append(_av_connect(server.port, f"127.0.0.{2 + i % 5}"))
            socks[-1].sendall(b"GET /health HTTP/1.1\r\nX-Partial: a")
        # (the connection of the request above may still hold a thread and a place: allow for it)
        wait_for(lambda: _rs_proc_status(pid)["Threads"] >= threads_before + cap - 10, timeout=15, interval=0.1)
        refused, resets = [], [0]
        for _ in range(5):
            start = time.monotonic()
            with _rs_connect(server.port) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                try:
                    while chunk := s.recv(65536):
                        data += chunk
                except ConnectionResetError:
                    # The server closes without reading our request, so its kernel may reset
                    # the connection; on Linux the answer already received is read first.
                    resets[0] += 1
            refused.append((data, time.monotonic() - start))
        for data, seconds in refused:
            assert data.startswith(b"HTTP/1.1 503 "), data[:200]
            assert b"\r\nRetry-After: 1\r\n" in data
            _, _, body = data.partition(b"\r\n\r\n")
            assert json.loads(body)["error"] == "unavailable" and body.endswith(b"}\n")
            assert seconds < 2.0
        _rs_note("connection cap: refused connections reset after the 503", f"{resets[0]} of 5")
        assert _rs_proc_status(pid)["Threads"] <= threads_before + cap + 5
    finally:
        for s in socks:
            s.close()
    socks.clear()
    ok = wait_for(lambda: (r := _rs_post(server.port, "hello", tokens["ci"], timeout=5))[0] == 200 and r,
                  timeout=10, interval=0.2)
    assert ok[0] == 200


def test_resilience_slow_body_is_cut_off_while_others_are_served(start_server, tmp_path):
    """A valid request whose 100-byte body comes at 1 byte a second is answered 400 and closed
    about REQUEST_READ_TIMEOUT after its head (it never runs), and other clients are served
    meanwhile. A head that stops half-way gets the same 400 at the same time."""
    marker = tmp_path / "slow-ran"
    config = _RS_CONFIG + f"""
[tasks.slow]
command = ["touch", "{marker}"]
apiKeyNames = ["ci"]
"""
    server, tokens = start_server(config, keys=("ci",))
    assert _rs_post(server.port, "hello", tokens["ci"])[0] == 200  # the key is cached
    head = (f"POST /tasks/slow HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {tokens['ci']}\r\n"
            f"Content-Length: 100\r\n\r\n").encode()
    others = []
    answer = b""
    ended = None
    half_head = _rs_connect(server.port)
    half_head.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Partial: ab")
    with _rs_connect(server.port) as s:
        s.sendall(head)
        head_sent = time.monotonic()
        s.settimeout(0.1)
        for _ in range(100):
            if time.monotonic() > head_sent + rtask.REQUEST_READ_TIMEOUT + 6:
                break
            try:
                s.sendall(b"x")
            except OSError:
                ended = time.monotonic()
                break
            # Another client meanwhile.
            others.append(_rs_post(server.port, "hello", tokens["ci"], timeout=5))
            pause_until = time.monotonic() + max(0.0, 1.0 - others[-1][3])
            while time.monotonic() < pause_until:
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    ended = time.monotonic()
                    break
                answer += chunk
            if ended is not None:
                break
    elapsed = (ended or time.monotonic()) - head_sent
    _rs_note("slow body: cut off after s", round(elapsed, 2))
    _rs_note("slow body: answer", answer[:60])
    _rs_note("slow body: other clients' max latency s", round(max(o[3] for o in others), 3))
    assert ended is not None, "the slow body was never cut off"
    assert elapsed <= rtask.REQUEST_READ_TIMEOUT + 2, elapsed
    late = b'"message": "The request was not sent within 10 seconds."'
    assert answer.startswith(b"HTTP/1.1 400 ") and late in answer, answer[:300]
    with half_head:
        half_head.settimeout(5)
        head_answer = half_head.recv(65536)
        assert head_answer.startswith(b"HTTP/1.1 400 ") and late in head_answer, head_answer[:300]
        assert half_head.recv(65536) == b""  # and closed
    assert len(others) >= int(rtask.REQUEST_READ_TIMEOUT) - 2
    assert all(o[0] == 200 and o[3] < 2.0 for o in others), [o for o in others if o[0] != 200 or o[3] >= 2.0]
    assert not marker.exists(), "the task ran although its body never arrived"
    wait_for(lambda: server.metric("task_rejection_total", handler="slow", reason="invalid_content") == 1,
             timeout=5)


# =============================================================================================
# Edge cases found in review: protocol corners, shutdown, queues that cannot start
# =============================================================================================


def _rv_status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else -1


def _rv_task_processes(tag: str) -> list[int]:
    """PIDs whose command line contains ``tag`` (a string unique to one test)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if tag.encode() in (entry / "cmdline").read_bytes() and pid_alive(int(entry.name)):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.mark.parametrize("line", [b"GET abc HTTP/1.1", b"OPTIONS * HTTP/1.1", b"CONNECT example.com:443 HTTP/1.1"])
def test_request_target_that_is_not_a_path_is_400_json(start_server, line):
    server, _ = start_server('[tasks.t]\ncommand = ["true"]\napiKeyNames = ["ci"]\n')
    answer = server.raw(line + b"\r\nHost: x\r\n\r\n")
    assert _rv_status(answer) == 400, answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "bad_request"
    assert "Traceback" not in server.log()


def test_content_length_with_a_non_ascii_digit_is_refused_not_crashed_on(start_server):
    server, keys = start_server('[tasks.t]\ncommand = ["true"]\napiKeyNames = ["ci"]\n')
    # A body-less route answers and drops the connection (the unreadable body cannot be skipped).
    answer = server.raw(b"GET /health HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n")
    assert _rv_status(answer) == 200 and b"Connection: close" in answer, answer
    answer = server.raw(f"POST /tasks/t HTTP/1.1\r\nAuthorization: Bearer {keys['ci']}\r\n".encode()
                        + b"Content-Length: \xb2\r\n\r\n")
    assert _rv_status(answer) == 400, answer
    assert "Traceback" not in server.log()


def test_chunk_size_must_be_plain_hex(start_server, tmp_path):
    marker = tmp_path / "ran"
    server, keys = start_server(f'[tasks.t]\ncommand = ["touch", "{marker}"]\napiKeyNames = ["ci"]\n')
    head = (f"POST /tasks/t HTTP/1.1\r\nAuthorization: Bearer {keys['ci']}\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
    answer = server.raw(head + b"0x5\r\nhello\r\n0\r\n\r\n")
    assert _rv_status(answer) == 400, answer
    assert not marker.exists()


def test_webhook_secret_with_a_slash_opens_its_url(start_server):
    server, _ = start_server('[tasks.t]\ncommand = ["echo", "hooked"]\nwebhookSecrets.ci = "abc/def+ghi="\n', keys=())
    for path in ("/wh/abc/def+ghi=", "/wh/abc%2Fdef+ghi="):
        r = server.request("POST", path)
        assert r.status == 200 and r.json["stdout"] == "hooked\n", (path, r)
    assert server.request("POST", "/wh/abc").status == 404
    assert "def+ghi" not in server.log()


def test_retry_after_is_the_ceiling_of_one_over_the_rate(start_server):
    server, keys = start_server('[tasks.t]\ncommand = ["true"]\napiKeyNames = ["ci"]\nrateLimit = 0.3\n')
    assert server.post("t", key=keys["ci"]).status == 200
    refused = server.post("t", key=keys["ci"])
    assert refused.status == 429 and refused.headers["Retry-After"] == "4", refused


def test_drain_refuses_new_requests_on_open_connections(start_server, tmp_path):
    marker = tmp_path / "late"
    server, keys = start_server(f'''
        [tasks.slow]
        command = ["sleep", "1.5"]
        apiKeyNames = ["ci"]
        [tasks.late]
        command = ["touch", "{marker}"]
        apiKeyNames = ["ci"]
        ''')
    idle = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    idle.request("GET", "/health")
    assert idle.getresponse().read()
    in_flight = []
    thread = threading.Thread(target=lambda: in_flight.append(server.post("slow", key=keys["ci"])))
    thread.start()
    time.sleep(0.3)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    idle.request("POST", "/tasks/late", headers={"Authorization": f"Bearer {keys['ci']}"})
    refused = idle.getresponse()
    assert refused.status == 503 and json.loads(refused.read())["error"] == "unavailable"
    thread.join(10)
    assert in_flight and in_flight[0].status == 200 and in_flight[0].json["status"] == "success"
    assert server.proc.wait(10) == 0
    assert not marker.exists()


def test_drain_cancels_queued_async_runs_and_leaves_no_process(start_server, tmp_path):
    tag = f"rtask-drain-{secrets.token_hex(4)}"
    server, keys = start_server(f'''
        [tasks.q]
        command = ["sh", "-c", "sleep 1; touch {tmp_path}/ran-$RTASK_TASK_ID", "{tag}"]
        apiKeyNames = ["ci"]
        async = true
        maxConcurrentTasks = 1
        queueSize = 3
        ''')
    ids = [server.post("q", key=keys["ci"]).json for _ in range(3)]
    assert [i["status"] for i in ids] == ["running", "queued", "queued"], ids
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(10) == 0
    assert sorted(p.name for p in tmp_path.glob("ran-*")) == [f"ran-{ids[0]['task_id']}"]
    assert _rv_task_processes(tag) == []
    assert server.log().count("status=cancelled") == 2


def _posts_on_one_connection(server, task: str, key: str, count: int) -> list[dict]:
    """``count`` POSTs of ``task`` one after another on one keep-alive connection: answers."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        answers = []
        for _ in range(count):
            conn.request("POST", f"/tasks/{task}", headers={"Authorization": f"Bearer {key}"})
            answers.append(json.loads(conn.getresponse().read()))
        return answers
    finally:
        conn.close()


def _line_emptied(server, task: str) -> dict:
    """/health/detailed of ``task`` once nothing of it runs or waits."""
    return wait_for(lambda: (d := server.get("/health/detailed").json["tasks"][task])["running"] == 0
                    and d["queued"] == 0 and d, timeout=20)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_drain_never_starts_a_queued_async_run_whose_slot_frees_meanwhile(wk_start, tmp_path, workers):
    """SIGTERM, and the running run ends as the drain begins: the async run waiting in line is
    cancelled and never starts. (The line used to be cancelled only after the listener had
    stopped, up to half a second later: a slot freed meanwhile started the next run, 5 of 5.)
    The running run ends when every worker has logged its drain (a gate file)."""
    gate = tmp_path / "gate"
    server, tokens = wk_start(f"""
        [tasks.q]
        command = ["sh", "-c", "while [ ! -e {gate} ]; do sleep 0.01; done; touch {tmp_path}/ran-$RTASK_TASK_ID"]
        apiKeyNames = ["ci"]
        async = true
        maxConcurrentTasks = 1
        queueSize = 1
        """, run_args=("--workers", workers, "--state-dir", str(tmp_path / "st")))
    first, second = (server.post("q", key=tokens["ci"]).json for _ in range(2))
    assert (first["status"], second["status"]) == ("running", "queued"), (first, second)
    server.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: server.log().count("shutting down: finishing running tasks") == int(workers))
    gate.touch()
    assert server.proc.wait(15) == 0
    assert sorted(p.name for p in tmp_path.glob("ran-*")) == [f"ran-{first['task_id']}"]
    db = sqlite3.connect(tmp_path / "st" / "state.db")
    statuses = dict(db.execute("SELECT id, status FROM runs").fetchall())
    db.close()
    assert statuses == {first["task_id"]: "success", second["task_id"]: "cancelled"}, statuses


def test_a_long_line_granted_during_a_drain_ends_cancelled_without_recursing(wk_start, tmp_path):
    """The supervisor marks the drain (<state dir>/draining) before its workers handle their
    SIGTERM; a slot granted meanwhile to an async run in line ends that run cancelled, whose
    end grants the next one... Done inline, 150 of them recursed until RecursionError (at
    ~120) and stranded the rest of the line, one of them holding the slot."""
    state = tmp_path / "st"
    server, tokens = wk_start("""
        [tasks.q]
        command = ["sleep", "1"]
        apiKeyNames = ["ci"]
        async = true
        maxConcurrentTasks = 1
        queueSize = 200
        """, run_args=("--state-dir", str(state)))
    answers = [a["status"] for a in _posts_on_one_connection(server, "q", tokens["ci"], 151)]
    assert answers == ["running"] + ["queued"] * 150, collections.Counter(answers)
    (state / "draining").touch()  # as the supervisor does on SIGTERM, before the worker knows
    detail = _line_emptied(server, "q")
    assert detail["results_kept"] == 151
    statuses = collections.Counter(r["status"] for r in server.get("/tasks/q", key=tokens["ci"]).json["runs"])
    assert statuses == {"success": 1, "cancelled": 150}, statuses
    assert "internal error" not in server.log() and "RecursionError" not in server.log()


def test_a_queue_of_runs_that_cannot_start_all_end_and_free_the_slot(start_server, tmp_path):
    workdir = tmp_path / "wd"
    workdir.mkdir()
    server, keys = start_server(f'''
        [tasks.q]
        command = ["sh", "-c", "sleep 0.5"]
        workdir = "{workdir}"
        apiKeyNames = ["ci"]
        async = true
        maxConcurrentTasks = 1
        queueSize = 300
        ''')
    ids = [a["task_id"] for a in _posts_on_one_connection(server, "q", keys["ci"], 200)]
    workdir.rmdir()  # the first run still has it as its cwd; every queued one fails to start
    detail = _line_emptied(server, "q")
    assert detail["results_kept"] == 200
    statuses = [server.get(f"/tasks/q/{i}", key=keys["ci"]).json for i in ids]
    assert sum(s["exit_code"] == -2 for s in statuses) >= 150, statuses[-1]
    assert "RecursionError" not in server.log() and "Traceback" not in server.log()
    workdir.mkdir()
    again = server.post("q", key=keys["ci"]).json
    assert again["status"] == "running", again


def test_cli_user_mistakes_with_key_files_give_no_traceback(tmp_path):
    (tmp_path / "not-pem").write_text("hello\n")
    checks = [("validate-token", "--token", "a.b.c", "--public-key", "not-pem"),
              ("generate-keys", "--output-dir", "/proc/rtask-cannot-exist")]
    for args in checks:
        out = rtask_cli(*args, cwd=tmp_path)
        assert out.returncode == 1 and out.stderr.startswith("rtask: "), (args, out.stderr)
        assert "Traceback" not in out.stderr, out.stderr


def test_busy_metrics_port_is_named_in_the_error(tmp_path):
    (tmp_path / "config.toml").write_text('[tasks.t]\ncommand = ["true"]\napiKeyNames = ["ci"]\n')
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = rtask_cli("run", "--api-address", "127.0.0.1:0", "--metrics-address", f"127.0.0.1:{port}",
                        cwd=tmp_path, timeout=20)
    assert out.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in out.stderr, out.stderr


def test_drain_waits_for_the_kill_of_a_grandchild_that_ignores_sigterm(start_server, tmp_path):
    """A run that timed out ended when its direct child died; a grandchild that ignores TERM
    must still get its KILL 2 s later, even when SIGTERM asked the server to stop meanwhile."""
    tag = f"rtask-drain-gc-{secrets.token_hex(4)}"
    grandchild = tmp_path / "grandchild.pid"
    server, keys = start_server(f'''
        [tasks.stubborn]
        command = ["sh", "-c", "sh -c 'trap \\"\\" TERM; echo $$ > {grandchild}; while :; do sleep 1; done' {tag} & sleep 300"]
        apiKeyNames = ["ci"]
        async = true
        executionTimeoutSeconds = 1
        ''')
    run_id = server.post("stubborn", key=keys["ci"]).json["task_id"]
    pid = int(wait_for(lambda: grandchild.exists() and grandchild.read_text().strip(), timeout=5))
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(15) == 0
    assert "status=timeout" in server.log() and run_id in server.log()
    assert not pid_alive(pid), "the grandchild outlived the server"
    assert _rv_task_processes(tag) == []


# =============================================================================================
# Request framing and header hygiene: no request can hide inside another (smuggling)
# =============================================================================================

_SM_WH_SECRET = "sm-wh-\u00fc\u00f1\u00ef-" + secrets.token_hex(8)  # non-ASCII: sent as raw UTF-8 too


@pytest.fixture(scope="module")
def _sm(tmp_path_factory):
    """One server: task ``echo`` (async=false) records each run in runs.log and prints stdin
    and its X-Note header; ``hook`` is reachable by a webhook secret with non-ASCII letters."""
    d = tmp_path_factory.mktemp("sm")
    runs = d / "runs.log"
    (d / "config.toml").write_text(f'''
[tasks.echo]
command = ["sh", "-c", "echo run >> {runs}; printf 'note=%s;' \\"$REQUEST_HEADER_X_NOTE\\"; cat"]
apiKeyNames = ["ci"]
passRequestHeaders = ["X-Note"]

[tasks.hook]
command = ["echo", "hooked"]
webhookSecrets = {{ sender = {json.dumps(_SM_WH_SECRET)} }}
''')
    key = new_key(d, "ci")
    server = Server(d)
    try:
        yield types.SimpleNamespace(server=server, key=key, runs=runs)
    finally:
        server.stop()


def _sm_runs(sm) -> int:
    return len(sm.runs.read_text().splitlines()) if sm.runs.exists() else 0


def _sm_statuses(raw: bytes) -> list[int]:
    """The status of every response in what the server sent on one connection."""
    return [int(m) for m in re.findall(rb"(?:^|\r\n\r\n|\})HTTP/1\.1 (\d{3}) ", raw)]


_SM_SMUGGLED = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"


def _sm_head(sm) -> bytes:
    """The start of an authorized POST /tasks/echo, up to the headers each test adds."""
    return b"POST /tasks/echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + sm.key.encode() + b"\r\n"


def test_two_content_lengths_on_a_route_without_a_body_hide_no_request(_sm):
    raw = _sm.server.raw(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: "
                         + str(len(_SM_SMUGGLED)).encode() + b"\r\n\r\n" + _SM_SMUGGLED, read_timeout=3)
    assert _sm_statuses(raw) == [200] and b'"alive"' not in raw, raw  # answered, then closed


@pytest.mark.parametrize("framing", [
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",  # a proxy sees "chunked, identity"
    b"Content-Length: 5\r\nContent-Length: 6\r\n",
], ids=["two-transfer-encodings", "two-content-lengths"])
def test_ambiguous_framing_on_a_task_is_400_and_nothing_runs(_sm, framing):
    before = _sm_runs(_sm)
    raw = _sm.server.raw(_sm_head(_sm) + framing + b"\r\n5\r\nhello\r\n0\r\n\r\n" + _SM_SMUGGLED, read_timeout=3)
    assert _sm_statuses(raw) == [400], raw
    assert _sm_runs(_sm) == before


def test_a_chunk_size_line_longer_than_its_limit_hides_no_request(_sm):
    """Cut at a fixed length, the rest of a long chunk-extension line would be read as data."""
    tail = b"0\r\nT: a\r\n2a\r\n\r\n" + _SM_SMUGGLED + b"\r\n0\r\n\r\n"
    before = _sm_runs(_sm)
    raw = _sm.server.raw(_sm_head(_sm)
                         + b"Transfer-Encoding: chunked\r\n\r\n7;" + b"a" * 1022 + b"XXXXXXX\r\n" + tail,
                         read_timeout=3)
    assert _sm_statuses(raw) == [400], raw
    assert _sm_runs(_sm) == before


@pytest.mark.parametrize("cut", [b"0\r\nX-Partial-Trail", b"0\r\n"], ids=["in-a-trailer", "before-the-end"])
def test_a_chunked_body_cut_off_in_its_trailers_never_runs(_sm, cut):
    before = _sm_runs(_sm)
    r = _hx_raw(_sm.server, _sm_head(_sm) + b"Transfer-Encoding: chunked\r\n\r\n4\r\nrm -\r\n" + cut, shut_wr=True)
    _hx_error(r, 400, "bad_request")
    assert _sm_runs(_sm) == before


def test_a_content_length_of_thousands_of_digits_is_413_not_500(_sm):
    huge = b"9" * 5000
    r = _hx_raw(_sm.server, _sm_head(_sm) + b"Content-Length: " + huge + b"\r\n\r\n")
    _hx_error(r, 413, "payload_too_large")
    raw = _sm.server.raw(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: " + huge + b"\r\n\r\n", read_timeout=3)
    assert _sm_statuses(raw) == [200], raw
    assert "internal error" not in _sm.server.log()


def test_a_url_in_the_query_does_not_change_the_path(_sm):
    r = _sm.server.request("POST", "/wh/" + urllib.parse.quote(_SM_WH_SECRET) + "?src=https://ci.example.com/job/1")
    assert r.status == 200 and r.json["stdout"] == "hooked\n", r
    r = _sm.server.get("/health?x=http://h/tasks/echo")
    assert (r.status, r.json) == (200, {"status": "healthy"}), r
    # the absolute form itself still works
    r = _hx_raw(_sm.server, b"GET http://127.0.0.1/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (r.status, r.json) == (200, {"status": "alive"}), r


@pytest.mark.parametrize("header", [b"X-Note: a\x00b", b"X-Note: a\rb", b"Foo\rTransfer-Encoding: chunked",
                                    b"X Note: a", b"X-Note\x00: a"],
                         ids=["nul-in-value", "cr-in-value", "cr-in-name", "space-in-name", "nul-in-name"])
def test_control_characters_in_a_header_are_400_before_anything_runs(_sm, header):
    before = _sm_runs(_sm)
    r = _hx_raw(_sm.server, _sm_head(_sm) + header + b"\r\nContent-Length: 0\r\n\r\n")
    assert (r.status, r.json["message"]) == (400, "A request header is malformed."), r
    assert _sm_runs(_sm) == before


def test_a_passed_header_arrives_in_the_environment(_sm):
    r = _sm.server.post("echo", b"body", key=_sm.key, headers={"X-Note": "tab\there"})
    assert r.status == 200 and r.json["stdout"] == "note=tab\there;body", r


def test_raw_utf8_in_the_path_is_read_like_percent_encoding(_sm):
    r = _hx_raw(_sm.server, b"POST /wh/" + _SM_WH_SECRET.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert r.status == 200 and r.json["stdout"] == "hooked\n", r
    r = _hx_raw(_sm.server, b"GET /tasks/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (r.status, r.json["message"]) == (400, "The request path is not valid UTF-8."), r


def test_wait_with_an_underscore_is_not_a_number(_sm):
    run_id = _sm.server.post("echo", key=_sm.key).json["task_id"]
    r = _sm.server.get(f"/tasks/echo/{run_id}?wait=1_0", key=_sm.key)
    assert (r.status, r.json["message"]) == (400, "wait must be a number of seconds."), r


def test_http_1_0_client_gets_no_100_continue(_sm):
    raw = _sm.server.raw(b"POST /tasks/echo HTTP/1.0\r\nAuthorization: Bearer " + _sm.key.encode()
                         + b"\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi", read_timeout=5)
    assert raw.startswith(b"HTTP/1.1 200 ") and b"100 Continue" not in raw, raw


# =============================================================================================
# Found by a second probe: reload of a dropped task, keys.toml corners, rtask call answers
# =============================================================================================


def test_a_task_dropped_and_restored_by_reload_keeps_its_running_run_and_limit(start_server):
    task = _ig_task("one", ["sleep", "3"], "async = true\nmaxConcurrentTasks = 1")
    server, keys = start_server(task + _ig_task("other", ["true"]))
    run_id = server.post("one", key=keys["ci"]).json["task_id"]
    assert server.post("one", key=keys["ci"]).status == 429
    config = server.workdir / "config.toml"
    config.write_text(_ig_task("other", ["true"]))
    assert _ig_sighup(server)
    config.write_text(task + _ig_task("other", ["true"]))
    assert _ig_sighup(server)
    assert server.post("one", key=keys["ci"]).status == 429  # the running run still holds the slot
    assert server.get(f"/tasks/one/{run_id}", key=keys["ci"]).json["status"] == "running"
    assert server.get("/health/detailed").json["tasks"]["one"]["running"] == 1
    done = server.get(f"/tasks/one/{run_id}?wait=10", key=keys["ci"]).json
    assert done["status"] == "success", done


def test_add_key_through_a_symlinked_keys_toml_updates_its_target(tmp_path):
    (tmp_path / "real").mkdir()
    target, link = tmp_path / "real" / "keys.toml", tmp_path / "keys.toml"
    assert rtask_cli("add-key", "a", "--api-keys-file", str(target), cwd=tmp_path).returncode == 0
    link.symlink_to(target)
    assert rtask_cli("add-key", "b", cwd=tmp_path).returncode == 0
    assert rtask_cli("remove-key", "a", cwd=tmp_path).returncode == 0
    assert link.is_symlink(), "the link was replaced by a file"
    assert sorted(_ck_entries(target)) == ["b"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_add_key_keeps_keys_toml_valid_with_a_name_beyond_the_bmp(tmp_path):
    _, entry = _ck_go_key(0)
    (tmp_path / "keys.toml").write_text(f'"caf\u00e9 \U0001F600 \\u007f" = "{entry}"\n')  # DEL escaped
    assert rtask_cli("add-key", "b", cwd=tmp_path).returncode == 0
    assert sorted(_ck_entries(tmp_path / "keys.toml")) == ["b", "caf\u00e9 \U0001F600 \x7f"]
    listed = rtask_cli("list-keys", cwd=tmp_path)
    assert listed.returncode == 0 and "\U0001F600" in listed.stdout, listed


def test_a_key_entry_argon2_cannot_compute_is_refused_when_loaded(tmp_path):
    """Argon2 needs 8 KiB of memory per lane: m = 1 MiB with p = 255 cannot be hashed."""
    salt = os.urandom(16)
    entry = _ck_b64e(_ck_go_cbor({1: 0, 2: salt, 3: 1, 4: 1, 5: 255, 6: os.urandom(40)}))
    (tmp_path / "keys.toml").write_text(f'ci = "{entry}"\n')
    (tmp_path / "config.toml").write_text(_ig_task("t", ["true"]))
    out = rtask_cli("check-config", cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out
    assert "Argon2 parameters out of range" in out.stderr, out.stderr


class _BadAnswers:
    """A server that answers every request with the raw bytes of ``answer`` and closes."""

    def __init__(self):
        self.answer = b""
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                    conn.sendall(self.answer)
                except OSError:
                    pass


def _bad_http(status: str, body: bytes, content_type=b"application/json", length=None) -> bytes:
    return (b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: " + content_type + b"\r\nContent-Length: "
            + str(len(body) if length is None else length).encode() + b"\r\nConnection: close\r\n\r\n" + body)


@pytest.mark.parametrize("answer", [
    _bad_http("200 OK", b"[]"),
    _bad_http("200 OK", b'"x"'),
    _bad_http("200 OK", b"{}"),
    _bad_http("200 OK", b'{"status": "success", "exit_code": 0, "stdout": null}'),
    _bad_http("200 OK", b'{"status": "succ', length=200),
    _bad_http("401 Unauthorized", b"[1, 2]"),
    _bad_http("200 OK", b"<html>proxy</html>", content_type=b"text/html"),
], ids=["list", "string", "no-task-id", "null-stdout", "truncated", "error-list", "html"])
@pytest.mark.parametrize("follow", [False, True], ids=["plain", "follow"])
def test_call_with_an_answer_rtask_never_sends_exits_2_without_a_traceback(tmp_path, answer, follow):
    server = _BadAnswers()
    server.answer = answer
    try:
        out = _ig_call("t", *(["--follow"] if follow else []), env=_ig_call_env(server.url, RTASK_AUTH_TOKEN="x"),
                       cwd=tmp_path, timeout=20)
    finally:
        server.sock.close()
    assert out.returncode == 2, out
    assert out.stderr.startswith(b"rtask call: refused: ") and b"Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("args, env", [
    (["--url", "http://127.0.0.1:99999"], {}),
    (["--url", "http://[::1"], {}),
    ([], {"RTASK_AUTH_TOKEN": "line\nbreak"}),
], ids=["port-too-large", "broken-ipv6", "newline-in-token"])
def test_call_with_a_bad_url_or_credential_says_so_in_one_sentence(tmp_path, args, env):
    out = _ig_call("t", *args, env=_ig_call_env("http://127.0.0.1:1", **env), cwd=tmp_path)
    assert out.returncode == 1, out
    assert out.stderr.startswith(b"rtask: ") and out.stderr.count(b"\n") == 1, out.stderr


def test_call_sends_non_utf8_data_bytes_as_they_came(tmp_path):
    server = _BadAnswers()
    server.answer = _bad_http("200 OK", b'{"status": "success", "exit_code": 0, "stdout": "ok"}')
    try:
        out = subprocess.run([sys.executable, RTASK, "call", "t", "--data", os.fsdecode(b"\xff\xfe")],
                             env=_ig_call_env(server.url, RTASK_AUTH_TOKEN="x"), cwd=tmp_path,
                             stdin=subprocess.DEVNULL, capture_output=True, timeout=20)
    finally:
        server.sock.close()
    assert (out.returncode, out.stdout) == (0, b"ok"), out


def test_metrics_listener_bounds_its_connections_and_drops_silent_ones(start_server):
    """Half-sent scrapes hold at most METRICS_MAX_CONNECTIONS threads (from one address: its
    share of them), each for at most METRICS_SOCKET_TIMEOUT; then /metrics answers again."""
    server, _ = start_server(_RS_CONFIG, keys=())
    pid = server.proc.pid  # the supervisor serves /metrics
    threads_before = _rs_proc_status(pid)["Threads"]
    socks = {}
    try:
        first = time.monotonic()
        for _ in range(rtask.METRICS_MAX_CONNECTIONS + 16):
            s = _rs_connect(server.metrics_port)
            s.sendall(b"GET /metrics HTTP/1.1\r\n")
            socks[s] = "half"
        opened = time.monotonic()
        time.sleep(0.5)
        assert _rs_proc_status(pid)["Threads"] <= threads_before + rtask.METRICS_MAX_CONNECTIONS + 2
        closed = _rs_wait_closed(socks, opened + rtask.METRICS_SOCKET_TIMEOUT + 5)
        assert len(closed) == len(socks), f"{len(socks) - len(closed)} silent connections still open"
        assert sum(t - opened < 2 for t in closed.values()) >= 16  # beyond the bound: closed at once
        assert max(closed.values()) - first >= rtask.METRICS_SOCKET_TIMEOUT - 1
    finally:
        for s in socks:
            s.close()
    assert "python_info" in server.metrics()  # scrapes work again
    wait_for(lambda: _rs_proc_status(pid)["Threads"] <= threads_before + 2, timeout=5)


# =============================================================================================
# Parameters (typed values, payload rules): README §4
# =============================================================================================
#
# One server for the section (log level debug, so that a secret value in any line is caught).
# Every run of a parameter task appends one JSON line (argv, RTASK_PARAM_* environment, stdin)
# to runs.jsonl: a refused request must add none.

_PM_SECRET = "PM-SECRET-VALUE-4711"
_PM_SECRET_DEFAULT = "pm-default-secret-value"
_PM_HOOK_SECRET = "pm-github-hook-secret"
_PM_WH_SECRET = "pm-plain-webhook-secret-0123456789"
_PM_RECORD = """
import json, os, sys
record = {"argv": sys.argv[1:], "stdin": sys.stdin.read(),
          "env": {k: v for k, v in os.environ.items() if k.startswith("RTASK_PARAM_")}}
with open(os.environ["PM_RUNS"], "a") as f:
    f.write(json.dumps(record) + "\\n")
print("ran")
"""


def _pm_config(d: Path) -> str:
    q = json.dumps
    record = lambda *args: q([sys.executable, "-c", _PM_RECORD, *args])  # noqa: E731
    runs = q(str(d / "runs.jsonl"))
    return f"""
[tasks.show]
command = {record("{target}", "{version}", "--x={version}", "{note}")}
apiKeyNames = ["ci"]
maxInputBytes = 4096
environment = {{ PM_RUNS = {runs} }}
[tasks.show.parameters.version]
type = "string"
pattern = '^v[0-9]+\\.[0-9]+\\.[0-9]+$'
maxLength = 32
required = true
[tasks.show.parameters.target]
type = "choice"
choices = ["staging", "production"]
default = "staging"
[tasks.show.parameters.note]
type = "string"
[tasks.show.parameters.count]
type = "integer"
[tasks.show.parameters.ratio]
type = "number"
[tasks.show.parameters.flag]
type = "boolean"
[tasks.show.parameters.path]
pattern = '[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*'
[tasks.show.parameters.token]
secret = true
default = "{_PM_SECRET_DEFAULT}"

[tasks.plain]
command = {record()}
apiKeyNames = ["ci"]
environment = {{ PM_RUNS = {runs} }}

[tasks.slot]
command = {record("{n}")}
apiKeyNames = ["ci"]
maxConcurrentTasks = 1
environment = {{ PM_RUNS = {runs} }}
[tasks.slot.parameters.n]
type = "integer"
required = true

[tasks.hook]
command = {record("{revision}")}
environment = {{ PM_RUNS = {runs} }}
[tasks.hook.signedWebhook]
provider = "github"
secret = "{_PM_HOOK_SECRET}"
events = ["push"]
[tasks.hook.signedWebhook.match]
"/ref" = "refs/heads/main"
"/repository/full_name" = {{ pattern = "acme/[a-z]+" }}
[tasks.hook.parameters.revision]
from = "/head_commit/id"
pattern = '[0-9a-f]{{40}}'
required = true
[tasks.hook.parameters.first]
from = "/commits/0/id"
[tasks.hook.parameters.escaped]
from = "/we~1ird/ti~0lde"
[tasks.hook.parameters.pusher]
type = "string"

[tasks.bg]
command = {record("{x}")}
apiKeyNames = ["ci"]
async = true
environment = {{ PM_RUNS = {runs} }}
[tasks.bg.parameters.x]
required = true

[tasks.wh]
command = {record()}
webhookSecrets = {{ pm = "{_PM_WH_SECRET}" }}
environment = {{ PM_RUNS = {runs} }}
[tasks.wh.parameters.x]
from = "/x"
[tasks.wh.parameters.y]
type = "integer"
"""


@pytest.fixture(scope="module")
def _pm(tmp_path_factory):
    """.server, .ci, .dir, and .runs(): the records of every run so far."""
    d = tmp_path_factory.mktemp("pm")
    (d / "config.toml").write_text(_pm_config(d))
    ci = new_key(d, "ci")
    server = Server(d, {"RTASK_LOG": "debug"})

    def runs():
        path = d / "runs.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    try:
        yield types.SimpleNamespace(server=server, ci=ci, dir=d, runs=runs)
    finally:
        server.stop()


def _pm_post(pm, task, query="", body=b"", content_type=None, key=True) -> Response:
    headers = {"Content-Type": content_type} if content_type else {}
    return pm.server.request("POST", f"/tasks/{task}{query}", body, key=pm.ci if key else None,
                             headers=headers)


def _pm_run(pm, task, query="", body=b"", content_type=None) -> dict:
    """POST, expect a successful run; return its record."""
    before = len(pm.runs())
    r = _pm_post(pm, task, query, body, content_type)
    assert r.status == 200 and r.json["status"] == "success", r
    runs = pm.runs()
    assert len(runs) == before + 1
    return runs[-1]


def _pm_refused(pm, task, query="", body=b"", content_type=None, fragment="") -> str:
    """POST, expect 400 invalid_parameter naming ``fragment`` and no run; return the message."""
    before = len(pm.runs())
    rejected = pm.server.metric("task_rejection_total", handler=task, reason="invalid_parameter")
    r = _pm_post(pm, task, query, body, content_type)
    assert r.status == 400, r
    assert r.json["error"] == "invalid_parameter", r
    assert fragment in r.json["message"], r
    assert len(pm.runs()) == before, "a refused request ran its command"
    assert pm.server.metric("task_rejection_total", handler=task, reason="invalid_parameter") == rejected + 1
    return r.json["message"]


def _pm_qs(**values) -> str:
    return "?" + urllib.parse.urlencode(values, quote_via=urllib.parse.quote)


def test_parameters_reach_the_command_as_env_and_whole_argv_elements(_pm):
    rec = _pm_run(_pm, "show", _pm_qs(version="v1.4.2", count="7"), b"the body\n", "text/plain")
    assert rec["argv"] == ["staging", "v1.4.2", "--x={version}", ""]  # default; literal; absent → ""
    assert rec["env"] == {"RTASK_PARAM_VERSION": "v1.4.2", "RTASK_PARAM_TARGET": "staging",
                          "RTASK_PARAM_NOTE": "", "RTASK_PARAM_COUNT": "7", "RTASK_PARAM_RATIO": "",
                          "RTASK_PARAM_FLAG": "", "RTASK_PARAM_PATH": "",
                          "RTASK_PARAM_TOKEN": _PM_SECRET_DEFAULT}
    assert rec["stdin"] == "the body\n"


def test_a_value_with_spaces_and_shell_metacharacters_is_one_argv_element_exactly(_pm):
    hostile = "$(id); rm -rf / `uname` | cat > /tmp/x & 'a b' \"c\" * ? \\ {note} ~"
    rec = _pm_run(_pm, "show", _pm_qs(version="v1.0.0", note=hostile))
    assert rec["argv"] == ["staging", "v1.0.0", "--x={version}", hostile]
    assert rec["env"]["RTASK_PARAM_NOTE"] == hostile


@pytest.mark.parametrize("query, fragment", [
    ("?version=v1.0.0&note=a%0Ab", "control character"),  # newline
    ("?version=v1.0.0&note=a%00b", "control character"),  # NUL
    ("?version=v1.0.0&note=a%1Bb", "control character"),  # ESC
    ("?version=v1.0.0&note=%ff", "not valid UTF-8"),  # not UTF-8 in the query
    ("?version=v1.0.0&note=" + "x" * 257, "longer than 256"),
    ("?version=v1.0.0&note=" + "y" * 5000, "longer than 256"),
    ("?version=v1.0.0&path=..%2Fetc", "pattern"),
    ("?version=v1.0.0&path=%2Fetc%2Fpasswd", "pattern"),
    ("?version=v1.0.0&path=a%2F..%2Fb", "pattern"),
    ("?version=v1.0.0%0A", "'version'"),  # a trailing newline never passes ^...$
    ("?version=v1.0.0;id", "pattern"),
    ("?version=v1.0.0&version=v2.0.0", "more than once"),  # duplicate query keys
    ("?version=v1.0.0&undeclared=1", "no parameter 'undeclared'"),
    ("?version=v1.0.0&count=4.2", "whole number"),
    ("?version=v1.0.0&count=0x10", "whole number"),
    ("?version=v1.0.0&ratio=1e999999", "longer than"),
    ("?version=v1.0.0&ratio=nan", "decimal number"),
    ("?version=v1.0.0&flag=maybe", "true or false"),
    ("?version=v1.0.0&target=dev", "one of: staging, production"),
    ("?note=x", "'version' is required"),
    ("?version=", "'version' is required"),  # an empty value counts as absent
    ("?version=v" + "1" * 40 + ".0.0", "longer than 32"),
])
def test_hostile_query_values_are_refused_and_nothing_runs(_pm, query, fragment):
    _pm_refused(_pm, "show", query, fragment=fragment)


@pytest.mark.parametrize("body, fragment", [
    ({"version": 123}, "pattern"),  # a JSON number for a string parameter is checked as "123"
    ({"version": "v1.0.0", "note": {"nested": "x"}}, "holds an object"),
    ({"version": "v1.0.0", "note": ["a"]}, "holds an array"),
    ({"version": "v1.0.0", "count": 1.0}, "whole number"),
    ({"version": "v1.0.0", "flag": "sometimes"}, "true or false"),
    ({"version": "v1.0.0", "note": "a\rb"}, "control character"),
    ({"version": "v1.0.0", "note": "\udcff"}, "not valid UTF-8"),
    ({"version": None}, "required"),  # null counts as absent
])
def test_hostile_json_body_values_are_refused_and_nothing_runs(_pm, body, fragment):
    _pm_refused(_pm, "show", body=json.dumps(body).encode(), content_type="application/json",
                fragment=fragment)


@pytest.mark.parametrize("query, body, expected", [
    ("?version=v1.0.0&count=042", None, {"RTASK_PARAM_COUNT": "42"}),
    ("?version=v1.0.0&count=-0", None, {"RTASK_PARAM_COUNT": "0"}),
    ("?version=v1.0.0&ratio=1.50", None, {"RTASK_PARAM_RATIO": "1.5"}),
    ("?version=v1.0.0&ratio=15e-1", None, {"RTASK_PARAM_RATIO": "1.5"}),
    ("?version=v1.0.0&ratio=2E3", None, {"RTASK_PARAM_RATIO": "2000"}),
    ("?version=v1.0.0&flag=TRUE", None, {"RTASK_PARAM_FLAG": "true"}),
    ("?version=v1.0.0&flag=off", None, {"RTASK_PARAM_FLAG": "false"}),
    ("?version=v1.0.0&note=a+b%2Bc", None, {"RTASK_PARAM_NOTE": "a b+c"}),
    ("", '{"version": "v1.0.0", "count": 42, "ratio": 1.50, "flag": true, "note": 42}',
     {"RTASK_PARAM_COUNT": "42", "RTASK_PARAM_RATIO": "1.5", "RTASK_PARAM_FLAG": "true",
      "RTASK_PARAM_NOTE": "42"}),  # a JSON number for a string parameter: its text
    ("", '{"version": "v1.0.0", "ratio": 12345678901234567890.10}', {"RTASK_PARAM_RATIO": "12345678901234567890.1"}),
    ("", '{"version": "v1.0.0", "extra": {"nested": [1, 2]}, "path": "a/b"}',
     {"RTASK_PARAM_PATH": "a/b"}),  # undeclared body fields are only payload
    ("?version=v9.9.9", '{"version": "v1.0.0", "target": "production"}',
     {"RTASK_PARAM_VERSION": "v9.9.9", "RTASK_PARAM_TARGET": "production"}),  # query first
])
def test_values_are_canonical_and_come_from_query_then_json_body(_pm, query, body, expected):
    data = body.encode() if body else b""
    rec = _pm_run(_pm, "show", query, data, "application/json" if body else None)
    assert {k: rec["env"][k] for k in expected} == expected
    assert rec["stdin"] == data.decode()  # the body reaches stdin unchanged


def test_form_body_fields_are_values_and_the_body_is_still_stdin(_pm):
    body = b"version=v3.0.0&note=a+b%26c&other=x"
    rec = _pm_run(_pm, "show", "", body, "application/x-www-form-urlencoded")
    assert rec["argv"][1] == "v3.0.0" and rec["env"]["RTASK_PARAM_NOTE"] == "a b&c"
    assert rec["stdin"] == body.decode()
    _pm_refused(_pm, "show", "", b"version=v3.0.0&version=v3.0.1", "application/x-www-form-urlencoded",
                fragment="more than once")


def test_async_task_gets_its_parameters_and_refuses_before_answering_a_task_id(_pm):
    r = _pm_post(_pm, "bg", "?x=" + urllib.parse.quote("one arg; $(id)"))
    assert r.status == 200 and "task_id" in r.json, r
    result = _pm.server.get(f"/tasks/bg/{r.json['task_id']}?wait=20", key=_pm.ci).json
    assert result["status"] == "success", result
    assert _pm.runs()[-1]["argv"] == ["one arg; $(id)"]
    _pm_refused(_pm, "bg", "", fragment="'x' is required")
    assert len(_pm.server.get("/tasks/bg", key=_pm.ci).json["runs"]) == 1  # the refused one left no run


def test_task_without_parameters_ignores_the_query(_pm):
    rec = _pm_run(_pm, "plain", "?utm_source=x&anything=%ff%0A")
    assert rec["env"] == {} and rec["argv"] == []


def test_refused_parameters_give_the_slot_back_at_once(_pm):
    """maxConcurrentTasks = 1: a refused request followed at once by a good one runs."""
    for _ in range(3):
        _pm_refused(_pm, "slot", "?n=x", fragment="'n'")
        rec = _pm_run(_pm, "slot", "?n=5")
        assert rec["argv"] == ["5"]


def test_parameters_are_checked_after_credentials_and_body_size(_pm):
    before = len(_pm.runs())
    assert _pm_post(_pm, "show", "?note=%00", key=False).status == 401
    big = _pm_post(_pm, "show", "?version=bad", body=b"x" * 5000)
    assert big.status == 413, big
    assert len(_pm.runs()) == before


def test_secret_value_never_appears_in_answers_logs_or_listings(_pm):
    rec = _pm_run(_pm, "show", _pm_qs(version="v1.0.0", token=_PM_SECRET, note="pm-visible-note"))
    assert rec["env"]["RTASK_PARAM_TOKEN"] == _PM_SECRET  # the command gets it
    message = _pm_refused(_pm, "show", _pm_qs(version="v1.0.0", token=_PM_SECRET + "\n"), fragment="'token'")
    assert _PM_SECRET not in message
    listing = _pm.server.get("/tasks", key=_pm.ci)
    runs = _pm.server.get("/tasks/show", key=_pm.ci)
    for text in (listing.body.decode(), runs.body.decode(), _pm.server.log()):
        assert _PM_SECRET not in text and _PM_SECRET_DEFAULT not in text
    # at debug level the values of non-secret parameters are logged, names always at info
    wait_for(lambda: "pm-visible-note" in _pm.server.log(), timeout=5)
    assert re.search(r'info "task finished" task=show .*parameters=version,target,note,count,ratio,flag,path,token',
                     _pm.server.log())


def test_get_tasks_describes_parameters_without_secret_defaults(_pm):
    tasks = {t["name"]: t for t in _pm.server.get("/tasks", key=_pm.ci).json["tasks"]}
    params = {p["name"]: p for p in tasks["show"]["parameters"]}
    assert params["version"] == {"name": "version", "type": "string", "required": True, "maxLength": 32,
                                 "pattern": "^v[0-9]+\\.[0-9]+\\.[0-9]+$"}
    assert params["target"] == {"name": "target", "type": "choice", "required": False, "maxLength": 256,
                                "default": "staging", "choices": ["staging", "production"]}
    assert params["token"] == {"name": "token", "type": "string", "required": False, "maxLength": 256,
                               "secret": True}
    assert tasks["plain"]["parameters"] == []


def _pm_push(pm, payload, *, form=False, event="push", query="") -> Response:
    raw = json.dumps(payload).encode()
    body = b"payload=" + urllib.parse.quote_plus(raw).encode() if form else raw
    headers = {"X-GitHub-Event": event, "X-Hub-Signature-256": _pm_signature(body),
               "Content-Type": "application/x-www-form-urlencoded" if form else "application/json"}
    return pm.server.request("POST", f"/hooks/hook{query}", body, headers=headers)


def _pm_signature(body: bytes) -> str:
    return "sha256=" + hmac.new(_PM_HOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()


_PM_SHA = "0123456789abcdef0123456789abcdef01234567"
_PM_PUSH = {"ref": "refs/heads/main", "repository": {"full_name": "acme/app"},
            "head_commit": {"id": _PM_SHA}, "commits": [{"id": "c0"}, {"id": "c1"}],
            "we/ird": {"ti~lde": "escaped-ok"}, "pusher": "octocat"}


@pytest.mark.parametrize("form", [False, True], ids=["json", "form-encoded"])
def test_signed_webhook_matching_delivery_runs_with_values_from_the_payload(_pm, form):
    before = len(_pm.runs())
    r = _pm_push(_pm, _PM_PUSH, form=form, query="?revision=" + "f" * 40 + "&whatever=1")
    assert r.status == 200 and r.json["status"] == "success", r
    rec = _pm.runs()[-1]
    assert len(_pm.runs()) == before + 1
    assert rec["argv"] == [_PM_SHA]  # from the signed payload; the unsigned query is ignored
    assert rec["env"]["RTASK_PARAM_FIRST"] == "c0"
    assert rec["env"]["RTASK_PARAM_ESCAPED"] == "escaped-ok"
    assert rec["env"]["RTASK_PARAM_PUSHER"] == ("octocat" if not form else "")


@pytest.mark.parametrize("change", [
    {"ref": "refs/heads/feature"},
    {"ref": "refs/heads/main2"},
    {"ref": None},
    {"ref": ["refs/heads/main"]},
    {"repository": {"full_name": "evil/app"}},
    {"repository": {"full_name": "acme/app/../x"}},
    {"repository": "acme/app"},
])
def test_signed_webhook_delivery_not_matching_every_rule_is_ignored(_pm, change):
    before = len(_pm.runs())
    r = _pm_push(_pm, {**_PM_PUSH, **change})
    assert r.status == 202 and r.json["status"] == "ignored", r
    assert len(_pm.runs()) == before


@pytest.mark.parametrize("change, fragment", [
    ({"head_commit": None}, "'revision' is required"),
    ({"head_commit": {"id": {"sha": _PM_SHA}}}, "holds an object"),
    ({"head_commit": {"id": "not-a-sha"}}, "pattern"),
    ({"head_commit": {"id": _PM_SHA + "\n"}}, "control character"),
])
def test_signed_webhook_refuses_bad_payload_values(_pm, change, fragment):
    before = len(_pm.runs())
    r = _pm_push(_pm, {**_PM_PUSH, **change})
    assert r.status == 400 and r.json["error"] == "invalid_parameter" and fragment in r.json["message"], r
    assert len(_pm.runs()) == before


def test_plain_webhook_takes_from_parameters_only_from_the_payload(_pm):
    path = f"/wh/{_PM_WH_SECRET}"
    r = _pm.server.request("POST", path + "?y=3", json.dumps({"x": "from-body"}).encode(),
                           headers={"Content-Type": "application/json"})
    assert r.status == 200, r
    assert _pm.runs()[-1]["env"] == {"RTASK_PARAM_X": "from-body", "RTASK_PARAM_Y": "3"}
    before = len(_pm.runs())
    r = _pm.server.request("POST", path + "?x=from-query", b"{}", headers={"Content-Type": "application/json"})
    assert r.status == 400 and "takes its value from the payload" in r.json["message"], r
    assert len(_pm.runs()) == before


@pytest.mark.parametrize("pointer, expected", [
    ("", "WHOLE"),
    ("/a~1b", 1),
    ("/m~0n", 2),
    ("/~01", 3),  # ~0 is unescaped after ~1: "~01" is "~1", never "/"
    ("/arr/0", "x"),
    ("/arr/1", "y"),
    ("/arr/01", "ABSENT"),  # no leading zeros
    ("/arr/-", "ABSENT"),  # "-" (past the end) never names a value
    ("/arr/2", "ABSENT"),
    ("/arr/x", "ABSENT"),
    ("/ ", 4),
    ("/", 5),  # the empty key
    ("/obj/k", None),
    ("/obj/k/deeper", "ABSENT"),
    ("/missing", "ABSENT"),
])
def test_json_pointer_follows_rfc_6901(pointer, expected):
    document = {"a/b": 1, "m~n": 2, "~1": 3, "arr": ["x", "y"], " ": 4, "": 5, "obj": {"k": None}}
    got = rtask.json_pointer_get(document, pointer)
    if expected == "ABSENT":
        assert got is rtask._ABSENT
    else:
        assert got == (document if expected == "WHOLE" else expected)


@pytest.mark.parametrize("text, canonical", [
    ("042", "42"), ("1.50", "1.5"), ("15e-1", "1.5"), ("1e3", "1000"), ("-0.0", "0"), ("0.001", "0.001"),
    ("-12.340e1", "-123.4"), ("1E-3", "0.001"), ("100", "100"), ("00.5", "0.5"),
])
def test_numbers_have_one_canonical_decimal_form(text, canonical):
    spec = rtask.ParameterSpec(name="n", type="number")
    assert rtask.canonical_value(spec, text) == canonical


_PM_BAD_DEFINITIONS = [
    ('type = "strnig"', "parameter 'p': field 'type' must be one of"),
    ('pattern = "("', "field 'pattern' is not a valid regular expression"),
    ('type = "integer"\ndefault = "x"', "field 'default' fails its own rule"),
    ('pattern = "[a-z]+"\ndefault = "ABC"', "field 'default' fails its own rule"),
    ('type = "choice"\nchoices = ["a"]\ndefault = "b"', "field 'default' fails its own rule"),
    ('from = "a/b"', "field 'from' must be a JSON Pointer"),
    ('from = "/a~2"', "field 'from' must be a JSON Pointer"),
    ('choices = ["a"]', "field 'choices' applies to type 'choice' only"),
    ('type = "integer"\npattern = "[0-9]+"', "field 'pattern' applies to type 'string' only"),
    ('type = "choice"', "type 'choice' needs field 'choices'"),
    ('colour = "red"', "parameter 'p': unknown field 'colour'"),
    ('required = true\ndefault = "x"', "either 'required = true' or 'default'"),
    ('maxLength = 0', "field 'maxLength' must be greater than 0"),
]


@pytest.mark.parametrize("definition, fragment", _PM_BAD_DEFINITIONS)
def test_check_config_names_task_and_field_of_a_bad_parameter(tmp_path, definition, fragment):
    (tmp_path / "config.toml").write_text(
        f'[tasks.t]\ncommand = ["echo", "{{p}}"]\napiKeyNames = ["ci"]\n[tasks.t.parameters.p]\n{definition}\n')
    out = rtask_cli("check-config", cwd=tmp_path)
    assert out.returncode == 1, out
    assert "task 't'" in out.stderr and fragment in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("extra, fragment", [
    ('command = ["echo", "{q}"]', "field 'command' has '{q}' but the task declares no parameter 'q'"),
    ('[tasks.t.signedWebhook]\nprovider = "github"\nsecret = "s"\n[tasks.t.signedWebhook.match]\n"/ref" = 5',
     "field 'match' entry '/ref' must be a string"),
    ('[tasks.t.signedWebhook]\nprovider = "github"\nsecret = "s"\n[tasks.t.signedWebhook.match]\n"ref" = "x"',
     "field 'match' entry 'ref' must be a JSON Pointer"),
    ('[tasks.t.signedWebhook]\nprovider = "github"\nsecret = "s"\n[tasks.t.signedWebhook.match]\n'
     '"/ref" = { pattern = "(" }', "not a valid regular expression"),
    ('[tasks.t.parameters.a-b]\n[tasks.t.parameters.a_b]', "both become RTASK_PARAM_A_B"),
])
def test_check_config_refuses_undeclared_arguments_bad_match_rules_and_clashing_names(tmp_path, extra, fragment):
    command = "" if extra.startswith("command") else 'command = ["echo"]\n'
    (tmp_path / "config.toml").write_text(f'[tasks.t]\n{command}apiKeyNames = ["ci"]\n{extra}\n')
    out = rtask_cli("check-config", cwd=tmp_path)
    assert out.returncode == 1 and fragment in out.stderr, out.stderr


def test_rtask_call_sends_parameters_percent_encoded(_pm):
    env = {**os.environ, "RTASK_API_KEY": _pm.ci, "RTASK_URL": f"http://127.0.0.1:{_pm.server.port}"}
    env.pop("RTASK_AUTH_TOKEN", None)
    note = "a b&c=d;$(id)+%ff#x"
    out = rtask_cli("call", "show", "-p", "version=v2.0.0", "-p", f"note={note}", "--param", "target=production",
                    cwd=_pm.dir, env=env)
    assert out.returncode == 0 and out.stdout == "ran\n", out
    assert _pm.runs()[-1]["argv"] == ["production", "v2.0.0", "--x={version}", note]
    out = rtask_cli("call", "show", "--follow", "-p", "version=v2.0.1", cwd=_pm.dir, env=env)
    assert out.returncode == 0 and out.stdout == "ran\n", out
    assert _pm.runs()[-1]["argv"][1] == "v2.0.1"
    out = rtask_cli("call", "show", "-p", "version=bad", cwd=_pm.dir, env=env)
    assert out.returncode == 2 and "400" in out.stderr and "'version'" in out.stderr, out
    out = rtask_cli("call", "show", "-p", "novalue", cwd=_pm.dir, env=env)
    assert out.returncode == 1 and "NAME=VALUE" in out.stderr and "Traceback" not in out.stderr, out


def test_shipped_config_parameter_example_works(tmp_path):
    (tmp_path / "config.toml").write_text((HERE / "config.toml").read_text())
    out = rtask_cli("check-config", cwd=tmp_path)
    assert "error" not in out.stderr, out.stderr
    token = new_key(tmp_path, "ci")
    server = Server(tmp_path)
    try:
        r = server.post("greet?name=" + urllib.parse.quote("Ada Lovelace; $(id)"), key=token)
        assert r.status == 200 and r.json["stdout"] == "hello, Ada Lovelace; $(id)!\n", r
        r = server.post("greet?name=Ada&greeting=goodbye", key=token)
        assert r.status == 200 and r.json["stdout"] == "goodbye, Ada!\n", r
        r = server.post("greet?name=Ada&greeting=hi", key=token)
        assert r.status == 400 and r.json["error"] == "invalid_parameter", r
    finally:
        server.stop()


# =============================================================================================
# Isolation: identity, environment, limits, networks (README §6; helpers prefixed _iso_)
# =============================================================================================

_ISO_SECRET = "iso-webhook-secret-0123456789"


def _iso_require_root():
    if os.geteuid() != 0:
        print("skipped: creating test users needs root")
        pytest.skip("creating test users (useradd) needs root")


def _iso_run(*argv):
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


class _IsoUsers:
    """System users and groups made for these tests (rtask-t-<random>), removed at the end."""

    def __init__(self):
        self.made: list[tuple[str, str]] = []  # ("user" | "group", name), in creation order

    def group(self, prefix="rtask-tg") -> str:
        name = f"{prefix}-{secrets.token_hex(3)}"
        _iso_run("groupadd", "--system", name)
        self.made.append(("group", name))
        return name

    def user(self, *groups) -> str:
        name = f"rtask-t-{secrets.token_hex(3)}"
        extra = ["-G", ",".join(groups)] if groups else []
        _iso_run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                 "--user-group", *extra, name)
        self.made.append(("user", name))
        return name

    def remove_all(self):
        for kind, name in reversed(self.made):
            subprocess.run(["userdel" if kind == "user" else "groupdel", name], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def _iso_users():
    _iso_require_root()
    users = _IsoUsers()
    try:
        yield users
    finally:
        users.remove_all()


def _iso_config(tmp: Path, user: str, group: str) -> str:
    return f"""
        [tasks.ident]
        command = ["id"]
        apiKeyNames = ["ci"]
        user = "{user}"

        [tasks.ident_status]
        command = ["grep", "-E", "^(Uid|Gid|CapPrm|CapEff):", "/proc/self/status"]
        apiKeyNames = ["ci"]
        user = "{user}"
        limits = {{ openFiles = 64 }}

        [tasks.ident_group]
        command = ["id"]
        apiKeyNames = ["ci"]
        user = "{user}"
        group = "{group}"

        [tasks.umask]
        command = ["sh", "-c", "umask; : > made && stat -c %a made"]
        apiKeyNames = ["ci"]
        workdir = "{tmp / 'umask'}"
        umask = "0027"

        [tasks.env_none]
        command = ["env"]
        apiKeyNames = ["ci"]
        inheritEnvironment = false
        environment = {{ TASK_VAR = "t" }}
        passRequestHeaders = ["X-Trace"]

        [tasks.env_list]
        command = ["env"]
        apiKeyNames = ["ci"]
        inheritEnvironment = ["RTASK_T_VISIBLE"]

        [tasks.env_user]
        command = ["env"]
        apiKeyNames = ["ci"]
        user = "{user}"

        [tasks.ulimits]
        command = ["sh", "-c", "ulimit -v; ulimit -n; ulimit -f"]
        apiKeyNames = ["ci"]
        user = "{user}"
        limits = {{ memoryBytes = 209715200, openFiles = 64, fileSizeBytes = 1048576 }}

        [tasks.memory]
        command = ["/usr/bin/python3", "-c", "bytearray(400 << 20)"]
        apiKeyNames = ["ci"]
        user = "{user}"
        limits = {{ memoryBytes = 209715200 }}

        [tasks.cpu]
        command = ["sh", "-c", "while :; do :; done"]
        apiKeyNames = ["ci"]
        executionTimeoutSeconds = 60
        limits = {{ cpuSeconds = 1 }}

        [tasks.nproc]
        command = ["/usr/bin/python3", "-c", "import os; os.fork() or os._exit(0); os.wait(); print('forked')"]
        apiKeyNames = ["ci"]
        user = "{user}"
        limits = {{ processes = 1 }}

        [tasks.nproc_ok]
        command = ["/usr/bin/python3", "-c", "import os; os.fork() or os._exit(0); os.wait(); print('forked')"]
        apiKeyNames = ["ci"]
        user = "{user}"
        limits = {{ processes = 16 }}

        [tasks.stubborn]
        command = ["sh", "-c", "trap '' TERM; sh -c \\"trap '' TERM; echo $$; exec sleep 60\\" & sleep 60"]
        apiKeyNames = ["ci"]
        user = "{user}"
        executionTimeoutSeconds = 1
        limits = {{ openFiles = 64 }}

        [tasks.noexec]
        command = ["{tmp / 'root-only'}"]
        apiKeyNames = ["ci"]
        user = "{user}"

        [tasks.noexec_limited]
        command = ["{tmp / 'root-only'}"]
        apiKeyNames = ["ci"]
        user = "{user}"
        limits = {{ openFiles = 64 }}

        [tasks.missing_limited]
        command = ["rtask-no-such-program"]
        apiKeyNames = ["ci"]
        user = "{user}"
        limits = {{ openFiles = 64 }}
        """


@pytest.fixture(scope="module")
def _iso(_iso_users, tmp_path_factory):
    """A server as root with tasks that drop to a test user: .server, .ci, .user, .group,
    .extra (a supplementary group of the user), .users (to make more)."""
    tmp = tmp_path_factory.mktemp("iso")
    extra, other = _iso_users.group(), _iso_users.group("rtask-to")
    user = _iso_users.user(extra)
    (tmp / "umask").mkdir()
    (tmp / "root-only").write_text("#!/bin/sh\necho ran\n")
    (tmp / "root-only").chmod(0o700)
    (tmp / "config.toml").write_text(textwrap.dedent(_iso_config(tmp, user, other)))
    ci = new_key(tmp, "ci")
    server = Server(tmp, {"RTASK_T_SECRET": "s3cret", "RTASK_T_VISIBLE": "seen"})
    try:
        yield types.SimpleNamespace(server=server, ci=ci, user=user, group=other, extra=extra,
                                    users=_iso_users, dir=tmp)
    finally:
        server.stop()


def test_isolated_run_has_the_users_uid_primary_and_supplementary_groups(_iso):
    import grp
    import pwd
    entry = pwd.getpwnam(_iso.user)
    out = _iso.server.post("ident", key=_iso.ci).json
    assert out["status"] == "success", out
    assert out["stdout"].startswith(f"uid={entry.pw_uid}({_iso.user}) gid={entry.pw_gid}("), out
    assert f"{grp.getgrnam(_iso.extra).gr_gid}({_iso.extra})" in out["stdout"].split("groups=")[1], out


def test_isolated_run_keeps_no_way_back_to_root(_iso):
    """Real, effective, saved and filesystem ids all switched; no capability left."""
    import pwd
    entry = pwd.getpwnam(_iso.user)
    out = _iso.server.post("ident_status", key=_iso.ci).json
    status = dict(line.split(":\t", 1) for line in out["stdout"].splitlines())
    assert status["Uid"].split() == [str(entry.pw_uid)] * 4 and status["Gid"].split() == [str(entry.pw_gid)] * 4, out
    assert int(status["CapPrm"], 16) == int(status["CapEff"], 16) == 0, out


def test_isolated_run_with_group_has_only_that_group(_iso):
    import grp
    gid = grp.getgrnam(_iso.group).gr_gid
    out = _iso.server.post("ident_group", key=_iso.ci).json
    assert out["stdout"].split(" ", 1)[1].strip() == f"gid={gid}({_iso.group}) groups={gid}({_iso.group})", out


def test_umask_applies_to_files_the_command_creates(_iso):
    out = _iso.server.post("umask", key=_iso.ci).json
    assert out["stdout"].split() == ["0027", "640"], out


def test_inherit_environment_false_keeps_only_the_tasks_own_variables(_iso):
    out = _iso.server.post("env_none", key=_iso.ci, headers={"X-Trace": "abc"}).json
    env = dict(line.split("=", 1) for line in out["stdout"].splitlines())
    assert "RTASK_T_SECRET" not in env and "RTASK_T_VISIBLE" not in env, env
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin", env
    assert (env["TASK_VAR"], env["REQUEST_HEADER_X_TRACE"], env["RTASK_TASK_NAME"]) == ("t", "abc", "env_none")
    assert set(env) <= {"PATH", "TASK_VAR", "REQUEST_HEADER_X_TRACE", "RTASK_TASK_NAME", "RTASK_TASK_ID",
                        "RTASK_CALLER", "PWD"}, env  # sh-less env: PWD only if a shell adds it


def test_inherit_environment_list_passes_only_the_named_variables(_iso):
    out = _iso.server.post("env_list", key=_iso.ci).json
    env = dict(line.split("=", 1) for line in out["stdout"].splitlines())
    assert env["RTASK_T_VISIBLE"] == "seen" and "RTASK_T_SECRET" not in env, env
    assert "HOME" not in env and env["PATH"] == "/usr/local/bin:/usr/bin:/bin", env


def test_a_user_task_inheriting_the_environment_gets_the_users_home(_iso):
    import pwd
    out = _iso.server.post("env_user", key=_iso.ci).json
    env = dict(line.split("=", 1) for line in out["stdout"].splitlines())
    assert (env["HOME"], env["USER"], env["LOGNAME"]) == (pwd.getpwnam(_iso.user).pw_dir, _iso.user, _iso.user), env
    assert env["RTASK_T_SECRET"] == "s3cret", env  # inheritEnvironment defaults to true


def test_limits_are_in_force_for_the_command(_iso):
    out = _iso.server.post("ulimits", key=_iso.ci).json
    # sh reports -v in KiB and -f in 512-byte blocks
    assert out["stdout"].split() == [str(209715200 // 1024), "64", str(1048576 // 512)], out


def test_memory_limit_makes_a_large_allocation_fail(_iso):
    out = _iso.server.post("memory", key=_iso.ci).json
    assert out["status"] == "failure" and out["exit_code"] > 0, out
    assert "MemoryError" in out.get("stderr", ""), out


def test_cpu_seconds_ends_a_busy_loop(_iso):
    started = time.monotonic()
    out = _iso.server.post("cpu", key=_iso.ci, timeout=90).json
    assert (out["status"], out["exit_code"]) == ("failure", -1), out  # killed by SIGXCPU/SIGKILL
    assert time.monotonic() - started < 45, out  # long before the 60 s timeout


def test_process_limit_refuses_forks_for_a_user(_iso):
    refused = _iso.server.post("nproc", key=_iso.ci).json
    assert refused["status"] == "failure" and "BlockingIOError" in refused.get("stderr", ""), refused
    allowed = _iso.server.post("nproc_ok", key=_iso.ci).json
    assert (allowed["status"], allowed.get("stdout")) == ("success", "forked\n"), allowed


def test_timeout_kills_an_isolated_run_that_ignores_sigterm_and_its_grandchild(_iso):
    started = time.monotonic()
    out = _iso.server.post("stubborn", key=_iso.ci, timeout=30).json
    assert (out["status"], out["exit_code"]) == ("timeout", -1), out
    assert time.monotonic() - started < 10, out
    grandchild = int(out["stdout"].split()[0])
    wait_for(lambda: not pid_alive(grandchild), timeout=rtask.KILL_GRACE_SECONDS + 8)


def test_program_the_user_cannot_execute_is_minus_2(_iso):
    for task in ("noexec", "noexec_limited"):
        out = _iso.server.post(task, key=_iso.ci).json
        assert (out["status"], out["exit_code"]) == ("failure", -2), (task, out)
        assert "Permission denied" in out["stderr"] and "ran" not in out.get("stdout", ""), (task, out)
    missing = _iso.server.post("missing_limited", key=_iso.ci).json
    assert (missing["exit_code"], missing["stderr"]) == (
        -2, "cannot start rtask-no-such-program: No such file or directory"), missing


def test_unknown_user_at_run_time_is_minus_2(_iso_users, start_server):
    gone = _iso_users.user()
    server, tokens = start_server(f"""
        [tasks.gone]
        command = ["id"]
        apiKeyNames = ["ci"]
        user = "{gone}"
        """)
    assert server.post("gone", key=tokens["ci"]).json["status"] == "success"
    _iso_run("userdel", gone)
    out = server.post("gone", key=tokens["ci"]).json
    assert (out["status"], out["exit_code"]) == ("failure", -2), out
    assert f"unknown user {gone!r}" in out["stderr"], out


def test_get_config_shows_the_isolation_settings(start_server):
    server, tokens = start_server("""
        [tasks.shown]
        command = ["true"]
        apiKeyNames = ["ci"]
        umask = "0027"
        inheritEnvironment = ["LANG"]
        allowedNetworks = ["127.0.0.1/32", "10.0.0.0/8"]
        limits = { openFiles = 64, cpuSeconds = 5 }

        [tasks.plain]
        command = ["true"]
        apiKeyNames = ["ci"]

        [auth]
        configEndpointEnabled = true
        [auth.keyPermissions]
        ci = ["system:config_read"]
        """)
    tasks = server.get("/config", key=tokens["ci"]).json["tasks"]
    shown = {k: tasks["shown"][k] for k in ("user", "group", "umask", "inheritEnvironment", "allowedNetworks", "limits")}
    assert shown == {"user": None, "group": None, "umask": "0027", "inheritEnvironment": ["LANG"],
                     "allowedNetworks": ["127.0.0.1/32", "10.0.0.0/8"],
                     "limits": {"openFiles": 64, "cpuSeconds": 5}}, shown
    assert (tasks["plain"]["inheritEnvironment"], tasks["plain"]["limits"]) == (True, {}), tasks["plain"]


def _iso_request(server, method, path, source="127.0.0.1", headers=None, body=b"") -> Response:
    """A request whose TCP source address is ``source`` (any 127/8 address works on Linux)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30, source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Response(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


_ISO_NET_CONFIG = f"""
    [tasks.net]
    command = ["echo", "ran"]
    apiKeyNames = ["ci"]
    async = true
    allowedNetworks = ["127.0.0.1/32"]
    webhookSecrets = {{ w = "{_ISO_SECRET}" }}

    [tasks.nethook]
    command = ["echo", "ran"]
    allowedNetworks = ["127.0.0.1/32"]
    signedWebhook = {{ provider = "hmac-sha256", secret = "{_ISO_SECRET}-hook" }}
    """


def test_allowed_networks_refuses_other_addresses_before_credentials(start_server):
    server, tokens = start_server(_ISO_NET_CONFIG)
    auth = {"Authorization": f"Bearer {tokens['ci']}"}
    ok = _iso_request(server, "POST", "/tasks/net", headers=auth)
    assert ok.status == 200, ok
    run_id = ok.json["task_id"]
    far = "127.0.0.2"
    for method, path, headers in (("POST", "/tasks/net", {}), ("POST", "/tasks/net", auth),
                                  ("GET", f"/tasks/net/{run_id}", auth), ("GET", "/tasks/net", auth),
                                  ("DELETE", f"/tasks/net/{run_id}", auth),
                                  ("GET", f"/tasks/net/{run_id}/events", auth), ("POST", "/hooks/nethook", {})):
        refused = _iso_request(server, method, path, far, headers)
        assert (refused.status, refused.json["error"]) == (403, "forbidden"), (method, path, refused)
    assert [t["name"] for t in _iso_request(server, "GET", "/tasks", headers=auth).json["tasks"]] == ["net"]
    assert _iso_request(server, "GET", "/tasks", far, auth).json["tasks"] == []
    assert server.metric("task_rejection_total", handler="net", reason="network_not_allowed") == 6
    assert server.metric("task_rejection_total", handler="nethook", reason="network_not_allowed") == 1
    assert server.metric("task_rejection_total", handler="net", reason="missing_key") == 0


def test_plain_webhook_from_a_disallowed_network_is_404_like_an_unknown_secret(start_server):
    server, _ = start_server(_ISO_NET_CONFIG)
    refused = _iso_request(server, "POST", f"/wh/{_ISO_SECRET}", "127.0.0.2")
    unknown = _iso_request(server, "POST", "/wh/not-a-secret", "127.0.0.2")
    assert (refused.status, refused.body) == (unknown.status, unknown.body) == (
        404, b'{"error": "not_found", "message": "There is nothing at this path."}\n'), refused
    assert server.metric("task_rejection_total", handler="net", reason="network_not_allowed") == 1
    assert _iso_request(server, "POST", f"/wh/{_ISO_SECRET}").status == 200


def test_allowed_networks_use_the_address_behind_a_trusted_proxy(tmp_path):
    (tmp_path / "config.toml").write_text(textwrap.dedent("""
        [tasks.internal]
        command = ["echo", "ran"]
        apiKeyNames = ["ci"]
        allowedNetworks = ["10.0.0.0/8"]
        """))
    key = new_key(tmp_path, "ci")
    server = _IgServer(tmp_path, run_args=["--trusted-proxy", "127.0.0.1"])
    try:
        inside = server.request("POST", "/tasks/internal", key=key, headers={"X-Forwarded-For": "10.1.2.3"})
        assert inside.status == 200 and inside.json["stdout"] == "ran\n", inside
        outside = server.request("POST", "/tasks/internal", headers={"X-Forwarded-For": "10.1.2.3, 192.0.2.9"})
        assert (outside.status, outside.json["error"]) == (403, "forbidden"), outside
        direct = server.request("POST", "/tasks/internal", key=key)  # the proxy's own address
        assert direct.status == 403, direct
    finally:
        server.stop()


def test_check_config_names_task_and_field_of_bad_isolation_settings(tmp_path):
    out = _ck_check(tmp_path, """
        [tasks.bad]
        command = ["true"]
        apiKeyNames = ["ci"]
        user = "rtask-no-such-user"
        group = "rtask-no-such-group"
        umask = 27
        inheritEnvironment = "yes"
        allowedNetworks = ["10.0.0.0/33", "10.0.0.0/8"]
        limits = { processes = -1, openFiles = 1.5, fileSizeBytes = 0, stackBytes = 1 }

        [tasks.bad2]
        command = ["true"]
        apiKeyNames = ["ci"]
        umask = "0999"
        limits = { memoryBytes = 0 }
        """)
    assert out.returncode == 1, out
    where = "config.toml: task 'bad'"
    for expected in (f"{where}: field 'user' names the unknown user 'rtask-no-such-user'",
                     f"{where}: field 'group' names the unknown group 'rtask-no-such-group'",
                     f"{where}: field 'umask' must be an octal string",
                     f"{where}: field 'inheritEnvironment' must be true, false or an array",
                     f"{where}: field 'allowedNetworks' has a value that is not an IP address or network",
                     f"{where}: [limits]: field 'processes' must be at least 1",
                     f"{where}: [limits]: field 'openFiles' must be a whole number",
                     f"{where}: [limits]: unknown field 'stackBytes'",
                     "config.toml: task 'bad2': field 'umask' must be an octal string",
                     "config.toml: task 'bad2': [limits]: field 'memoryBytes' must be at least 1"):
        assert expected in out.stderr, (expected, out.stderr)
    assert "fileSizeBytes" not in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.count("error: ") == 10, out.stderr


def test_limit_above_the_servers_hard_limit_is_refused_at_start_up(tmp_path):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        pytest.skip("the open-files hard limit is unlimited here")
    out = _ck_check(tmp_path, f"""
        [tasks.wide]
        command = ["true"]
        apiKeyNames = ["ci"]
        limits = {{ openFiles = {hard + 1} }}
        """)
    assert out.returncode == 1 and (f"task 'wide': [limits]: field 'openFiles' is {hard + 1}, above the "
                                    f"server's hard limit {hard}") in out.stderr, out


def _iso_unprivileged_copy(owner: str) -> Path:
    """A directory the test user owns, holding rtask.py and the third-party packages it needs
    (the test interpreter may live under /root, which the user cannot read)."""
    import pwd
    import shutil
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="rtask-t-"))
    shutil.copy(RTASK, d / "rtask.py")
    site = Path(cbor2.__file__).parent.parent
    for name in ("argon2", "_argon2_cffi_bindings", "cffi", "cbor2", "prometheus_client"):
        shutil.copytree(site / name, d / "pp" / name)
    for backend in site.glob("_cffi_backend*.so"):
        shutil.copy(backend, d / "pp" / backend.name)
    entry = pwd.getpwnam(owner)
    for path in [d, *d.rglob("*")]:
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return d


class _IsoServerAs(Server):
    """``rtask run`` started as an ordinary user (setpriv) from a directory it owns."""

    def __init__(self, d: Path, user: str):
        import pwd
        entry = pwd.getpwnam(user)
        self.workdir, self.log_path = d, d / "server.log"
        self._log = open(self.log_path, "wb")
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": str(d / "pp"), "HOME": str(d)}
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups",
             "/usr/bin/python3", str(d / "rtask.py"), "run", "--api-address", "127.0.0.1:0",
             "--metrics-address", "127.0.0.1:0"],
            cwd=d, env=env, stdout=self._log, stderr=subprocess.STDOUT)


def test_server_as_an_ordinary_user_refuses_user_and_applies_limits(_iso_users):
    import pwd
    import shutil
    if not Path("/usr/bin/python3").exists() or not shutil.which("setpriv"):
        pytest.skip("needs /usr/bin/python3 and setpriv")
    user = _iso_users.user()
    entry = pwd.getpwnam(user)
    d = _iso_unprivileged_copy(user)
    try:
        (d / "config.toml").write_text(textwrap.dedent("""
            [tasks.as_root]
            command = ["true"]
            apiKeyNames = ["ci"]
            user = "root"
            """))
        refused = _IsoServerAs(d, user)
        assert refused.proc.wait(60) == 1, refused.log()
        refused.stop()
        assert "task 'as_root': field 'user' is 'root', but the server runs as " + user in refused.log()

        (d / "config.toml").write_text(textwrap.dedent("""
            [tasks.limited]
            command = ["sh", "-c", "id -u; ulimit -n; trap '' TERM; sleep 60"]
            apiKeyNames = ["ci"]
            executionTimeoutSeconds = 1
            limits = { openFiles = 64 }
            """))
        key = new_key(d, "ci")
        os.chown(d / "keys.toml", entry.pw_uid, entry.pw_gid)
        server = _IsoServerAs(d, user)
        try:
            server.port, server.metrics_port = server._wait_for_ports()
            started = time.monotonic()
            out = server.post("limited", key=key).json
            assert (out["status"], out["stdout"].split()) == ("timeout", [str(entry.pw_uid), "64"]), out
            assert time.monotonic() - started < 10, out
        finally:
            server.stop()
    finally:
        shutil.rmtree(d, ignore_errors=True)


# =============================================================================================
# ===== Availability under exhaustion: threads, descriptors, one greedy client, reloads =====
# =============================================================================================

_AV_CONFIG = """
[tasks.hello]
command = ["true"]
apiKeyNames = ["ci"]
"""


class _AvServer(Server):
    """A ``rtask run`` like the shared fixture, started through ``prefix`` (prlimit, setpriv:
    the test's means, not the server's), with options after ``run``."""

    def __init__(self, workdir: Path, run_args=(), prefix=(), env=None, **popen):
        self.workdir = workdir
        self.log_path = workdir / "server.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, RTASK, "run", "--api-address", "127.0.0.1:0",
             "--metrics-address", "127.0.0.1:0", *run_args],
            cwd=workdir, env=env or _ck_env(), stdout=self._log, stderr=subprocess.STDOUT, **popen)
        try:
            self.port, self.metrics_port = self._wait_for_ports()
        except BaseException:
            self.stop()
            raise


def _av_connect(port: int, source: str = "127.0.0.1", timeout=10.0) -> socket.socket:
    """A TCP connection from ``source`` (any 127.0.0.0/8 address: another client to the server)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def _av_get(port: int, path: str = "/health", source: str = "127.0.0.1", timeout=5.0) -> bytes:
    """GET ``path`` on a fresh connection from ``source``; the raw answer (b"" if none)."""
    try:
        with _av_connect(port, source, timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            return data
    except OSError:
        return b""


def _av_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _av_log_lines_since(server: Server, offset: int) -> list[str]:
    return server.log()[offset:].splitlines()


# ---------------------------------------------------------------------------------------------
# Item 1: a thread that cannot start gives its connection slot back
# ---------------------------------------------------------------------------------------------


def _av_shadowed_ancestor(path: str) -> str | None:
    """The first directory above ``path`` that others may not enter (/root for a Python built
    into root's home), or None."""
    parts = Path(path).resolve().parts
    for i in range(2, len(parts)):
        ancestor = Path(*parts[:i])
        if not ancestor.stat().st_mode & 0o001:
            return str(ancestor)
    return None


def _av_as_user_prefix(user: str, scratch: Path) -> list[str]:
    """argv prefix that runs a command as ``user`` (real and effective ids, no capabilities).
    When this Python lives under a directory others may not enter, a private mount namespace
    shows that directory as one holding only the Python tree (mode 755); nothing else changes."""
    as_user = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    hidden = _av_shadowed_ancestor(sys.base_prefix)
    if hidden is None:
        return as_user
    inner = Path(hidden, Path(sys.base_prefix).resolve().relative_to(hidden).parts[0])
    shadow = scratch / "shadow"
    (shadow / inner.name).mkdir(parents=True)
    shadow.chmod(0o755)
    script = (f'mount --bind "{inner}" "{shadow / inner.name}" && mount --rbind "{shadow}" "{hidden}" '
              f'&& exec "$@"')
    return ["unshare", "--mount", "sh", "-c", script, "sh", *as_user]


@pytest.fixture
def _av_user():
    """A fresh system user for the test, removed at the end (needs root)."""
    if os.geteuid() != 0:
        print("SKIPPED: needs root to create a user (RLIMIT_NPROC does not bind root)")
        pytest.skip("needs root to create a user (RLIMIT_NPROC does not bind root)")
    name = f"rtask-t1-{secrets.token_hex(4)}"
    subprocess.run(["useradd", "--system", "--no-create-home", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def test_av_thread_that_cannot_start_gives_its_slot_back(_av_user):
    """Issue 9.1: with RLIMIT_NPROC lowered so that no thread can start, ~1100 requests get
    503 (or a close); once the limit is lifted the server serves again by itself, on both
    listeners, and the episode cost a bounded number of log lines and no traceback."""
    scratch = Path(tempfile.mkdtemp(prefix="rtask-t1-"))
    scratch.chmod(0o755)  # the user reaches its work directory by its absolute path too (state dir)
    try:
        work = scratch / "work"
        work.mkdir()
        (work / "config.toml").write_text(textwrap.dedent(_AV_CONFIG))
        subprocess.run(["chown", "-R", f"{_av_user}:{_av_user}", str(work)], check=True)
        server = _AvServer(work, prefix=_av_as_user_prefix(_av_user, scratch))
        try:
            pids = [server.proc.pid, server.worker_pid()]  # the supervisor (metrics), the worker (API)
            for pid in pids:
                uid = int(re.search(r"^Uid:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M).group(1))
                assert uid != 0, "the server must run as the ordinary user"
            assert b" 200 " in _av_get(server.port).split(b"\r\n")[0]
            time.sleep(1.0)  # the thread of that connection has ended
            # RLIMIT_NPROC counts every thread of the user: both processes' threads are its all.
            tasks = sum(_rs_proc_status(pid)["Threads"] for pid in pids)
            before = len(server.log())
            # (as the user itself: the kernel here refuses root's prlimit on another user's process)
            as_user = ["setpriv", f"--reuid={_av_user}", f"--regid={_av_user}", "--clear-groups", "prlimit"]
            hard = re.search(r"^Max processes\s+\S+\s+(\S+)", Path(f"/proc/{pids[0]}/limits").read_text(), re.M)[1]
            for pid in pids:
                subprocess.run([*as_user, f"--pid={pid}", f"--nproc={tasks}:"], check=True)
            try:
                answers = [_av_get(server.port, timeout=5) for _ in range(1100)]
                scrapes = [_av_get(server.metrics_port, "/metrics", timeout=5) for _ in range(100)]
            finally:
                for pid in pids:
                    subprocess.run([*as_user, f"--pid={pid}", f"--nproc={hard}:"], check=True)
            served = [a for a in answers if b" 200 " in a.split(b"\r\n")[0]]
            assert not served, "threads could start after all: the limit did not bind"
            refused = [a for a in answers if a.startswith(b"HTTP/1.1 503 ")]
            assert len(refused) >= 1000, f"only {len(refused)} of 1100 got a 503"
            assert not any(b" 200 " in s.split(b"\r\n")[0] for s in scrapes)
            wait_for(lambda: b" 200 " in _av_get(server.port).split(b"\r\n")[0], timeout=10, interval=0.1)
            after = [_av_get(server.port) for _ in range(50)]
            assert all(b" 200 " in a.split(b"\r\n")[0] for a in after), after[:3]
            metrics = [_av_get(server.metrics_port, "/metrics") for _ in range(80)]  # more than its cap
            assert all(b"python_info" in m for m in metrics)
            lines = _av_log_lines_since(server, before)
            assert not any("Traceback" in line for line in lines), "\n".join(lines[:40])
            assert len(lines) <= 8, "\n".join(lines[:40])
            assert any("resource exhausted" in line for line in lines)
            _rs_note("log lines for 1100 requests without threads", len(lines))
        finally:
            server.stop()
    finally:
        subprocess.run(["rm", "-rf", str(scratch)])


# ---------------------------------------------------------------------------------------------
# Item 2: one address cannot fill the cap; idle connections make room
# ---------------------------------------------------------------------------------------------


def test_av_one_address_cannot_lock_out_the_others(start_server):
    """Issue 9.2: 1100 idle connections from 127.0.0.1 take at most a quarter of the default
    cap (the rest are refused at once); a client from 127.0.0.2 is served at once."""
    _rs_raise_nofile(1500)
    server, _ = start_server(_AV_CONFIG, keys=())
    share = int(rtask.MAX_CONNECTIONS * rtask.CONNECTION_SHARE_PER_ADDRESS)
    socks, refused = [], 0
    try:
        for _ in range(1100):
            s = _av_connect(server.port)
            socks.append(s)
        closed = _rs_wait_closed({s: "idle" for s in socks}, time.monotonic() + 5)
        refused = len(closed)
        start = time.monotonic()
        answer = _av_get(server.port, source="127.0.0.2")
        seconds = time.monotonic() - start
        _rs_note("other address served with 1100 idle connections of one, s", round(seconds, 3))
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert seconds < 2.0
        assert refused == 1100 - share, f"{1100 - refused} connections of one address kept (share {share})"
    finally:
        for s in socks:
            s.close()


def test_av_full_cap_of_idle_connections_makes_room(tmp_path):
    """Issue 9.2: when the cap is full of idle keep-alive connections from several addresses,
    the one idle longest is closed and a new client is served at once; connections that are
    not idle (a request half sent) are never closed for room: then the newcomer gets 503."""
    workdir = tmp_path
    (workdir / "config.toml").write_text(textwrap.dedent(_AV_CONFIG))
    server = _AvServer(workdir, run_args=("--max-connections", "8"))
    idle = []
    try:
        for i in range(8):  # 4 addresses × 2 (the share of a cap of 8)
            s = _av_connect(server.port, f"127.0.0.{1 + i // 2}")
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # served, then kept alive: idle
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
            idle.append(s)
            time.sleep(0.05)
        answer = _av_get(server.port, source="127.0.0.5")
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        closed = _rs_wait_closed({s: "idle" for s in idle}, time.monotonic() + 3)
        assert list(closed) == [idle[0]], "exactly the connection idle longest is closed"
        assert rtask.connection_share(8) == 2 and rtask.connection_share(1) == 1
    finally:
        for s in idle:
            s.close()
        server.stop()
    # A cap full of busy connections (requests half sent): no room is made, 503 at once.
    server = _AvServer(workdir, run_args=("--max-connections", "8", "--max-connections-per-address", "8"))
    busy = []
    try:
        for _ in range(8):
            s = _av_connect(server.port)
            s.sendall(b"GET /health HTTP/1.1\r\nX-Partial: a")
            busy.append(s)
        wait_for(lambda: _rs_proc_status(server.worker_pid())["Threads"] >= 8, timeout=5)
        answer = _av_get(server.port, source="127.0.0.5")
        assert answer.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: 1\r\n" in answer, answer[:200]
    finally:
        for s in busy:
            s.close()
        server.stop()


@pytest.mark.parametrize("option, value", [("--max-connections", "0"), ("--max-connections", "x"),
                                           ("--max-connections-per-address", "-1")])
def test_av_connection_options_are_checked(tmp_path, option, value):
    (tmp_path / "config.toml").write_text(textwrap.dedent(_AV_CONFIG))
    out = rtask_cli("run", option, value, cwd=tmp_path, timeout=15)
    assert out.returncode != 0 and option in out.stderr and "Traceback" not in out.stderr, out.stderr


# ---------------------------------------------------------------------------------------------
# Item 3: out of descriptors, the accept loops back off instead of spinning
# ---------------------------------------------------------------------------------------------


def test_av_accept_backs_off_when_out_of_descriptors(tmp_path):
    """Issue 9.3: a server with 64 descriptors and 200 connections (plus 20 to the metrics
    listener) waiting in its backlog uses little CPU while it cannot accept, logs a line or
    two, and serves again once connections close."""
    (tmp_path / "config.toml").write_text(textwrap.dedent(_AV_CONFIG))
    server = _AvServer(tmp_path, prefix=["prlimit", "--nofile=64:64"])
    socks = []
    try:
        pids = [server.proc.pid, server.worker_pid()]  # the supervisor (metrics), the worker (API)
        before = len(server.log())
        for port in [server.port] * 200 + [server.metrics_port] * 20:
            s = socket.socket()
            s.setblocking(False)  # beyond the backlogs a connect would wait
            s.connect_ex(("127.0.0.1", port))
            socks.append(s)
        time.sleep(1.0)  # the server runs out of descriptors
        cpu, start = sum(map(_av_cpu_seconds, pids)), time.monotonic()
        time.sleep(2.0)
        per_second = (sum(map(_av_cpu_seconds, pids)) - cpu) / (time.monotonic() - start)
        _rs_note("CPU s/s while out of descriptors", round(per_second, 3))
        assert per_second < 0.3, f"{per_second:.2f} s of CPU per second while it cannot accept"
        lines = _av_log_lines_since(server, before)
        assert 1 <= len(lines) <= 4, "\n".join(lines[:20])
        assert all("resource exhausted" in line for line in lines), lines
        for s in socks:
            s.close()
        wait_for(lambda: _av_get(server.port).startswith(b"HTTP/1.1 200 "), timeout=10, interval=0.2)
        wait_for(lambda: b"python_info" in _av_get(server.metrics_port, "/metrics"), timeout=10, interval=0.2)
        assert "resource available again" in server.log()
    finally:
        for s in socks:
            s.close()
        server.stop()


# ---------------------------------------------------------------------------------------------
# Item 4: slow clients cannot blind the metrics listener
# ---------------------------------------------------------------------------------------------


def test_av_slow_metrics_clients_do_not_blind_scrapes(start_server):
    """Issue 9.4: 64 connections trickle a header byte every 2 s (each read well within the
    socket timeout) for ~12 s, reopening when closed, while another address scrapes every
    0.5 s: all scrapes but at most one succeed, and a trickling connection is closed
    METRICS_REQUEST_TIMEOUT after it opened, however steadily it sends."""
    server, _ = start_server(_AV_CONFIG, keys=())
    port = server.metrics_port
    stop = threading.Event()
    lifetimes: list[float] = []

    def trickle():
        while not stop.is_set():
            try:
                s = _av_connect(port)
            except OSError:
                time.sleep(0.1)
                continue
            opened = time.monotonic()
            try:
                s.sendall(b"GET /metrics HTTP/1.1\r\nX-A: ")
                while not stop.wait(2.0):
                    try:
                        s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        s.sendall(b"a")  # still open: one more byte
                    else:
                        raise ConnectionAbortedError  # the server answered or closed: cut off
            except OSError:
                lifetimes.append(time.monotonic() - opened)
            finally:
                s.close()

    trickers = [threading.Thread(target=trickle, daemon=True) for _ in range(64)]
    for t in trickers:
        t.start()
    try:
        time.sleep(1.0)
        results = []
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            results.append(b"python_info" in _av_get(port, "/metrics", source="127.0.0.2", timeout=5))
            time.sleep(0.5)
    finally:
        stop.set()
        for t in trickers:
            t.join(5)
    _rs_note("scrapes served while 64 clients trickle", f"{sum(results)} of {len(results)}")
    assert sum(results) >= len(results) - 1, results
    # (refused ones fail on their first or second send, within ~4 s)
    cut = [t for t in lifetimes if rtask.METRICS_REQUEST_TIMEOUT - 1 < t < rtask.METRICS_REQUEST_TIMEOUT + 3]
    assert cut, sorted(lifetimes)[-5:]


# ---------------------------------------------------------------------------------------------
# Item 5: an interrupted add-key leaves no temporary file for long
# ---------------------------------------------------------------------------------------------


def test_av_add_and_remove_key_clean_up_interrupted_writes(tmp_path):
    """Issue 9.5: the next add-key / remove-key removes the temporary files an interrupted
    one left beside keys.toml, and only those."""
    leftovers = [".keys.toml.abcd_123.tmp", ".keys.toml.zz9xk2q0.tmp"]
    others = [".keys.toml.abcd1234.tmp.keep", ".keys.toml.ABCD1234.tmp", ".other.toml.abcd1234.tmp",
              "keys.toml.abcd1234.tmp", ".keys.toml.abc.tmp", "notes.txt"]
    for name in leftovers + others:
        (tmp_path / name).write_text("x")
    (tmp_path / "target").write_text("kept")
    (tmp_path / ".keys.toml.lnk12345.tmp").symlink_to(tmp_path / "target")
    new_key(tmp_path, "ci")
    assert not any((tmp_path / n).exists() for n in leftovers)
    assert all((tmp_path / n).exists() for n in others)
    assert (tmp_path / ".keys.toml.lnk12345.tmp").is_symlink() and (tmp_path / "target").read_text() == "kept"
    (tmp_path / leftovers[0]).write_text("x")
    out = rtask_cli("remove-key", "ci", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / leftovers[0]).exists()
    assert all((tmp_path / n).exists() for n in others)


# ---------------------------------------------------------------------------------------------
# Item 15: SIGHUP re-reads the TLS certificate
# ---------------------------------------------------------------------------------------------


def _av_peer_certificate(port: int) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw) as tls:
            return tls.getpeercert(binary_form=True)


def test_av_sighup_rereads_the_tls_certificate(tmp_path):
    """Issue 9.15: after the pair is renewed and SIGHUP sent, new connections on both
    listeners get the new certificate; an unreadable pair is an error line and the pair in
    use stays."""
    (tmp_path / "config.toml").write_text(textwrap.dedent(_AV_CONFIG))
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    old_dir.mkdir()
    new_dir.mkdir()
    cert, key = _ig_make_certificate(old_dir)
    new_cert, new_key_path = _ig_make_certificate(new_dir)
    live_cert, live_key = tmp_path / "cert.pem", tmp_path / "key.pem"
    live_cert.write_bytes(cert.read_bytes())
    live_key.write_bytes(key.read_bytes())
    der = ssl.PEM_cert_to_DER_cert
    server = _AvServer(tmp_path, run_args=("--tls-cert", str(live_cert), "--tls-key", str(live_key)))
    try:
        for port in (server.port, server.metrics_port):
            assert _av_peer_certificate(port) == der(cert.read_text())
        live_cert.write_bytes(new_cert.read_bytes())
        live_key.write_bytes(new_key_path.read_bytes())
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "TLS certificate reloaded" in server.log(), timeout=10)
        for port in (server.port, server.metrics_port):
            assert _av_peer_certificate(port) == der(new_cert.read_text())
        live_key.write_bytes(key.read_bytes())  # a mismatched pair
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "TLS certificate reload failed" in server.log(), timeout=10)
        for port in (server.port, server.metrics_port):
            assert _av_peer_certificate(port) == der(new_cert.read_text())
        assert "Traceback" not in server.log()
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# Item 16: a missing keys.toml is a warning
# ---------------------------------------------------------------------------------------------


def test_av_missing_keys_file_is_a_warning(start_server):
    """Issue 9.16: keys.toml removed under a running server (every key now 401) and a start
    without it, while tasks name keys, are warnings naming the file."""
    server, tokens = start_server(_AV_CONFIG)
    assert server.post("hello", key=tokens["ci"]).status == 200
    keys = server.workdir / "keys.toml"
    keys.unlink()
    time.sleep(rtask.KEY_FILE_CHECK_INTERVAL + 0.2)
    assert server.post("hello", key=tokens["ci"]).status == 401
    line = wait_for(lambda: next((l for l in server.log().splitlines() if "missing" in l), None), timeout=5)
    assert line.split()[1] == "warning" and str(keys.name) in line, line
    server.stop()
    fresh = _AvServer(server.workdir)
    try:
        startup = [l for l in fresh.log().splitlines() if "missing" in l]
        assert startup and startup[0].split()[1] == "warning" and "keys.toml" in startup[0], fresh.log()
    finally:
        fresh.stop()


# ---------------------------------------------------------------------------------------------
# Item 20: signals are handled before anything can observe the server
# ---------------------------------------------------------------------------------------------


def _av_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_av_sighup_as_soon_as_the_port_answers_reloads(tmp_path):
    """Issue 9.20: a SIGHUP sent the moment the API port accepts a connection reloads the
    server (five starts in a row), rather than killing it with the signal's default action."""
    (tmp_path / "config.toml").write_text(textwrap.dedent(_AV_CONFIG))
    for attempt in range(5):
        port = _av_free_port()
        log_path = tmp_path / f"server{attempt}.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen([sys.executable, RTASK, "run", "--api-address", f"127.0.0.1:{port}",
                                     "--metrics-address", "127.0.0.1:0"], cwd=tmp_path, env=_ck_env(),
                                    stdout=log_file, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and proc.poll() is None:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        proc.send_signal(signal.SIGHUP)
                        break
            time.sleep(0.5)
            assert proc.poll() is None, f"attempt {attempt}: SIGHUP killed the server:\n{log_path.read_text()}"
            wait_for(lambda: "configuration reloaded" in log_path.read_text(), timeout=5)
        finally:
            proc.terminate()
            proc.wait(15)


def test_av_process_that_cannot_start_for_want_of_descriptors_is_503(start_server):
    """Issue 9.1, the executor: with the server out of descriptors (RLIMIT_NOFILE lowered
    under it), a run whose pipes cannot be made gives its slot back and is answered 503 with
    Retry-After (sync and async), with no traceback; once descriptors are back, runs start."""
    server, tokens = start_server('''
        [tasks.hello]
        command = ["true"]
        apiKeyNames = ["ci"]
        maxConcurrentTasks = 1

        [tasks.later]
        command = ["true"]
        apiKeyNames = ["ci"]
        async = true
        maxConcurrentTasks = 1
        ''')
    pid = server.worker_pid()
    soft = resource.prlimit(pid, resource.RLIMIT_NOFILE)[0]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    headers = {"Authorization": f"Bearer {tokens['ci']}", "Content-Length": "0"}

    def post(task):
        conn.request("POST", f"/tasks/{task}", headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.headers, json.loads(resp.read())

    try:
        assert post("hello")[0] == 200  # the connection's thread exists, the key is cached
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]))
        try:
            for task in ("hello", "later", "hello"):  # the same slot twice: it was given back
                status, resp_headers, body = post(task)
                assert (status, body["error"]) == (503, "unavailable"), (task, status, body)
                assert resp_headers["Retry-After"] == "1"
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]))
        status, _, body = post("hello")
        assert (status, body["status"]) == (200, "success"), body
        status, _, body = post("later")
        assert status == 200 and "task_id" in body, body
    finally:
        conn.close()
    assert "Traceback" not in server.log()


def test_av_key_check_without_memory_is_503_and_recovers(start_server):
    """Issue 9.1, Argon2: when its 64 MiB cannot be had (RLIMIT_AS lowered under the server),
    a key check is answered 503 with Retry-After and one log line, no traceback, no 500;
    with memory back, the same key works."""
    server, tokens = start_server(_AV_CONFIG)
    pid = server.worker_pid()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", "/health")
        assert conn.getresponse().read() and True  # the connection's thread and its arena exist
        hard = resource.prlimit(pid, resource.RLIMIT_AS)[1]
        size = int(re.search(r"^VmSize:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M)[1]) * 1024
        headers = {"Authorization": f"Bearer {tokens['ci']}", "Content-Length": "0"}
        resource.prlimit(pid, resource.RLIMIT_AS, (size + 16 * 1024 * 1024, hard))
        try:
            conn.request("POST", "/tasks/hello", headers=headers)
            resp = conn.getresponse()
            body = json.loads(resp.read())
        finally:
            resource.prlimit(pid, resource.RLIMIT_AS, (hard, hard))
        assert (resp.status, body["error"], resp.headers["Retry-After"]) == (503, "unavailable", "1"), body
        conn.request("POST", "/tasks/hello", headers=headers)
        resp = conn.getresponse()
        assert (resp.status, json.loads(resp.read())["status"]) == (200, "success")
    finally:
        conn.close()
    log_text = server.log()
    assert "Traceback" not in log_text and log_text.count("cannot verify a key now") == 1, log_text


# =============================================================================================
# ===== HTTP semantics, key spellings, Go names, pre-initialised metrics, call messages =====
# =============================================================================================
# Helpers of this section are prefixed _h2_. One shared server answers the HTTP tests; tests
# that need their own files or names start their own.

_H2_HOOK_SECRET = "h2-secret/with/slash/"
_H2_GITLAB_SECRET = "sécret-h2"


def _h2_config(d: Path) -> str:
    return f"""
[tasks.echo]
command = ["sh", "-c", "printf '%s' \\"$REQUEST_HEADER_X_NAME\\" | od -An -tx1 | tr -d ' \\\\n'"]
apiKeyNames = ["ci"]
passRequestHeaders = ["X-Name"]
webhookSecrets = {{ hook = "{_H2_HOOK_SECRET}" }}

[tasks.slow]
command = ["sh", "-c", "echo started; sleep 30"]
apiKeyNames = ["ci"]
async = true
executionTimeoutSeconds = 40

[tasks.signed]
command = ["true"]
[tasks.signed.signedWebhook]
provider = "gitlab"
secret = "{_H2_GITLAB_SECRET}"
"""


@pytest.fixture(scope="module")
def _h2(tmp_path_factory):
    d = tmp_path_factory.mktemp("h2")
    (d / "config.toml").write_text(_h2_config(d))
    ci = new_key(d, "ci")
    server = Server(d)
    try:
        run_id = server.post("echo", key=ci).json["task_id"]
        slow_id = server.post("slow", key=ci).json["task_id"]
        yield types.SimpleNamespace(server=server, ci=ci, run_id=run_id, slow_id=slow_id, dir=d)
    finally:
        server.stop()


def _h2_exchange(server, *requests: bytes, timeout=5.0) -> bytes:
    """Send requests on one keep-alive connection (the last should say Connection: close);
    everything the server sent until it closed."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        s.sendall(b"".join(requests))
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (socket.timeout, ConnectionResetError):
            pass
    return b"".join(chunks)


def _h2_request(method, path, headers=(), close=False) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: x", *headers]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _h2_split_head(data: bytes) -> tuple[int, dict, bytes]:
    """(status, lower-cased headers without Date, the bytes after the head)."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, data
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.lower() != "date":
            headers[name.lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers, rest


def _h2_head_and_get(server, path, headers=()) -> tuple[tuple, tuple]:
    """((status, headers, bytes after the head) of a HEAD followed on its connection by a
    GET /health, (status, headers, body) of a GET of the same path on a connection of its own,
    so that an answer that closes its connection is still compared)."""
    head = _h2_split_head(_h2_exchange(
        server, _h2_request("HEAD", path, headers) + _h2_request("GET", "/health", close=True)))
    get = _h2_split_head(_h2_exchange(server, _h2_request("GET", path, headers, close=True)))
    return head, get


def _h2_www_authenticate(r: Response) -> str:
    return r.headers.get("WWW-Authenticate", "")


# -- HEAD --------------------------------------------------------------------------------------


def test_head_is_answered_like_get_without_a_body_on_every_route(_h2):
    """Status, headers and Content-Length as GET, no body: the next answer on the connection
    starts right after the head (curl -I, wget --spider, Node's keep-alive agent)."""
    s, key = _h2.server, [f"Authorization: Bearer {_h2.ci}"]
    cases = [("/health", ()), ("/health/", ()), ("/health/live", ()), ("/health/ready", ()),
             ("/health/detailed", ()), ("/tasks", key), ("/tasks", ()), ("/tasks/echo", key),
             (f"/tasks/echo/{_h2.run_id}", key), ("/tasks/echo/aaaaaaaaaaaaaaaa", key),
             (f"/tasks/echo/{_h2.run_id}", ["Authorization: Bearer wrong"]), ("/nothing/here", ()),
             ("/wh/" + _H2_HOOK_SECRET, ()), ("/config", ()), ("/tasks/echo/x/y/z", key)]
    for path, headers in cases:
        (h_status, h_headers, after), (g_status, g_headers, g_body) = _h2_head_and_get(s, path, headers)
        assert after.startswith(b"HTTP/1.1 200 OK"), (path, after[:200])  # no body came before it
        g_headers.pop("connection", None)
        h_headers.pop("connection", None)
        if path == "/health/detailed":  # its uptime, so its length, changes between the two
            assert h_headers.pop("content-length") and g_headers.pop("content-length"), path
        else:
            assert h_headers["content-length"] == str(len(g_body)), path
        assert (h_status, h_headers) == (g_status, g_headers), path


def test_head_on_a_path_without_get_is_405_without_a_body_and_allow_lists_head(_h2):
    s = _h2.server
    status, headers, after = _h2_split_head(_h2_exchange(
        s, _h2_request("HEAD", "/hooks/signed") + _h2_request("GET", "/health", close=True)))
    assert (status, headers["allow"]) == (405, "POST")
    assert after.startswith(b"HTTP/1.1 200 OK"), after[:200]
    r = s.request("PUT", f"/tasks/echo/{_h2.run_id}", key=_h2.ci)
    assert r.status == 405 and r.headers["Allow"] == "GET, HEAD, DELETE", (r, r.headers)
    r = s.request("PUT", "/health")
    assert r.status == 405 and r.headers["Allow"] == "GET, HEAD", (r, r.headers)


def test_head_on_an_event_stream_sends_its_headers_and_no_stream(_h2):
    """The run is still running: a HEAD must not wait for it nor send any event."""
    started = time.monotonic()
    data = _h2_exchange(_h2.server, _h2_request("HEAD", f"/tasks/slow/{_h2.slow_id}/events",
                                                [f"Authorization: Bearer {_h2.ci}"]), timeout=10)
    assert time.monotonic() - started < 5
    status, headers, after = _h2_split_head(data)
    assert status == 200 and headers["content-type"] == "text/event-stream", data
    assert headers["x-accel-buffering"] == "no" and headers["cache-control"] == "no-cache"
    assert after == b"", after


@pytest.mark.parametrize("request_bytes, expected", [
    (b"HEAD /health HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n", 400),
    (b"HEAD /health HTTP/2.0\r\nHost: x\r\n\r\n", 400),
    (b"HEAD /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"HEAD /health HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n", 431),
], ids=["bad_header", "bad_version", "long_line", "long_header"])
def test_head_on_a_protocol_error_has_no_body(_h2, request_bytes, expected):
    data = _h2_exchange(_h2.server, request_bytes)
    status, headers, after = _h2_split_head(data)
    assert status == expected and int(headers["content-length"]) > 0 and after == b"", data


def test_head_has_no_side_effects_of_its_own(_h2):
    """HEAD goes to GET routes only: a HEAD on a task path never runs it."""
    runs = lambda: len(_h2.server.get("/tasks/echo", key=_h2.ci).json["runs"])  # noqa: E731
    before = runs()
    for path in ("/tasks/echo", "/tasks/echo/", "/wh/" + _H2_HOOK_SECRET):
        assert _h2.server.request("HEAD", path, key=_h2.ci).status in (200, 404)
    assert runs() == before


def test_metrics_listener_answers_head_like_get(_h2):
    with socket.create_connection(("127.0.0.1", _h2.server.metrics_port), timeout=5) as sock:
        sock.sendall(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status, headers, after = _h2_split_head(data)
    assert status == 200 and after == b"", data[:300]
    assert int(headers["content-length"]) > 1000  # GET's length, not 0
    assert headers["content-type"].startswith("text/plain")


# -- 401, trailing slash, header bytes, newline, SSE headers -----------------------------------


def test_every_401_carries_a_bearer_challenge(_h2):
    s = _h2.server
    missing = s.post("echo")
    assert missing.status == 401 and _h2_www_authenticate(missing) == 'Bearer realm="rtask"', missing.headers
    refused = [s.post("echo", key=_h2.ci[:-2] + "AA"), s.post("echo", key="notakey"),
               s.post("echo", headers={"Authorization": "Basic Zm9vOmJhcg=="}),
               s.get(f"/tasks/echo/{_h2.run_id}", headers={"X-API-Key": "wrong"}),
               s.request("POST", "/hooks/signed", headers={"X-Gitlab-Token": "wrong"})]
    for r in refused:
        assert r.status == 401, r
        assert _h2_www_authenticate(r) == 'Bearer realm="rtask", error="invalid_token"', (r, r.headers)


def test_a_trailing_slash_names_the_same_resource(_h2):
    s = _h2.server
    ran = s.request("POST", "/tasks/echo/", key=_h2.ci)
    assert ran.status == 200 and ran.json["status"] == "success", ran
    assert s.get("/tasks/", key=_h2.ci).status == 200
    assert s.get("/tasks/echo/", key=_h2.ci).json["task"] == "echo"
    assert s.get(f"/tasks/echo/{ran.json['task_id']}/", key=_h2.ci).json["task_id"] == ran.json["task_id"]
    assert s.get("/health/").json == {"status": "healthy"}
    assert s.get("/health/live/").json == {"status": "alive"}
    # Under /wh/ a final "/" belongs to the secret (secrets may hold '/').
    assert s.request("POST", "/wh/" + _H2_HOOK_SECRET).status == 200
    assert s.request("POST", "/wh/" + _H2_HOOK_SECRET.rstrip("/")).status == 404


@pytest.mark.parametrize("value", [b"caf\xc3\xa9", b"\xff\xfe raw", b"\xe2\x82\xac \xf0\x9f\x9a\x80"])
def test_header_values_reach_the_command_byte_for_byte(_h2, value):
    head = (f"POST /tasks/echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {_h2.ci}\r\n"
            "Content-Length: 0\r\nConnection: close\r\nX-Name: ").encode() + value + b"\r\n\r\n"
    status, _, body = _h2_split_head(_h2_exchange(_h2.server, head))
    assert status == 200 and json.loads(body)["stdout"] == value.hex(), body


def test_signed_webhook_token_is_compared_on_the_bytes_sent(_h2):
    """The GitLab token is the secret itself, UTF-8 on the wire; bytes that are not UTF-8 are
    a wrong token (401), never an error."""
    s = _h2.server
    good = (b"POST /hooks/signed HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n"
            b"X-Gitlab-Token: " + _H2_GITLAB_SECRET.encode() + b"\r\n\r\n")
    assert _h2_split_head(_h2_exchange(s, good))[0] == 200
    bad = good.replace(_H2_GITLAB_SECRET.encode(), b"s\xe9cret-h2")
    assert _h2_split_head(_h2_exchange(s, bad))[0] == 401


def test_json_answers_end_with_a_newline(_h2):
    s = _h2.server
    answers = [s.get("/health"), s.post("echo", key=_h2.ci), s.post("echo"), s.get("/nothing"),
               s.request("PUT", "/health")]
    for r in answers:
        assert r.body.endswith(b"}\n") and r.body.count(b"\n") == 1, r
        assert json.loads(r.body)
    status, headers, body = _h2_split_head(_h2.server.raw(b"GET /health HTTP/1.1\r\nHost: x\r\nbad\r\n\r\n"))
    assert status == 400 and body.endswith(b"}\n") and int(headers["content-length"]) == len(body), body


def test_event_streams_tell_proxies_not_to_buffer(_h2):
    s = _h2.server
    streamed = s.request("POST", "/tasks/echo", key=_h2.ci, headers={"Accept": "text/event-stream"})
    followed = s.get(f"/tasks/echo/{_h2.run_id}/events", key=_h2.ci)
    for r in (streamed, followed):
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream", r
        assert (r.headers["X-Accel-Buffering"], r.headers["Cache-Control"]) == ("no", "no-cache")
        assert b"event: result" in r.body


# -- one key, one spelling ---------------------------------------------------------------------


def _h2_other_spellings(token: str) -> dict[str, str]:
    """Spellings of the same (id, key) that are not the one add-key printed (id 1..23)."""
    raw = _ck_b64d(token)
    key_id, key = cbor2.loads(raw)[1], cbor2.loads(raw)[2]
    assert raw[:4] == b"\xa2\x01" + bytes([key_id]) + b"\x02" and len(raw) % 3  # {1: id, 2: key}
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    return {
        "trailing_char": token + "x",
        "trailing_block": token + "AAAAAAAA",
        "padding": token + "=" * (-len(token) % 4),
        "unused_bits_set": token[:-1] + alphabet[alphabet.index(token[-1]) | 1],
        "cbor_after_map": _ck_b64e(raw + b"\x00"),
        "extra_field": _ck_b64e(cbor2.dumps({1: key_id, 2: key, 3: 1})),
        "fields_reordered": _ck_b64e(cbor2.dumps({2: key, 1: key_id})),
        "long_int_form": _ck_b64e(raw[:2] + b"\x1a" + key_id.to_bytes(4, "big") + raw[3:]),
        "indefinite_bytes": _ck_b64e(raw[:4] + b"\x5f" + cbor2.dumps(key[:20]) + cbor2.dumps(key[20:]) + b"\xff"),
        "bool_field_key": _ck_b64e(b"\xa2\xf5" + raw[2:]),  # true == 1 to a Python dict
    }


def test_a_key_has_one_spelling_and_others_are_invalid_key_encoding(start_server):
    server, tokens = start_server("""
        [tasks.t]
        command = ["true"]
        apiKeyNames = ["ci", "second"]
        """, keys=("ci", "second"))
    token = tokens["second"]  # id 1: the map has both fields
    assert cbor2.loads(_ck_b64d(token))[1] == 1
    for name, spelling in _h2_other_spellings(token).items():
        assert spelling != token, name
        r = server.post("t", key=spelling)
        assert r.status == 401 and r.json["message"] == "The API key is malformed.", (name, spelling, r)
    assert server.metric("task_rejection_total", handler="t", reason="invalid_key_encoding") == \
        len(_h2_other_spellings(token))
    assert server.post("t", key=token).status == 200
    assert server.post("t", key=tokens["ci"]).status == 200  # id 0: no field 1 at all


def test_a_repeated_key_costs_one_argon2_run(start_server):
    """Cached by the decoded key: 20 uses of a key cost about one verification, not twenty."""
    server, tokens = start_server('[tasks.t]\ncommand = ["true"]\napiKeyNames = ["ci"]\n')
    started = time.monotonic()
    for _ in range(20):
        assert server.request("GET", "/tasks/t", key=tokens["ci"]).status == 200
    cached = time.monotonic() - started
    assert cached < 20 * 0.05 + 2, cached  # twenty Argon2 runs would take 20 x ~65 ms at least


@pytest.mark.parametrize("entry_change", ["extra_field", "bytes_after_map", "string_field_key"])
def test_a_stored_entry_of_another_shape_is_refused_naming_the_key(tmp_path, entry_change):
    new_key(tmp_path, "ci")
    entry = _ck_entries(tmp_path / "keys.toml")["ci"]
    raw = _ck_b64d(entry)
    fields = cbor2.loads(raw)
    changed = {"extra_field": lambda: cbor2.dumps({**fields, 7: 1}),
               "bytes_after_map": lambda: raw + b"\x01",
               "string_field_key": lambda: cbor2.dumps({**{k: v for k, v in fields.items() if k != 6}, "6": fields[6]}),
               }[entry_change]()
    (tmp_path / "keys.toml").write_text(f'ci = "{_ck_b64e(changed)}"\n')
    out = rtask_cli("list-keys", cwd=tmp_path)
    assert out.returncode == 1 and "'ci'" in out.stderr and "Traceback" not in out.stderr, out
    assert out.stderr.count("\n") == 1, out.stderr


# -- names as the Go RTask takes them -----------------------------------------------------------

_H2_ODD_TASK = "rel 1.0?x=%41#z:prod"


def test_go_style_task_and_key_names_work_end_to_end(start_server, tmp_path):
    server, tokens = start_server(f"""
        [tasks."build:prod"]
        command = ["sh", "-c", "echo prod $RTASK_TASK_NAME"]
        apiKeyNames = ["deploy key"]

        [tasks."{_H2_ODD_TASK}"]
        command = ["echo", "odd"]
        apiKeyNames = ["ci"]

        [auth]
        configEndpointEnabled = true

        [auth.keyPermissions]
        "deploy key" = ["tasks:read:{_H2_ODD_TASK}", "system:config_read"]
        "ci" = ["tasks:run:build:prod"]
        """, keys=("deploy key", "ci"))
    keys_text = (tmp_path / "keys.toml").read_text()
    assert tomllib.loads(keys_text).keys() == {"deploy key", "ci"}
    assert rtask_cli("list-keys", cwd=tmp_path).stdout.count("deploy key") == 1
    ran = server.post("build%3Aprod", key=tokens["deploy key"])
    assert ran.status == 200 and ran.json["stdout"] == "prod build:prod\n", ran
    assert server.post("build:prod", key=tokens["ci"]).status == 200  # keyPermissions with ':' in it
    odd = server.post(urllib.parse.quote(_H2_ODD_TASK, safe=""), key=tokens["ci"])
    assert odd.status == 200 and odd.json["stdout"] == "odd\n", odd
    assert server.get("/tasks/" + urllib.parse.quote(_H2_ODD_TASK, safe="") + "/" + odd.json["task_id"],
                      key=tokens["deploy key"]).status == 200
    config = server.get("/config", key=tokens["deploy key"]).json
    assert set(config["tasks"]) == {"build:prod", _H2_ODD_TASK} and "deploy key" in config["auth"]["keys"]
    assert server.metric("task_duration_seconds_count", handler="build:prod", api_key_used="deploy key",
                         status="success") == 1
    env = {**os.environ, "RTASK_URL": f"http://127.0.0.1:{server.port}", "RTASK_AUTH_TOKEN": tokens["ci"]}
    for name, expected in (("build:prod", "prod build:prod\n"), (_H2_ODD_TASK, "odd\n")):
        out = rtask_cli("call", name, cwd=tmp_path, env=env)
        assert (out.returncode, out.stdout) == (0, expected), out
    assert re.search(r'task="?build:prod', server.log())


@pytest.mark.parametrize("name", ["a/b", " lead", "trail ", "tab\tin", "new\nline", "del\x7f", ""])
def test_names_with_slash_control_or_surrounding_whitespace_are_refused(tmp_path, name):
    out = rtask_cli("add-key", name, cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out
    assert not (tmp_path / "keys.toml").exists()
    if name:
        (tmp_path / "config.toml").write_text(f'[tasks.{json.dumps(name)}]\ncommand = ["true"]\napiKeyNames = ["ci"]\n')
        out = rtask_cli("check-config", cwd=tmp_path)
        assert out.returncode == 1 and "'/'" in out.stderr and "Traceback" not in out.stderr, out


# -- metrics known at start-up exist at 0 --------------------------------------------------------


def test_series_known_at_start_exist_at_zero_and_after_a_reload(start_server, tmp_path):
    server, tokens = start_server("""
        [tasks.t]
        command = ["true"]
        apiKeyNames = ["ci"]
        webhookSecrets = { gh = "h2-preinit-secret" }
        """)
    text = server.metrics()
    for reason in ("missing_key", "invalid_header", "invalid_key_encoding", "invalid_key", "key_not_allowed",
                   "limit_exceeded", "max_concurrent", "input_too_large", "invalid_content"):
        assert f'task_rejection_total{{handler="t",reason="{reason}"}} 0.0' in text, reason
    for caller in ("ci", "gh"):
        for status in ("success", "failure", "timeout"):
            assert (f'task_duration_seconds_count{{api_key_used="{caller}",handler="t",status="{status}"}} 0.0'
                    in text), (caller, status)
            assert (f'task_duration_seconds_bucket{{api_key_used="{caller}",handler="t",le="+Inf",'
                    f'status="{status}"}} 0.0' in text)
    server.post("t")  # a first rejection is a step from 0 to 1
    assert server.metric("task_rejection_total", handler="t", reason="missing_key") == 1
    (tmp_path / "config.toml").write_text(textwrap.dedent("""
        [tasks.t]
        command = ["true"]
        apiKeyNames = ["ci"]

        [tasks.added]
        command = ["true"]
        apiKeyNames = ["ci"]
        """))
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: 'task_rejection_total{handler="added",reason="invalid_key"} 0.0' in server.metrics())
    text = server.metrics()
    assert 'task_duration_seconds_count{api_key_used="ci",handler="added",status="timeout"} 0.0' in text
    assert server.metric("task_rejection_total", handler="t", reason="missing_key") == 1  # kept


# -- rtask call: why a run did not succeed, Ctrl-C ------------------------------------------------

_H2_CALL_CONFIG = """
[tasks.slow_silent]
command = ["sleep", "30"]
apiKeyNames = ["ci"]
executionTimeoutSeconds = 0.5

[tasks.killed]
command = ["sh", "-c", "kill -9 $$"]
apiKeyNames = ["ci"]

[tasks.exit3]
command = ["sh", "-c", "exit 3"]
apiKeyNames = ["ci"]

[tasks.speaks]
command = ["sh", "-c", "echo 'my own reason' >&2; exit 4"]
apiKeyNames = ["ci"]

[tasks.missing]
command = ["/nonexistent/h2-program"]
apiKeyNames = ["ci"]

[tasks.background]
command = ["sh", "-c", "echo begun; sleep 30"]
apiKeyNames = ["ci"]
async = true
executionTimeoutSeconds = 40
"""


def _h2_call(server, token, *args, cwd, timeout=30):
    env = {**os.environ, "RTASK_URL": f"http://127.0.0.1:{server.port}", "RTASK_AUTH_TOKEN": token}
    return rtask_cli("call", *args, cwd=cwd, env=env, timeout=timeout)


def test_call_says_in_one_sentence_why_a_silent_run_did_not_succeed(start_server, tmp_path):
    server, tokens = start_server(_H2_CALL_CONFIG)
    cases = {"slow_silent": (124, "timed out after"), "killed": (1, "killed by a signal"),
             "exit3": (3, "exit code 3")}
    for task, (code, fragment) in cases.items():
        out = _h2_call(server, tokens["ci"], task, cwd=tmp_path)
        assert out.returncode == code, (task, out)
        assert out.stderr.count("\n") == 1 and fragment in out.stderr and repr(task) in out.stderr, (task, out)
    spoke = _h2_call(server, tokens["ci"], "speaks", cwd=tmp_path)
    assert (spoke.returncode, spoke.stderr) == (4, "my own reason\n"), spoke  # the task said why
    missing = _h2_call(server, tokens["ci"], "missing", cwd=tmp_path)
    assert missing.returncode == 125 and missing.stderr.startswith("cannot start"), missing  # rtask's reason
    assert missing.stderr.strip().count("\n") == 0, missing.stderr


def test_call_says_when_a_followed_run_was_cancelled(start_server, tmp_path):
    server, tokens = start_server(_H2_CALL_CONFIG)
    env = {**os.environ, "RTASK_URL": f"http://127.0.0.1:{server.port}", "RTASK_AUTH_TOKEN": tokens["ci"]}
    call = subprocess.Popen([sys.executable, RTASK, "call", "background"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        runs = wait_for(lambda: server.get("/tasks/background", key=tokens["ci"]).json["runs"], timeout=15)
        assert server.request("DELETE", f"/tasks/background/{runs[0]['task_id']}", key=tokens["ci"]).status == 200
        stdout, stderr = call.communicate(timeout=20)
    finally:
        call.kill()
        call.wait()
    assert call.returncode == 1 and "was cancelled" in stderr, (stdout, stderr)


def _h2_default_sigint():
    """(In the child, before exec.) A shell starts a background job (``cmd &``) with SIGINT
    ignored, and the client would inherit that: a test suite run that way would wait for a
    Ctrl-C the client never sees. The client gets SIGINT's default, as a terminal's job has."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("follow", [False, True])
def test_ctrl_c_while_following_an_async_run_names_it_and_exits_130(start_server, tmp_path, follow):
    server, tokens = start_server(_H2_CALL_CONFIG)
    env = {**os.environ, "RTASK_URL": f"http://127.0.0.1:{server.port}", "RTASK_AUTH_TOKEN": tokens["ci"]}
    call = subprocess.Popen([sys.executable, RTASK, "call", "background", *(["--follow"] if follow else [])],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_h2_default_sigint)
    try:
        runs = wait_for(lambda: server.get("/tasks/background", key=tokens["ci"]).json["runs"], timeout=15)
        time.sleep(1.0)  # the client is now waiting on its long-poll or its event stream
        call.send_signal(signal.SIGINT)
        stdout, stderr = call.communicate(timeout=20)
    finally:
        call.kill()
        call.wait()
    run_id = runs[0]["task_id"]
    assert call.returncode == 130, (stdout, stderr)
    assert run_id in stderr and "goes on" in stderr and "Traceback" not in stderr, stderr
    assert stderr.strip().count("\n") == 0, stderr
    assert server.get(f"/tasks/background/{run_id}", key=tokens["ci"]).json["status"] == "running"


# -- Python older than 3.11 -----------------------------------------------------------------------


def _h2_old_pythons() -> list[str]:
    """Interpreters older than 3.11 that happen to be installed (pyenv, python3.8..3.10)."""
    import glob
    import shutil
    found = [shutil.which(f"python3.{minor}") for minor in (8, 9, 10)]
    found += glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3"))
    old = []
    for python in sorted({p for p in found if p}):
        try:
            out = subprocess.run([python, "-c", "import sys; print((3, 8) <= sys.version_info < (3, 11))"],
                                 capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if out.stdout.strip() == "True":  # a pyenv shim for a version not selected fails here
            old.append(python)
    return old


def test_rtask_py_parses_as_python_3_8():
    import ast
    ast.parse(Path(RTASK).read_text(), feature_version=(3, 8))


def test_an_old_python_gets_one_sentence_naming_both_versions(tmp_path):
    """Run for real with an older interpreter when one is installed (no way to fake
    sys.version_info for a subprocess honestly); skipped, saying so, otherwise."""
    pythons = _h2_old_pythons()
    if not pythons:
        pytest.skip("no Python 3.8-3.10 interpreter installed (python3.8..3.10 or ~/.pyenv/versions)")
    for python in pythons:
        version = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"],
                                 capture_output=True, text=True, timeout=30).stdout.strip()
        for argv in (["call", "x"], ["run"], ["--version"]):
            out = subprocess.run([python, RTASK, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=30)
            assert out.returncode == 1 and out.stdout == "", (python, argv, out)
            assert out.stderr.count("\n") == 1 and "3.11" in out.stderr and version in out.stderr, (python, out.stderr)


# -- the README's systemd unit --------------------------------------------------------------------


def test_readme_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    """systemd drops a setting line it cannot parse (e.g. one with a trailing '# comment')
    with only a warning: every such line is a hardening option silently not in force."""
    import shutil
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (.ci/run installs Debian's systemd package)")
    readme = (HERE / "README.md").read_text()
    match = re.search(r"`/etc/systemd/system/rtask\.service`:\n\n```ini\n(.*?)```", readme, re.S)
    assert match, "README.md has no rtask.service unit block"
    unit = match.group(1)
    # The paths the unit names, made to exist here.
    (tmp_path / "opt").mkdir()
    (tmp_path / "opt" / "rtask.py").write_text("")
    unit = unit.replace("/opt/rtask", str(tmp_path / "opt")).replace("/usr/bin/python3", sys.executable)
    settings = [line for line in unit.splitlines() if "=" in line and not line.lstrip().startswith("#")]
    assert all("#" not in line.partition("=")[2] for line in settings), "a comment at the end of a setting line"
    (tmp_path / "rtask.service").write_text(unit)
    out = subprocess.run([analyze, "verify", str(tmp_path / "rtask.service")],
                         capture_output=True, text=True, timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if re.search(r"Failed to parse|Unknown key|[Uu]nknown (lvalue|section)|ignoring", line)]
    assert not problems, "\n".join(problems)
    names = {line.partition("=")[0].strip() for line in settings}
    for hardening in ("TimeoutStopSec", "NoNewPrivileges", "PrivateTmp", "ProtectSystem", "ProtectHome",
                      "PrivateDevices", "ProtectKernelLogs", "ProtectClock", "RestrictNamespaces",
                      "SystemCallArchitectures", "UMask", "KillMode", "ExecReload"):
        assert hardening in names, hardening


# =============================================================================================
# Workers and the durable state (README §6): results across restarts, crash recovery
# =============================================================================================

_WK_CONFIG = """
[tasks.echo]
command = ["/bin/echo", "hi"]
apiKeyNames = ["ci"]

[tasks.later]
command = ["/bin/sh", "-c", "echo started; exec sleep 60"]
apiKeyNames = ["ci"]
async = true
asyncResultRetentionSeconds = 300
"""


@pytest.fixture
def wk_start(tmp_path):
    """wk_start(config_text=None, run_args=(), keys=("ci",)) → (server, tokens): like
    start_server, with options after ``run`` (--workers, --state-dir); may be called again in
    one test (a restart on the same directory) and stops every server it started."""
    servers, tokens = [], {}

    def start(config_text=None, run_args=(), keys=("ci",)):
        if config_text is not None:
            (tmp_path / "config.toml").write_text(textwrap.dedent(config_text))
        for name in keys:
            if name not in tokens:
                tokens[name] = new_key(tmp_path, name)
        server = _IgServer(tmp_path, run_args=run_args)
        servers.append(server)
        return server, tokens

    yield start
    for server in servers:
        server.stop()


def _wk_group_alive(pgid: int) -> bool:
    """Any process (not a zombie) left in process group ``pgid``?"""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2:].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def _wk_pgid_of_run(run_id) -> int:
    """The process group of a run, found through its environment (RTASK_TASK_ID)."""
    def find():
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    environ = Path(f"/proc/{entry}/environ").read_bytes()
                except OSError:
                    continue
                if f"RTASK_TASK_ID={run_id}".encode() in environ.split(b"\0"):
                    return os.getpgid(int(entry))
        return None
    return wait_for(find, timeout=10)


def test_results_and_listing_survive_a_restart(wk_start, tmp_path):
    """A finished result stays readable and listed after SIGTERM and a new start on the same
    state directory (default: rtask-state next to config.toml, mode 0700)."""
    server, tokens = wk_start(_WK_CONFIG)
    key = tokens["ci"]
    first = server.post("echo", key=key).json
    assert first["status"] == "success"
    assert server.stop() == 0
    server, _ = wk_start()
    again = server.get(f"/tasks/echo/{first['task_id']}", key=key)
    assert again.status == 200 and again.json == first
    listed = server.get("/tasks/echo", key=key).json["runs"]
    assert [r["task_id"] for r in listed] == [first["task_id"]]
    assert server.get(f"/tasks/echo/{first['task_id']}/events", key=key,
                      headers={"Accept": "text/event-stream"}).body.count(b"event: result") == 1
    assert stat.S_IMODE((tmp_path / "rtask-state").stat().st_mode) == 0o700


def test_an_internal_error_answers_500_without_a_traceback_and_the_server_goes_on(wk_start, tmp_path):
    """The contract's 500 ``internal``: a fault of the server's own (here its state store's
    table dropped from outside, as a mistaken operator or a damaged disk might) answers
    {"error": "internal", "message": ...} and never a traceback, which goes to the log; the
    server goes on answering (and running tasks: a run's result does not need the store)."""
    state = tmp_path / "st"
    server, tokens = wk_start("""
        [tasks.t]
        command = ["echo", "hi"]
        apiKeyNames = ["ci"]
        """, run_args=("--state-dir", str(state)))
    key = tokens["ci"]
    assert server.post("t", key=key).status == 200
    db = sqlite3.connect(state / "state.db")
    db.execute("DROP TABLE runs")
    db.commit()
    db.close()
    for path in ("/tasks/t", "/health/detailed"):
        r = server.get(path, key=key)
        assert (r.status, r.json) == (500, {"error": "internal", "message": "Internal server error."}), r
    assert re.search(r'error "internal error" method=GET error="Traceback', server.log()), server.log()
    assert server.get("/health").status == 200
    ran = server.post("t", key=key)
    assert (ran.status, ran.json["stdout"]) == (200, "hi\n"), ran
    assert server.stop() == 0


def test_a_second_server_on_the_same_state_dir_is_refused(wk_start, tmp_path):
    server, _ = wk_start(_WK_CONFIG)
    out = rtask_cli("run", "--api-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0",
                    cwd=tmp_path, timeout=30)
    assert out.returncode == 1
    assert "in use by another rtask server" in out.stderr and str(tmp_path / "rtask-state") in out.stderr
    assert "Traceback" not in out.stderr
    assert server.proc.poll() is None  # the first one serves on


def test_a_killed_server_leaves_no_run_unsupervised(wk_start, tmp_path):
    """kill -9 of the whole server (supervisor and worker, neither able to react): the next
    server on the state directory stops the run's process group (TERM, then KILL) and records
    the run as failure with the reason in stderr."""
    server, tokens = wk_start(_WK_CONFIG, run_args=("--state-dir", str(tmp_path / "st")))
    key = tokens["ci"]
    run_id = server.post("later", key=key).json["task_id"]
    pgid = _wk_pgid_of_run(run_id)
    worker = server.worker_pid()
    os.kill(server.proc.pid, signal.SIGSTOP)  # it cannot replace the worker nor record its end
    os.kill(worker, signal.SIGKILL)
    server.proc.kill()
    server.proc.wait()
    wait_for(lambda: not pid_alive(worker), timeout=10)
    assert _wk_group_alive(pgid)  # nothing stopped it yet
    server, _ = wk_start(run_args=("--state-dir", str(tmp_path / "st")))
    wait_for(lambda: not _wk_group_alive(pgid), timeout=10)
    result = server.get(f"/tasks/later/{run_id}", key=key).json
    assert (result["status"], result["exit_code"]) == ("failure", -1)
    assert "ended unexpectedly" in result["stderr"]
    assert "recorded as failed" in server.log()


_WK_MANY = """
[tasks.echo]
command = ["/bin/echo", "hi"]
apiKeyNames = ["ci"]

[tasks.rare]
command = ["/bin/echo", "rare"]
apiKeyNames = ["ci"]
rateLimit = 0.05

[tasks.single]
command = ["/bin/sh", "-c", "sleep 1.5; echo ran"]
apiKeyNames = ["ci"]
maxConcurrentTasks = 1

[tasks.line]
command = ["/bin/sh", "-c", "echo \\"$REQUEST_HEADER_X_ORDER\\" >> order.log; sleep 2.5"]
apiKeyNames = ["ci"]
maxConcurrentTasks = 1
queueSize = 3
queueTimeoutSeconds = 30
passRequestHeaders = ["X-Order"]

[tasks.brief]
command = ["/bin/sh", "-c", "sleep 3"]
apiKeyNames = ["ci"]
maxConcurrentTasks = 1
queueSize = 1
queueTimeoutSeconds = 1

[tasks.later]
command = ["/bin/sh", "-c", "echo started; exec sleep 60"]
apiKeyNames = ["ci"]
async = true
asyncResultRetentionSeconds = 300

[tasks.batch]
command = ["/bin/sh", "-c", "sleep 1; echo \\"$REQUEST_HEADER_X_ORDER\\""]
apiKeyNames = ["ci"]
async = true
maxConcurrentTasks = 1
queueSize = 2
passRequestHeaders = ["X-Order"]

[tasks.talk]
command = ["/bin/sh", "-c", "echo one; sleep 1.5; echo two; sleep 1.5; echo three"]
apiKeyNames = ["ci"]
async = true

[tasks.drain]
command = ["/bin/sh", "-c", "sleep 1.5; echo drained"]
apiKeyNames = ["ci"]
"""

_WK_FOUR = ("--workers", "4")


def _wk_worker_pids(server) -> list[int]:
    """The supervisor's worker processes (its children)."""
    pid = server.proc.pid
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _wk_owners(workdir: Path, task: str) -> dict[str, int]:
    """run id → pid of the worker that ran it, from the state store."""
    import sqlite3
    db = sqlite3.connect(f"file:{workdir / 'rtask-state' / 'state.db'}?mode=ro", uri=True, timeout=10)
    try:
        return dict(db.execute("SELECT id, owner FROM runs WHERE task = ?", (task,)).fetchall())
    finally:
        db.close()


def _wk_warm(server, key, workdir: Path):
    """Until every worker has verified ``key`` once (it then has it cached): parallel echo
    runs, retried, until the state store shows runs by each worker. Without this, many
    first requests at once would each need an Argon2 check and meet the server-wide bound
    (503), which is the contract but not what these tests are about."""
    def all_warm():
        _wk_parallel(8, lambda i: server.post("echo", key=key))
        return set(_wk_owners(workdir, "echo").values()) >= set(_wk_worker_pids(server))
    wait_for(lambda: len(_wk_worker_pids(server)) == 4, timeout=15)
    wait_for(all_warm, timeout=60, interval=0.1)


def _wk_parallel(count, call):
    """``call(i)`` for i in range(count), all at once on their own connections."""
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(call, range(count)))


def test_workers_count_the_rate_limit_across_workers(wk_start, tmp_path):
    """Burst 1 for the whole server: of many requests at once, spread over 4 workers, one runs."""
    server, tokens = wk_start(_WK_MANY, run_args=_WK_FOUR)
    _wk_warm(server, tokens["ci"], tmp_path)
    statuses = _wk_parallel(12, lambda i: server.post("rare", key=tokens["ci"]).status)
    assert sorted(statuses) == [200] + [429] * 11, statuses


def test_workers_count_max_concurrent_across_workers(wk_start, tmp_path):
    server, tokens = wk_start(_WK_MANY, run_args=_WK_FOUR)
    _wk_warm(server, tokens["ci"], tmp_path)
    statuses = _wk_parallel(8, lambda i: server.post("single", key=tokens["ci"]).status)
    assert sorted(statuses) == [200] + [429] * 7, statuses
    assert server.post("single", key=tokens["ci"]).status == 200  # the slot came back


def test_workers_share_one_fifo_queue_with_its_timeout(wk_start, tmp_path):
    """queueSize and FIFO hold across workers: requests sent one after another run in that
    order, the one beyond the queue is refused, and a waiter past queueTimeoutSeconds gets 429."""
    server, tokens = wk_start(_WK_MANY, run_args=_WK_FOUR)
    _wk_warm(server, tokens["ci"], tmp_path)
    results = {}

    def post(i):
        results[i] = server.post("line", key=tokens["ci"], headers={"X-Order": str(i)})

    threads = []
    for i in range(5):
        threads.append(threading.Thread(target=post, args=(i,)))
        threads[-1].start()
        if i < 4:  # admitted in this order (a worker's first Argon2 check may delay a request)
            wait_for(lambda: len(_wk_owners(tmp_path, "line")) == i + 1, timeout=15)
    for t in threads:
        t.join(60)
    assert sorted(r.status for r in results.values()) == [200] * 4 + [429], results
    order = (tmp_path / "order.log").read_text().split()
    assert order == [str(i) for i in range(5) if results[i].status == 200], order
    assert results[4].status == 429  # the line was full
    first = threading.Thread(target=lambda: server.post("brief", key=tokens["ci"]))
    first.start()
    time.sleep(0.3)
    began = time.monotonic()
    assert server.post("brief", key=tokens["ci"]).status == 429  # waited its queueTimeoutSeconds
    assert 0.8 <= time.monotonic() - began < 8  # queueTimeoutSeconds = 1, plus a loaded machine
    first.join(30)


def test_workers_any_worker_answers_for_any_run(wk_start, tmp_path):
    """Result, long-poll, event stream, listing and cancel of a run answered on many new
    connections, so by every worker, also those that do not run it (they forward)."""
    server, tokens = wk_start(_WK_MANY, run_args=_WK_FOUR)
    key = tokens["ci"]
    _wk_warm(server, key, tmp_path)
    run_id = server.post("talk", key=key).json["task_id"]
    got = _wk_parallel(12, lambda i: server.get(f"/tasks/talk/{run_id}", key=key))
    assert all(r.status == 200 and r.json["status"] == "running" for r in got), got
    listed = _wk_parallel(8, lambda i: server.get("/tasks/talk", key=key).json["runs"])
    assert all([r["task_id"] for r in runs] == [run_id] for runs in listed), listed

    def events(i):
        began = time.monotonic()
        body = server.get(f"/tasks/talk/{run_id}/events", key=key, headers={"Accept": "text/event-stream"}).body
        return body, time.monotonic() - began

    streams = _wk_parallel(6, events)
    for body, _ in streams:
        assert body.count(b"event: result") == 1 and b'"one\\n"' in body and b"three" in body, body
    polls = _wk_parallel(6, lambda i: server.get(f"/tasks/talk/{run_id}?wait=30", key=key).json)
    assert all(p["status"] == "success" and p["stdout"] == "one\ntwo\nthree\n" for p in polls), polls
    # cancel, from some worker; the others then find it ended (409)
    later = server.post("later", key=key).json["task_id"]
    pgid = _wk_pgid_of_run(later)
    answers = _wk_parallel(6, lambda i: server.request("DELETE", f"/tasks/later/{later}", key=key))
    # 200 for those that came while it was being stopped (as with one process), 409 after
    assert all(a.status == 409 or (a.status == 200 and a.json["status"] == "cancelled") for a in answers), answers
    assert any(a.status == 200 for a in answers)
    wait_for(lambda: not _wk_group_alive(pgid), timeout=10)
    assert server.get(f"/tasks/later/{later}", key=key).json["status"] == "cancelled"


def test_workers_all_honour_a_key_added_and_a_reload(wk_start, tmp_path):
    """add-key while serving works on every worker within ~2 s; SIGHUP reaches every worker
    (a task added to config.toml is served by all)."""
    server, tokens = wk_start(_WK_MANY, run_args=_WK_FOUR)
    fresh = new_key(tmp_path, "fresh")
    (tmp_path / "config.toml").write_text(textwrap.dedent(_WK_MANY).replace('apiKeyNames = ["ci"]',
                                                                            'apiKeyNames = ["ci", "fresh"]', 1))
    time.sleep(2.5)
    # one at a time: each worker verifies the new key once (Argon2), no 503 from the bound
    statuses = [server.post("echo", key=fresh).status for _ in range(16)]
    assert statuses == [403] * 16, statuses  # known everywhere (not 401), not yet allowed
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: server.log().count("configuration reloaded") == 4, timeout=15)
    statuses = _wk_parallel(16, lambda i: server.post("echo", key=fresh).status)
    assert statuses == [200] * 16, statuses


def test_workers_sigterm_drains_every_worker(wk_start, tmp_path):
    server, tokens = wk_start(_WK_MANY, run_args=_WK_FOUR)
    _wk_warm(server, tokens["ci"], tmp_path)
    workers = _wk_worker_pids(server)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(server.post, "drain", key=tokens["ci"]) for _ in range(6)]
        wait_for(lambda: len(_wk_owners(tmp_path, "drain")) == 6, timeout=15)  # all running
        server.proc.send_signal(signal.SIGTERM)
        answers = [f.result(timeout=60) for f in futures]
    assert all(a.status == 200 and a.json["stdout"] == "drained\n" for a in answers), answers
    assert server.proc.wait(30) == 0
    assert not any(pid_alive(pid) for pid in workers)


def test_workers_metrics_are_summed_over_workers(wk_start, tmp_path):
    server, tokens = wk_start(_WK_MANY, run_args=_WK_FOUR)
    _wk_warm(server, tokens["ci"], tmp_path)  # echo runs by every worker
    runs = len(_wk_owners(tmp_path, "echo"))
    assert server.metric("task_duration_seconds_count", handler="echo", status="success") == runs
    assert server.metric("auth_requests_total", method="api_key", result="success") == runs
    assert "python_info" in server.metrics()
    assert [server.post("drain", key=tokens["ci"]).status for _ in range(4)] == [200] * 4
    assert server.metric("task_duration_seconds_count", handler="drain", status="success") == 4
    _wk_parallel(3, lambda i: server.post("single", key=tokens["ci"]))
    assert server.metric("task_rejection_total", handler="single", reason="max_concurrent") == 2


def _wk_worker_of_connection(conn: http.client.HTTPConnection, server_port: int, workers: list[int]) -> int | None:
    """Which worker accepted ``conn``: the server side's socket inode, from /proc/net/tcp, in
    a worker's descriptors."""
    client_port = conn.sock.getsockname()[1]
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == server_port and int(fields[2].split(":")[1], 16) == client_port:
            target = f"socket:[{fields[9]}]"
            for pid in workers:
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    with contextlib.suppress(OSError):
                        if os.readlink(fd) == target:
                            return pid
    return None


def test_long_polls_and_event_streams_on_another_worker_get_the_result_when_the_owner_dies(wk_start, tmp_path):
    """kill -9 of the worker running a run: long-polls and event streams about it that another
    worker relays get the run's result (failure, with the reason) once the supervisor has
    recorded it, and a plain read meanwhile waits for it too. They used to end without an
    answer (long-poll), without the result event (stream), or with 503 for ~2 s (read).
    (Connections the dead worker itself held die with it.)"""
    server, tokens = wk_start("""
        [tasks.a]
        command = ["sh", "-c", "echo hi; sleep 30"]
        apiKeyNames = ["ci"]
        async = true
        """, run_args=("--workers", "2"))
    key = tokens["ci"]
    run_id = server.post("a", key=key).json["task_id"]
    owner = wait_for(lambda: _wk_owners(tmp_path, "a").get(run_id))
    workers, relayed = _wk_worker_pids(server), []
    for attempt in range(200):  # (which worker accepts a connection is the kernel's choice)
        path = (f"/tasks/a/{run_id}?wait=40", f"/tasks/a/{run_id}/events")[attempt % 2]
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}",
                                           **({"Accept": "text/event-stream"} if "events" in path else {})})
        if wait_for(lambda: _wk_worker_of_connection(conn, server.port, workers)) == owner:
            conn.close()
            continue
        relayed.append((conn, path))
        if sum("events" in p for _, p in relayed) >= 3 and sum("wait" in p for _, p in relayed) >= 3:
            break
    assert len(relayed) >= 6, relayed
    os.kill(owner, signal.SIGKILL)
    read = server.get(f"/tasks/a/{run_id}", key=key).json  # at once: waits for the recorded end
    assert (read["status"], read["exit_code"]) == ("failure", -1), read
    for conn, path in relayed:
        answer = conn.getresponse()
        body = answer.read().decode()
        if "events" in path:
            assert answer.status == 200 and body.startswith("event: "), body  # (stdout, or only the end)
            result = json.loads(body.rsplit("event: result\ndata: ", 1)[1])
        else:
            result = json.loads(body)
        assert (result["status"], result["exit_code"]) == ("failure", -1), (path, body)
        assert "worker process running this task died (signal 9)" in result["stderr"], result
        conn.close()


def test_a_killed_worker_is_replaced_and_only_its_runs_fail(wk_start, tmp_path):
    """kill -9 of a worker: a new one takes its place; its run's process group is stopped and
    the run ends as failure with the reason; a run of another worker goes on."""
    server, tokens = wk_start(_WK_MANY, run_args=_WK_FOUR)
    key = tokens["ci"]
    runs = {}
    for _ in range(40):
        run_id = server.post("later", key=key).json["task_id"]
        runs[run_id] = wait_for(lambda: _wk_owners(tmp_path, "later").get(run_id))
        if len(set(runs.values())) >= 2:
            break
    owners = {}
    for run_id, owner in runs.items():
        owners.setdefault(owner, run_id)
    (victim, doomed), (_, survivor) = list(owners.items())[:2]
    doomed_group, survivor_group = _wk_pgid_of_run(doomed), _wk_pgid_of_run(survivor)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in _wk_worker_pids(server) and len(_wk_worker_pids(server)) == 4, timeout=15)
    wait_for(lambda: not _wk_group_alive(doomed_group), timeout=10)
    result = wait_for(lambda: (r := server.get(f"/tasks/later/{doomed}", key=key).json)["status"] != "running"
                      and r, timeout=10)
    assert (result["status"], result["exit_code"]) == ("failure", -1)
    assert "worker process running this task died (signal 9)" in result["stderr"]
    assert _wk_group_alive(survivor_group)
    assert server.get(f"/tasks/later/{survivor}", key=key).json["status"] == "running"
    assert server.request("DELETE", f"/tasks/later/{survivor}", key=key).json["status"] == "cancelled"
    assert "worker died; starting another" in server.log()


def _wk_row(workdir: Path, run_id: str):
    """(status, pgid, proc_start, owner) of a run's row in the state store, or None."""
    import sqlite3
    db = sqlite3.connect(f"file:{workdir / 'rtask-state' / 'state.db'}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute("SELECT status, pgid, proc_start, owner FROM runs WHERE id = ?", (run_id,)).fetchone()
    finally:
        db.close()


def test_workers_an_async_id_is_answered_once_its_row_and_group_are_stored(wk_start, tmp_path):
    """Rows are written in groups, but an async run's id is answered only once its row (with
    its process group and that leader's start time) is committed: any worker, and crash
    recovery, can find it the moment the caller has the id."""
    server, tokens = wk_start(_WK_MANY, run_args=_WK_FOUR)
    for _ in range(10):
        run_id = server.post("later", key=tokens["ci"]).json["task_id"]
        status, pgid, proc_start, owner = _wk_row(tmp_path, run_id)  # at once: no waiting here
        assert (status, owner in _wk_worker_pids(server)) == ("running", True)
        assert pgid == _wk_pgid_of_run(run_id) and proc_start is not None
        server.request("DELETE", f"/tasks/later/{run_id}", key=tokens["ci"])


def test_workers_a_sync_run_still_going_is_recorded_and_stopped_with_its_worker(wk_start, tmp_path):
    """A sync run's process group is recorded soon after its spawn (short runs only with their
    end): kill -9 of its worker stops the group and the run ends failure with the reason."""
    server, tokens = wk_start(_WK_MANY, run_args=_WK_FOUR)
    key = tokens["ci"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: server.post("drain", key=key))  # sleeps 1.5 s; its answer is lost
        run_id = wait_for(lambda: next(iter(_wk_owners(tmp_path, "drain")), None), timeout=5)
        _, pgid, proc_start, owner = wait_for(lambda: (row := _wk_row(tmp_path, run_id))[1] and row, timeout=1)
        assert pgid == _wk_pgid_of_run(run_id) and proc_start is not None
        os.kill(owner, signal.SIGKILL)
        wait_for(lambda: not _wk_group_alive(pgid), timeout=10)
    result = wait_for(lambda: (r := server.get(f"/tasks/drain/{run_id}", key=key).json).get("status")
                      not in (None, "running") and r, timeout=15)  # (503 while its owner is gone)
    assert (result["status"], result["exit_code"]) == ("failure", -1), result
    assert "worker process running this task died (signal 9)" in result["stderr"]


def test_workers_a_killed_supervisor_leaves_nothing_running(wk_start, tmp_path):
    """kill -9 of the supervisor: its workers stop their runs and exit, freeing the port."""
    server, tokens = wk_start(_WK_MANY, run_args=_WK_FOUR)
    key = tokens["ci"]
    run_id = server.post("later", key=key).json["task_id"]
    pgid = _wk_pgid_of_run(run_id)
    workers = _wk_worker_pids(server)
    server.proc.kill()
    server.proc.wait()
    wait_for(lambda: not any(pid_alive(p) for p in workers), timeout=15)
    wait_for(lambda: not _wk_group_alive(pgid), timeout=10)
    def nobody_listens():
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", server.port)) != 0
    wait_for(nobody_listens, timeout=10)  # the port is free again
    server, _ = wk_start(run_args=_WK_FOUR)
    result = server.get(f"/tasks/later/{run_id}", key=key).json
    assert result["status"] == "failure" and "supervisor" in result["stderr"], result


def _wk_runs_on_two_workers(server, key, tmp_path, task: str):
    """Post async runs of ``task`` until a second one lands on another worker than the
    first (where it runs or waits in line, as the task's limit has it): their ids."""
    first = server.post(task, key=key).json["task_id"]
    owner = wait_for(lambda: _wk_owners(tmp_path, task).get(first))
    for _ in range(60):
        other = server.post(task, key=key).json["task_id"]
        if wait_for(lambda: _wk_owners(tmp_path, task).get(other)) != owner:
            return first, other
        server.request("DELETE", f"/tasks/{task}/{other}", key=key)
    raise AssertionError("every run went to one worker")


def test_workers_of_a_killed_supervisor_start_nothing_from_the_line(wk_start, tmp_path):
    """kill -9 of the supervisor: the worker that stops its running run must not hand its slot
    to a run waiting in line on another worker, which would start with nobody left to stop it
    (it used to, 3 of 3, and ran to its end). The waiting run's worker is held (SIGSTOP) until
    the other has stopped its run and exited, so that it learns of the death last."""
    server, tokens = wk_start(f"""
        [tasks.q]
        command = ["sh", "-c", "touch {tmp_path}/ran-$RTASK_TASK_ID; sleep 30"]
        apiKeyNames = ["ci"]
        async = true
        maxConcurrentTasks = 1
        queueSize = 60
        """, run_args=("--workers", "2"))
    running, queued = _wk_runs_on_two_workers(server, tokens["ci"], tmp_path, "q")
    owners = _wk_owners(tmp_path, "q")
    server.proc.kill()
    server.proc.wait()
    os.kill(owners[queued], signal.SIGSTOP)
    try:
        wait_for(lambda: not pid_alive(owners[running]), timeout=15)
    finally:
        os.kill(owners[queued], signal.SIGCONT)
    wait_for(lambda: not pid_alive(owners[queued]), timeout=15)
    assert sorted(p.name for p in tmp_path.glob("ran-*")) == [f"ran-{running}"]


def test_a_worker_killed_during_the_drain_has_its_runs_stopped_at_once(wk_start, tmp_path):
    """SIGTERM, then kill -9 of one worker while the other drains: the dead worker's runs are
    stopped and recorded at once (they used to run on until the other worker had drained, and
    were then recorded as "did not drain cleanly")."""
    server, tokens = wk_start("""
        [tasks.q]
        command = ["sleep", "30"]
        apiKeyNames = ["ci"]
        async = true
        maxConcurrentTasks = 2
        executionTimeoutSeconds = 12
        """, run_args=("--workers", "2", "--state-dir", str(tmp_path / "rtask-state")))
    survivor_run, doomed = _wk_runs_on_two_workers(server, tokens["ci"], tmp_path, "q")
    victim, pgid = _wk_owners(tmp_path, "q")[doomed], _wk_pgid_of_run(doomed)
    server.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: server.log().count("shutting down: finishing running tasks") == 2)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: not _wk_group_alive(pgid), timeout=5)
    status, *_ = wait_for(lambda: (row := _wk_row(tmp_path, doomed))[0] != "running" and row, timeout=5)
    assert status == "failure"
    assert server.proc.wait(30) == 0


def test_workers_results_survive_kill9_of_everything(wk_start, tmp_path):
    """kill -9 of the supervisor and all its workers at once: finished results stay readable,
    and the next server stops the run they left and records it as failure."""
    server, tokens = wk_start(_WK_MANY, run_args=_WK_FOUR)
    key = tokens["ci"]
    done = server.post("echo", key=key).json
    run_id = server.post("later", key=key).json["task_id"]
    pgid = _wk_pgid_of_run(run_id)
    for pid in [server.proc.pid, *_wk_worker_pids(server)]:
        os.kill(pid, signal.SIGKILL)
    server.proc.wait()
    time.sleep(1)
    assert _wk_group_alive(pgid)  # orphaned, unsupervised until the next start
    server, _ = wk_start(run_args=_WK_FOUR)
    wait_for(lambda: not _wk_group_alive(pgid), timeout=10)
    assert server.get(f"/tasks/echo/{done['task_id']}", key=key).json == done
    result = server.get(f"/tasks/later/{run_id}", key=key).json
    assert (result["status"], result["exit_code"]) == ("failure", -1)
    assert "ended unexpectedly" in result["stderr"]


def test_workers_share_one_argon2_bound(wk_start, tmp_path):
    """The Argon2 bound is the server's, not each worker's: while every slot is held (here
    by this test, through the slot files the workers lock), no worker verifies an uncached
    key: each answers 503 after the slot wait. Once the slots are free, the same key works."""
    server, tokens = wk_start(_WK_MANY, run_args=_WK_FOUR)
    wait_for(lambda: len(_wk_worker_pids(server)) == 4, timeout=15)
    held = []
    try:
        for i in range(rtask.ARGON2_MAX_CONCURRENT):
            fd = os.open(tmp_path / "rtask-state" / f"argon2-{i}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            held.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
        answers = _wk_parallel(8, lambda i: server.post("echo", key=tokens["ci"]))
    finally:
        for fd in held:
            os.close(fd)
    assert [(a.status, a.json["error"]) for a in answers] == [(503, "unavailable")] * 8, answers
    assert all(a.headers["Retry-After"] == "1" for a in answers)
    assert server.post("echo", key=tokens["ci"]).status == 200


def test_workers_check_a_burst_of_one_new_key_once_each(wk_start, tmp_path):
    """Right after a start, many requests at once with one key: each worker runs Argon2 for it
    once and the others wait for that outcome (single flight), so the burst fits the bound
    even with one slot free. Before, each request ran its own check: 40 checks × ~60 ms in
    one slot outlast the 2 s slot wait, and the last ones were answered 503."""
    server, tokens = wk_start(_WK_MANY, run_args=_WK_FOUR)
    wait_for(lambda: len(_wk_worker_pids(server)) == 4, timeout=15)
    fd = os.open(tmp_path / "rtask-state" / "argon2-0.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # one slot of two left
        statuses = _wk_parallel(40, lambda i: server.post("echo", key=tokens["ci"]).status)
    finally:
        os.close(fd)
    assert statuses == [200] * 40, statuses


def test_workers_queue_async_runs_across_workers(wk_start, tmp_path):
    """Async runs over the limit are answered ``queued`` by whichever worker takes them, start
    in admission order as slots free anywhere, and one beyond queueSize gets 429."""
    server, tokens = wk_start(_WK_MANY, run_args=_WK_FOUR)
    key = tokens["ci"]
    _wk_warm(server, key, tmp_path)
    answers = []
    for i in range(4):
        answers.append(server.post("batch", key=key, headers={"X-Order": str(i)}))
    assert [a.status for a in answers] == [200, 200, 200, 429], answers
    assert [a.json["status"] for a in answers[:3]] == ["running", "queued", "queued"]
    results = [server.get(f"/tasks/batch/{a.json['task_id']}?wait=30", key=key).json for a in answers[:3]]
    assert [r["stdout"] for r in results] == ["0\n", "1\n", "2\n"], results
    starts = [r["started_at"] for r in results]
    assert starts == sorted(starts) and all(r["status"] == "success" for r in results)


def test_unusable_state_dir_and_worker_count_are_clear_errors(tmp_path):
    (tmp_path / "config.toml").write_text(textwrap.dedent(_WK_CONFIG))
    (tmp_path / "a-file").write_text("")
    for extra, message in ((("--state-dir", "a-file"), "cannot use the state directory a-file"),
                           (("--workers", "0"), "--workers '0' must be a number from 1 to"),
                           (("--workers", "2", "--state-dir", "a-file"), "cannot use the state directory")):
        out = rtask_cli("run", "--api-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0", *extra,
                        cwd=tmp_path, timeout=30)
        assert out.returncode == 1 and message in out.stderr, (extra, out.stderr)
        assert "Traceback" not in out.stderr


# =============================================================================================
# Where the pieces meet: limits and reloads, forwarding, TLS at the connection cap, secrets
# =============================================================================================


def test_a_reload_that_lifts_the_concurrency_limit_starts_the_queued_runs(start_server, tmp_path):
    """maxConcurrentTasks 1 → 0 by SIGHUP: the run waiting in line starts at once, not when
    the running one ends (a lifted limit used to strand the line until a restart)."""
    config = """
        [tasks.slow]
        command = ["sh", "-c", "sleep 6; echo done"]
        apiKeyNames = ["ci"]
        async = true
        maxConcurrentTasks = {limit}
        queueSize = 2
        """
    server, tokens = start_server(config.format(limit=1))
    key = tokens["ci"]
    first = server.post("slow", key=key).json["task_id"]
    second = server.post("slow", key=key).json
    assert second["status"] == "queued", second
    (tmp_path / "config.toml").write_text(textwrap.dedent(config.format(limit=0)))
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: server.get(f"/tasks/slow/{second['task_id']}", key=key).json["status"] == "running",
             timeout=3)
    assert server.get(f"/tasks/slow/{first}", key=key).json["status"] == "running"


def test_a_secret_parameter_cannot_be_a_command_argument(tmp_path):
    """Arguments are visible to every local user (ps): a secret parameter goes by env only."""
    (tmp_path / "config.toml").write_text(textwrap.dedent("""
        [tasks.t]
        command = ["./login.sh", "{token}"]
        apiKeyNames = ["ci"]
        [tasks.t.parameters.token]
        type = "string"
        secret = true
        """))
    out = rtask_cli("check-config", cwd=tmp_path)
    assert out.returncode == 1, out
    assert "task 't'" in out.stderr and "'token'" in out.stderr and "RTASK_PARAM_TOKEN" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_sighups_while_a_replacement_worker_starts_reload_it_and_never_kill_it(wk_start):
    """The supervisor passes SIGHUP on to every worker, also one it has just started: that
    worker must not die of it (a SIGHUP's default action) before its handlers are in place.
    It did, and a SIGHUP every 50 ms after a worker's death made each replacement die the
    same way until the supervisor gave up (exit 1). A worker starts with those signals
    blocked; the commands it runs must not inherit that. (grep reads its own mask: a shell
    reading its own would see dash's, which blocks every signal while it waits for a child.)"""
    server, tokens = wk_start("""
        [tasks.mask]
        command = ["grep", "SigBlk", "/proc/self/status"]
        apiKeyNames = ["ci"]
        [tasks.mask_async]
        command = ["grep", "SigBlk", "/proc/self/status"]
        apiKeyNames = ["ci"]
        async = true
        """)
    os.kill(_wk_worker_pids(server)[0], signal.SIGKILL)
    end = time.monotonic() + 3
    while time.monotonic() < end:
        os.kill(server.proc.pid, signal.SIGHUP)
        time.sleep(0.05)
    assert server.proc.poll() is None, server.log()
    assert "signal 1" not in server.log()
    key = tokens["ci"]
    assert wait_for(lambda: server.request("POST", "/tasks/mask", key=key).status == 200)
    run_id = server.request("POST", "/tasks/mask_async", key=key).json["task_id"]
    for body in (server.request("POST", "/tasks/mask", key=key).json,
                 server.request("GET", f"/tasks/mask_async/{run_id}?wait=10", key=key).json):
        assert body["stdout"].split() == ["SigBlk:", "0000000000000000"], body
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(15) == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_sync_request_waiting_in_line_can_be_cancelled(wk_start, tmp_path, workers):
    """A DELETE of a sync run that waits for a slot takes it out of the line at once (on any
    worker): it never starts, its caller gets the cancelled result, and the run that held the
    slot is not disturbed. (It used to be doomed as a copy: 7 s, then 200 "queued", and it ran.)"""
    marker = tmp_path / "b-ran"
    server, tokens = wk_start("""
        [tasks.one]
        command = ["sh", "-c", "sleep 1.5; touch \\"$(cat)\\""]
        apiKeyNames = ["ci"]
        maxConcurrentTasks = 1
        queueSize = 2
        queueTimeoutSeconds = 20
        """, run_args=("--workers", workers))
    key = tokens["ci"]
    answers = {}

    def call(name, body):
        answers[name] = server.request("POST", "/tasks/one", body, key=key, timeout=30).json
    first = threading.Thread(target=call, args=("a", str(tmp_path / "a-ran")))
    first.start()
    wait_for(lambda: any(r["status"] == "running" for r in server.get("/tasks/one", key=key).json["runs"]))
    second = threading.Thread(target=call, args=("b", str(marker)))
    second.start()
    queued = wait_for(lambda: [r for r in server.get("/tasks/one", key=key).json["runs"] if r["status"] == "queued"])
    t0 = time.monotonic()
    deleted = server.request("DELETE", f"/tasks/one/{queued[0]['task_id']}", key=key)
    assert time.monotonic() - t0 < 1.0
    assert (deleted.status, deleted.json["status"], deleted.json["exit_code"]) == (200, "cancelled", -1), deleted.json
    second.join(5)
    assert not second.is_alive()
    assert (answers["b"]["status"], answers["b"]["task_id"]) == ("cancelled", queued[0]["task_id"]), answers
    assert "started_at" not in answers["b"]
    first.join(10)
    assert answers["a"]["status"] == "success", answers
    time.sleep(0.3)
    assert not marker.exists()  # the cancelled run never started
    assert server.request("DELETE", f"/tasks/one/{queued[0]['task_id']}", key=key).status == 409


def test_a_delete_racing_the_queue_timeout_of_a_sync_request_never_starts_it(wk_start, tmp_path):
    """DELETEs sent around the moment sync requests' time in line runs out: whichever wins,
    no request starts (the slot stays held by the first), each caller gets 429 or the
    cancelled result, and each DELETE answers at once: "cancelled", 409 or 404. (A DELETE that
    won used to let the run start anyway, beside the slot holder; one that lost waited 7 s
    and answered "queued". A run whose time ran out is forgotten: 404 then.)"""
    marks = tmp_path / "marks"
    marks.mkdir()
    server, tokens = wk_start(f"""
        [tasks.line]
        command = ["sh", "-c", "b=$(cat); touch {_hx_q(str(marks))[1:-1]}/$b; [ $b = hold ] && sleep 8; true"]
        apiKeyNames = ["ci"]
        maxConcurrentTasks = 1
        queueSize = 50
        queueTimeoutSeconds = 1
        """)
    key = tokens["ci"]
    answers, deletes = {}, {}
    holder = threading.Thread(target=lambda: server.request("POST", "/tasks/line", "hold", key=key, timeout=30))
    holder.start()
    wait_for(lambda: (marks / "hold").exists())

    def call(i):
        answers[i] = server.request("POST", "/tasks/line", f"q{i}", key=key, timeout=30)
    callers = [threading.Thread(target=call, args=(i,)) for i in range(24)]
    for caller in callers:
        caller.start()
    queued = wait_for(lambda: len(runs := [r for r in server.get("/tasks/line", key=key).json["runs"]
                                           if r["status"] == "queued"]) == 24 and runs)

    def delete(run):
        created = datetime.datetime.fromisoformat(run["created_at"].replace("Z", "+00:00")).timestamp()
        time.sleep(max(0.0, created + 1.0 + random.uniform(-0.05, 0.05) - time.time()))
        t0 = time.monotonic()
        deletes[run["task_id"]] = (server.request("DELETE", f"/tasks/line/{run['task_id']}", key=key), time.monotonic() - t0)
    deleters = [threading.Thread(target=delete, args=(run,)) for run in queued]
    for thread in deleters:
        thread.start()
    for thread in deleters + callers:
        thread.join(15)
    for run_id, (r, seconds) in deletes.items():
        assert seconds < 2, (run_id, seconds, r.status)
        assert r.status in (404, 409) or (r.status, r.json["status"]) == (200, "cancelled"), (run_id, r.status, r.body)
    for i, r in answers.items():
        assert r.status == 429 or (r.status, r.json["status"]) == (200, "cancelled"), (i, r.status, r.body)
    assert sorted(p.name for p in marks.iterdir()) == ["hold"]  # no queued request ever ran


def test_a_cancel_of_a_run_that_never_spawns_keeps_nothing(tmp_path):
    """A DELETE that finds a sync run just as its time in line runs out (withdrawn by its own
    timeout, not yet ended) cannot tell it from a run whose process is being spawned, and the
    executor notes it to stop on arrival. That run never spawns: the note must go with it
    (it stayed for the life of the worker). The window is microseconds wide over HTTP, so
    this drives the executor itself, in process."""
    (tmp_path / "config.toml").write_text('[tasks.t]\ncommand = ["true"]\n')
    task = rtask.load_config(str(tmp_path / "config.toml"), rtask.Problems()).tasks["t"]
    executor = rtask.Executor()
    run = rtask.Run(task, rtask.Caller("ci", "api_key"), "127.0.0.1")
    assert executor.cancel(run)  # not ended: it may be about to spawn
    assert list(executor._doomed) == [run]
    run.finish("cancelled", -1)  # its queue timeout ends it instead, and forgets it
    del run
    gc.collect()
    assert not list(executor._doomed)


def test_a_run_holding_a_slot_is_listed_running_by_every_worker(tmp_path):
    """Another worker reads a run from its row. A run that took a slot (row "starting", or
    "granted" from the line) is running from then on, though its worker records its process
    only RECORD_SPAWN_AFTER later: it used to be listed "queued" there meanwhile, so a caller
    who DELETEd "the queued run" cancelled the running one (seen in CI). Two stores on one
    directory are two workers' views; the slot is taken by the real limiter."""
    (tmp_path / "config.toml").write_text('[tasks.t]\ncommand = ["true"]\nmaxConcurrentTasks = 1\nqueueSize = 1\n')
    task = rtask.load_config(str(tmp_path / "config.toml"), rtask.Problems()).tasks["t"]
    mine, other = rtask.StateStore(str(tmp_path / "state")), rtask.StateStore(str(tmp_path / "state"))
    slots = rtask.ConcurrencyLimit("t", 1, 1, mine)
    first, second = (rtask.Run(task, rtask.Caller("ci", "api_key"), "127.0.0.1") for _ in range(2))
    granted = threading.Event()
    assert slots.admit(first, None) == "now"
    assert slots.admit(second, granted.set) == "queued"

    def seen_by_the_other():
        return {line["task_id"]: line["status"] for line in rtask.RunStore(60, other).listing(task)}
    assert seen_by_the_other() == {first.id: "running", second.id: "queued"}
    first.mark_started()
    first.finish("success", 0)
    mine.finish(first, 60, lambda: None)
    mine.write_pending()
    slots.promote()
    assert granted.is_set()
    assert seen_by_the_other() == {first.id: "success", second.id: "running"}


def test_a_run_cancelled_in_line_stays_known_to_every_worker(tmp_path):
    """A run taken out of the line (DELETE) keeps its row until its cancelled end replaces it.
    Its row used to be deleted and written again: another worker answered 404 for the run
    meanwhile (17 of 40 cancels, with 6 clients reading). Two stores on one directory are two
    workers' views; a request refused after its time in line (429) still leaves nothing."""
    (tmp_path / "config.toml").write_text('[tasks.t]\ncommand = ["true"]\nmaxConcurrentTasks = 1\nqueueSize = 2\n')
    task = rtask.load_config(str(tmp_path / "config.toml"), rtask.Problems()).tasks["t"]
    mine, other = rtask.StateStore(str(tmp_path / "state")), rtask.StateStore(str(tmp_path / "state"))
    slots = rtask.ConcurrencyLimit("t", 1, 2, mine)
    holder, cancelled, timed_out = (rtask.Run(task, rtask.Caller("ci", "api_key"), "127.0.0.1") for _ in range(3))
    assert [slots.admit(run, lambda: None) for run in (holder, cancelled, timed_out)] == ["now", "queued", "queued"]
    assert slots.withdraw(cancelled)
    seen = other.load(task, cancelled.id)
    assert seen is not None and seen.summary()["status"] == "queued"
    assert slots.queued == 1  # no longer in line
    assert slots.withdraw(timed_out, forget=True)
    assert other.load(task, timed_out.id) is None


def test_a_run_granted_by_another_worker_is_never_shown_queued_by_its_own(tmp_path):
    """Every listing shows a run running once another worker has granted it a slot; its own
    worker learns of the grant from a poller every 15 ms. Asked about the run before then,
    it used to answer "queued" after a listing had said "running" (3 of 30 runs with 2
    workers): now it starts the run first."""
    (tmp_path / "config.toml").write_text('[tasks.t]\ncommand = ["true"]\nmaxConcurrentTasks = 1\nqueueSize = 1\n')
    task = rtask.load_config(str(tmp_path / "config.toml"), rtask.Problems()).tasks["t"]
    mine, other = rtask.StateStore(str(tmp_path / "state")), rtask.StateStore(str(tmp_path / "state"))
    holder, waiting = (rtask.Run(task, rtask.Caller("ci", "api_key"), "127.0.0.1") for _ in range(2))
    started = threading.Event()
    assert rtask.ConcurrencyLimit("t", 1, 1, other).admit(holder, None) == "now"
    runs = rtask.RunStore(60, mine)
    waiting.launch = started.set
    runs.add(waiting)
    assert rtask.ConcurrencyLimit("t", 1, 1, mine).admit(waiting, started.set) == "queued"
    holder.mark_started()
    holder.finish("success", 0)
    other.finish(holder, 60, lambda: None)
    other.write_pending()
    rtask.ConcurrencyLimit("t", 1, 1, other).promote()  # the other worker grants it the slot
    assert runs.get(task, waiting.id) is waiting and started.is_set()


def test_listings_never_show_more_running_or_queued_than_the_limits(start_server):
    """One listing joins this worker's live runs and the stored rows: read at two moments,
    they used to show a run that had ended beside its successor (2 running with
    maxConcurrentTasks = 1, in 147 of 2506 listings) and requests still asking for a place in
    line that were then refused (more queued than queueSize)."""
    server, keys = start_server("""
        [tasks.q]
        command = ["sleep", "0.1"]
        apiKeyNames = ["ci"]
        async = true
        maxConcurrentTasks = 1
        queueSize = 2
        asyncResultRetentionSeconds = 600
        """)
    stop = time.monotonic() + 4
    wrong = []

    def post():
        while time.monotonic() < stop:
            server.post("q", key=keys["ci"])

    def list_runs():
        while time.monotonic() < stop:
            counts = collections.Counter(r["status"] for r in server.get("/tasks/q", key=keys["ci"]).json["runs"])
            if counts["running"] > 1 or counts["queued"] > 2:
                wrong.append(counts)
    threads = [threading.Thread(target=post) for _ in range(3)] + [threading.Thread(target=list_runs) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong, wrong[:5]


def test_requests_forwarded_to_another_worker_keep_their_path(wk_start):
    """A task name with '?', '%' and ' ' (names are what Go accepts): every worker answers a
    read of a running run, also when it forwards the request to the worker that runs it."""
    server, tokens = wk_start("""
        [tasks."odd?name %x"]
        command = ["sh", "-c", "sleep 3; echo done"]
        apiKeyNames = ["ci"]
        async = true
        """, run_args=("--workers", "4"))
    key = tokens["ci"]
    path = "/tasks/" + urllib.parse.quote("odd?name %x", safe="")
    run_id = server.request("POST", path, key=key).json["task_id"]
    answers = [server.get(f"{path}/{run_id}", key=key) for _ in range(16)]  # new connections: any worker
    assert all(a.status == 200 and a.json["task_id"] == run_id for a in answers), answers


def test_tls_handshakes_that_never_finish_do_not_lock_out_other_clients(tmp_path):
    """At the connection cap, connections stuck in their TLS handshake are closed first to make
    room, like idle keep-alive ones: a real client gets in at once."""
    cert, key = _ig_make_certificate(tmp_path)
    (tmp_path / "config.toml").write_text(_AV_CONFIG)
    new_key(tmp_path, "ci")
    server = _AvServer(tmp_path, run_args=("--tls-cert", str(cert), "--tls-key", str(key),
                                           "--max-connections", "4", "--max-connections-per-address", "4"))
    stuck = []
    try:
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall(b"\x16\x03\x01\x00\xc8\x01")  # the start of a ClientHello, then nothing
            stuck.append(s)
        time.sleep(0.5)
        context = ssl.create_default_context(cafile=str(cert))
        started = time.monotonic()
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=10,
                                           source_address=("127.0.0.2", 0))  # another client
        try:
            conn.request("GET", "/health")
            assert conn.getresponse().status == 200
        finally:
            conn.close()
        assert time.monotonic() - started < 3
    finally:
        for s in stuck:
            s.close()
        server.stop()


def test_a_run_end_the_store_could_not_write_frees_its_slot_once_written(start_server, tmp_path):
    """The state database is locked past its busy timeout while a run ends: the end is kept and
    written with the next write, so the task's only slot comes back (it used to be held for
    ever, every later request 429)."""
    import sqlite3
    server, tokens = start_server("""
        [tasks.one]
        command = ["sh", "-c", "sleep 1; echo ran"]
        apiKeyNames = ["ci"]
        async = true
        maxConcurrentTasks = 1
        """)
    key = tokens["ci"]
    first = server.post("one", key=key).json["task_id"]
    db = sqlite3.connect(tmp_path / "rtask-state" / "state.db", timeout=10, isolation_level=None)
    try:
        db.execute("BEGIN EXCLUSIVE")  # every writer of the server waits, then fails
        time.sleep(14)  # the run ends after 1 s (or a little more); its end write gives up after 10 s
        db.execute("ROLLBACK")
    finally:
        db.close()
    assert "cannot record runs in the state store" in server.log()
    second = server.post("one", key=key)
    assert second.status == 200, second
    assert server.get(f"/tasks/one/{first}", key=key).json["status"] == "success"
    result = server.get(f"/tasks/one/{second.json['task_id']}?wait=10", key=key).json
    assert (result["status"], result["stdout"]) == ("success", "ran\n"), result


def test_state_writers_wait_for_the_write_lock(start_server, tmp_path):
    """Every writer of the state store takes <state dir>/write.lock first (an flock: waiting
    writers are woken when it is free, rather than polling SQLite's lock): while it is held
    elsewhere, a run's end waits to be recorded and so its answer waits; once it is free, the
    answer comes at once."""
    server, tokens = start_server("""
        [tasks.quick]
        command = ["/bin/echo", "hi"]
        apiKeyNames = ["ci"]
        """)
    assert server.post("quick", key=tokens["ci"]).status == 200  # (the key is verified and cached)
    fd = os.open(tmp_path / "rtask-state" / "write.lock", os.O_RDWR)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            answer = pool.submit(lambda: server.post("quick", key=tokens["ci"]))
            time.sleep(1.5)
            assert not answer.done()
        finally:
            os.close(fd)
        started = time.monotonic()
        r = answer.result(timeout=10)
    assert (r.status, r.json["stdout"]) == (200, "hi\n")
    assert time.monotonic() - started < 2


def test_a_write_lock_held_for_ever_delays_an_answer_by_the_busy_timeout_only(start_server, tmp_path):
    """A process that holds <state dir>/write.lock and never lets go (a stopped worker): a
    run's end gives up waiting after the busy timeout (10 s), is logged, and is answered; the
    end is written once the lock is free, so the result can be read back."""
    server, tokens = start_server("""
        [tasks.quick]
        command = ["/bin/echo", "hi"]
        apiKeyNames = ["ci"]
        """)
    key = tokens["ci"]
    assert server.post("quick", key=key).status == 200
    fd = os.open(tmp_path / "rtask-state" / "write.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        started = time.monotonic()
        r = server.post("quick", key=key, timeout=30)
        assert 9 < time.monotonic() - started < 20
    finally:
        os.close(fd)
    assert (r.status, r.json["stdout"]) == (200, "hi\n")
    assert "write lock is held by another process for too long" in server.log()
    server.post("quick", key=key)  # the next write writes the kept end first
    assert server.get(f"/tasks/quick/{r.json['task_id']}", key=key).json == r.json


def test_a_reload_the_store_cannot_take_changes_nothing(start_server, tmp_path):
    """SIGHUP while the state database is locked past its busy timeout: the reload fails as a
    whole and the old limits stay (the old code had already raised the first task's
    maxConcurrentTasks in memory when the database refused it: half a reload)."""
    import sqlite3
    old = """
        [tasks.one]
        command = ["sh", "-c", "sleep 2; echo ran"]
        apiKeyNames = ["ci"]
        maxConcurrentTasks = 1
        """
    server, tokens = start_server(old)
    (tmp_path / "config.toml").write_text(textwrap.dedent(old).replace("= 1", "= 3"))
    db = sqlite3.connect(tmp_path / "rtask-state" / "state.db", timeout=10, isolation_level=None)
    try:
        db.execute("BEGIN EXCLUSIVE")
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload failed" in server.log(), timeout=20)
        db.execute("ROLLBACK")
    finally:
        db.close()
    assert "configuration reloaded" not in server.log()
    statuses = _wk_parallel(2, lambda i: server.post("one", key=tokens["ci"]).status)
    assert sorted(statuses) == [200, 429], statuses


def test_a_forwarded_request_checks_and_counts_its_credential_once(wk_start):
    """Reads of a run that another worker runs are forwarded to it: the credential is checked
    (and counted in auth_requests_total) by the worker that took the request, not again."""
    server, tokens = wk_start("""
        [tasks.slow]
        command = ["sh", "-c", "sleep 4; echo done"]
        apiKeyNames = ["ci"]
        async = true
        """, run_args=("--workers", "4"))
    key = tokens["ci"]
    run_id = server.post("slow", key=key).json["task_id"]
    answers = [server.get(f"/tasks/slow/{run_id}", key=key) for _ in range(16)]
    assert all(a.status == 200 and a.json["status"] == "running" for a in answers), answers
    wait_for(lambda: server.metric("auth_requests_total", method="api_key", result="success") >= 17)
    time.sleep(0.5)
    assert server.metric("auth_requests_total", method="api_key", result="success") == 17


def test_health_detailed_counts_the_runs_of_every_worker(wk_start):
    """/health/detailed is the same whichever worker answers: a running run of an unlimited
    task counts once, for every worker."""
    server, tokens = wk_start("""
        [tasks.free]
        command = ["sh", "-c", "sleep 4"]
        apiKeyNames = ["ci"]
        async = true
        """, run_args=("--workers", "4"))
    server.post("free", key=tokens["ci"])
    counts = [server.get("/health/detailed").json["tasks"]["free"]["running"] for _ in range(12)]
    assert counts == [1] * 12, counts


# =============================================================================================
# ===== Every run is supervised, also with one worker (issue 12 follow-up) =====
# =============================================================================================


def test_default_run_is_a_supervisor_with_one_worker(wk_start, tmp_path):
    """``run`` with no --workers: the supervisor and exactly one worker, which runs the tasks;
    the listening line counts it."""
    server, tokens = wk_start(_WK_CONFIG)
    worker = server.worker_pid()
    assert _wk_worker_pids(server) == [worker]
    run_id = server.post("later", key=tokens["ci"]).json["task_id"]
    assert wait_for(lambda: _wk_owners(tmp_path, "later").get(run_id)) == worker
    assert re.search(r"rtask listening\W.*workers=1", server.log()), server.log()


def test_default_run_replaces_a_killed_worker_and_fails_its_run(wk_start, tmp_path):
    """Default --workers 1, kill -9 of the worker: a new worker takes its place and serves;
    the run it held is stopped (its process group) and ends ``failure`` with the reason."""
    server, tokens = wk_start(_WK_CONFIG)
    key = tokens["ci"]
    run_id = server.post("later", key=key).json["task_id"]
    pgid = _wk_pgid_of_run(run_id)
    victim = server.worker_pid()
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: _wk_worker_pids(server) not in ([], [victim]), timeout=15)
    wait_for(lambda: not _wk_group_alive(pgid), timeout=10)
    result = wait_for(lambda: (r := server.get(f"/tasks/later/{run_id}", key=key).json)["status"] != "running"
                      and r, timeout=15)
    assert (result["status"], result["exit_code"]) == ("failure", -1), result
    assert "worker process running this task died (signal 9)" in result["stderr"]
    assert server.post("echo", key=key).json["stdout"] == "hi\n"  # the new worker serves
    assert server.worker_pid() != victim
    assert "worker died; starting another" in server.log()
    assert server.stop() == 0


def test_default_run_killed_supervisor_leaves_nothing_running(wk_start, tmp_path):
    """Default --workers 1, kill -9 of the supervisor: the worker stops its run (recorded as
    failure, naming the supervisor) and exits, and the port is freed."""
    server, tokens = wk_start(_WK_CONFIG)
    key = tokens["ci"]
    run_id = server.post("later", key=key).json["task_id"]
    pgid = _wk_pgid_of_run(run_id)
    worker = server.worker_pid()
    server.proc.kill()
    server.proc.wait()
    wait_for(lambda: not pid_alive(worker), timeout=15)
    wait_for(lambda: not _wk_group_alive(pgid), timeout=10)

    def nobody_listens():
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", server.port)) != 0
    wait_for(nobody_listens, timeout=10)
    server, _ = wk_start()
    result = server.get(f"/tasks/later/{run_id}", key=key).json
    assert (result["status"], result["exit_code"]) == ("failure", -1), result
    assert "supervisor" in result["stderr"], result


def test_a_full_tls_listener_closes_new_connections_without_plain_text(tmp_path):
    """At the cap of a TLS listener a new connection is closed: a plain-text 503 on a TLS port
    only breaks the client's handshake (curl reports a TLS error, not the 503)."""
    cert, key = _ig_make_certificate(tmp_path)
    (tmp_path / "config.toml").write_text(_AV_CONFIG)
    new_key(tmp_path, "ci")
    server = _AvServer(tmp_path, run_args=("--tls-cert", str(cert), "--tls-key", str(key),
                                           "--max-connections", "1"))
    context = ssl.create_default_context(cafile=str(cert))
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as busy:
            busy.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # a request under way: not idle
            time.sleep(0.5)
            refused = _av_connect(server.port, "127.0.0.2")
            with refused:
                assert refused.recv(65536) == b""  # closed, no plain text
    finally:
        server.stop()
