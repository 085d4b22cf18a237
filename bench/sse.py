#!/usr/bin/env python3
"""Benchmark rtask's live output (Server-Sent Events, README §5).

Two figures:

- **Line latency**: an async task runs a small Python script that writes N lines (default
  1000) to stdout, one every ~2 ms, each carrying its own time.time_ns(); a client reading
  `GET /tasks/<task>/<id>/events` notes when each line arrives. Latency = receive time -
  embedded time (same machine, same CLOCK_REALTIME). Median, p90, p99 and max per run, over
  several runs (target: < 5 ms median on loopback).
- **Memory of open streams**: 100 SSE streams held open at once on long-running tasks; the
  server's VmRSS and thread count (from /proc) before and while they are open, and after
  they are closed. Done twice: 100 streams on 100 runs (one each), then 100 streams on one run.

    python3 bench/sse.py            # 3 latency runs of 1000 lines, then 100 streams
    python3 bench/sse.py --runs 1   # a quicker check

Everything runs on 127.0.0.1 in a temporary directory removed afterwards. Progress goes to
stderr, the report to stdout; its last line is the summary.
"""

import argparse
import json
import os
import re
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# Shared helpers of the main benchmark (same directory; its main() only runs as a script).
from bench import (HOST, START_TIMEOUT, BenchError, Server, add_key, fmt, http_call, run_main,  # noqa: E402
                   log, percentile, rtask_cmd, scan_log, tail)

LINES_TASK = "lines"
TICKER_TASK = "ticker"
TICKER_SECONDS = 20  # the ticker runs this long, printing one line a second
MAX_OUTPUT = 1_000_000  # maxOutputBytes of the lines task: 1000 lines fit easily
READ_TIMEOUT = 10.0  # seconds a stream may stay silent before the client gives up

# Writes argv[1] lines "<seq> <time_ns>\n", flushing each, argv[2] seconds apart, after
# waiting argv[3] seconds (time for the client to open the stream: no line is backlog).
LINES_SCRIPT = r"""
import sys, time
n, gap, delay = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
time.sleep(delay)
out = sys.stdout
for i in range(n):
    out.write(f"{i} {time.time_ns()}\n")
    out.flush()
    time.sleep(gap)
"""

TICKER_SCRIPT = (f"i=0; while [ $i -lt {TICKER_SECONDS} ]; do echo tick $i; i=$((i+1)); "
                 "sleep 1; done")


# --------------------------------------------------------------------------- server

def write_config(tmp, lines, gap, delay):
    tasks = {
        LINES_TASK: {"command": [sys.executable, "-c", LINES_SCRIPT, str(lines), str(gap),
                                 str(delay)],
                     "async": True, "maxOutputBytes": MAX_OUTPUT,
                     "executionTimeoutSeconds": 120},
        TICKER_TASK: {"command": ["/bin/sh", "-c", TICKER_SCRIPT], "async": True,
                      "executionTimeoutSeconds": TICKER_SECONDS + 30},
    }
    out = []
    for name, opts in tasks.items():
        out.append(f"[tasks.{name}]")
        out.append('apiKeyNames = ["bench"]')
        for k, v in opts.items():
            out.append(f"{k} = {'true' if v is True else json.dumps(v)}")
        out.append("")
    with open(os.path.join(tmp, "config.toml"), "w") as f:
        f.write("\n".join(out))


def start_server(rtask, tmp, token):
    """rtask on 127.0.0.1:0; the ports are read from its 'rtask listening' log line."""
    log_path = os.path.join(tmp, "rtask.log")
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(rtask_cmd(rtask, tmp, "run", "--api-address", f"{HOST}:0",
                                          "--metrics-address", f"{HOST}:0"),
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, cwd=tmp)
    srv = Server("rtask", proc, None, "", {"Authorization": f"Bearer {token}"}, log_path)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"rtask exited with code {proc.returncode} at start-up; log:\n"
                             f"{tail(log_path)}")
        with open(log_path, errors="replace") as f:
            m = re.search(r"rtask listening.*?api=\S*?:(\d+)\b", f.read())
        if m:
            srv.port = int(m.group(1))
            break
        time.sleep(0.05)
    else:
        srv.stop()
        raise BenchError(f"no 'rtask listening' line within {START_TIMEOUT:.0f} s; log:\n"
                         f"{tail(log_path)}")
    status, body = http_call(srv.port, "GET", "/health", timeout=5)
    if status != 200:
        srv.stop()
        raise BenchError(f"GET /health answered {status} {body[:200]!r}")
    return srv


