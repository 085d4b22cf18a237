#!/usr/bin/env python3
"""Benchmark the cost of typed task parameters (README §4) against a request without them.

Two figures, each a ratio to a baseline measured in the same run:

- **Over HTTP**: requests/s of `POST /tasks/params?<5 values>` (a string with a pattern, a
  choice, an integer, a number and a boolean; two of them as `{name}` arguments) against
  `POST /tasks/plain`, both running `/bin/echo`, on one server, with a keep-alive load from
  a few connections. Rounds alternate (plain, params, plain, params, ...) and the best round
  of each is compared (target: within 5 %).
- **In process**: the per-request parameter work alone (query parsing, checks, canonical
  forms, RTASK_PARAM_* and argv), in µs per call, for the 5-parameter task and for a task
  without parameters (which returns at once).

    python3 bench/params.py                 # 3 rounds of 5 s at 4 connections
    python3 bench/params.py --seconds 2     # a quicker check

Everything runs on 127.0.0.1 in a temporary directory removed afterwards. Progress goes to
stderr, the report to stdout; its last line is the summary.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# Shared helpers of the other benchmarks (same directory; their main() only runs as a script).
from bench import BenchError, Server, add_key, http_call, log, run_main, run_pyload  # noqa: E402
from auth import import_rtask, per_call_us  # noqa: E402
from sse import start_server  # noqa: E402

TARGET_RATIO = 0.95  # parameters may cost at most 5 % of the requests/s
QUERY = "?version=v1.4.2&target=production&count=042&ratio=15e-1&flag=yes"
CONFIG = """
[tasks.plain]
command = ["/bin/echo", "hi"]
apiKeyNames = ["bench"]

[tasks.params]
command = ["/bin/echo", "hi", "{target}", "{version}"]
apiKeyNames = ["bench"]
[tasks.params.parameters.version]
pattern = '^v[0-9]+\\.[0-9]+\\.[0-9]+$'
maxLength = 32
required = true
[tasks.params.parameters.target]
type = "choice"
choices = ["staging", "production"]
default = "staging"
[tasks.params.parameters.count]
type = "integer"
[tasks.params.parameters.ratio]
type = "number"
[tasks.params.parameters.flag]
type = "boolean"
"""


def check_answers(srv):
    """Both tasks answer 200 with their output, the parameters in canonical form."""
    for path, expected in (("/tasks/plain", "hi\n"), ("/tasks/params" + QUERY, "hi production v1.4.2\n")):
        status, body = http_call(srv.port, "POST", path, srv.headers)
        if status != 200 or json.loads(body).get("stdout") != expected:
            raise BenchError(f"POST {path} answered {status} {body[:300]!r}; expected stdout {expected!r}")


def http_rounds(srv, rounds, seconds, conns):
    """Best requests/s of each task over alternating rounds."""
    plain = Server("rtask", srv.proc, srv.port, "/tasks/plain", srv.headers, srv.log_path)
    params = Server("rtask", srv.proc, srv.port, "/tasks/params" + QUERY, srv.headers, srv.log_path)
    best = {"plain": 0.0, "params": 0.0}
    for i in range(rounds):
        for name, target in (("plain", plain), ("params", params)):
            res = run_pyload(target, conns, seconds)
            if res["non2xx"] or res["errors"]:
                raise BenchError(f"{name}: {res['non2xx']} non-2xx answers, {res['errors']} errors")
            log(f"round {i + 1} {name}: {res['rps']:.0f} requests/s (p50 {res['p50']:.2f} ms)")
            best[name] = max(best[name], res["rps"])
    return best


def in_process(rtask, config_path, calls, rounds):
    """µs per call of the parameter work of one request, for each task."""
    problems = rtask.Problems()
    config = rtask.load_config(config_path, problems)
    problems.raise_if_errors()
    figures = {}
    for name, query in (("plain", ""), ("params", QUERY[1:])):
        task = config.tasks[name]

        def work():
            values = rtask.resolve_parameters(task, rtask.RequestValues(query, None, b""))
            rtask.parameter_environment(task, values)
            rtask.task_with_arguments(task, values)
        work()
        figures[name] = per_call_us(work, calls, rounds)
    return figures


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rtask", default=os.path.join(HERE, "..", "rtask.py"),
                    help="path to rtask.py (../rtask.py next to this script)")
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per HTTP round (5)")
    ap.add_argument("--rounds", type=int, default=3, help="HTTP rounds per task; best is kept (3)")
    ap.add_argument("--connections", type=int, default=4, help="keep-alive connections (4)")
    ap.add_argument("--calls", type=int, default=50_000, help="in-process calls per round (50000)")
    args = ap.parse_args(argv)
    if not (0.5 <= args.seconds <= 60 and 1 <= args.rounds <= 10 and 1 <= args.connections <= 64
            and 1000 <= args.calls <= 1_000_000):
        ap.error("--seconds 0.5..60, --rounds 1..10, --connections 1..64, --calls 1000..1000000")
    path = os.path.abspath(args.rtask)
    if not os.path.isfile(path):
        raise BenchError(f"{path} not found (pass --rtask PATH)")
    tmp = tempfile.mkdtemp(prefix="rtask-bench-params-")
    srv = None
    try:
        config_path = os.path.join(tmp, "config.toml")
        with open(config_path, "w") as f:
            f.write(CONFIG)
        token = add_key(path, tmp)
        srv = start_server(path, tmp, token)
        check_answers(srv)
        log(f"HTTP: {args.rounds} rounds of {args.seconds:g} s per task at {args.connections} connections ...")
        rps = http_rounds(srv, args.rounds, args.seconds, args.connections)
        srv.stop()
        srv = None
        log(f"in process: {args.calls} calls x 5 rounds per task ...")
        rtask = import_rtask(path)
        us = in_process(rtask, config_path, args.calls, 5)
    finally:
        if srv is not None:
            srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    ratio = rps["params"] / rps["plain"]
    print(f"HTTP, {args.connections} connections, best of {args.rounds} x {args.seconds:g} s:")
    print(f"  without parameters: {rps['plain']:.0f} requests/s")
    print(f"  with 5 parameters:  {rps['params']:.0f} requests/s")
    print("in process, parameter work per request (best / median µs):")
    print(f"  without parameters: {us['plain'][0]:.2f} / {us['plain'][1]:.2f}")
    print(f"  with 5 parameters:  {us['params'][0]:.2f} / {us['params'][1]:.2f}")
    verdict = "within" if ratio >= TARGET_RATIO else "OUTSIDE"
    print(f"summary: 5 parameters at {ratio:.3f}x the requests/s of none ({verdict} the 5 % target); "
          f"validation {us['params'][0]:.1f} µs per request")
    return 0


if __name__ == "__main__":
    run_main(main)
