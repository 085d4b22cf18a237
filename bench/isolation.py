#!/usr/bin/env python3
"""Benchmark what isolating a run costs (README §6): another user, and resource limits.

Two figures, each against a plain run measured in the same process, interleaved:

- **Spawn cost per run** (µs) of `/bin/echo hi` with pipes, waited for, by each mechanism
  that can apply identity and limits without a preexec_fn, from this small process:
  subprocess.Popen alone (the baseline, vfork), Popen's own `user=/group=/extra_groups=`
  (which makes Popen fork instead of vfork), the util-linux `setpriv` and `prlimit` exec
  wrappers alone and chained (what rtask does), Popen user= with prlimit, a Python
  trampoline (`python3 -I -S -c`, setrlimit then exec), and, as a prototype of what rtask
  does not do, the work of a spawner process (this small process forks; the child sets
  limits and ids in Python and execs). Median of rounds; ratios to plain.
- **HTTP throughput** of `POST /tasks/<name>` on one rtask server whose tasks all run
  `/bin/echo hi`: `plain`; `limits` (memoryBytes, openFiles); as root also `user`
  (`nobody`) and `user+limits`. Rounds alternate between the tasks; the best round of each
  is reported with its ratio to plain (target: within 1.3x).

    python3 bench/isolation.py             # 5 s load runs at 4 connections, 3 rounds
    python3 bench/isolation.py --quick     # a smoke check

Progress goes to stderr, the report to stdout; its last line is the summary.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench import (BenchError, add_key, fmt, load, log, run_main, start_rtask, verify_rtask,  # noqa: E402
                   wait_rtask_ready)

COMMAND = ["/bin/echo", "hi"]
PRLIMIT = "/usr/bin/prlimit"
SETPRIV = "/usr/bin/setpriv"
LIMITS = {"memoryBytes": 1 << 30, "openFiles": 256}
PRLIMIT_ARGS = [f"--as={LIMITS['memoryBytes']}", f"--nofile={LIMITS['openFiles']}"]
TRAMPOLINE = ("import os,resource,sys;resource.setrlimit(resource.RLIMIT_AS,(1<<30,1<<30));"
              "resource.setrlimit(resource.RLIMIT_NOFILE,(256,256));os.execv(sys.argv[1],sys.argv[1:])")


def mechanisms(as_root: bool):
    """name → (argv, extra Popen arguments); identity ones only as root (nobody = 65534)."""
    who = {"user": 65534, "group": 65534, "extra_groups": [65534]} if as_root else {}
    setpriv = [SETPRIV, "--reuid=65534", "--regid=65534", "--groups=65534", "--"]
    prlimit = [PRLIMIT, *PRLIMIT_ARGS, "--"]
    found = {"plain": (COMMAND, {}),
             "prlimit (rtask: limits)": ([*prlimit, *COMMAND], {}),
             "trampoline (python3 -I -S)": ([sys.executable, "-I", "-S", "-c", TRAMPOLINE, *COMMAND], {})}
    if as_root:
        found["Popen user= (fork)"] = (COMMAND, who)
        found["Popen user= + prlimit"] = ([*prlimit, *COMMAND], who)
        found["setpriv (rtask: user)"] = ([*setpriv, *COMMAND], {})
        found["setpriv + prlimit (rtask: both)"] = ([*setpriv, *prlimit, *COMMAND], {})
    return {name: m for name, m in found.items() if os.access(m[0][0], os.X_OK)}


def spawn_cost(argv, extra, n) -> float:
    """µs per run: Popen with stdout/stderr pipes, read to EOF, waited for."""
    t0 = time.perf_counter()
    for _ in range(n):
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True, close_fds=True, **extra)
        out, _ = p.communicate(timeout=30)
        if p.returncode != 0 or out != b"hi\n":
            raise BenchError(f"{argv} answered {p.returncode} {out!r}")
    return (time.perf_counter() - t0) / n * 1e6


def spawner_cost(as_root, n) -> float:
    """µs per run of what a spawner process would do (not something rtask does): this small,
    single-threaded process forks, and the child sets limits (and identity) in Python, then
    execs. The IPC a real spawner needs to hand over the request and the exit is not counted."""
    import resource
    t0 = time.perf_counter()
    for _ in range(n):
        out_r, out_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.setsid()
                os.dup2(out_w, 1)
                resource.setrlimit(resource.RLIMIT_AS, (LIMITS["memoryBytes"],) * 2)
                resource.setrlimit(resource.RLIMIT_NOFILE, (LIMITS["openFiles"],) * 2)
                if as_root:
                    os.setgroups([65534])
                    os.setresgid(65534, 65534, 65534)
                    os.setresuid(65534, 65534, 65534)
                os.execv(COMMAND[0], COMMAND)
            finally:
                os._exit(127)
        os.close(out_w)
        out = os.read(out_r, 100)
        os.close(out_r)
        _, status = os.waitpid(pid, 0)
        if status != 0 or out != b"hi\n":
            raise BenchError(f"spawner prototype answered {status} {out!r}")
    return (time.perf_counter() - t0) / n * 1e6


def write_config(tmp, as_root) -> list[str]:
    """The tasks to compare, all /bin/echo hi; returns their names, plain first."""
    limits = "limits = { " + ", ".join(f"{k} = {v}" for k, v in LIMITS.items()) + " }"
    tasks = {"plain": "", "limits": limits}
    if as_root:
        tasks.update({"user": 'user = "nobody"', "user_limits": f'user = "nobody"\n{limits}'})
    with open(os.path.join(tmp, "config.toml"), "w") as f:
        for name, extra in tasks.items():
            f.write(f'[tasks.{name}]\ncommand = ["/bin/echo", "hi"]\napiKeyNames = ["bench"]\n{extra}\n\n')
    return list(tasks)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per load run (5)")
    ap.add_argument("--connections", type=int, default=4, help="keep-alive connections (4)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each measurement (3)")
    ap.add_argument("--spawns", type=int, default=300, help="spawns per mechanism and round (300)")
    ap.add_argument("--quick", action="store_true", help="1 s runs, 1 round, 50 spawns")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.rounds, args.spawns = 1.0, 1, 50
    as_root = os.geteuid() == 0
    rtask = os.path.join(os.path.dirname(HERE), "rtask.py")
    out = [f"isolation benchmark: {'root (user = nobody + limits)' if as_root else 'not root (limits only)'}, "
           f"{os.cpu_count()} CPUs"]

    found = mechanisms(as_root)
    spawner = "spawner prototype (fork+set+exec)"
    costs = {name: [] for name in [*found, spawner]}
    for r in range(args.rounds):
        for name, (cmd, extra) in found.items():
            n = max(10, args.spawns // 10) if name.startswith("trampoline") else args.spawns
            costs[name].append(spawn_cost(cmd, extra, n))
        costs[spawner].append(spawner_cost(as_root, args.spawns))
        log(f"spawn round {r + 1}/{args.rounds} done")
    base = statistics.median(costs["plain"])
    out.append("SPAWN per run (median of rounds), /bin/echo hi with pipes:")
    for name, values in costs.items():
        median = statistics.median(values)
        out.append(f"  {name:32s} {median:9.0f} µs   x{median / base:.2f} of plain")

    tmp = tempfile.mkdtemp(prefix="rtask-bench-iso-")
    server = None
    try:
        tasks = write_config(tmp, as_root)
        key = add_key(rtask, tmp)
        server = start_rtask(rtask, tmp, key, 0)
        server.path = "/tasks/plain"
        wait_rtask_ready(server)
        verify_rtask(server)
        use_wrk = shutil.which("wrk") is not None
        results = {task: [] for task in tasks}
        for r in range(args.rounds):
            for task in results:
                server.path = f"/tasks/{task}"
                verify_rtask(server)
                res = load(server, args.connections, args.duration, tmp, use_wrk)
                if res.get("non2xx") or res.get("errors"):
                    raise BenchError(f"{task}: {res}")
                results[task].append(res)
            log(f"HTTP round {r + 1}/{args.rounds} done")
        best = {task: max(rounds, key=lambda x: x["rps"]) for task, rounds in results.items()}
        out.append(f"HTTP POST /tasks/<task>, {args.connections} connections, {args.duration:g} s, "
                   f"{'wrk' if use_wrk else 'python load'}, best of {args.rounds} alternating rounds:")
        for task, res in best.items():
            out.append(f"  {task:11s} {fmt(res['rps'], 0):>8} req/s   p50 {fmt(res['p50'])} ms   "
                       f"p99 {fmt(res['p99'])} ms   plain/this x{best['plain']['rps'] / res['rps']:.2f}")
        chosen = "setpriv + prlimit (rtask: both)" if as_root else "prlimit (rtask: limits)"
        isolated = tasks[-1]
        out.append(f"SUMMARY spawn x{statistics.median(costs[chosen]) / base:.2f} ({chosen}), HTTP plain/"
                   f"{isolated} x{best['plain']['rps'] / best[isolated]['rps']:.2f} (target <= 1.3)")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(out), flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