def proc_fields(pid, names=("VmRSS", "VmHWM", "Threads")):
    """Fields of /proc/<pid>/status: Vm* in MiB, Threads as a count (None when unreadable)."""
    out = dict.fromkeys(names)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in out:
                    v = int(rest.split()[0])
                    out[key] = v / 1024.0 if key.startswith("Vm") else v
    except OSError:
        pass
    return out


def wait_threads(pid, target, seconds):
    """Poll /proc until the thread count is back to ``target`` (or ``seconds`` pass)."""
    end = time.monotonic() + seconds
    while True:
        now = proc_fields(pid)
        if now["Threads"] is None or now["Threads"] <= target or time.monotonic() > end:
            return now
        time.sleep(0.1)


def broken_pipe_tracebacks(log_path):
    """'internal error' log lines whose traceback is a client gone away in stream_events."""
    try:
        with open(log_path, errors="replace") as f:
            return sum(1 for line in f if '"internal error"' in line and "stream_events" in line
                       and re.search(r"BrokenPipeError|ConnectionResetError", line))
    except OSError:
        return 0


def post_async(srv, task):
    status, body = http_call(srv.port, "POST", f"/tasks/{task}", srv.headers)
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if status != 200 or not isinstance(data, dict) or not data.get("task_id"):
        raise BenchError(f"POST /tasks/{task} answered {status} {body[:300]!r}; expected 200 "
                         f"with a task_id")
    return data["task_id"]


def cancel(srv, task, run_id):
    try:
        status, body = http_call(srv.port, "DELETE", f"/tasks/{task}/{run_id}", srv.headers,
                                 timeout=15)
        return status, json.loads(body).get("status") if body else None
    except (OSError, ValueError) as e:
        return None, repr(e)


# --------------------------------------------------------------------------- SSE client

class Stream:
    """One raw-socket SSE reader: parses the HTTP head, then events, and stamps each event
    with the time.time_ns() of the recv() that completed it."""

    def __init__(self, port, path, token):
        self.sock = socket.create_connection((HOST, port), timeout=READ_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                           f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n"
                           "\r\n").encode())
        self.opened_ns = time.time_ns()
        self.buf = b""
        self.head = None  # (status, headers dict) once read
        self.event, self.data = None, []
        self.eof = False
        self.ended = False  # a result event arrived
        self.count = 0  # events received

    def recv(self):
        """Read what is there (blocking); return [(recv_ns, event, data)] completed by it."""
        chunk = self.sock.recv(65536)
        t = time.time_ns()
        if not chunk:
            self.eof = True
            return []
        self.buf += chunk
        if self.head is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return []
            lines = self.buf[:end].decode("latin-1").split("\r\n")
            self.buf = self.buf[end + 4:]
            parts = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            self.head = (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0, headers)
            if self.head[0] != 200:
                return []
        events = []
        *complete, self.buf = self.buf.split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8").rstrip("\r")
            if not line:
                if self.event is not None or self.data:
                    events.append((t, self.event or "message", "\n".join(self.data)))
                    self.count += 1
                    if self.event == "result":
                        self.ended = True
                self.event, self.data = None, []
            elif line.startswith(":"):
                continue
            else:
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "event":
                    self.event = value
                elif field == "data":
                    self.data.append(value)
        return events

    def check_head(self):
        status, headers = self.head
        if status != 200 or "text/event-stream" not in headers.get("content-type", ""):
            rest = self.buf[:300]
            raise BenchError(f"GET events answered {status} {headers} {rest!r}; expected 200 "
                             f"text/event-stream")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------- latency

