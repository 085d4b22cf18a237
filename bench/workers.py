#!/usr/bin/env python3
"""rtask with worker processes (run --workers) against adnanh/webhook, in one run.

Prints, all measured in the same run on the same machine:
- the Python spawn ceiling (/bin/echo hi) from 16 threads and from 16 processes: the GIL
  limit that workers exist to pass;
- the Python server ceiling: bench/python_ceiling.py, the least a threaded Python server can
  do for the same request (HTTP, a thread per connection, subprocess.run, JSON; no auth, no
  logs, no store), in 1 and 2 processes: how close rtask is to what Python reaches here; and
  the same in 2 processes with an asyncio event loop each instead of threads: the most a
  rewrite of rtask's request path around an event loop could reach;
- requests/s, p99, the server's CPU time per request (all its processes: supervisor and
  workers; not the commands) and the whole machine's CPU time per request of `POST /tasks/echo` with an API key at 4, 16 and 64
  connections, for webhook (no auth), rtask --workers 1, 2 and auto, rtask --workers 1 with
  the state store's writes taken out (a copy of rtask.py whose StateStore._write_batch
  returns at once: the durable store's cost, same code otherwise), and the previous design's
  rtask.py (--base REV, a git revision of this repository, default 969341f: one process,
  results in memory, no workers);
- the capacity of the machine: with every CPU busy, requests/s is CPUs / the machine's CPU
  time per request, and the part of it outside the server (the command, wrk, the kernel) is
  about the same for every server: so it prints the server CPU per request that rtask would
  need to reach webhook's rate, beside what it spends;
- the ratios the contract asks for: 2 workers / webhook at 4 and 16 connections (req/s, p99)
  and 2 workers / the Python server ceiling in 2 processes,
  the rate at 64 over the rate at 16 connections for 1 and 2 workers, workers 1 / base, and
  workers 1 / workers 1 without store writes.

Every cell is the median of --rounds runs (default 3), the servers taking turns, so that a
busy moment of a shared machine hits everyone alike.

    python3 bench/workers.py              # 8 s per load run, 3 rounds (~15 min)
    python3 bench/workers.py --quick      # 2 s runs, 1 round: a smoke check of the script

Needs wrk and webhook (`apt-get install -y webhook wrk`); see bench/README.md.
"""

import argparse
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import (APT_LINE, BASE_REVISION, HERE, HOST, START_TIMEOUT, TASK, BenchError,  # noqa: E402
                   Server, add_key, ceiling_subprocess, free_port, load, log, previous_design,
                   rtask_cmd, run_main, start_webhook, verify_rtask, verify_webhook, wait_port,
                   wait_rtask_ready, write_rtask_config)

CONNECTIONS = (4, 16, 64)
def _spawn_loop(seconds: float) -> int:
    end, n = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        subprocess.run(["/bin/echo", "hi"], capture_output=True, timeout=10)
        n += 1
    return n


def ceiling_processes(seconds: float, processes: int) -> float:
    """subprocess.run of /bin/echo in a loop in ``processes`` processes: spawns/s in total."""
    t0 = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        total = sum(pool.map(_spawn_loop, [seconds] * processes))
    return total / (time.perf_counter() - t0)


def without_store_writes(rtask: str, tmp: str) -> str:
    """A copy of ``rtask`` whose state store writes nothing (the bench's "no store" variant)."""
    with open(rtask) as f:
        source = f.read()
    signature = "    def _write_batch(self, batch: list):\n"
    if signature not in source:
        raise BenchError(f"{rtask} has no StateStore._write_batch to take out; update bench/workers.py")
    path = os.path.join(tmp, "rtask-no-store-writes.py")
    with open(path, "w") as f:
        f.write(source.replace(signature, signature + "        return  # bench: no store writes\n"))
    return path


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its direct children (the workers), not counting
    reaped grandchildren (the commands)."""
    pids = [pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                    text=True).stdout.split()]
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine so far, all CPUs (/proc/stat: busy is
    user + nice + system + irq + softirq + steal, idle is idle + iowait)."""
    with open("/proc/stat") as f:
        ticks = [int(t) for t in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = ticks
    tck = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq + steal) / tck, (idle + iowait) / tck


