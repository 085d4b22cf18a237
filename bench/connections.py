#!/usr/bin/env python3
"""Cost of the connection accounting (per-address share, idle tracking, accept back-off):
new connections per second (one GET /health each, Connection: close) against this rtask.py
and a baseline rtask.py (default: the base commit's copy given by --baseline), measured
alternately in the same run; prints each rate and the ratio this/baseline.

    python3 bench/connections.py --baseline /path/to/old/rtask.py [--seconds 3] [--threads 4]
"""

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def start(rtask: str, workdir: str):
    log = open(os.path.join(workdir, "server.log"), "wb")
    proc = subprocess.Popen([sys.executable, rtask, "run", "--api-address", "127.0.0.1:0",
                             "--metrics-address", "127.0.0.1:0"], cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        m = re.search(r"api=\S*:(\d+)", open(os.path.join(workdir, "server.log")).read())
        if m:
            return proc, int(m.group(1))
        time.sleep(0.05)
    proc.kill()
    sys.exit(f"{rtask} did not start")


def rate(port: int, seconds: float, threads: int) -> float:
    done = [0] * threads
    stop = time.monotonic() + seconds

    def worker(i):
        request = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        while time.monotonic() < stop:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(request)
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            if data.startswith(b"HTTP/1.1 200 "):
                done[i] += 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(done) / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the rtask.py to compare against")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    candidates = {"this": os.path.join(HERE, "..", "rtask.py"), "baseline": args.baseline}
    best = {name: 0.0 for name in candidates}
    for _ in range(args.rounds):
        for name, rtask in candidates.items():
            with tempfile.TemporaryDirectory() as workdir:
                with open(os.path.join(workdir, "config.toml"), "w") as f:
                    f.write('[tasks.echo]\ncommand = ["true"]\napiKeyNames = ["ci"]\n')
                proc, port = start(rtask, workdir)
                try:
                    rate(port, 0.5, args.threads)  # warm-up
                    best[name] = max(best[name], rate(port, args.seconds, args.threads))
                finally:
                    proc.terminate()
                    proc.wait(15)
    for name, value in best.items():
        print(f"{name:9} {value:8.0f} new connections/s (best of {args.rounds})")
    print(f"ratio this/baseline: {best['this'] / best['baseline']:.3f}")


if __name__ == "__main__":
    main()