def latency_run(srv, token, n_lines, gap):
    """One run of the lines task, followed live; latencies in ms of the non-backlog lines."""
    run_id = post_async(srv, LINES_TASK)
    st = Stream(srv.port, f"/tasks/{LINES_TASK}/{run_id}/events", token)
    lats, seen, dupes = [], set(), 0
    backlog = batched = stdout_events = other = 0
    result = None
    deadline = time.monotonic() + 30 + n_lines * gap * 3
    try:
        while not st.ended and not st.eof:
            if time.monotonic() > deadline:
                raise BenchError(f"latency run {run_id}: no result event before the deadline "
                                 f"({len(seen)} lines so far)")
            try:
                events = st.recv()
            except socket.timeout:
                raise BenchError(f"latency run {run_id}: stream silent for {READ_TIMEOUT:.0f} s "
                                 f"after {len(seen)} lines; log:\n{tail(srv.log_path)}") from None
            if st.head is not None:
                st.check_head()
            for t, name, data in events:
                if name == "result":
                    result = json.loads(data)
                    continue
                if name != "stdout":
                    other += 1
                    continue
                stdout_events += 1
                lines = [l for l in json.loads(data).split("\n") if l]
                batched += len(lines) > 1
                for line in lines:
                    seq, ns = (int(x) for x in line.split())
                    if seq in seen:
                        dupes += 1
                    seen.add(seq)
                    if ns < st.opened_ns:
                        backlog += 1  # written before the stream was open: not a latency
                    else:
                        lats.append((t - ns) / 1e6)
    finally:
        st.close()
    missing = n_lines - len(seen & set(range(n_lines)))
    return {"run_id": run_id, "lats": sorted(lats), "received": len(seen) + dupes,
            "missing": missing, "dupes": dupes, "backlog": backlog, "events": stdout_events,
            "batched": batched, "other_events": other, "result": result, "eof": st.eof}


def lat_stats(lats):
    return {"median": statistics.median(lats) if lats else None,
            "p90": percentile(lats, 90), "p99": percentile(lats, 99),
            "max": lats[-1] if lats else None, "min": lats[0] if lats else None}


# --------------------------------------------------------------------------- memory

def streams_memory(srv, token, n_runs, n_streams, idle_threads, notes):
    """Open n_streams SSE streams spread over n_runs ticker runs; /proc figures around it."""
    pid = srv.proc.pid
    runs = [post_async(srv, TICKER_TASK) for _ in range(n_runs)]
    t_started = time.monotonic()
    # Warm-up: one stream opened and closed first, so one-time costs are not counted.
    warm = Stream(srv.port, f"/tasks/{TICKER_TASK}/{runs[0]}/events", token)
    t_end = time.monotonic() + READ_TIMEOUT
    while not warm.count and not warm.eof and time.monotonic() < t_end:
        warm.recv()
    warm.close()
    # Its handler notices the close at a later tick; other short-lived handlers end too.
    wait_threads(pid, idle_threads, 5.0)
    before = proc_fields(pid)

    streams = []
    sel = selectors.DefaultSelector()
    try:
        for i in range(n_streams):
            st = Stream(srv.port, f"/tasks/{TICKER_TASK}/{runs[i % n_runs]}/events", token)
            st.sock.setblocking(False)
            sel.register(st.sock, selectors.EVENT_READ, st)
            streams.append(st)

        def pump(seconds):
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for key, _ in sel.select(timeout=0.1):
                    st = key.data
                    try:
                        st.recv()
                    except BlockingIOError:
                        continue
                    except OSError:
                        st.eof = True
                    if st.head is not None:
                        st.check_head()
                    if st.eof or st.ended:
                        sel.unregister(st.sock)

        # Until every stream has had its first event (or a deadline), then 2 s more.
        t_open = time.monotonic()
        while time.monotonic() - t_open < 15 and not all(s.count or s.eof for s in streams):
            pump(0.1)
        t_first = time.monotonic() - t_open
        samples = []
        for _ in range(8):
            pump(0.25)
            samples.append(proc_fields(pid))
        live = sum(1 for s in streams if s.count and not s.eof and not s.ended)
        during = samples[-1]
        rss_peak = max(s["VmRSS"] or 0 for s in samples)
        if live != n_streams:
            notes.append(f"{n_streams} streams on {n_runs} run(s): only {live} were live at "
                         f"the measurement ({sum(s.eof for s in streams)} closed, "
                         f"{sum(not s.count for s in streams)} without an event)")
        elapsed = time.monotonic() - t_started
    finally:
        for st in streams:
            st.close()
        sel.close()
    # The handlers notice closed sockets at their next write (a tick comes every second).
    t_close = time.monotonic()
    after = wait_threads(pid, before["Threads"], 6.0)
    t_threads_back = time.monotonic() - t_close
    cancelled = {}
    for run_id in runs:
        status, final = cancel(srv, TICKER_TASK, run_id)
        cancelled[(status, final)] = cancelled.get((status, final), 0) + 1
    if elapsed > TICKER_SECONDS:
        notes.append(f"the ticker runs ({TICKER_SECONDS} s) may have ended before the "
                     f"measurement ({elapsed:.1f} s after they started)")
    bad = {k: v for k, v in cancelled.items() if k != (200, "cancelled")}
    if bad:
        notes.append(f"DELETE of the {n_runs} ticker run(s): {bad} not 200 cancelled")
    time.sleep(0.5)
    return {"runs": n_runs, "streams": n_streams, "live": live, "before": before,
            "during": during, "rss_peak": rss_peak, "after": after, "first_event_s": t_first,
            "threads_back_s": t_threads_back, "after_cancel": proc_fields(pid)}