def measured_load(server, conns, duration, tmp):
    """One load run; adds ``cpu_ms``, the server's CPU time per answered request, and
    ``machine_ms``, the whole machine's (server, commands, wrk, kernel) per request, with
    ``idle``, the share of the machine's CPU time left idle meanwhile."""
    before, (busy0, idle0) = tree_cpu_seconds(server.proc.pid), machine_cpu_seconds()
    result = load(server, conns, duration, tmp, True)
    busy1, idle1 = machine_cpu_seconds()
    requests = max(result["requests"], 1)
    result["cpu_ms"] = (tree_cpu_seconds(server.proc.pid) - before) * 1000 / requests
    result["machine_ms"] = (busy1 - busy0) * 1000 / requests
    result["idle"] = (idle1 - idle0) / max(busy1 - busy0 + idle1 - idle0, 1e-9)
    return result


def start(rtask, tmp, key, name, run_args):
    """An rtask server (its own state directory) under ``name``, answering."""
    api, metrics = free_port(), free_port()
    log_path = os.path.join(tmp, f"{name}.log")
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(rtask_cmd(rtask, tmp, "run", "--api-address", f"{HOST}:{api}",
                                          "--metrics-address", f"{HOST}:{metrics}", *run_args),
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, cwd=tmp)
    server = Server(name, proc, api, f"/tasks/{TASK}", {"Authorization": f"Bearer {key}"}, log_path)
    wait_rtask_ready(server)
    verify_rtask(server)
    return server


def start_python_ceiling(tmp, processes, model="threads"):
    """bench/python_ceiling.py in ``processes`` processes (``model``: threads or asyncio), answering."""
    port = free_port()
    name = f"Python ceiling, {processes} proc" if model == "threads" else f"Python ceiling {model}, {processes} proc"
    log_path = os.path.join(tmp, f"python-ceiling-{model}-{processes}.log")
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "python_ceiling.py"), str(port), str(processes),
                                 model], stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, cwd=tmp)
    server = Server(name, proc, port, f"/tasks/{TASK}", {}, log_path)
    wait_port(server, time.monotonic() + START_TIMEOUT)
    verify_rtask(server)
    return server


