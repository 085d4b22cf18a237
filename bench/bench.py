#!/usr/bin/env python3
"""Benchmark rtask against adnanh/webhook on one trivial task (/bin/echo hi).

Both servers run on loopback ports of this machine and get the same load: wrk when it is
installed, else a Python keep-alive load generator. The script also measures the raw cost
of spawning the command from Python (the ceiling any Python server shares), rtask's idle
and loaded memory, its `--help` start-up time and, when the task can also be reached
through a webhook secret, what API-key authentication costs per request.

    python3 bench/bench.py              # 10 s runs at 4 and 16 connections
    python3 bench/bench.py --quick      # 2 s runs, a smoke check

Peers: `apt-get install -y webhook wrk` (Debian packages). See bench/README.md.
"""

import argparse
import base64
import http.client
import itertools
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
APT_LINE = "apt-get update && apt-get install -y webhook wrk"
HOST = "127.0.0.1"  # only loopback, ever
TASK = "echo"
COMMAND = ["/bin/echo", "hi"]
START_TIMEOUT = 20.0  # seconds a server gets to answer after it is started
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL
BASE_REVISION = "969341f"  # the last single-process rtask, before workers and the durable store


class BenchError(Exception):
    """A condition that makes the figures meaningless: the run stops with this message."""


def log(msg=""):
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- helpers

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http_call(port, method, path, headers=None, body=b"", timeout=10.0):
    """One request on a fresh connection: (status, body bytes)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        hdrs = {"Content-Length": str(len(body))}
        hdrs.update(headers or {})
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def proc_status(pid):
    """VmRSS and VmHWM of a process in MiB, from /proc (None when unreadable)."""
    out = {"VmRSS": None, "VmHWM": None}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in out:
                    out[key] = int(rest.split()[0]) / 1024.0
    except OSError:
        pass
    return out


def tail(path, lines=25):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


def scan_log(path):
    """Tracebacks and error/warning lines in a server log, summarised as notes."""
    try:
        with open(path, errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return []
    found = []
    tracebacks = [i for i, l in enumerate(lines) if l.startswith("Traceback")]
    if tracebacks:
        i = tracebacks[0]
        last = next((l.strip() for l in lines[i + 1:i + 60] if l and not l[0].isspace()), "?")
        found.append(f"rtask log has {len(tracebacks)} traceback(s), first ends: {last}")
    for level in ("error", "warning", "critical"):
        hits = [l.strip() for l in lines if re.search(rf"\b{level}\b", l, re.I)
                and not l.startswith(" ")]
        if hits:
            found.append(f"rtask log has {len(hits)} {level} line(s), first: {hits[0][:200]}")
    return found


def percentile(sorted_vals, p):
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, int(round(p / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


def fmt(v, nd=2):
    return "-" if v is None else f"{v:.{nd}f}"


def tool_version(argv):
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=5)
        return (out.stdout + out.stderr).strip().splitlines()[0].split(" Copyright")[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "?"


# --------------------------------------------------------------------------- servers

class Server:
    """A server process under test, with the URL path and headers of the benchmark request."""

    def __init__(self, name, proc, port, path, headers, log_path):
        self.name, self.proc, self.port = name, proc, port
        self.path, self.headers, self.log_path = path, headers, log_path

    @property
    def url(self):
        return f"http://{HOST}:{self.port}{self.path}"

    def alive(self):
        return self.proc.poll() is None

    def check_alive(self):
        if not self.alive():
            raise BenchError(f"{self.name} exited with code {self.proc.returncode} during the "
                             f"benchmark; last log lines:\n{tail(self.log_path)}")

    def stop(self):
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM: SIGKILL")
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def wait_port(server, deadline):
    while time.monotonic() < deadline:
        server.check_alive()
        try:
            with socket.create_connection((HOST, server.port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{server.name} did not open port {server.port} within {START_TIMEOUT:.0f} s; "
                     f"last log lines:\n{tail(server.log_path)}")


def wait_rtask_ready(server):
    """GET /health until 200; if /health is absent, until the task POST gets any answer."""
    deadline = time.monotonic() + START_TIMEOUT
    wait_port(server, deadline)
    while time.monotonic() < deadline:
        server.check_alive()
        try:
            status, _ = http_call(server.port, "GET", "/health", timeout=2)
            if status == 200:
                return "/health 200"
            status, _ = http_call(server.port, "POST", server.path, server.headers, timeout=5)
            return f"/health {status}, task POST answered {status}"
        except (OSError, http.client.HTTPException):
            time.sleep(0.1)
    raise BenchError(f"rtask did not answer HTTP within {START_TIMEOUT:.0f} s; last log lines:\n"
                     f"{tail(server.log_path)}")


def rtask_cmd(rtask, tmp, *args):
    return [sys.executable, rtask, "--config", os.path.join(tmp, "config.toml"),
            "--api-keys-file", os.path.join(tmp, "keys.toml"), *args]


def write_rtask_config(tmp, wh_secret):
    lines = [f"[tasks.{TASK}]",
             "command = " + json.dumps(COMMAND),
             'apiKeyNames = ["bench"]']
    if wh_secret:
        lines.append(f'webhookSecrets = {{ bench = "{wh_secret}" }}')
    with open(os.path.join(tmp, "config.toml"), "w") as f:
        f.write("\n".join(lines) + "\n")


def add_key(rtask, tmp):
    r = subprocess.run(rtask_cmd(rtask, tmp, "add-key", "bench"), capture_output=True,
                       text=True, timeout=60, cwd=tmp)
    m = re.search(r"API-KEY:\s*(\S+)", r.stdout)
    if r.returncode != 0 or not m:
        raise BenchError(f"`rtask add-key bench` failed (exit {r.returncode}).\nstdout: "
                         f"{r.stdout.strip()}\nstderr: {r.stderr.strip()[-2000:]}")
    return m.group(1)


def start_rtask(rtask, tmp, key, attempt):
    api, metrics = free_port(), free_port()
    log_path = os.path.join(tmp, f"rtask-{attempt}.log")
    logf = open(log_path, "wb")
    proc = subprocess.Popen(rtask_cmd(rtask, tmp, "run", "--api-address", f"{HOST}:{api}",
                                      "--metrics-address", f"{HOST}:{metrics}"),
                            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, cwd=tmp)
    logf.close()
    return Server("rtask", proc, api, f"/tasks/{TASK}", {"Authorization": f"Bearer {key}"},
                  log_path)


def verify_rtask(server):
    status, body = http_call(server.port, "POST", server.path, server.headers)
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if status != 200 or not isinstance(data, dict) or "hi" not in str(data.get("stdout", "")):
        raise BenchError(f"rtask check failed: POST {server.path} answered {status} "
                         f"{body[:300]!r}; expected 200 with \"hi\" in stdout. Log:\n"
                         f"{tail(server.log_path)}")
    return data


def start_webhook(tmp, auth_value):
    hooks = [{"id": TASK, "execute-command": COMMAND[0],
              "pass-arguments-to-command": [{"source": "string", "name": a} for a in COMMAND[1:]],
              "include-command-output-in-response": True}]
    hooks_path = os.path.join(tmp, "hooks.json")
    with open(hooks_path, "w") as f:
        json.dump(hooks, f)
    port = free_port()
    log_path = os.path.join(tmp, "webhook.log")
    logf = open(log_path, "wb")
    proc = subprocess.Popen(["webhook", "-hooks", hooks_path, "-ip", HOST, "-port", str(port),
                             "-http-methods", "POST", "-nopanic"],
                            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, cwd=tmp)
    logf.close()
    # An Authorization header as long as rtask's, so both parse as many bytes; webhook
    # ignores it.
    return Server("webhook", proc, port, f"/hooks/{TASK}", {"Authorization": auth_value},
                  log_path)


def verify_webhook(server):
    deadline = time.monotonic() + START_TIMEOUT
    wait_port(server, deadline)
    last = None
    while time.monotonic() < deadline:
        try:
            status, body = http_call(server.port, "POST", server.path, server.headers)
            if status == 200 and b"hi" in body:
                return
            last = f"{status} {body[:200]!r}"
        except (OSError, http.client.HTTPException) as e:
            last = repr(e)
        time.sleep(0.1)
    raise BenchError(f"webhook check failed: POST {server.path} answered {last}; expected 200 "
                     f"with \"hi\". Log:\n{tail(server.log_path)}")


# --------------------------------------------------------------------------- load

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}
_DURATION_RE = r"([\d.]+)(us|ms|s|m|h)"


def parse_wrk(out):
    res = {"rps": None, "p50": None, "p99": None, "requests": 0, "non2xx": 0, "errors": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        res["rps"] = float(m.group(1))
    for p in ("50", "99"):
        m = re.search(rf"^\s+{p}%\s+{_DURATION_RE}\s*$", out, re.M)
        if m:
            res["p" + p] = float(m.group(1)) * _UNITS_MS[m.group(2)]
    m = re.search(r"(\d+) requests in", out)
    if m:
        res["requests"] = int(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        res["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["errors"] = sum(int(x) for x in m.groups())
    return res


_SCRIPT_IDS = itertools.count()


def run_wrk(server, conns, duration, tmp, headers=None):
    headers = server.headers if headers is None else headers
    script = os.path.join(tmp, f"post-{next(_SCRIPT_IDS)}.lua")
    with open(script, "w") as f:
        f.write('wrk.method = "POST"\nwrk.body = ""\n')
        for k, v in headers.items():
            f.write(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n")
    argv = ["wrk", f"-t{min(2, conns)}", f"-c{conns}", f"-d{duration:g}s", "--timeout", "10s",
            "--latency", "-s", script, server.url]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    res = parse_wrk(r.stdout)
    if r.returncode != 0 or res["rps"] is None:
        raise BenchError(f"wrk failed (exit {r.returncode}): {' '.join(argv)}\n{r.stdout}\n{r.stderr}")
    return res


def run_pyload(server, conns, duration, headers=None):
    """Keep-alive load from `conns` threads, one connection each; latency per request."""
    headers = dict(server.headers if headers is None else headers)
    headers["Content-Length"] = "0"
    lats, counts = [], {"non2xx": 0, "errors": 0}
    lock = threading.Lock()
    start_evt = threading.Event()
    deadline = [0.0]

    def worker():
        mine, non2xx, errors = [], 0, 0
        conn = None
        start_evt.wait()
        while time.perf_counter() < deadline[0]:
            if conn is None:
                conn = http.client.HTTPConnection(HOST, server.port, timeout=10)
            t0 = time.perf_counter()
            try:
                conn.request("POST", server.path, body=b"", headers=headers)
                resp = conn.getresponse()
                resp.read()
                mine.append(time.perf_counter() - t0)
                if not 200 <= resp.status < 400:
                    non2xx += 1
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                errors += 1
                conn.close()
                conn = None
        if conn is not None:
            conn.close()
        with lock:
            lats.extend(mine)
            counts["non2xx"] += non2xx
            counts["errors"] += errors

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(conns)]
    for t in threads:
        t.start()
    t_start = time.perf_counter()
    deadline[0] = t_start + duration
    start_evt.set()
    for t in threads:
        t.join(duration + 15)
    elapsed = time.perf_counter() - t_start
    lats.sort()
    return {"rps": len(lats) / elapsed, "requests": len(lats),
            "p50": None if not lats else percentile(lats, 50) * 1000,
            "p99": None if not lats else percentile(lats, 99) * 1000,
            **counts}


def load(server, conns, duration, tmp, use_wrk, headers=None):
    server.check_alive()
    if use_wrk:
        res = run_wrk(server, conns, duration, tmp, headers)
    else:
        res = run_pyload(server, conns, duration, headers)
    server.check_alive()
    return res


# --------------------------------------------------------------------------- ceilings

def ceiling_subprocess(seconds, threads=1):
    """subprocess.run(["/bin/echo", "hi"], capture_output=True) in a loop: spawns/s."""
    counts = [0] * threads
    end = time.perf_counter() + seconds

    def loop(i):
        while time.perf_counter() < end:
            subprocess.run(COMMAND, capture_output=True, timeout=10)
            counts[i] += 1

    t0 = time.perf_counter()
    ts = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(seconds + 30)
    return sum(counts) / (time.perf_counter() - t0)


def ceiling_posix_spawn(seconds):
    """os.posix_spawn with stdout/stderr pipes, read to EOF, waitpid: spawns/s."""
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    env = dict(os.environ)
    while time.perf_counter() < end:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            pid = os.posix_spawn(COMMAND[0], COMMAND, env, file_actions=[
                (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)])
        finally:
            os.close(out_w)
            os.close(err_w)
        for fd in (out_r, err_r):
            while os.read(fd, 65536):
                pass
            os.close(fd)
        os.waitpid(pid, 0)
        n += 1
    return n / (time.perf_counter() - t0)


def previous_design(revision: str, tmp: str, name: str = "rtask.py") -> str | None:
    """A file of this repository (rtask.py, config.toml) as it was at git ``revision``, written
    into ``tmp``; its path, or None (logged) when git or the revision cannot give it."""
    try:
        source = subprocess.run(["git", "-C", HERE, "show", f"{revision}:{name}"], capture_output=True,
                                check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        log(f"no {name} at git revision {revision!r}: the previous design is not measured")
        return None
    path = os.path.join(tmp, f"{revision}-{name}")
    with open(path, "wb") as f:
        f.write(source)
    return path


def median_wall(argv, runs=10):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, capture_output=True, timeout=30)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


# --------------------------------------------------------------------------- main

def wrong_key(key):
    """The same key with its last secret byte flipped: a known id, a wrong secret."""
    try:
        raw = bytearray(base64.urlsafe_b64decode(key + "=" * (-len(key) % 4)))
        raw[-1] ^= 0x01
        return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode(), "known id, wrong secret"
    except (ValueError, IndexError):
        return "A" * len(key), "undecodable token"


def pick(rounds):
    """Best round by req/s (its p50/p99 come with it)."""
    return max(rounds, key=lambda r: r["rps"] or 0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per load run (10)")
    ap.add_argument("--connections", default="4,16", help="comma-separated list (4,16)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per server (2)")
    ap.add_argument("--rtask", default=os.path.join(HERE, "..", "rtask.py"),
                    help="path to rtask.py (../rtask.py next to this script)")
    ap.add_argument("--quick", action="store_true", help="2 s runs, short ceilings: smoke check")
    ap.add_argument("--python-load", action="store_true",
                    help="use the Python load generator even when wrk is installed")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration = 2.0
    conns_list = [int(c) for c in args.connections.split(",") if c.strip()]
    if not conns_list or min(conns_list) < 1 or args.rounds < 1 or args.duration <= 0:
        ap.error("--connections needs positive integers, --rounds and --duration positive values")
    ceil_s = 1.0 if args.quick else 3.0
    rtask_path = os.path.abspath(args.rtask)

    have_webhook = shutil.which("webhook") is not None
    use_wrk = shutil.which("wrk") is not None and not args.python_load
    have_rtask = os.path.isfile(rtask_path)
    if not have_webhook or shutil.which("wrk") is None:
        missing = [n for n in ("webhook", "wrk") if shutil.which(n) is None]
        log(f"note: {' and '.join(missing)} not installed; to compare fully, run as root:\n"
            f"    {APT_LINE}")
    if not have_rtask:
        log(f"note: {rtask_path} not found: measuring the peer and the ceilings only")

    tmp = tempfile.mkdtemp(prefix="rtask-bench-")
    servers, notes, report = [], [], []
    rtask_srv = webhook_srv = None
    rtask_exit = None
    log_findings = []
    try:
        # ---- ceilings and start-up, first, while no server is using the CPUs
        log("spawn ceilings and --help timing ...")
        ceil = [("subprocess.run, 1 thread", ceiling_subprocess(ceil_s, 1)),
                ("subprocess.run, 2 threads", ceiling_subprocess(ceil_s, 2)),
                ("os.posix_spawn + pipes, 1 thread", ceiling_posix_spawn(ceil_s))]
        help_ms = base_ms = None
        if have_rtask:
            help_ms = median_wall([sys.executable, rtask_path, "--help"])
            base_ms = median_wall([sys.executable, "-c", "pass"])

        # ---- start and verify the servers
        mem = {}
        wh_secret = None
        auth_split = False
        if have_rtask:
            # A webhook secret on the same task lets the auth cost be separated; an rtask
            # that does not know `webhookSecrets` yet is restarted without it.
            wh_secret = secrets.token_urlsafe(24)
            write_rtask_config(tmp, wh_secret)
            key = add_key(rtask_path, tmp)
            rtask_srv = start_rtask(rtask_path, tmp, key, 1)
            try:
                how = wait_rtask_ready(rtask_srv)
            except BenchError as e:
                rtask_srv.stop()
                log(f"rtask did not start with a webhookSecrets entry ({str(e).splitlines()[0]}); "
                    "retrying without it")
                wh_secret = None
                write_rtask_config(tmp, None)
                rtask_srv = start_rtask(rtask_path, tmp, key, 2)
                how = wait_rtask_ready(rtask_srv)
            log(f"rtask up on {HOST}:{rtask_srv.port} (ready: {how})")
            mem["idle"] = proc_status(rtask_srv.proc.pid)
            data = verify_rtask(rtask_srv)
            log(f"rtask check: 200 {json.dumps(data)[:200]}")
            servers.append(rtask_srv)
            if wh_secret:
                status, body = http_call(rtask_srv.port, "POST", f"/wh/{wh_secret}")
                if status == 200 and b"hi" in body:
                    auth_split = True
                else:
                    notes.append(f"POST /wh/<secret> answered {status} {body[:120]!r}: "
                                 "auth cost not separated")
        if have_webhook:
            webhook_srv = start_webhook(
                tmp, rtask_srv.headers["Authorization"] if rtask_srv else "Bearer " + "x" * 59)
            verify_webhook(webhook_srv)
            log(f"webhook up on {HOST}:{webhook_srv.port}, check: 200 hi")
            servers.append(webhook_srv)
        if not servers:
            raise BenchError("neither rtask nor webhook is available: nothing to measure")

        # ---- warm-up, then alternating rounds
        for s in servers:
            load(s, conns_list[0], min(1.0, args.duration), tmp, use_wrk)
        results = {}
        for c in conns_list:
            for rnd in range(args.rounds):
                for s in servers:
                    r = load(s, c, args.duration, tmp, use_wrk)
                    results.setdefault((s.name, c), []).append(r)
                    log(f"  {s.name:8} c={c:<3} round {rnd + 1}: {fmt(r['rps'], 1)} req/s, "
                        f"p50 {fmt(r['p50'])} ms, p99 {fmt(r['p99'])} ms, "
                        f"non-2xx {r['non2xx']}, socket errors {r['errors']}")
        if rtask_srv:
            mem["after load"] = proc_status(rtask_srv.proc.pid)
        wh_mem = proc_status(webhook_srv.proc.pid) if webhook_srv else None

        # ---- auth cost: same task, same spawn, key route vs. webhook-secret route
        auth = None
        if rtask_srv and auth_split:
            c = conns_list[0]
            wh_view = Server("rtask /wh", rtask_srv.proc, rtask_srv.port, f"/wh/{wh_secret}", {},
                             rtask_srv.log_path)
            key_runs, wh_runs = [], []
            for _ in range(args.rounds):
                key_runs.append(load(rtask_srv, c, args.duration, tmp, use_wrk))
                wh_runs.append(load(wh_view, c, args.duration, tmp, use_wrk))
            auth = (c, pick(key_runs), pick(wh_runs))

        # ---- rejected requests: HTTP + auth work without a spawn
        rejects = []
        if rtask_srv:
            c = conns_list[-1]
            bad, kind = wrong_key(key)
            for label, hdrs in (("no Authorization header", {}),
                                (f"bad key ({kind})", {"Authorization": f"Bearer {bad}"})):
                status, _ = http_call(rtask_srv.port, "POST", rtask_srv.path, hdrs)
                r = load(rtask_srv, c, min(args.duration, 5.0), tmp, use_wrk, headers=hdrs)
                rejects.append((label, status, c, r))
            time.sleep(1.0)  # let requests still queued in the server finish
            mem["after rejects"] = proc_status(rtask_srv.proc.pid)

    finally:
        if rtask_srv:
            rtask_exit = rtask_srv.stop()
            log_findings = scan_log(rtask_srv.log_path)
        if webhook_srv:
            webhook_srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    # ---- report
    pick_note = f"best of {args.rounds} alternating rounds by req/s" if args.rounds > 1 \
        else "one round"
    loader = "wrk -t2 --latency, keep-alive" if use_wrk else \
        "Python keep-alive generator (wrk not installed)"
    out = report
    out.append(f"rtask benchmark: POST -> /bin/echo hi, {args.duration:g} s runs, {pick_note}")
    out.append(f"machine: {os.cpu_count()} CPUs, {platform.platform()}, Python "
               f"{platform.python_version()}")
    versions = [v for v in ((tool_version(["wrk", "-v"]) if use_wrk else ""),
                            (tool_version(["webhook", "-version"]) if have_webhook else "")) if v]
    out.append(f"load: {loader}" + ("; " + ", ".join(versions) if versions else ""))
    out.append("")
    out.append(f"{'server':<10}{'conns':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
               f"{'non-2xx':>9}{'errors':>8}")
    out.append("-" * 61)
    for c in conns_list:
        for s in servers:
            r = pick(results[(s.name, c)])
            bad = sum(x["non2xx"] for x in results[(s.name, c)])
            err = sum(x["errors"] for x in results[(s.name, c)])
            out.append(f"{s.name:<10}{c:>6}{fmt(r['rps'], 1):>10}{fmt(r['p50']):>9}"
                       f"{fmt(r['p99']):>9}{bad:>9}{err:>8}")
            if s.name == "rtask" and (bad or err):
                notes.append(f"rtask gave {bad} non-2xx answers and {err} socket errors at c={c}")
    out.append("(non-2xx and errors are summed over all rounds)")

    ratios = []
    if rtask_srv and webhook_srv:
        out.append("")
        out.append(f"{'rtask/webhook':<14}{'conns':>6}{'req/s':>9}{'p99':>9}")
        for c in conns_list:
            a, b = pick(results[("rtask", c)]), pick(results[("webhook", c)])
            rr = a["rps"] / b["rps"] if a["rps"] and b["rps"] else None
            pr = a["p99"] / b["p99"] if a["p99"] and b["p99"] else None
            out.append(f"{'':<14}{c:>6}{fmt(rr):>8}x{fmt(pr):>8}x")
            ratios.append(f"c={c}: req/s {fmt(rr)}x, p99 {fmt(pr)}x")

    out.append("")
    out.append("spawn ceiling (Python, same machine, /bin/echo hi, stdout+stderr captured):")
    for label, v in ceil:
        out.append(f"  {label:<36}{v:>9.0f} spawns/s")

    if rtask_srv:
        out.append("")
        out.append("rtask memory (main process, /proc VmRSS; VmHWM = peak):")
        for label, m in mem.items():
            out.append(f"  {label:<16} VmRSS {fmt(m['VmRSS'], 1):>7} MiB   VmHWM "
                       f"{fmt(m['VmHWM'], 1):>7} MiB")
        if wh_mem:
            out.append(f"  (webhook after load: VmRSS {fmt(wh_mem['VmRSS'], 1)} MiB)")
        out.append(f"rtask --help: {fmt(help_ms, 1)} ms median of 10 "
                   f"(python3 -c pass: {fmt(base_ms, 1)} ms)")
        if auth:
            c, k, w = auth
            out.append("")
            out.append(f"auth cost, same task and spawn, c={c} ({pick_note}):")
            out.append(f"  POST /tasks/echo + API key   {fmt(k['rps'], 1):>8} req/s  p50 "
                       f"{fmt(k['p50'])} ms  p99 {fmt(k['p99'])} ms  non-2xx {k['non2xx']}")
            out.append(f"  POST /wh/<secret>, no key    {fmt(w['rps'], 1):>8} req/s  p50 "
                       f"{fmt(w['p50'])} ms  p99 {fmt(w['p99'])} ms  non-2xx {w['non2xx']}")
            if k["rps"] and w["rps"]:
                per_req = (1.0 / k["rps"] - 1.0 / w["rps"]) * 1000
                if per_req > 0:
                    out.append(f"  => key check costs about {per_req:.3f} ms of server time per "
                               f"request (1/rps difference)")
                else:
                    out.append("  => no measurable cost: the key route was not slower "
                               "(difference within run-to-run noise)")
        else:
            out.append("auth cost: not separated (no working /wh/<secret> route to compare with)")
        for label, status, c, r in rejects:
            out.append(f"rejected, {label}: first answer {status}; {fmt(r['rps'], 1)} req/s at "
                       f"c={c}, p50 {fmt(r['p50'])} ms, p99 {fmt(r['p99'])} ms")
            if status != 401:
                notes.append(f"{label}: expected 401, got {status}")
        if rejects and all(r["p50"] and 38 <= r["p50"] <= 48 for _, _, _, r in rejects):
            notes.append("rtask answers even a 401 in ~40-44 ms: the TCP delayed-ACK/Nagle stall "
                         "of a response written in two send() calls (headers, then body) on a "
                         "keep-alive connection; write the response in one call or set "
                         "TCP_NODELAY")
        out.append(f"rtask exit code after SIGTERM: {rtask_exit}")
        if rtask_exit != 0:
            notes.append(f"rtask exited {rtask_exit} on SIGTERM (expected 0)")

    notes.extend(log_findings)
    for n in notes:
        out.append(f"NOTE: {n}")
    out.append("")
    if ratios:
        out.append("RATIOS rtask/webhook: " + "; ".join(ratios))
    elif rtask_srv:
        out.append("RATIOS rtask/webhook: n/a (webhook not installed: " + APT_LINE + ")")
    else:
        out.append("RATIOS rtask/webhook: n/a (rtask.py not found)")
    print("\n".join(out), flush=True)
    return 0


def run_main(main):
    """Run a benchmark's main(): a BenchError is one line on stderr and exit 1."""
    try:
        sys.exit(main())
    except BenchError as e:
        log(f"bench: {e}")
        sys.exit(1)
    except KeyboardInterrupt:
        log("bench: interrupted")
        sys.exit(130)


if __name__ == "__main__":
    run_main(main)
