#!/usr/bin/env python3
"""The state store under many writing processes: rtask's StateStore against the same store
without its write lock (SQLite's own busy handler only), in one run.

Each of N processes opens a StateStore on one shared directory, as workers do, and records
run ends in a loop (one commit each, 0.5 ms of other work between them). Printed for each
N: commits/s over all processes and the slowest single write, for

- "write lock": StateStore as shipped (writers wait on an flock of <state dir>/write.lock
  and are woken when it is free);
- "busy handler": the same StateStore with that flock taken out (the process's own lock
  only), i.e. SQLite's busy handler, which sleeps 1, 2, 5, ... ms between tries.

    python3 bench/store.py                    # 2, 8 and 16 processes, 3 s each, twice
    python3 bench/store.py --processes 4,32 --seconds 5
"""

import argparse
import contextlib
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import rtask  # noqa: E402

CONFIG = '[tasks.echo]\ncommand = ["/bin/echo", "hi"]\n'


def _without_write_lock(store):
    """The variant: only the process's lock, no flock between processes."""
    @contextlib.contextmanager
    def writing():
        with store._lock:
            yield
    store._writing = writing


def _write_ends(job) -> tuple[int, float]:
    directory, variant, seconds = job
    store = rtask.StateStore(directory)
    if variant == "busy handler":
        _without_write_lock(store)
    problems = rtask.Problems()
    task = rtask.load_config(os.path.join(directory, "config.toml"), problems).tasks["echo"]
    caller = rtask.Caller("bench", "key")
    count, slowest, end = 0, 0.0, time.monotonic() + seconds
    while time.monotonic() < end:
        run = rtask.Run(task, caller, "127.0.0.1")
        run.mark_started()
        run.stdout.append(b"hi\n")
        run.finish("success", 0)
        store.finish(run, 3600.0, lambda: None)
        started = time.perf_counter()
        store.write_pending()
        slowest = max(slowest, time.perf_counter() - started)
        count += 1
        time.sleep(0.0005)  # the rest of a worker's work between two commits
    return count, slowest


def measure(processes: int, variant: str, seconds: float) -> tuple[float, float]:
    directory = tempfile.mkdtemp(prefix="rtask-bench-store-")
    try:
        with open(os.path.join(directory, "config.toml"), "w") as f:
            f.write(CONFIG)
        rtask.StateStore(directory)  # the schema, before the writers start
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            results = pool.map(_write_ends, [(directory, variant, seconds)] * processes)
        return sum(n for n, _ in results) / seconds, max(s for _, s in results)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", default="2,8,16", help="comma-separated process counts (2,8,16)")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement (3)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds, variants taking turns (2)")
    args = ap.parse_args(argv)
    print(f"{'processes':>9} {'variant':14} {'commits/s':>10} {'slowest write':>14}")
    for processes in (int(p) for p in args.processes.split(",")):
        for _ in range(args.rounds):
            for variant in ("write lock", "busy handler"):
                rate, slowest = measure(processes, variant, args.seconds)
                print(f"{processes:9} {variant:14} {rate:10.0f} {slowest * 1000:11.1f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