def print_capacity(results, cpus):
    """What the machine allows: with every CPU busy, requests/s = CPUs / machine CPU per
    request. The part of that outside the server (the command's spawn and exec, wrk, the
    kernel) is about the same whatever the server, so matching webhook's rate needs the
    server's own CPU per request to be at most webhook's machine CPU minus rtask's outside."""
    print("\ncapacity (same run): requests/s ~ CPUs x 1000 / machine ms per request when the machine is busy")
    for c in (4, 16):
        hook, two, ceiling, loop = (results[name, c] for name in (
            "webhook", "rtask workers=2", "Python ceiling, 2 proc", "Python ceiling asyncio, 2 proc"))
        outside = two["machine_ms"] - two["cpu_ms"]
        print(f"  c={c:<2}: idle {hook['idle']:.0%} (webhook), {two['idle']:.0%} (workers=2); outside the server "
              f"{hook['machine_ms'] - hook['cpu_ms']:.3f} ms/request (webhook), {outside:.3f} (workers=2); "
              f"webhook's rate needs rtask's server CPU <= {hook['machine_ms'] - outside:.3f} ms/request: "
              f"it is {two['cpu_ms']:.3f}, the Python ceiling's {ceiling['cpu_ms']:.3f} (threads), "
              f"{loop['cpu_ms']:.3f} (asyncio), webhook's {hook['cpu_ms']:.3f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per load run (8)")
    ap.add_argument("--rounds", type=int, default=3, help="runs per cell; the median is shown (3)")
    ap.add_argument("--rtask", default=os.path.join(HERE, "..", "rtask.py"))
    ap.add_argument("--base", default=BASE_REVISION,
                    help=f"git revision of the previous design to compare with (default {BASE_REVISION})")
    ap.add_argument("--quick", action="store_true", help="2 s runs, 1 round: a smoke check")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 2.0, 1
    for tool in ("wrk", "webhook"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed; as root: {APT_LINE}")
    cpus = len(os.sched_getaffinity(0))
    ceil_s = 1.0 if args.quick else 3.0
    log("spawn ceilings ...")
    threads16 = ceiling_subprocess(ceil_s, 16)
    procs16 = ceiling_processes(ceil_s, 16)

    tmp = tempfile.mkdtemp(prefix="rtask-bench-workers-")
    servers = []
    try:
        write_rtask_config(tmp, None)
        key = add_key(os.path.abspath(args.rtask), tmp)
        webhook = start_webhook(tmp, f"Bearer {key}")
        verify_webhook(webhook)
        servers.append(webhook)
        servers += [start_python_ceiling(tmp, 1), start_python_ceiling(tmp, 2),
                    start_python_ceiling(tmp, 2, "asyncio")]
        configs = [("rtask workers=1", args.rtask, ["--workers", "1", "--state-dir", os.path.join(tmp, "s1")]),
                   ("rtask workers=2", args.rtask, ["--workers", "2", "--state-dir", os.path.join(tmp, "s2")]),
                   (f"rtask workers=auto ({cpus})", args.rtask,
                    ["--workers", "auto", "--state-dir", os.path.join(tmp, "sa")]),
                   ("workers=1 no store writes", without_store_writes(args.rtask, tmp),
                    ["--workers", "1", "--state-dir", os.path.join(tmp, "s0")])]
        base, base_name = previous_design(args.base, tmp), f"previous design {args.base}"
        if base:
            configs.append((base_name, base, []))
        for name, path, run_args in configs:
            servers.append(start(os.path.abspath(path), tmp, key, name, run_args))
        for server in servers:  # warm-up (each worker's key cache, imports, page cache)
            load(server, 16, min(2.0, args.duration), tmp, True)
        runs = {}
        for round_ in range(args.rounds):
            for conns in CONNECTIONS:
                for server in servers:  # taking turns, so that a busy moment hits everyone alike
                    r = measured_load(server, conns, args.duration, tmp)
                    runs.setdefault((server.name, conns), []).append(r)
                    log(f"round {round_ + 1}: {server.name:28} c={conns:<3} {r['rps']:8.0f} req/s "
                        f"{r['cpu_ms']:6.3f} ms CPU/request")
        results = {cell: {k: statistics.median(r[k] or 0 for r in rs)
                          for k in ("rps", "p99", "cpu_ms", "machine_ms", "idle")}
                   for cell, rs in runs.items()}
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nPython spawn ceiling (/bin/echo hi): 16 threads {threads16:,.0f}/s, "
          f"16 processes {procs16:,.0f}/s ({cpus} CPUs)")
    print(f"medians of {args.rounds} round(s) of {args.duration:g} s; CPU: the server's own processes, "
          "ms per request; machine: all CPU time of the machine (server, commands, wrk, kernel), "
          "ms per request")
    print(f"\n{'server':28} " + " ".join(f"{'c=' + str(c) + ' req/s':>12} {'p99 ms':>8} {'CPU':>6} {'machine':>7}"
                                          for c in CONNECTIONS))
    for server in servers:
        cells = " ".join(f"{results[server.name, c]['rps']:12.0f} {results[server.name, c]['p99']:8.2f} "
                         f"{results[server.name, c]['cpu_ms']:6.3f} {results[server.name, c]['machine_ms']:7.3f}"
                         for c in CONNECTIONS)
        print(f"{server.name:28} {cells}")
    print_capacity(results, cpus)

    def rps(name, c):
        return results[name, c]["rps"]

    print("\nratios (same run):")
    for c in (4, 16):
        print(f"  workers=2 / webhook at {c:>2} connections: req/s {rps('rtask workers=2', c) / rps('webhook', c):.2f}x"
              f" (goal >= 1.0), p99 {results['rtask workers=2', c]['p99'] / results['webhook', c]['p99']:.2f}x"
              " (goal <= 1.0)")
        print(f"  workers=2 / Python ceiling in 2 processes at {c:>2} connections: req/s "
              f"{rps('rtask workers=2', c) / rps('Python ceiling, 2 proc', c):.2f}x, Python ceiling / webhook "
              f"{rps('Python ceiling, 2 proc', c) / rps('webhook', c):.2f}x, its asyncio model / webhook "
              f"{rps('Python ceiling asyncio, 2 proc', c) / rps('webhook', c):.2f}x")
    for name in ("rtask workers=1", "rtask workers=2"):
        print(f"  {name}: rate at 64 / rate at 16 connections: {rps(name, 64) / rps(name, 16):.2f} (goal >= 0.95)")
    for c in CONNECTIONS:
        ratio = rps("rtask workers=1", c) / rps("workers=1 no store writes", c)
        cpu = results["rtask workers=1", c]["cpu_ms"] / results["workers=1 no store writes", c]["cpu_ms"]
        print(f"  workers=1 / workers=1 without store writes at {c:>2} connections: req/s {ratio:.2f}x, "
              f"CPU per request {cpu:.2f}x (goal: the store costs < 10 %)")
    if (base_name, 16) in results:
        for c in CONNECTIONS:
            ratio = rps("rtask workers=1", c) / rps(base_name, c)
            cpu = results["rtask workers=1", c]["cpu_ms"] / results[base_name, c]["cpu_ms"]
            print(f"  workers=1 / previous design at {c:>2} connections: req/s {ratio:.2f}x, "
                  f"CPU per request {cpu:.2f}x (goal: within 5 %)")
    return 0


if __name__ == "__main__":
    run_main(main)
