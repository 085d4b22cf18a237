#!/usr/bin/env python3
"""Microbenchmark of rtask's API-key authentication, in process (no HTTP).

The target: a request repeating a known-good key spends < 50 µs on
authentication. rtask.py is imported and its own code is timed:

- the first `KeyRing.verify(token)` of a fresh key: a real Argon2id check (ms);
- `KeyRing.verify(token)` of that key again: the verified-key cache (µs per call);
- `Authenticator.authenticate(headers)` with `Authorization: Bearer <token>`: the whole
  per-request auth step (header parsing, cache, grants), with a no-op metrics object and with
  rtask's real Prometheus Metrics;
- rejections: a token with an unknown key id (no Argon2), a malformed token, and a wrong
  secret under the known id (Argon2 runs, ms).

    python3 bench/auth.py             # 100 000 cached calls per figure, best of 5 rounds
    python3 bench/auth.py --calls 20000

Runs in a temporary directory removed afterwards; the last line of stdout is the summary.
"""

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET_US = 50.0
MAX_SECONDS_PER_FIGURE = 30.0  # a round loop stops early past this, whatever --calls says


def log(msg=""):
    print(msg, file=sys.stderr, flush=True)


def import_rtask(path):
    """Import rtask.py from ``path`` (registered as module 'rtask': dataclasses need it)."""
    spec = importlib.util.spec_from_file_location("rtask", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["rtask"] = mod
    spec.loader.exec_module(mod)
    return mod


def per_call_us(fn, calls, rounds):
    """Run ``fn`` ``calls`` times per round; (best, median) µs per call over the rounds."""
    results = []
    deadline = time.perf_counter() + MAX_SECONDS_PER_FIGURE
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        n = 0
        for _ in range(calls):
            fn()
            n += 1
            if n % 10_000 == 0 and time.perf_counter() > deadline:
                break
        results.append((time.perf_counter_ns() - t0) / n / 1000.0)
        if time.perf_counter() > deadline:
            break
    return min(results), statistics.median(results)



class NoMetrics:
    """Counts nothing: isolates the authentication path from prometheus_client's cost."""

    def auth_result(self, *args):
        pass

    def jwt_verification(self, *args):
        pass

    def permission_denied(self, *args):
        pass


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rtask", default=os.path.join(HERE, "..", "rtask.py"),
                    help="path to rtask.py (../rtask.py next to this script)")
    ap.add_argument("--calls", type=int, default=100_000, help="calls per round (100000)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per figure; best is shown (5)")
    ap.add_argument("--tasks", default="10,100,1000",
                    help="also time authenticate() with this many tasks naming the key "
                         "(comma-separated; 10,100,1000; '' for none)")
    ap.add_argument("--argon2", type=int, default=3, help="wrong-secret Argon2 checks (3)")
    args = ap.parse_args(argv)
    try:
        args.tasks = [int(x) for x in args.tasks.split(",") if x.strip()]
    except ValueError:
        ap.error("--tasks takes comma-separated integers")
    if any(not 1 <= n <= 5000 for n in args.tasks):
        ap.error("--tasks: counts 1..5000")
    if not (1000 <= args.calls <= 10_000_000 and 1 <= args.rounds <= 20
            and 1 <= args.argon2 <= 20):
        ap.error("--calls 1000..10000000, --rounds 1..20, --argon2 1..20")
    path = os.path.abspath(args.rtask)
    if not os.path.isfile(path):
        log(f"bench: {path} not found (pass --rtask PATH)")
        return 1
    rtask = import_rtask(path)
    rtask.setup_logging("text")

    tmp = tempfile.mkdtemp(prefix="rtask-bench-auth-")
    try:
        keys_path = os.path.join(tmp, "keys.toml")
        config_path = os.path.join(tmp, "config.toml")
        with open(config_path, "w") as f:
            f.write('[tasks.echo]\ncommand = ["/bin/echo", "hi"]\napiKeyNames = ["bench"]\n')

        t0 = time.perf_counter()
        token = rtask.add_key(keys_path, "bench")
        add_key_ms = (time.perf_counter() - t0) * 1000
        problems = rtask.Problems()
        config = rtask.load_config(config_path, problems)
        problems.raise_if_errors()
        keyring = rtask.KeyRing(keys_path, rtask.parse_key_file(keys_path))
        key_id, secret = rtask.decode_api_key(token)

        # ---- first check: real Argon2
        t0 = time.perf_counter()
        name = keyring.verify(token)
        first_ms = (time.perf_counter() - t0) * 1000
        if name != "bench":
            log(f"bench: verify returned {name!r}, expected 'bench'")
            return 1

        # ---- cached: verify, then the whole authenticate
        log(f"timing {args.calls} cached verify() calls x {args.rounds} rounds ...")
        verify_best, verify_med = per_call_us(lambda: keyring.verify(token), args.calls,
                                              args.rounds)
        headers = rtask.Headers()
        headers.add("Authorization", f"Bearer {token}")
        auth_null = rtask.Authenticator(config, keyring, NoMetrics())
        caller = auth_null.authenticate(headers)
        if caller.name != "bench" or "tasks:run:echo" not in caller.grants:
            log(f"bench: authenticate returned {caller!r}, expected key 'bench' with "
                f"tasks:run:echo")
            return 1
        log("timing authenticate() ...")
        authn_best, authn_med = per_call_us(lambda: auth_null.authenticate(headers),
                                            args.calls, args.rounds)
        auth_real = rtask.Authenticator(config, keyring, rtask.Metrics())
        auth_real.authenticate(headers)
        authm_best, authm_med = per_call_us(lambda: auth_real.authenticate(headers),
                                            args.calls, args.rounds)

        # ---- the same with more tasks naming the key (grants are derived per request)
        scaling = []
        for n_tasks in args.tasks:
            many_path = os.path.join(tmp, f"config-{n_tasks}.toml")
            with open(many_path, "w") as f:
                for i in range(n_tasks):
                    f.write(f'[tasks.t{i}]\ncommand = ["/bin/echo", "hi"]\n'
                            'apiKeyNames = ["bench"]\n')
            p = rtask.Problems()
            many = rtask.load_config(many_path, p)
            p.raise_if_errors()
            auth_many = rtask.Authenticator(many, keyring, NoMetrics())
            auth_many.authenticate(headers)
            log(f"timing authenticate() with {n_tasks} tasks ...")
            best, med = per_call_us(lambda: auth_many.authenticate(headers),
                                    max(1000, args.calls // n_tasks), min(args.rounds, 3))
            scaling.append((n_tasks, best, med))

        # ---- rejections without Argon2
        unknown = rtask.encode_api_key(999 if key_id != 999 else 998, os.urandom(40))
        malformed = "A" * len(token)

        def rejected(tok):
            def call():
                try:
                    keyring.verify(tok)
                except rtask.Reject:
                    return
                raise AssertionError("verify accepted a bad token")
            return call

        for tok, label in ((unknown, "unknown id"), (malformed, "malformed")):
            try:
                keyring.verify(tok)
                log(f"bench: verify accepted the {label} token")
                return 1
            except rtask.Reject as r:
                log(f"{label} token: Reject {r.status} {r.reason}")
        log("timing rejections ...")
        unk_best, unk_med = per_call_us(rejected(unknown), args.calls, args.rounds)
        mal_best, mal_med = per_call_us(rejected(malformed), args.calls, args.rounds)

        # ---- wrong secret under the known id: Argon2 every time (no negative cache)
        wrong = bytearray(secret)
        wrong[-1] ^= 0x01
        wrong_token = rtask.encode_api_key(key_id, bytes(wrong))
        argon_ms, reason = [], None
        for _ in range(args.argon2):
            t0 = time.perf_counter()
            try:
                keyring.verify(wrong_token)
                log("bench: verify accepted a wrong secret")
                return 1
            except rtask.Reject as r:
                reason = f"{r.status} {r.reason}"
            argon_ms.append((time.perf_counter() - t0) * 1000)
        # a direct Argon2id call with the stored parameters, for comparison
        stored = next(iter(rtask.parse_key_file(keys_path).values()))
        t0 = time.perf_counter()
        rtask.argon2id(secret, stored.salt, stored.time, stored.memory_mib, stored.threads,
                       len(stored.hash))
        raw_ms = (time.perf_counter() - t0) * 1000
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # ---- report
    import platform
    out = [f"rtask auth microbenchmark ({path})",
           f"machine: {os.cpu_count()} CPUs, {platform.platform()}, Python "
           f"{platform.python_version()}",
           f"{args.calls} calls per round, {args.rounds} rounds: best (median) per call", "",
           f"  add_key (Argon2 hash + keys.toml write)      {add_key_ms:9.1f} ms",
           f"  first verify(token): Argon2id check           {first_ms:9.1f} ms",
           f"  verify(token), cached                         {verify_best:9.2f} µs  "
           f"({verify_med:.2f})",
           f"  authenticate(headers), no metrics             {authn_best:9.2f} µs  "
           f"({authn_med:.2f})",
           f"  authenticate(headers), rtask.Metrics          {authm_best:9.2f} µs  "
           f"({authm_med:.2f})",
           f"  verify(unknown key id), rejected, no Argon2   {unk_best:9.2f} µs  "
           f"({unk_med:.2f})",
           f"  verify(malformed token), rejected             {mal_best:9.2f} µs  "
           f"({mal_med:.2f})",
           f"  verify(known id, wrong secret), Argon2        {statistics.median(argon_ms):9.1f} ms"
           f"  (median of {len(argon_ms)}: {', '.join(f'{x:.1f}' for x in argon_ms)}; {reason})",
           f"  argon2id() alone, stored parameters           {raw_ms:9.1f} ms  "
           f"(t={stored.time}, m={stored.memory_mib} MiB, p={stored.threads})"]
    for n_tasks, best, med in scaling:
        label = f"authenticate(headers), {n_tasks} tasks name the key"
        out.append(f"  {label:<46}{best:9.2f} µs  "
                   f"({med:.2f}){'  > target' if best >= TARGET_US else ''}")
    worst = max(verify_best, authn_best, authm_best)
    verdict = "meets" if worst < TARGET_US else "MISSES"
    out.append(f"  => a repeated good key costs at most {worst:.2f} µs of authentication: "
               f"{verdict} the < {TARGET_US:g} µs target")
    over = [n for n, best, _ in scaling if best >= TARGET_US]
    if over:
        out.append(f"NOTE: authenticate() grows with the number of tasks naming the key "
                   f"(key grants should be built once per config): over "
                   f"{TARGET_US:g} µs with {min(over)} tasks (counts tried: "
                   f"{', '.join(str(n) for n, _, _ in scaling)})")
    out.append("")
    out.append(f"auth: cached key {verify_best:.1f} µs/verify, {authn_best:.1f} µs/authenticate "
               f"({authm_best:.1f} µs with metrics) (target < {TARGET_US:g} µs); unknown id "
               f"{unk_best:.1f} µs; Argon2 check {statistics.median(argon_ms):.0f} ms"
               + "".join(f"; {n} tasks {best:.0f} µs/authenticate" for n, best, _ in scaling))
    print("\n".join(out), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("bench: interrupted")
        sys.exit(130)
