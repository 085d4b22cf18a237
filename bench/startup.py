#!/usr/bin/env python3
"""Start-up time and idle memory of `rtask run` (default --workers 1), against a baseline
rtask.py, in one run.

Prints, measured in the same run on the same machine with the shipped config.toml in a
temporary directory (one key, ephemeral ports):
- seconds from starting `run` to the "rtask listening" line: median of --runs starts, for
  this rtask.py and for the previous design (--base REV, a git revision of this repository;
  default: the last single-process rtask);
- idle RSS (MiB, from /proc VmRSS) of every process of the server (the supervisor and its
  worker, or the base's single process), one second after that line;
- the ratios this / base.

    python3 bench/startup.py [--base REV] [--runs 5]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import BASE_REVISION, HERE, previous_design  # noqa: E402

RTASK = os.path.join(HERE, "..", "rtask.py")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(p) for p in f.read().split()]
    except OSError:
        return []
    return [pid] + [p for child in children for p in tree(child)]


def start_once(rtask: str, directory: str) -> tuple[float, float, int]:
    """(seconds to "rtask listening", idle RSS MiB of all its processes, process count)."""
    shutil.rmtree(os.path.join(directory, "rtask-state"), ignore_errors=True)
    log_path = os.path.join(directory, "server.log")
    with open(log_path, "wb") as log:
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, rtask, "run", "--api-address", "127.0.0.1:0",
                                 "--metrics-address", "127.0.0.1:0"], cwd=directory, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        while True:
            with open(log_path, "rb") as f:
                if b"rtask listening" in f.read():
                    break
            if proc.poll() is not None or time.monotonic() - started > 60:
                raise SystemExit(f"{rtask} did not start:\n{open(log_path).read()}")
            time.sleep(0.005)
        seconds = time.monotonic() - started
        time.sleep(1.0)
        pids = tree(proc.pid)
        return seconds, sum(rss_mib(p) for p in pids), len(pids)
    finally:
        proc.terminate()
        proc.wait(30)


def measure(rtask: str, config: str, runs: int) -> tuple[float, float, int]:
    """Median start time and idle RSS of ``runs`` starts of ``rtask`` serving ``config``."""
    with tempfile.TemporaryDirectory(prefix="rtask-bench-startup-") as directory:
        shutil.copy(config, os.path.join(directory, "config.toml"))
        subprocess.run([sys.executable, rtask, "add-key", "ci"], cwd=directory, check=True,
                       stdout=subprocess.DEVNULL)
        samples = [start_once(rtask, directory) for _ in range(runs)]
    return (statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples),
            samples[-1][2])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=BASE_REVISION, help=f"git revision (default {BASE_REVISION})")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rtask-bench-base-") as tmp:
        base_rtask, base_config = previous_design(args.base, tmp), previous_design(args.base, tmp, "config.toml")
        if not (base_rtask and base_config):
            raise SystemExit(f"no rtask.py and config.toml at git revision {args.base!r}")
        base = measure(base_rtask, base_config, args.runs)  # each with the config it shipped with
    this = measure(RTASK, os.path.join(HERE, "..", "config.toml"), args.runs)
    for name, (seconds, rss, count) in (("base", base), ("this", this)):
        print(f"{name}: start to 'rtask listening' {seconds:.3f} s (median of {args.runs}), "
              f"idle RSS {rss:.1f} MiB in {count} process(es)")
    print(f"ratio this/base: start {this[0] / base[0]:.2f}, idle RSS {this[1] / base[1]:.2f}")


if __name__ == "__main__":
    main()