# --------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rtask", default=os.path.join(HERE, "..", "rtask.py"),
                    help="path to rtask.py (../rtask.py next to this script)")
    ap.add_argument("--runs", type=int, default=3, help="latency runs (3)")
    ap.add_argument("--lines", type=int, default=1000, help="lines per latency run (1000)")
    ap.add_argument("--gap-ms", type=float, default=2.0, help="ms between lines (2)")
    ap.add_argument("--streams", type=int, default=100, help="open streams to measure (100)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the temporary directory (config, keys, rtask.log) and print it")
    args = ap.parse_args(argv)
    if not (1 <= args.runs <= 20 and 1 <= args.lines <= 100_000 and 0 <= args.gap_ms <= 100
            and 1 <= args.streams <= 500):
        ap.error("--runs 1..20, --lines 1..100000, --gap-ms 0..100, --streams 1..500")
    rtask = os.path.abspath(args.rtask)
    if not os.path.isfile(rtask):
        raise BenchError(f"{rtask} not found (pass --rtask PATH)")
    if args.lines * 20 > MAX_OUTPUT:
        raise BenchError(f"--lines {args.lines}: more output than maxOutputBytes {MAX_OUTPUT}")

    gap = args.gap_ms / 1000.0
    tmp = tempfile.mkdtemp(prefix="rtask-bench-sse-")
    srv = None
    notes, lat_runs, mem_runs = [], [], []
    exit_code = None
    findings = []
    try:
        write_config(tmp, args.lines, gap, 0.5)
        token = add_key(rtask, tmp)
        srv = start_server(rtask, tmp, token)
        log(f"rtask up on {HOST}:{srv.port} (pid {srv.proc.pid})")
        # Idle: the fewest threads over 1 s (the /health check's handler may still be ending).
        idle = min((proc_fields(srv.proc.pid) for _ in range(10) if not time.sleep(0.1)),
                   key=lambda f: f["Threads"] or 0)

        for i in range(args.runs):
            log(f"latency run {i + 1}/{args.runs}: {args.lines} lines, {args.gap_ms:g} ms apart")
            r = latency_run(srv, token, args.lines, gap)
            srv.check_alive()
            lat_runs.append(r)
            res = r["result"] or {}
            if r["received"] != args.lines or r["missing"] or r["dupes"]:
                notes.append(f"latency run {i + 1}: received {r['received']} lines, missing "
                             f"{r['missing']}, duplicated {r['dupes']} (expected {args.lines})")
            if res.get("status") != "success" or res.get("exit_code") != 0:
                notes.append(f"latency run {i + 1}: result event {json.dumps(res)[:200]}")
            if res.get("stdout_truncated"):
                notes.append(f"latency run {i + 1}: stdout_truncated in the result")
            if r["backlog"]:
                notes.append(f"latency run {i + 1}: {r['backlog']} line(s) were written before "
                             f"the stream opened; left out of the latency figures")
            if r["other_events"]:
                notes.append(f"latency run {i + 1}: {r['other_events']} unexpected non-stdout "
                             f"event(s)")
            if not r["result"]:
                notes.append(f"latency run {i + 1}: the stream closed without a result event")

        for n_runs in (args.streams, 1):
            log(f"memory: {args.streams} streams on {n_runs} ticker run(s) ...")
            mem_runs.append(streams_memory(srv, token, n_runs, args.streams,
                                           idle["Threads"], notes))
            srv.check_alive()
    finally:
        if srv:
            exit_code = srv.stop()
            findings = scan_log(srv.log_path)
            closed = sum(m["streams"] + 1 for m in mem_runs)  # +1: the warm-up stream
            pipes = broken_pipe_tracebacks(srv.log_path)
            if pipes:
                findings.insert(0, f"rtask logged {pipes} 'internal error' tracebacks at level "
                                   f"error (BrokenPipeError/ConnectionResetError in "
                                   f"stream_events) for the {closed} SSE streams this client "
                                   f"closed: a reader going away is logged as a server error")
        if args.keep:
            log(f"kept {tmp} (rtask.log, config.toml, keys.toml)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- report
    out = [f"rtask SSE benchmark: {args.runs} run(s) of {args.lines} lines, "
           f"{args.gap_ms:g} ms apart; then {args.streams} open streams",
           f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; server idle VmRSS "
           f"{fmt(idle['VmRSS'], 1)} MiB, {idle['Threads']} threads", "",
           "line latency (process write -> SSE client recv), ms:",
           f"  {'run':<6}{'lines':>6}{'events':>8}{'multi':>7}{'median':>8}{'p90':>8}{'p99':>8}"
           f"{'max':>8}{'min':>8}"]
    for i, r in enumerate(lat_runs):
        s = lat_stats(r["lats"])
        out.append(f"  {i + 1:<6}{r['received']:>6}{r['events']:>8}{r['batched']:>7}"
                   f"{fmt(s['median'], 3):>8}{fmt(s['p90'], 3):>8}{fmt(s['p99'], 3):>8}"
                   f"{fmt(s['max'], 3):>8}{fmt(s['min'], 3):>8}")
    pooled = sorted(x for r in lat_runs for x in r["lats"])
    ps = lat_stats(pooled)
    out.append(f"  {'all':<6}{len(pooled):>6}{sum(r['events'] for r in lat_runs):>8}"
               f"{sum(r['batched'] for r in lat_runs):>7}{fmt(ps['median'], 3):>8}"
               f"{fmt(ps['p90'], 3):>8}{fmt(ps['p99'], 3):>8}{fmt(ps['max'], 3):>8}"
               f"{fmt(ps['min'], 3):>8}")
    out.append("  (events = stdout events; multi = events that carried more than one line)")
    out.append("")
    out.append("open streams (server VmRSS from /proc; 'during' = all streams open, after "
               "2 s of reading):")
    for m in mem_runs:
        d = (m["during"]["VmRSS"] or 0) - (m["before"]["VmRSS"] or 0)
        out.append(f"  {m['streams']} streams on {m['runs']} run(s): VmRSS {fmt(m['before']['VmRSS'], 1)}"
                   f" -> {fmt(m['during']['VmRSS'], 1)} MiB (+{d:.1f} MiB, {d / m['streams']:.3f} "
                   f"MiB/stream; peak {fmt(m['rss_peak'], 1)}); threads {m['before']['Threads']} -> "
                   f"{m['during']['Threads']}; {m['live']} live")
        out.append(f"    all had an event after {m['first_event_s']:.2f} s; after close: threads "
                   f"{m['after']['Threads']} within {m['threads_back_s']:.1f} s, VmRSS "
                   f"{fmt(m['after']['VmRSS'], 1)} MiB; after cancelling the runs: VmRSS "
                   f"{fmt(m['after_cancel']['VmRSS'], 1)} MiB, threads {m['after_cancel']['Threads']}")
    out.append("  (the 'before' figure is taken after the ticker runs were started and one "
               "warm-up stream was opened and closed)")
    out.append(f"rtask exit code after SIGTERM: {exit_code}")
    if exit_code != 0:
        notes.append(f"rtask exited {exit_code} on SIGTERM (expected 0)")
    notes.extend(findings)
    for n in notes:
        out.append(f"NOTE: {n}")
    out.append("")
    summary = f"SSE: median {fmt(ps['median'], 2)} ms, p99 {fmt(ps['p99'], 2)} ms over " \
              f"{len(pooled)} lines (target < 5 ms median)"
    if mem_runs:
        m = mem_runs[0]
        d = (m["during"]["VmRSS"] or 0) - (m["before"]["VmRSS"] or 0)
        summary += (f"; {m['streams']} streams on {m['runs']} runs: +{d:.1f} MiB "
                    f"({d / m['streams']:.3f} MiB each), +{m['during']['Threads'] - m['before']['Threads']} threads")
    out.append(summary)
    print("\n".join(out), flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
