#!/usr/bin/env python3
"""rtask: a secure task runner that turns configured commands into authenticated HTTP endpoints.

A CI job, a cron script or a webhook sender POSTs to ``/tasks/<name>``; rtask checks the
credential, applies the task's limits, runs the command (no shell) with the request body on
stdin, and answers with the exit status and output, or, for async tasks, a task id to poll.

Start (serves the shipped config.toml), and test::

    pip install -r requirements.txt && python3 rtask.py add-key ci && python3 rtask.py run
    pip install -r requirements.txt 'PyJWT[crypto]>=2.10.1' 'pytest>=7' 'pytest-xdist>=3' && python3 -m pytest -q -n 3 test_rtask.py

README.md is the manual and the reference: names, formats, status codes, defaults.
The file reads in the order of a request's path: constants → configuration → key store →
authentication → limits → parameters → isolation → execution → results and state → HTTP →
workers → metrics → logging → CLI.

License: MIT.
"""

from __future__ import annotations

import sys

# Checked before any import that needs 3.11 (tomllib), so that an older Python gives one
# sentence instead of a traceback; everything above and here still parses on Python 3.8.
if sys.version_info < (3, 11):
    sys.exit(f"rtask: Python 3.11 or newer is needed; this is Python {sys.version.split()[0]} "
             f"({sys.executable}). Run it with python3.11 or newer.")

import argparse
import base64
import collections
import contextlib
import dataclasses
import codecs
import difflib
import errno
import fcntl
import functools
import gc
import grp
import hashlib
import heapq
import hmac
import itertools
import json
import logging
import math
import os
import pwd
import re
import secrets
import select
import selectors
import shlex
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import tomllib
import weakref
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote

__version__ = "0.1.0"

# =============================================================================================
# Constants and defaults
# =============================================================================================

DEFAULT_CONFIG_PATH = "./config.toml"
DEFAULT_KEYS_PATH = "./keys.toml"
DEFAULT_API_ADDRESS = "localhost:8800"
DEFAULT_METRICS_ADDRESS = "localhost:9090"

_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110)
TASK_ID_RE = re.compile(r"[a-z2-7]{16}")
NAME_RULE = "a name must be non-empty, without '/', control characters or surrounding whitespace"


def is_valid_name(name: str) -> bool:
    """Task and key names are what the Go RTask accepts (README §4): any non-empty string
    without '/', control characters or surrounding whitespace ("build:prod", "deploy key").
    Lone surrogates (undecodable bytes on a command line) cannot be written to TOML either.
    Whatever is built from a name quotes it: TOML keys, paths (percent-encoded), logs."""
    import unicodedata
    return (bool(name) and "/" not in name and name == name.strip()
            and not any(unicodedata.category(c) in ("Cc", "Cs") for c in name))

# Permissions (README §8): a task-scoped permission is "tasks:<action>" or "tasks:<action>:<task>".
TASK_ACTIONS = ("run", "read", "list", "cancel")
SYSTEM_PERMISSIONS = ("system:config_read",)
WILDCARDS = ("*", "tasks:*", "system:*")


def is_known_permission(permission: str) -> bool:
    parts = permission.split(":", 2)  # the task part may hold ':' ("tasks:run:build:prod")
    if permission in WILDCARDS or permission in SYSTEM_PERMISSIONS:
        return True
    return (parts[0] == "tasks" and len(parts) in (2, 3) and parts[1] in TASK_ACTIONS
            and (len(parts) == 2 or is_valid_name(parts[2])))


def holds_permission(grants: frozenset[str], needed: str) -> bool:
    """Does a set of grants include ``needed`` ("tasks:run:deploy"), directly or by wildcard?"""
    resource, action = needed.split(":")[:2]
    return any(p in grants for p in (needed, f"{resource}:{action}", f"{resource}:*", "*"))


# Key format of the Go RTask (README §7): these values are written into every new key entry.
KEY_BYTES = 40
SALT_BYTES = 16
ARGON2_TIME = 1
ARGON2_MEMORY_MIB = 64
ARGON2_THREADS = 4
MAX_KEY_ID = 999
MAX_TOKEN_CHARS = 4096  # a real key is 62 characters; anything far longer is not a key

# JWKS: a flood of tokens with random kids must not become a flood of fetches.
JWKS_COOLDOWN_SECONDS = 10.0
JWKS_FETCH_TIMEOUT_SECONDS = 10.0
JWKS_MAX_BYTES = 1 << 20
WARNED_SUBJECTS_KEPT = 1024  # token warnings are logged once per subject, up to this many

# Argon2 costs ~65 ms and 64 MiB per verification, so concurrent verifications are bounded;
# a request that cannot get a slot within the wait gets 503 instead of piling up memory.
ARGON2_MAX_CONCURRENT = 2
ARGON2_SLOT_WAIT_SECONDS = 2.0
# Verified keys are cached (by an HMAC of the decoded id and key, never the key itself) so a
# repeated good key costs microseconds instead of an Argon2 run. Any change of keys.toml
# empties the cache.
KEY_CACHE_SIZE = 1024
KEY_CACHE_TTL_SECONDS = 300.0
KEY_FILE_CHECK_INTERVAL = 1.0  # seconds between stat() calls on keys.toml in a running server

# HTTP hygiene: every resource a caller can grow is bounded.
MAX_CONNECTIONS = 1024  # open client connections (one handler thread each)
REQUEST_READ_TIMEOUT = 10.0  # seconds to send a whole request (line, headers, body)
KEEPALIVE_IDLE_TIMEOUT = 30.0  # seconds an idle keep-alive connection is kept open
SOCKET_WRITE_TIMEOUT = 30.0  # a client that stops reading its answer is dropped after this
# One peer address (the TCP peer: a proxy is one address) may hold at most this fraction of a
# listener's connection cap, so that one client cannot lock the others out (run
# --max-connections-per-address overrides it for the API listener).
CONNECTION_SHARE_PER_ADDRESS = 1 / 4
METRICS_MAX_CONNECTIONS = 64  # open connections to the metrics listener; more are closed at once
METRICS_SOCKET_TIMEOUT = 10.0  # a metrics client silent this long (on one read or write) is dropped
METRICS_REQUEST_TIMEOUT = 10.0  # seconds a metrics connection has to send its request and be answered
# Accept errors (out of file descriptors, memory) pause the accept loop instead of spinning:
# first this long, doubling up to the bound, back to the start after an accept succeeds.
ACCEPT_BACKOFF_FIRST = 0.05
ACCEPT_BACKOFF_MAX = 1.0
MAX_REQUEST_LINE = 8192
MAX_HEADER_LINE = 8192
MAX_HEADERS = 100
DISCARD_BODY_LIMIT = 1 << 20  # unread bodies up to this size are drained to keep the connection

# Execution.
READ_CHUNK = 65536
READS_PER_EVENT = 4  # chunks read from one output pipe before the loop turns to other events
WATCH_HERE_BELOW = 8  # running runs in a process below which a sync run is watched by its own thread
PIPE_GRACE_SECONDS = 0.5  # after a normal exit, how long to wait for pipes held by daemons
KILL_GRACE_SECONDS = 2.0  # SIGTERM → SIGKILL: time for a task to clean up before it is killed
MAX_RUNS_IN_FLIGHT = 512  # running processes per worker, whatever the task limits
RECORD_SPAWN_AFTER = 0.02  # seconds: a sync run still going this long has its process group recorded
MAX_RESULTS_KEPT = 1000  # per task: finished results kept for polling (oldest dropped first)
MAX_SECONDS = 365 * 86400  # the largest duration a config may give (one year)
MAX_LONG_POLL_SECONDS = 60.0  # GET ...?wait=S waits at most this long
SSE_HEARTBEAT_SECONDS = 15.0  # a comment line on a quiet event stream finds closed readers


# =============================================================================================
# Configuration (config.toml)
# =============================================================================================


class ConfigError(Exception):
    """A user mistake in a file or on the command line: printed as one sentence, exit 1."""


@dataclasses.dataclass(frozen=True)
class SignedWebhookSpec:
    """``[tasks.<name>.signedWebhook]``: POST /hooks/<name> from GitHub, GitLab or any sender
    that signs the body with HMAC-SHA256."""

    provider: str  # "github" (X-Hub-Signature-256), "gitlab" (X-Gitlab-Token), "hmac-sha256"
    secret: str  # from secret or secretFile (whitespace trimmed)
    events: tuple[str, ...] = ()  # run only for these X-GitHub-Event / X-Gitlab-Event values
    signature_header: str = "X-Signature-256"  # hmac-sha256 only
    match: tuple[MatchRule, ...] = ()  # payload rules (JSON Pointer → value); unmatched: 202, no run


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One ``[tasks.<name>]`` table, validated. Field comments give the unit and default."""

    name: str
    command: tuple[str, ...]  # program and arguments; run directly, never through a shell
    workdir: str | None = None  # working directory; None: the server's cwd
    api_key_names: tuple[str, ...] = ()  # keys that may call /tasks/<name>; () = no such route
    webhooks: tuple[tuple[str, str], ...] = ()  # (name, secret) from webhookSecrets(+Files)
    environment: tuple[tuple[str, str], ...] = ()  # extra environment variables
    pass_request_headers: tuple[str, ...] = ()  # header names passed as REQUEST_HEADER_* vars
    is_async: bool = False  # answer with a task id at once, run in the background
    retention_seconds: float = 60.0  # how long a finished result stays readable
    rate_limit: float = 0.0  # requests per second, burst 1; 0 = unlimited
    max_concurrent: int = 0  # running executions at once; 0 = unlimited
    max_input_bytes: int = 16384  # largest request body
    max_output_bytes: int = 16384  # stdout and stderr are each cut to this many bytes
    timeout_seconds: float = 30.0  # then the process group gets SIGTERM, SIGKILL 2 s later
    merge_stderr: bool = False  # stderr goes into stdout
    queue_size: int = 0  # requests that may wait for a maxConcurrentTasks slot; 0 = none
    queue_timeout_seconds: float = 30.0  # how long a queued sync request waits, then 429
    signed_webhook: SignedWebhookSpec | None = None  # POST /hooks/<name>
    histogram_buckets: tuple[float, ...] | None = None  # None: Prometheus default buckets
    parameters: tuple[ParameterSpec, ...] = ()  # typed values for the command (README §4); () = none
    isolation: IsolationSpec | None = None  # user, group, umask, environment, networks, limits

    @functools.cached_property
    def parameter_index(self) -> dict[str, ParameterSpec]:
        return {spec.name: spec for spec in self.parameters}

    @functools.cached_property
    def argument_slots(self) -> tuple[tuple[int, str], ...]:
        """(index, parameter name) of each argv element that is exactly "{name}"."""
        return tuple((i, m.group(1)) for i, element in enumerate(self.command)
                     if (m := _ARGUMENT_RE.fullmatch(element)))

    @functools.cached_property
    def env_names(self) -> dict[str, str]:
        """Lower-cased header name → environment variable name, for passRequestHeaders."""
        return {h.lower(): _header_env_name(h) for h in self.pass_request_headers}

    @functools.cached_property
    def base_environment(self) -> dict[str, str]:
        """The server's environment with the task's on top, built once per task."""
        return {**inherited_environment(self), **dict(self.environment)}


@dataclasses.dataclass(frozen=True)
class JwtSpec:
    """``[auth.jwt]``: how bearer JWTs are verified."""

    verification_method: str = "public_key"  # "public_key" or "jwks"
    public_key: str | None = None  # PEM text (publicKey, publicKeyPath, or the env overrides)
    issuer: str = "rtask"  # required value of "iss"
    audience: str = "rtask-api"  # required value of "aud"
    permissions_claim: str = "permissions"  # list of strings, or one space-separated string
    leeway_seconds: float = 60.0  # clock skew allowed on exp / nbf
    allowed_algorithms: tuple[str, ...] = ("RS256",)  # asymmetric only: never none, never HMAC
    jwks_url: str | None = None
    jwks_refresh_interval_seconds: float = 3600.0  # refresh a key set older than this
    jwks_max_stale_seconds: float = 300.0  # keep using old keys this long when refresh fails
    jwks_allow_http: bool = False  # plain http only for a local identity provider or tests


@dataclasses.dataclass(frozen=True)
class AuthSpec:
    """``[auth]``: credentials beyond the task's apiKeyNames. Auth itself is always on."""

    api_key_header: str = "X-API-Key"  # second way to send an rtask key
    strict_validation: bool = True  # a JWT with an unknown permission string is rejected
    log_unknown_permissions: bool = True
    config_endpoint_enabled: bool = False  # GET /config
    key_permissions: tuple[tuple[str, tuple[str, ...]], ...] = ()  # key name → extra grants
    jwt: JwtSpec | None = None


@dataclasses.dataclass(frozen=True)
class Config:
    path: str
    tasks: dict[str, TaskSpec]
    auth: AuthSpec = AuthSpec()

    @property
    def open_task_routes(self) -> bool:
        """A task without apiKeyNames has no /tasks route, unless keys or tokens may be
        granted permissions on it ([auth.keyPermissions] or [auth.jwt])."""
        return bool(self.auth.key_permissions or self.auth.jwt)

    def key_grants(self, key_name: str) -> frozenset[str]:
        """The permissions an rtask key holds: run/read/list/cancel on every task that names
        it in apiKeyNames, plus what [auth.keyPermissions] adds."""
        return self._grants_by_key.get(key_name, frozenset())

    @functools.cached_property
    def _grants_by_key(self) -> dict[str, frozenset[str]]:
        """Built once per config, not per request (it walks every task)."""
        grants = collections.defaultdict(set)
        for task in self.tasks.values():
            for name in task.api_key_names:
                grants[name].update(f"tasks:{action}:{task.name}" for action in TASK_ACTIONS)
        for name, permissions in self.auth.key_permissions:
            grants[name].update(permissions)
        return {name: frozenset(held) for name, held in grants.items()}

    def webhook_index(self) -> dict[bytes, tuple[TaskSpec, str]]:
        """sha256(secret) → (task, webhook name). Looking a secret up by its digest keeps the
        dictionary's timing independent of how much of a guessed secret is right."""
        return {_digest(secret): (task, name)
                for task in self.tasks.values() for name, secret in task.webhooks}


class _Invalid(Exception):
    """A value of the wrong type or range; the loader adds file, task and field."""


def _bool(value):
    if not isinstance(value, bool):
        raise _Invalid("must be true or false")
    return value


def _number(value, *, positive=False):
    """A non-negative number of seconds or requests per second; at most MAX_SECONDS, since a
    larger wait overflows the clocks and timers underneath."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Invalid("must be a number")
    if positive and value <= 0:
        raise _Invalid("must be greater than 0")
    if value < 0:
        raise _Invalid("must not be negative")
    if value > MAX_SECONDS:
        raise _Invalid(f"must be at most {MAX_SECONDS}")
    return float(value)


def _integer(value, *, positive=False):
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid("must be a whole number")
    if positive and value <= 0:
        raise _Invalid("must be greater than 0")
    if value < 0:
        raise _Invalid("must not be negative")
    return value


def _string(value):
    if not isinstance(value, str) or not value:
        raise _Invalid("must be a non-empty string")
    if "\0" in value:
        raise _Invalid("must not contain a NUL character")
    return value


def _string_list(value, *, non_empty=False):
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _Invalid("must be an array of non-empty strings")
    if non_empty and not value:
        raise _Invalid("must not be empty")
    if any("\0" in v for v in value):
        raise _Invalid("must not contain a NUL character")
    return tuple(value)


def _names(names):
    bad = [n for n in names if not is_valid_name(n)]
    if bad:
        raise _Invalid(f"has {bad[0]!r}; {NAME_RULE}")
    return names


def _string_table(value):
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _Invalid("must be a table of strings")
    if any(not k or "\0" in k or "\0" in v for k, v in value.items()):
        raise _Invalid("must not have empty names or NUL characters")
    return value


def _environment(value):
    table = _string_table(value)
    bad = [k for k in table if "=" in k]
    if bad:
        raise _Invalid(f"has a variable name with '=' in it: {bad[0]!r}")
    return tuple(table.items())


def _header_name(value):
    if not isinstance(value, str) or not _HEADER_NAME.fullmatch(value):
        raise _Invalid(f"must be a header name (letters, digits and !#$%&'*+.^_`|~-), not {value!r}")
    return value


def _header_names(value):
    names = _string_list(value)
    bad = [n for n in names if not _HEADER_NAME.fullmatch(n)]
    if bad:
        raise _Invalid(f"has an invalid header name: {bad[0]!r}")
    seen = {}
    for name in names:
        other = seen.setdefault(_header_env_name(name), name)
        if other != name:
            raise _Invalid(f"has {other!r} and {name!r}, which both become {_header_env_name(name)}")
    return names


def _header_env_name(header: str) -> str:
    return "REQUEST_HEADER_" + re.sub(r"[^A-Za-z0-9_]", "_", header).upper()


def _buckets(value):
    if not isinstance(value, list) or not value:
        raise _Invalid("must be a non-empty array of numbers")
    numbers = [_number_any(v) for v in value]
    if len(numbers) > 1 and numbers[-1] == math.inf:
        numbers.pop()  # the +Inf bucket is always there; writing it is allowed
    if not all(math.isfinite(n) for n in numbers):
        raise _Invalid("must be finite numbers (the +Inf bucket is always added)")
    if any(b >= a for a, b in zip(numbers[1:], numbers)):
        raise _Invalid("must be strictly increasing")
    return tuple(numbers)


def _number_any(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise _Invalid("must be an array of numbers")
    return float(value)


# key in config.toml → (TaskSpec field, validator). The order is the reference order.
_TASK_OPTIONS = {
    "command": ("command", lambda v: _string_list(v, non_empty=True)),
    "workdir": ("workdir", _string),
    "apiKeyNames": ("api_key_names", lambda v: _names(_string_list(v))),
    "webhookSecrets": (None, _string_table),
    "webhookSecretFiles": (None, _string_table),
    "environment": ("environment", _environment),
    "passRequestHeaders": ("pass_request_headers", _header_names),
    "async": ("is_async", _bool),
    "asyncResultRetentionSeconds": ("retention_seconds", lambda v: _number(v, positive=True)),
    "rateLimit": ("rate_limit", _number),
    "maxConcurrentTasks": ("max_concurrent", _integer),
    "maxInputBytes": ("max_input_bytes", lambda v: _integer(v, positive=True)),
    "maxOutputBytes": ("max_output_bytes", lambda v: _integer(v, positive=True)),
    "executionTimeoutSeconds": ("timeout_seconds", lambda v: _number(v, positive=True)),
    "mergeStderr": ("merge_stderr", _bool),
    "queueSize": ("queue_size", _integer),
    "queueTimeoutSeconds": ("queue_timeout_seconds", lambda v: _number(v, positive=True)),
    "signedWebhook": (None, None),
    "durationHistogramBuckets": ("histogram_buckets", _buckets),
    "parameters": (None, None),
    # Isolation (README §6), parsed by parse_isolation into TaskSpec.isolation:
    "user": (None, None),
    "group": (None, None),
    "umask": (None, None),
    "inheritEnvironment": (None, None),
    "allowedNetworks": (None, None),
    "limits": (None, None),
}
# Spellings of the older RTask README: old key → (new key, how the value translates).
_DEPRECATED_OPTIONS = {
    "blocking": ("async", lambda blocking: not blocking),
    "redirectStderr": ("mergeStderr", lambda merge: merge),
}


@dataclasses.dataclass
class Problems:
    """Everything wrong with the files, collected so that one run reports it all."""

    errors: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def raise_if_errors(self):
        if self.errors:
            raise ConfigError("\n".join(self.errors))


def load_config(path: str, problems: Problems) -> Config:
    """Read and validate config.toml; add every problem to ``problems`` (errors and warnings).

    Relative paths inside the file (workdir, webhookSecretFiles) are taken relative to the
    directory of the config file, so the server behaves the same whatever its cwd."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found (pass --config PATH or create it)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None

    base_dir = os.path.dirname(os.path.abspath(path))
    for key in raw:
        if key not in ("tasks", "auth"):
            problems.errors.append(f"{path}: unknown top-level key {key!r}{_suggest(key, ['tasks', 'auth'])}")
    tables = raw.get("tasks", {})
    if not isinstance(tables, dict):
        problems.errors.append(f"{path}: 'tasks' must be a table of [tasks.<name>] tables")
        tables = {}
    if not tables:
        problems.warnings.append(f"{path}: no tasks are configured")

    tasks = {}
    for name, table in tables.items():
        task = _parse_task(path, base_dir, name, table, problems)
        if task is not None:
            tasks[name] = task
    _check_unique_webhook_secrets(path, tasks, problems)
    config = Config(path=path, tasks=tasks, auth=_parse_auth(path, base_dir, raw.get("auth", {}), problems))
    for task in tasks.values():
        if not (task.api_key_names or task.webhooks or task.signed_webhook or config.open_task_routes):
            problems.warnings.append(f"{path}: task {task.name!r}: has neither apiKeyNames nor webhooks, so nothing can call it")
    return config


def _parse_task(path, base_dir, name, table, problems: Problems) -> TaskSpec | None:
    where = f"{path}: task {name!r}"
    if not is_valid_name(name):
        problems.errors.append(f"{where}: {NAME_RULE}")
        return None
    if not isinstance(table, dict):
        problems.errors.append(f"{where}: must be a table ([tasks.{_toml_key(name)}])")
        return None
    errors_before = len(problems.errors)
    table = _translate_deprecated(where, table, problems)
    fields = _parse_table(where, table, _TASK_OPTIONS, problems)
    if "command" not in table:
        problems.errors.append(f"{where}: field 'command' is required (an array like [\"/bin/echo\", \"hi\"])")
    webhooks = _load_webhook_secrets(where, base_dir, table, problems)
    if "signedWebhook" in table:
        fields["signed_webhook"] = _parse_signed_webhook(f"{where}: signedWebhook", base_dir,
                                                         table["signedWebhook"], problems)
    if "parameters" in table or any(_ARGUMENT_RE.fullmatch(a) for a in fields.get("command", ())):
        fields["parameters"] = parse_parameters(where, table.get("parameters", {}), fields.get("command"), problems)
    fields["isolation"] = parse_isolation(where, table, problems)
    if len(problems.errors) > errors_before or webhooks is None:
        return None
    if "workdir" in fields:
        fields["workdir"] = os.path.join(base_dir, fields["workdir"])
    task = TaskSpec(name=name, webhooks=webhooks, **fields)
    _warn_about_task(where, task, problems)
    return task


def _translate_deprecated(where, table, problems: Problems) -> dict:
    table = dict(table)
    for old, (new, translate) in _DEPRECATED_OPTIONS.items():
        if old not in table:
            continue
        if new in table:
            problems.errors.append(f"{where}: fields {old!r} and {new!r} are the same option; keep only {new!r}")
            del table[old]
            continue
        value = table.pop(old)
        if isinstance(value, bool):
            table[new] = translate(value)
            problems.warnings.append(f"{where}: field {old!r} is deprecated; write {new} = {str(translate(value)).lower()}")
        else:
            problems.errors.append(f"{where}: field {old!r} must be true or false")
    return table


def _read_config_file(what: str, base_dir: str, path: str, problems: Problems) -> str | None:
    """The whitespace-trimmed text of a file named in the config (relative to its directory),
    or None with the problem recorded: unreadable, not UTF-8, or empty."""
    full = os.path.join(base_dir, path)
    try:
        with open(full, encoding="utf-8") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        problems.errors.append(f"{what}: cannot read {full}: {reason}")
        return None
    if not text:
        problems.errors.append(f"{what}: {full} is empty")
        return None
    return text


def _load_webhook_secrets(where, base_dir, table, problems: Problems):
    """(name, secret) pairs from webhookSecrets and webhookSecretFiles; None on an error."""
    pairs, ok = [], True
    inline = table.get("webhookSecrets")
    files = table.get("webhookSecretFiles")
    if isinstance(inline, dict):
        pairs += [(n, s) for n, s in inline.items() if isinstance(s, str)]
        if any(not s.strip() for _, s in pairs):
            problems.errors.append(f"{where}: field 'webhookSecrets' has an empty secret")
            ok = False
    if isinstance(files, dict):
        for wh_name, file_path in files.items():
            if not isinstance(file_path, str):
                continue
            if isinstance(inline, dict) and wh_name in inline:
                problems.errors.append(f"{where}: webhook {wh_name!r} is in both webhookSecrets and webhookSecretFiles")
                ok = False
                continue
            secret = _read_config_file(f"{where}: field 'webhookSecretFiles' entry {wh_name!r}",
                                       base_dir, file_path, problems)
            if secret is None:
                ok = False
                continue
            pairs.append((wh_name, secret))
    return tuple(pairs) if ok else None


_SIGNED_WEBHOOK_OPTIONS = {
    "provider": ("provider", _string),
    "secret": ("secret", _string),
    "secretFile": ("secret_file", _string),
    "events": ("events", _string_list),
    "signatureHeader": ("signature_header", _header_name),
    "match": ("match", lambda v: _match_rules(v)),  # defined with the parameters
}
SIGNED_WEBHOOK_PROVIDERS = ("github", "gitlab", "hmac-sha256")


def _parse_signed_webhook(where, base_dir, table, problems: Problems) -> SignedWebhookSpec | None:
    if not isinstance(table, dict):
        problems.errors.append(f"{where} must be a table")
        return None
    fields = _parse_table(where, table, _SIGNED_WEBHOOK_OPTIONS, problems)
    if fields.get("provider") not in SIGNED_WEBHOOK_PROVIDERS:
        problems.errors.append(f"{where}: field 'provider' must be one of {', '.join(SIGNED_WEBHOOK_PROVIDERS)}")
        return None
    if "signature_header" in fields and fields["provider"] != "hmac-sha256":
        problems.errors.append(f"{where}: field 'signatureHeader' applies to provider 'hmac-sha256' only")
    secret_file = fields.pop("secret_file", None)
    if secret_file and "secret" in fields:
        problems.errors.append(f"{where}: give either 'secret' or 'secretFile', not both")
        return None
    if secret_file:
        fields["secret"] = _read_config_file(f"{where}: field 'secretFile'", base_dir, secret_file, problems)
        if fields["secret"] is None:
            return None
    if not fields.get("secret", "").strip():
        problems.errors.append(f"{where}: needs a non-empty 'secret' or 'secretFile'")
        return None
    return SignedWebhookSpec(**fields)


def _check_unique_webhook_secrets(path, tasks, problems: Problems):
    seen = {}
    for task in tasks.values():
        for wh_name, secret in task.webhooks:
            other = seen.get(secret)
            if other:
                problems.errors.append(
                    f"{path}: task {task.name!r}: webhook {wh_name!r} uses the same secret as "
                    f"webhook {other[1]!r} of task {other[0]!r}; every webhook needs its own secret")
            seen[secret] = (task.name, wh_name)


def _permission_list(value):
    names = _string_list(value)
    unknown = [p for p in names if not is_known_permission(p)]
    if unknown:
        raise _Invalid(f"has an unknown permission {unknown[0]!r} (see rtask show-permissions)")
    return names


def _http_url(value):
    url = _string(value)
    if not re.match(r"https?://[^/]", url):
        raise _Invalid("must be an http(s) URL")
    return url


_AUTH_OPTIONS = {
    "apiKeyHeader": ("api_key_header", _header_name),
    "strictValidation": ("strict_validation", _bool),
    "logUnknownPermissions": ("log_unknown_permissions", _bool),
    "configEndpointEnabled": ("config_endpoint_enabled", _bool),
    "keyPermissions": (None, None),
    "jwt": (None, None),
}
_JWT_OPTIONS = {
    "verificationMethod": ("verification_method", _string),
    "publicKey": ("public_key", _string),
    "publicKeyPath": ("public_key_path", _string),
    "issuer": ("issuer", _string),
    "audience": ("audience", _string),
    "permissionsClaim": ("permissions_claim", _string),
    "leewaySeconds": ("leeway_seconds", _number),
    "allowedAlgorithms": ("allowed_algorithms", lambda v: _string_list(v, non_empty=True)),
    "jwksUrl": ("jwks_url", _http_url),
    "jwksRefreshIntervalSeconds": ("jwks_refresh_interval_seconds", lambda v: _number(v, positive=True)),
    "jwksMaxStaleSeconds": ("jwks_max_stale_seconds", _number),
    "jwksAllowHttp": ("jwks_allow_http", _bool),
}
JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384")


def _parse_table(where, table, options, problems: Problems) -> dict:
    """Validate ``table`` against an option map (key → (field, validator)); returns the
    fields. A key without a field is only validated; one without a validator is left for
    the caller."""
    fields = {}
    for key, value in table.items():
        if key not in options:
            problems.errors.append(f"{where}: unknown field {key!r}{_suggest(key, options)}")
            continue
        attr, validate = options[key]
        try:
            checked = validate(value) if validate else None
        except _Invalid as e:
            problems.errors.append(f"{where}: field {key!r} {e}")
            continue
        if attr:
            fields[attr] = checked
    return fields


def _parse_auth(path, base_dir, table, problems: Problems) -> AuthSpec:
    where = f"{path}: [auth]"
    if not isinstance(table, dict):
        problems.errors.append(f"{where} must be a table")
        return AuthSpec()
    fields = _parse_table(where, table, _AUTH_OPTIONS, problems)
    grants = table.get("keyPermissions", {})
    if not isinstance(grants, dict):
        problems.errors.append(f"{where}: field 'keyPermissions' must be a table of key name → permissions")
        grants = {}
    key_permissions = []
    for key_name, value in grants.items():
        try:
            _names([key_name])
            key_permissions.append((key_name, _permission_list(value)))
        except _Invalid as e:
            problems.errors.append(f"{where}: keyPermissions entry {key_name!r} {e}")
    jwt_table = table.get("jwt")
    jwt_spec = None
    if jwt_table is not None:
        jwt_spec = _parse_jwt(f"{path}: [auth.jwt]", base_dir, jwt_table, problems)
    return AuthSpec(key_permissions=tuple(key_permissions), jwt=jwt_spec, **fields)


def _parse_jwt(where, base_dir, table, problems: Problems) -> JwtSpec | None:
    if not isinstance(table, dict):
        problems.errors.append(f"{where} must be a table")
        return None
    fields = _parse_table(where, table, _JWT_OPTIONS, problems)
    method = fields.get("verification_method", "public_key")
    bad_algs = [a for a in fields.get("allowed_algorithms", ()) if a not in JWT_ALGORITHMS]
    if bad_algs:
        problems.errors.append(f"{where}: field 'allowedAlgorithms' has {bad_algs[0]!r}; "
                               f"allowed are {', '.join(JWT_ALGORITHMS)}")
    if method == "public_key":
        fields["public_key"] = _jwt_public_key(where, base_dir, fields, problems)
        if fields["public_key"] is None:
            return None
    elif method == "jwks":
        fields.pop("public_key_path", None)
        url = fields.get("jwks_url")
        if not url:
            problems.errors.append(f"{where}: verificationMethod 'jwks' needs jwksUrl")
            return None
        try:
            _import_jwt()
        except ConfigError as e:
            problems.errors.append(f"{where}: {e}")
            return None
        if url.startswith("http://") and not fields.get("jwks_allow_http"):
            problems.errors.append(f"{where}: field 'jwksUrl' must be https (set jwksAllowHttp = true only for a local identity provider)")
            return None
    else:
        problems.errors.append(f"{where}: field 'verificationMethod' must be 'public_key' or 'jwks'")
        return None
    return JwtSpec(**fields)


def _jwt_public_key(where, base_dir, fields, problems: Problems) -> str | None:
    """The PEM text: env RTASK_JWT_PUBLIC_KEY, else env RTASK_JWT_PUBLIC_KEY_PATH, else
    publicKey, else publicKeyPath (the environment overrides the file, as in Tasker). It is
    parsed here so that check-config reports a bad key, as run would."""
    inline, path = fields.get("public_key"), fields.pop("public_key_path", None)
    if inline and path:
        problems.errors.append(f"{where}: give either 'publicKey' or 'publicKeyPath', not both")
        return None
    source = "publicKey" if inline else "publicKeyPath"
    if os.environ.get("RTASK_JWT_PUBLIC_KEY"):
        inline, path, source = os.environ["RTASK_JWT_PUBLIC_KEY"], None, "env RTASK_JWT_PUBLIC_KEY"
    elif os.environ.get("RTASK_JWT_PUBLIC_KEY_PATH"):
        inline, path, source = None, os.environ["RTASK_JWT_PUBLIC_KEY_PATH"], "env RTASK_JWT_PUBLIC_KEY_PATH"
    if path:
        inline = _read_config_file(f"{where}: the public key", base_dir, path, problems)
        if inline is None:
            return None
    if not inline:
        problems.errors.append(f"{where}: verificationMethod 'public_key' needs publicKeyPath or publicKey")
        return None
    try:
        _import_jwt()
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
        load_pem_public_key(inline.encode())
    except ConfigError as e:
        problems.errors.append(f"{where}: {e}")
        return None
    except ValueError:
        problems.errors.append(f"{where}: {source} is not a PEM public key")
        return None
    return inline


def _warn_about_task(where, task: TaskSpec, problems: Problems):
    if task.workdir and not os.path.isdir(task.workdir):
        problems.warnings.append(f"{where}: workdir {task.workdir} does not exist (yet); runs will fail until it does")
    program = task.command[0]
    if "/" in program:
        program_path = os.path.join(task.workdir or os.getcwd(), program)
        if not os.access(program_path, os.X_OK):
            problems.warnings.append(f"{where}: command {program} is not an executable file (yet)")
    elif not _which(program):
        problems.warnings.append(f"{where}: command {program!r} is not found on PATH")


def _which(program):
    return any(os.access(os.path.join(d, program), os.X_OK)
               for d in os.environ.get("PATH", os.defpath).split(os.pathsep) if d)


def _suggest(word, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def warn_about_key_names(config: Config, key_names, keys_path, problems: Problems):
    """A key named by a task but not in keys.toml yet is a warning, since a fresh install
    configures tasks first and adds keys after; so is a key granted '*'."""
    for task in config.tasks.values():
        for name in task.api_key_names:
            if name not in key_names:
                problems.warnings.append(
                    f"{config.path}: task {task.name!r}: key {name!r} is not in {keys_path} yet; "
                    f"create it with: rtask add-key {shlex.quote(name)}")
    for name, grants in config.auth.key_permissions:
        if "*" in grants:
            problems.warnings.append(f"{config.path}: [auth.keyPermissions] grants '*' (everything) to key {name!r}")


# =============================================================================================
# Key store (keys.toml, byte-compatible with the Go RTask)
# =============================================================================================
#
# The key handed out:   base64url(no padding) of CBOR {1: id, 2: key}
# The stored entry:     base64url(no padding) of CBOR {1: id, 2: salt, 3: time, 4: memory_mib,
#                       5: threads, 6: argon2id(key, salt, ...)}
# As the Go writer does, a field whose value is zero or empty is left out (id 0 has no field 1),
# and a missing field decodes as zero/empty.


@dataclasses.dataclass(frozen=True)
class StoredKey:
    name: str
    id: int
    salt: bytes
    time: int
    memory_mib: int
    threads: int
    hash: bytes


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    """Strict base64url without padding; ValueError on anything else."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _cbor_int_map(fields: dict[int, object]) -> bytes:
    import cbor2
    return cbor2.dumps({k: v for k, v in fields.items() if v})  # zero/empty omitted, as in Go


def _decode_int_map(text: str, types: dict[int, type]) -> dict[int, object]:
    """Decode base64url CBOR: exactly one map whose keys are among ``types`` (small integers),
    each value of its type, and nothing after the map (the Go decoder refuses trailing bytes
    too). Missing fields become 0 / b"". ValueError on anything else."""
    import io
    import cbor2
    data = _b64decode(text)
    try:
        decoder = cbor2.CBORDecoder(io.BytesIO(data))
        value = decoder.decode()
    except Exception as e:  # cbor2 raises several types on hostile input; all mean "not a key"
        raise ValueError("not CBOR") from e
    if decoder.fp.tell() != len(data):
        raise ValueError("bytes after the CBOR map")
    if not isinstance(value, dict):
        raise ValueError("not a CBOR map")
    if any(type(k) is not int or k not in types for k in value):  # type(): True == 1 in a dict
        raise ValueError("a field that is not one of " + ", ".join(map(str, types)))
    out = {}
    for field, kind in types.items():
        item = value.get(field, kind())
        if type(item) is not kind or (kind is int and not 0 <= item < 2**32):
            raise ValueError(f"field {field} has the wrong type")
        out[field] = item
    return out


def encode_api_key(key_id: int, key: bytes) -> str:
    return _b64encode(_cbor_int_map({1: key_id, 2: key}))


def decode_api_key(token: str) -> tuple[int, bytes]:
    """(id, key bytes) of a presented key. One key, one spelling (README §7): the token must be
    exactly what add-key prints for that (id, key) -- canonical base64url (no padding, unused
    bits zero) of the minimal CBOR map {1: id, 2: key} in that order, nothing after it -- so
    "<key>x", "<key>AAAA" or a re-encoded map are not the key, and cost no Argon2 run."""
    import cbor2
    try:
        fields = cbor2.loads(_b64decode(token))
        key_id, key = fields.get(1, 0), fields[2]
    except Exception as e:  # cbor2 raises several types on hostile input; all mean "not a key"
        raise ValueError("not a key") from e
    # Comparing with the re-encoding checks everything at once (base64 bits, integer and
    # length forms, field order, extra fields, trailing bytes) and costs a few µs, which
    # matters: every request with a cached key pays it.
    if not (type(key_id) is int and 0 <= key_id < 2**32 and type(key) is bytes and key) \
            or encode_api_key(key_id, key) != token:
        raise ValueError("not the one spelling of a key")
    return key_id, key


def encode_stored_key(k: StoredKey) -> str:
    return _b64encode(_cbor_int_map(
        {1: k.id, 2: k.salt, 3: k.time, 4: k.memory_mib, 5: k.threads, 6: k.hash}))


def decode_stored_key(name: str, text: str) -> StoredKey:
    f = _decode_int_map(text, {1: int, 2: bytes, 3: int, 4: int, 5: int, 6: bytes})
    key = StoredKey(name, f[1], f[2], f[3], f[4], f[5], f[6])
    if not (1 <= key.time <= 100 and 1 <= key.memory_mib <= 4096 and 1 <= key.threads <= 255
            and len(key.hash) >= 4 and len(key.salt) >= 8
            and key.memory_mib * 1024 >= 8 * key.threads):  # Argon2 needs 8 KiB per lane
        raise ValueError("Argon2 parameters out of range")
    return key


def argon2id(secret: bytes, salt: bytes, time_cost: int, memory_mib: int, threads: int,
             length: int) -> bytes:
    """The raw hash. MemoryError when its memory or threads cannot be had (argon2-cffi says
    HashingError, as for any failure of the C library; with these parameters checked, only
    memory and thread allocation can fail)."""
    from argon2.exceptions import HashingError
    from argon2.low_level import Type, hash_secret_raw
    try:
        return hash_secret_raw(secret, salt, time_cost=time_cost, memory_cost=memory_mib * 1024,
                               parallelism=threads, hash_len=length, type=Type.ID)
    except HashingError as e:
        raise MemoryError(str(e)) from None


def new_stored_key(name: str, key_id: int) -> tuple[StoredKey, str]:
    """A fresh key: (what keys.toml stores, the token handed to the user once)."""
    key = secrets.token_bytes(KEY_BYTES)
    salt = secrets.token_bytes(SALT_BYTES)
    digest = argon2id(key, salt, ARGON2_TIME, ARGON2_MEMORY_MIB, ARGON2_THREADS, len(key))
    stored = StoredKey(name, key_id, salt, ARGON2_TIME, ARGON2_MEMORY_MIB, ARGON2_THREADS, digest)
    return stored, encode_api_key(key_id, key)


def parse_key_file(path: str) -> dict[str, StoredKey]:
    """Read keys.toml; a missing file is an empty store. ConfigError names the bad entry."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    keys, ids = {}, {}
    for name, text in raw.items():
        if not isinstance(text, str):
            raise ConfigError(f"{path}: key {name!r} must be a string (as written by add-key)")
        try:
            key = decode_stored_key(name, text)
        except ValueError as e:
            raise ConfigError(f"{path}: key {name!r} is not a valid key entry ({e}); "
                              f"remove it and create it again with add-key") from None
        if key.id in ids:
            raise ConfigError(f"{path}: keys {ids[key.id]!r} and {name!r} have the same id {key.id}")
        ids[key.id] = name
        keys[name] = key
    return keys


def _toml_key(name: str) -> str:
    """A bare key, or a basic string. ensure_ascii=False: json's surrogate pairs for characters
    beyond U+FFFF are not valid TOML escapes. DEL is the one control json leaves raw."""
    if re.fullmatch(r"[A-Za-z0-9_-]+", name):
        return name
    return json.dumps(name, ensure_ascii=False).replace("\x7f", "\\u007f")


def write_key_file(path: str, keys: dict[str, StoredKey]):
    text = "".join(f"{_toml_key(n)} = \"{encode_stored_key(k)}\"\n" for n, k in sorted(keys.items()))
    write_file_atomically(path, text.encode("utf-8"), 0o600)


def write_file_atomically(path: str, data: bytes, mode: int):
    """Replace ``path``: temp file in the same directory (created 0600, then ``mode``), fsync,
    rename, fsync the directory. A crash leaves either the old file or the new one."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=_temporary_prefix(path), suffix=".tmp")
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror}") from None
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full or read-only disk: the old file is untouched
        os.unlink(tmp)
        raise ConfigError(f"cannot write {path}: {e.strerror}") from None
    except BaseException:
        os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _temporary_prefix(path: str) -> str:
    return "." + os.path.basename(path) + "."


def remove_leftover_temporaries(path: str):
    """Delete the temporary files an interrupted write_file_atomically(path) left behind (a
    process killed between writing and renaming): regular files beside ``path`` named
    ``.<name>.XXXXXXXX.tmp``, as mkstemp names them there; nothing else. Call it with the
    file's lock held, so that no write in progress loses its file."""
    directory = os.path.dirname(os.path.abspath(path))
    leftover = re.compile(re.escape(_temporary_prefix(path)) + r"[a-z0-9_]{8}\.tmp")
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        with contextlib.suppress(OSError):
            if leftover.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                log.info("removed a temporary file an interrupted write left", extra={"fields": {"file": entry.path}})


class KeyFileLock:
    """An exclusive flock on ``<keys>.lock`` beside keys.toml, so that concurrent add-key and
    remove-key runs serialize their read-modify-write. (Locking keys.toml itself would not
    work: the atomic rename replaces the file that the other process holds the lock on.)"""

    def __init__(self, keys_path: str):
        self.path = keys_path + ".lock"

    def __enter__(self):
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise ConfigError(f"{self.path}: cannot create the lock file: {e.strerror}") from None
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def _real_path(keys_path: str) -> str:
    """A keys.toml that is a symlink is updated where it points (and locked there), so that
    the link and its target never part ways and writers through either path exclude each other."""
    return os.path.realpath(keys_path)


def add_key(keys_path: str, name: str) -> str:
    """Create key ``name`` with the lowest free id; return the token to show once."""
    if not is_valid_name(name):
        raise ConfigError(f"key name {name!r} is not valid: {NAME_RULE}")
    keys_path = _real_path(keys_path)
    with KeyFileLock(keys_path):
        remove_leftover_temporaries(keys_path)
        keys = parse_key_file(keys_path)
        if name in keys:
            raise ConfigError(f"{keys_path}: key {name!r} already exists; use remove-key first")
        used = {k.id for k in keys.values()}
        free = next((i for i in range(MAX_KEY_ID + 1) if i not in used), None)
        if free is None:
            raise ConfigError(f"{keys_path}: all {MAX_KEY_ID + 1} key ids are in use; remove a key first")
        stored, token = new_stored_key(name, free)
        keys[name] = stored
        write_key_file(keys_path, keys)
    return token


def remove_key(keys_path: str, name: str):
    keys_path = _real_path(keys_path)
    with KeyFileLock(keys_path):
        remove_leftover_temporaries(keys_path)
        keys = parse_key_file(keys_path)
        if name not in keys:
            raise ConfigError(f"{keys_path}: there is no key named {name!r} (see list-keys)")
        del keys[name]
        write_key_file(keys_path, keys)


# =============================================================================================
# Authentication and permissions
# =============================================================================================


class Reject(Exception):
    """An answered refusal: HTTP status, error code, sentence, and the metric reason."""

    def __init__(self, status, code, message, reason=None, headers=()):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.reason, self.headers = reason, tuple(headers)


def unauthorized(reason, message):
    """401 with the challenge RFC 9110 §11.6.1 requires on every 401 (RFC 6750 §3 form):
    ``error="invalid_token"`` when a credential was presented and refused, none when there
    was no credential at all (wget and other clients need the header to treat it as auth)."""
    challenge = 'Bearer realm="rtask"' if reason == "missing_key" else 'Bearer realm="rtask", error="invalid_token"'
    return Reject(401, "unauthorized", message, reason, [("WWW-Authenticate", challenge)])


def auth_overloaded(message="The server cannot verify keys right now; retry shortly."):
    """503 for a key that cannot be checked now (no Argon2 slot, memory or threads); README §7."""
    return Reject(503, "unavailable", message, "auth_overloaded", [("Retry-After", "1")])


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who made a request (labels metrics and logs, and is RTASK_CALLER) and what it may do."""

    name: str  # key name, JWT subject, or webhook name
    kind: str  # "api_key", "jwt" or "webhook"
    grants: frozenset[str] = frozenset()


class _CheckInFlight:
    """The outcome of one check of a token, for the requests that bring the same token meanwhile."""

    __slots__ = ("done", "outcome")

    def __init__(self):
        self.done = threading.Event()
        self.outcome: str | Reject | None = None

    def outcome_when_done(self) -> str:
        self.done.wait()  # (the check ends: the slot wait and Argon2 are bounded)
        if isinstance(self.outcome, Reject):
            r = self.outcome
            raise Reject(r.status, r.code, r.message, r.reason, r.headers)  # (its own traceback)
        if self.outcome is None:  # the check failed on something else (logged where it did)
            raise auth_overloaded()
        return self.outcome


class KeyRing:
    """The keys of a running server: verification, the verified-key cache, and live reload.

    keys.toml is stat()ed at most once a second; a changed file is parsed and replaces the set
    at once (add-key and remove-key need no restart), and the cache is emptied so a removed key
    stops working on the next check. A file that fails to parse is logged and the previous set
    stays in force."""

    def __init__(self, path: str, keys: dict[str, StoredKey], argon2_slots=None):
        self.path = path
        self._by_id = {k.id: k for k in keys.values()}
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[bytes, tuple[str, float]] = collections.OrderedDict()
        self._cache_secret = secrets.token_bytes(32)  # per process: cache keys are useless elsewhere
        # Single flight: requests that bring a token being checked wait for that check's outcome
        # instead of running Argon2 again (after a restart, a burst of CI jobs with one key
        # would otherwise queue one check each for the server-wide bound, and get 503s).
        self._checking: dict[bytes, _CheckInFlight] = {}
        # Server-wide in a server (Argon2Slots, across its workers), else in this process.
        self._argon2_slots = argon2_slots or threading.BoundedSemaphore(ARGON2_MAX_CONCURRENT)

    @property
    def names(self) -> set[str]:
        return {k.name for k in self._by_id.values()}

    def _file_stamp(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def reload_if_changed(self, force=False):
        now = time.monotonic()
        if now - self._checked < KEY_FILE_CHECK_INTERVAL and not force:
            return
        with self._lock:
            if now - self._checked < KEY_FILE_CHECK_INTERVAL and not force:
                return
            self._checked = now
            stamp = self._file_stamp()
            if stamp == self._stamp:
                if force and stamp is None:
                    self.warn_missing()
                return
            self._stamp = stamp
            try:
                keys = parse_key_file(self.path)
            except ConfigError as e:
                log.error("keys file changed but cannot be used; the previous keys stay in force",
                          extra={"fields": {"problem": str(e)}})
                return
            self._by_id = {k.id: k for k in keys.values()}
            self._cache.clear()
            if stamp is None:
                self.warn_missing()
            else:
                log.info("keys reloaded", extra={"fields": {"keys": len(keys), "file": self.path}})

    def warn_missing(self):
        warn_missing_keys_file(self.path)

    def verify(self, token: str) -> str:
        """The name of the key ``token`` is, or Reject(401). Unknown ids never reach Argon2."""
        self.reload_if_changed()
        # The cache is keyed by an HMAC of the token (never the token: the cache holds nothing
        # that opens the server). Only a key's one canonical spelling is ever verified and
        # cached, so a token names exactly one decoded key and no other spelling of it can hit
        # or fill the cache: this is keying by the decoded key, without decoding on a hit.
        tag = hmac.digest(self._cache_secret, token.encode("utf-8", "surrogateescape"), "sha256")
        name = self._cached(tag)
        if name:
            return name
        with self._lock:
            check = self._checking.get(tag)
            first = check is None
            if first:
                check = self._checking[tag] = _CheckInFlight()
        if not first:
            return check.outcome_when_done()
        try:
            check.outcome = self._check(token, tag)
        except Reject as r:
            check.outcome = r
            raise
        finally:
            with self._lock:
                del self._checking[tag]
            check.done.set()
        return check.outcome

    def _check(self, token: str, tag: bytes) -> str:
        """Decode ``token`` and run Argon2 on it (within the server-wide bound); cache a match."""
        try:
            if len(token) > MAX_TOKEN_CHARS:
                raise ValueError("too long")
            key_id, key = decode_api_key(token)
        except ValueError:
            raise unauthorized("invalid_key_encoding", "The API key is malformed.") from None
        stored = self._by_id.get(key_id)
        if stored is None or len(key) != len(stored.hash):
            raise unauthorized("invalid_key", "The API key is not valid.")
        if not self._argon2_slots.acquire(timeout=ARGON2_SLOT_WAIT_SECONDS):
            raise auth_overloaded("Too many key verifications at once; retry shortly.")
        try:
            digest = argon2id(key, stored.salt, stored.time, stored.memory_mib, stored.threads,
                              len(stored.hash))
        except MemoryError as e:  # its 64 MiB or its threads cannot be had now (README §5)
            log.warning("cannot verify a key now: out of memory or threads", extra={"fields": {"problem": str(e)}})
            raise auth_overloaded() from None
        finally:
            self._argon2_slots.release()
        if not hmac.compare_digest(digest, stored.hash):
            raise unauthorized("invalid_key", "The API key is not valid.")
        with self._lock:
            # keys.toml may have been reloaded while Argon2 ran: the key must still be there.
            if self._by_id.get(key_id) != stored:
                raise unauthorized("invalid_key", "The API key is not valid.")
            self._cache[tag] = (stored.name, time.monotonic() + KEY_CACHE_TTL_SECONDS)
            if len(self._cache) > KEY_CACHE_SIZE:
                self._cache.popitem(last=False)
        return stored.name

    def _cached(self, tag: bytes) -> str | None:
        with self._lock:
            hit = self._cache.get(tag)
            if hit is None:
                return None
            if hit[1] < time.monotonic():
                del self._cache[tag]
                return None
            self._cache.move_to_end(tag)
            return hit[0]


def warn_missing_keys_file(path: str):
    """A missing keys file is an empty store (README §7), so every key is refused: say so."""
    log.warning(f"keys file {path} is missing: every API key gets 401 until it exists again "
                f"(rtask add-key creates it)", extra={"fields": {"file": path}})


def warn_if_keys_missing(args, config: Config):
    """At start-up: keys.toml is missing while tasks or [auth.keyPermissions] name keys."""
    if not os.path.exists(args.api_keys_file) and (config.auth.key_permissions or
                                                   any(t.api_key_names for t in config.tasks.values())):
        warn_missing_keys_file(args.api_keys_file)


def _import_jwt():
    """PyJWT is an optional extra, imported only where JWTs are used."""
    try:
        import jwt
        from jwt.algorithms import has_crypto
    except ImportError:
        has_crypto = False
    if not has_crypto:  # PyJWT without its crypto extra cannot verify RSA or EC signatures
        raise ConfigError("JWT support needs the optional extra: pip install 'PyJWT[crypto]'")
    return jwt


class JwksCache:
    """The identity provider's signing keys, by ``kid``.

    Fetched by ``prepare`` (at start, while /health/ready says "starting"; a failure is
    logged and the server goes on without keys), refreshed lazily when
    older than the refresh interval, and at once for an unknown kid, but never more than once
    per JWKS_COOLDOWN_SECONDS whatever the reason, so a flood of random kids costs one fetch.
    When the provider is down, the last keys serve up to jwksMaxStaleSeconds past their
    refresh time. Only HTTPS (unless jwksAllowHttp), a 10-second timeout, no redirects."""

    def __init__(self, spec: JwtSpec, metrics: Metrics):
        self.spec, self.metrics = spec, metrics
        self._keys: dict[str | None, object] = {}
        self._fetched: float | None = None  # monotonic time of the last successful fetch
        self._attempted = -math.inf
        self._lock = threading.Lock()
        self._prepared = threading.Event()  # set once the first fetch has been tried
        self.fetches = 0

    def prepare(self):
        self.refresh()
        self._prepared.set()

    def refresh(self):
        """Fetch the key set unless another fetch is running or one was tried too recently."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            if time.monotonic() - self._attempted < JWKS_COOLDOWN_SECONDS:
                return
            self._attempted = time.monotonic()
            self.fetches += 1
            try:
                self._keys = self._fetch()
                self._fetched = time.monotonic()
                log.info("JWKS fetched", extra={"fields": {"url": self.spec.jwks_url, "keys": len(self._keys)}})
            except Exception as e:  # network, TLS, JSON or key errors: keep the old keys
                log.error("JWKS fetch failed; keeping the previous keys",
                          extra={"fields": {"url": self.spec.jwks_url, "problem": str(e)[:200]}})
        finally:
            self._lock.release()

    def _fetch(self) -> dict:
        import urllib.request
        jwt = _import_jwt()

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):
                raise ValueError("the JWKS URL redirects; configure the final URL")

        opener = urllib.request.build_opener(NoRedirect)
        with opener.open(self.spec.jwks_url, timeout=JWKS_FETCH_TIMEOUT_SECONDS) as response:
            data = json.loads(response.read(JWKS_MAX_BYTES + 1)[:JWKS_MAX_BYTES])
        keys = {}
        for entry in data.get("keys", []):
            try:
                jwk = jwt.PyJWK.from_dict(entry)
            except jwt.PyJWTError:
                continue  # a key type or algorithm we do not use
            keys[jwk.key_id] = jwk.key
        return keys

    def key_for(self, kid: str | None):
        # A token that arrives while the first fetch runs waits for it rather than failing.
        self._prepared.wait(JWKS_FETCH_TIMEOUT_SECONDS + 1)
        now = time.monotonic()
        interval = self.spec.jwks_refresh_interval_seconds
        if self._fetched is None or now - self._fetched > interval or kid not in self._keys:
            self.refresh()
        if self._fetched is None or time.monotonic() - self._fetched > interval + self.spec.jwks_max_stale_seconds:
            raise ValueError("no current signing keys from the identity provider")
        key = self._keys.get(kid)
        if key is None:
            raise ValueError("unknown signing key id")
        return key


class JwtVerifier:
    """Checks a bearer JWT: signature with an allowed asymmetric algorithm, exp required,
    nbf if present, iss and aud as configured, leeway; then reads the permissions claim."""

    def __init__(self, spec: JwtSpec, auth: AuthSpec, metrics: Metrics):
        jwt = _import_jwt()
        self.spec, self.auth, self.metrics = spec, auth, metrics
        self._jwt = jwt
        self._static_key = None
        self._warned: set[tuple[str, str]] = set()
        self.jwks = None
        if spec.verification_method == "jwks":
            self.jwks = JwksCache(spec, metrics)
        else:  # checked when the config was loaded
            from cryptography.hazmat.primitives.serialization import load_pem_public_key
            self._static_key = load_pem_public_key(spec.public_key.encode())

    def prepare(self):
        """Fetch the JWKS, if that is where the keys come from: up to its fetch timeout."""
        if self.jwks:
            self.jwks.prepare()

    def verify(self, token: str) -> Caller:
        started = time.perf_counter()
        try:
            caller = self._verify(token)
        except Reject:
            self.metrics.jwt_verification(time.perf_counter() - started, "failure")
            raise
        self.metrics.jwt_verification(time.perf_counter() - started, "success")
        return caller

    def _verify(self, token: str) -> Caller:
        jwt = self._jwt
        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") not in self.spec.allowed_algorithms:
                raise jwt.InvalidAlgorithmError("algorithm not allowed")
            key = self.jwks.key_for(header.get("kid")) if self.jwks else self._static_key
            claims = jwt.decode(token, key, algorithms=list(self.spec.allowed_algorithms),
                                audience=self.spec.audience, issuer=self.spec.issuer,
                                leeway=self.spec.leeway_seconds,
                                options={"require": ["exp", "iss", "aud"]})
            if claims["iss"] != self.spec.issuer:  # PyJWT 2.10.0 matched it as a substring
                raise jwt.InvalidIssuerError("wrong issuer")
        except (jwt.PyJWTError, ValueError, TypeError) as e:
            reason = "token_expired" if isinstance(e, jwt.ExpiredSignatureError) else "invalid_token"
            raise unauthorized(reason, f"The bearer token is not valid: {_jwt_problem(e)}.") from None
        grants = self._permissions(claims)
        subject = claims.get("sub")
        return Caller(subject if isinstance(subject, str) and subject else "jwt", "jwt", grants)

    def _permissions(self, claims: dict) -> frozenset[str]:
        value = claims.get(self.spec.permissions_claim, [])
        if isinstance(value, str):  # OAuth "scope" / Okta "scp" style
            value = value.split()
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise unauthorized("invalid_token", f"The token's {self.spec.permissions_claim!r} claim is not a list of permissions.")
        unknown = [p for p in value if not is_known_permission(p)]
        if unknown and self.auth.log_unknown_permissions:
            log.warning("token carries unknown permissions", extra={"fields": {
                "subject": claims.get("sub"), "unknown": ",".join(unknown)[:200]}})
        if unknown and self.auth.strict_validation:
            raise unauthorized("unknown_permission", f"The token has an unknown permission: {unknown[0][:64]!r}.")
        if "*" in value:
            self._warn_once("token grants '*' (everything)", claims.get("sub"))
        return frozenset(value)

    def _warn_once(self, message: str, subject):
        """A warning about a token, once per subject: a pipeline presenting the same admin
        token on every request would otherwise add a warning line to each."""
        seen = (message, repr(subject)[:200])  # repr: a forged claim may be any JSON value
        if seen in self._warned:
            return
        if len(self._warned) >= WARNED_SUBJECTS_KEPT:
            self._warned.clear()
        self._warned.add(seen)
        log.warning(message, extra={"fields": {"subject": subject}})


def _jwt_problem(error: Exception) -> str:
    """A short reason that never echoes the token or a key."""
    names = {"ExpiredSignatureError": "expired", "ImmatureSignatureError": "not yet valid",
             "InvalidAudienceError": "wrong audience", "InvalidIssuerError": "wrong issuer",
             "InvalidSignatureError": "bad signature", "InvalidAlgorithmError": "algorithm not allowed",
             "MissingRequiredClaimError": "a required claim is missing", "DecodeError": "malformed"}
    if isinstance(error, ValueError) and not type(error).__module__.startswith("jwt"):
        return str(error)
    return names.get(type(error).__name__, "rejected")


class Authenticator:
    """Turns a request's credentials into a Caller, in priority order (README §8):

    1. ``Authorization: Bearer <token>``: a JWT when the token has the three-part JWS form,
       else an rtask API key.
    2. The API-key header (``apiKeyHeader``, default X-API-Key) holding an rtask API key.

    A credential that is present but fails never falls back to a lower one."""

    def __init__(self, config: Config, keyring: KeyRing, metrics: Metrics):
        self.config, self.keyring, self.metrics = config, keyring, metrics
        self.api_key_header = config.auth.api_key_header.lower()
        self.jwt = JwtVerifier(config.auth.jwt, config.auth, metrics) if config.auth.jwt else None

    def fetches_keys(self) -> bool:
        return bool(self.jwt and self.jwt.jwks)

    def prepare(self):
        if self.jwt:
            self.jwt.prepare()

    def authenticate(self, headers: Headers) -> Caller:
        method = "api_key"
        try:
            authorization = headers.get_all("authorization")
            if authorization:
                token = _bearer_token(authorization)
                if token.count(".") == 2:
                    method = "jwt"
                    caller = self._verify_jwt(token)
                else:
                    caller = self._verify_key(token)
            elif api_key := headers.get_all(self.api_key_header):
                if len(api_key) > 1:
                    raise unauthorized("invalid_header", f"Send one {self.config.auth.api_key_header} header.")
                caller = self._verify_key(api_key[0].strip())
            else:
                raise unauthorized("missing_key", "A credential is required: send 'Authorization: Bearer <key>'.")
        except Reject as r:
            self.metrics.auth_result(method, r.reason)
            raise
        self.metrics.auth_result(method, None)
        return caller

    def _verify_key(self, token: str) -> Caller:
        name = self.keyring.verify(token)
        return Caller(name, "api_key", self.config.key_grants(name))

    def _verify_jwt(self, token: str) -> Caller:
        if self.jwt is None:
            raise unauthorized("invalid_token", "Bearer tokens (JWT) are not enabled on this server.")
        return self.jwt.verify(token)


def _bearer_token(values: list[str]) -> str:
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    if len(values) > 1 or scheme.lower() != "bearer" or not token or " " in token:
        raise unauthorized("invalid_header", "The Authorization header must be 'Bearer <token>'.")
    return token


def require_permission(caller: Caller, permission: str, metrics: Metrics):
    """403 unless the caller holds ``permission``. The metric reason is README §5's
    ``key_not_allowed`` for every kind of credential."""
    if caller.kind == "webhook" or holds_permission(caller.grants, permission):
        return
    metrics.permission_denied(permission)
    log.info("permission denied", extra={"fields": {
        "caller": caller.name, "kind": caller.kind, "permission": permission}})
    raise Reject(403, "forbidden", f"Missing required permission: {permission}", "key_not_allowed")


# =============================================================================================
# Limits (rate, concurrency)
# =============================================================================================


class RateLimiter:
    """Token bucket with a burst of 1: at most ``rate`` requests a second, never two at once,
    counted across every process of the server: the bucket is a row of the StateStore, taken
    in one write transaction. time.monotonic() is CLOCK_MONOTONIC, one clock for the whole
    machine, so every process computes the refill alike. A task without a rateLimit touches
    no lock. A bucket whose rate changed (reload) starts full, as a new limiter did.

    A refused request learns when to retry: the ceiling of 1/rate seconds (README §5)."""

    def __init__(self, task_name: str, rate: float, store: StateStore):
        self.task_name, self.rate, self.store = task_name, rate, store
        self.retry_after = str(math.ceil(min(1 / rate, MAX_SECONDS))) if rate > 0 else "1"

    def allow(self) -> bool:
        if self.rate <= 0:
            return True
        with self.store.transaction() as db:
            now = time.monotonic()
            row = db.execute("SELECT tokens, last, rate FROM buckets WHERE task = ?", (self.task_name,)).fetchone()
            tokens = 1.0 if row is None or row[2] != self.rate else \
                min(1.0, row[0] + max(0.0, now - row[1]) * self.rate)  # a reboot resets the clock: no refill
            allowed = tokens >= 1.0
            db.execute("INSERT OR REPLACE INTO buckets (task, tokens, last, rate) VALUES (?, ?, ?, ?)",
                       (self.task_name, tokens - allowed, now, self.rate))
        return allowed


class ConcurrencyLimit:
    """Slots for running executions of one task (0 = unlimited), and a bounded line of
    requests waiting for one (queueSize), counted across every process of the server.

    - A slot is held by a run's row in the StateStore from admission (status ``starting``, or
      ``granted`` when it came from the line) until the run ends, also for async runs; a run
      waiting in line is a ``queued`` row, in admission order (seq), and a run taken out of
      the line a ``withdrawn`` one until its end is written. Every check and change is
      one write transaction, so two processes never both take the last slot.
    - A freed slot goes straight to the first in line (its row becomes ``granted``), so
      newcomers cannot overtake the queue. The process that waits for it learns it at once
      when it freed the slot itself, else from its poller (every GRANT_POLL_SECONDS, only while
      it has runs in line, or at once when asked about one). A dead worker's rows are ended
      by the supervisor, which frees their slots.
    - An unlimited task takes no lock; its runs are counted (for /health/detailed) from the rows
      their processes write when they start."""

    GRANT_POLL_SECONDS = 0.015
    HOLDING = ("starting", "granted", "running")  # row statuses that hold a slot

    def __init__(self, task_name: str, limit: int, queue_size: int, store: StateStore):
        self.task_name, self.store = task_name, store
        self.set_limits(limit, queue_size)

    @property
    def running(self) -> int:
        """Runs holding a slot (or, unlimited, running), in every process."""
        return self._count(self.HOLDING)

    @property
    def queued(self) -> int:
        """Runs waiting in line, in every process."""
        return self._count(("queued",)) if self.limit else 0

    @property
    def waiting_here(self) -> int:
        """Runs of this process waiting in line (a drain waits for them)."""
        return self.store.grants.waiting(self.task_name)

    def _count(self, statuses: tuple) -> int:
        return self.store.query_one(f"SELECT count(*) FROM runs WHERE task = ? AND expires_at IS NULL AND status "
                                    f"IN ({', '.join('?' * len(statuses))})", (self.task_name, *statuses))

    def has_room(self) -> bool:
        """Could a request start now or wait in line?"""
        if not self.limit:
            return True
        return self.running < self.limit or self.queued < self.queue_size

    def admit(self, run: Run, on_grant) -> str:
        """Take a free slot ("now"), else a place in line ("queued": ``on_grant()`` is called,
        holding the slot, when one frees), else "full". One transaction: done as two steps, a
        slot freed in between would go to nobody while the newcomer waits for it."""
        if not self.limit:
            return "now"
        granted = []
        with self.store.transaction() as db:
            counts = dict(db.execute("SELECT status, count(*) FROM runs WHERE task = ? AND expires_at IS NULL "
                                     "GROUP BY status", (self.task_name,)).fetchall())
            holding, queued = sum(counts.get(s, 0) for s in self.HOLDING), counts.get("queued", 0)
            if holding < self.limit and queued:
                # A slot freed but not handed on (its promotion is on its way, or failed on
                # a busy database) belongs to the line: hand it on now, so that the line
                # never waits for a release that will not come.
                granted = promote_queued(db, self.task_name, self.limit)
                holding, queued = holding + len(granted), queued - len(granted)
            if holding < self.limit and not queued:
                admission = "now"
            elif queued < self.queue_size:
                admission = "queued"
            else:
                admission = "full"
            if admission != "full":
                self.store.insert_run(db, run, "starting" if admission == "now" else "queued")
            if admission == "queued":  # last: if it cannot wait here, the row is rolled back
                self.store.grants.expect(run, on_grant)
        if admission != "full":
            run.holds_slot = admission == "now"
            run.recorded.set()
        self.store.grants.start(granted)  # (after the commit: a rolled-back grant is no grant)
        return admission

    def withdraw(self, run: Run, forget: bool = False) -> bool:
        """Leave the line; False if the slot was already granted (then ``on_grant`` has been
        called, here if no one had yet). The row stays, as ``withdrawn`` (neither in line nor
        holding a slot), until the run's end replaces it, so that every worker finds the run
        meanwhile (deleted and written again, it was unknown to the others for a moment: 404);
        with ``forget`` the row goes (a request refused with 429 leaves no run)."""
        change = "DELETE FROM runs" if forget else "UPDATE runs SET status = 'withdrawn'"
        with self.store.transaction() as db:
            left = db.execute(f"{change} WHERE id = ? AND status = 'queued'", (run.id,)).rowcount
        on_grant = self.store.grants.forget(run.id)
        if not left and on_grant:
            on_grant()
        return bool(left)

    def release(self, then):
        """A run of this task has ended (its row says so): hand free slots to the line, call
        ``then()`` (whatever happens), and only then start this process's grantees, so that
        no answer shows the ended run still going beside its successor. (A lifted limit
        granted the whole line at once: set_limits.)"""
        granted = []
        try:
            if self.limit and self.store.hands_on_slots:
                with self.store.transaction() as db:
                    granted = promote_queued(db, self.task_name, self.limit)
        finally:
            then()
        self.store.grants.start(granted)

    def promote(self):
        """Grant free slots to the first in line, in every process (the others' pollers start
        theirs); this process's own grantees start now."""
        with self.store.transaction() as db:
            granted = promote_queued(db, self.task_name, self.limit)
        self.store.grants.start(granted)

    def set_limits(self, limit: int, queue_size: int):
        """New limits (reload; the store's copy is written first: StateStore.save_limits); a
        raised limit admits waiting requests at once, and a lifted one (0) the whole line. If
        the database is busy now, the line gets those slots at the next admission instead."""
        self.limit, self.queue_size = limit, queue_size
        try:
            self.promote()
        except sqlite3.Error as e:
            log.warning("cannot hand free slots to the line now", extra={"fields": {
                "task": self.task_name, "problem": str(e)}})


def promote_queued(db, task_name: str, limit: int) -> list[tuple[str, int]]:
    """Within a transaction: mark the first queued rows ``granted`` while slots are free;
    returns their (run id, owner pid). A limit of 0 (no longer limited) grants them all."""
    holding = ", ".join(f"'{s}'" for s in ConcurrencyLimit.HOLDING)
    running = db.execute(f"SELECT count(*) FROM runs WHERE task = ? AND expires_at IS NULL AND status IN ({holding})",
                         (task_name,)).fetchone()[0]
    free = limit - running if limit else -1
    rows = db.execute("SELECT id, owner FROM runs WHERE task = ? AND status = 'queued' AND expires_at IS NULL "
                      "ORDER BY seq LIMIT ?", (task_name, free)).fetchall() if free else []
    db.executemany("UPDATE runs SET status = 'granted' WHERE id = ?", [(run_id,) for run_id, _ in rows])
    return rows


class Grants:
    """This process's runs waiting in line, and the poller that starts them when another
    process grants them a slot (it runs only while some are waiting)."""

    def __init__(self, store: StateStore):
        self.store = store
        self._waiting: dict[str, tuple[str, object]] = {}  # run id → (task name, on_grant)
        self._lock = threading.Lock()
        self._polling = False

    def waiting(self, task_name: str) -> int:
        with self._lock:
            return sum(1 for task, _ in self._waiting.values() if task == task_name)

    def expect(self, run: Run, on_grant):
        """Wait here for ``run``'s grant. Reject(503) when the poller thread cannot start (a
        process or thread limit): the caller's transaction then takes back its place in line."""
        with self._lock:
            if not self._polling:
                try:
                    threading.Thread(target=self._poll, name="rtask-grants", daemon=True).start()
                except (RuntimeError, MemoryError) as e:
                    log.warning("cannot start a thread", extra={"fields": {"thread": "rtask-grants", "problem": str(e)}})
                    raise Reject(503, "unavailable", "The server cannot take more work right now; retry shortly.",
                                 None, [("Retry-After", "1")]) from None
                self._polling = True
            self._waiting[run.id] = (run.task.name, on_grant)

    def forget(self, run_id: str):
        with self._lock:
            entry = self._waiting.pop(run_id, None)
        return entry and entry[1]

    def start(self, granted: list[tuple[str, int]]):
        """Start the runs of ``granted`` that wait here."""
        for run_id, owner in granted:
            on_grant = self.forget(run_id) if owner == os.getpid() else None
            if on_grant:
                on_grant()

    def check(self, ids=None):
        """Start the runs waiting here (or those of ``ids``) that another process has granted
        a slot since. Raises sqlite3.Error (a busy database)."""
        with self._lock:
            ids = [i for i in (ids if ids is not None else self._waiting) if i in self._waiting]
        if ids:
            self.start(self.store.query_all(
                f"SELECT id, owner FROM runs WHERE status = 'granted' AND id IN ({', '.join('?' * len(ids))})", ids))

    def _poll(self):
        while True:
            time.sleep(ConcurrencyLimit.GRANT_POLL_SECONDS)
            with self._lock:
                if not self._waiting:
                    self._polling = False
                    return
            try:
                self.check()
            except sqlite3.Error as e:  # a busy database: try again on the next round
                log.warning("cannot read granted slots", extra={"fields": {"problem": str(e)}})
            except Exception:  # a bug in one start must not stop the runs waiting behind it
                log.exception("internal error while starting a granted run")


class Argon2Slots:
    """At most ARGON2_MAX_CONCURRENT Argon2 computations at once in the whole server (each
    takes ARGON2_MEMORY_MIB): slot i is an flock on ``<state dir>/argon2-<i>.lock``, which the
    kernel releases if the holder dies. Each acquisition opens its own file description, since
    flock is shared by everything using one. Same interface as a semaphore."""

    POLL_SECONDS = 0.005

    def __init__(self, directory: str):
        self.paths = [os.path.join(directory, f"argon2-{i}.lock") for i in range(ARGON2_MAX_CONCURRENT)]
        self._held = threading.local()

    def acquire(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            for path in self.paths:
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                except OSError as e:  # out of descriptors: no slot now (the caller answers 503)
                    log.warning("cannot open an Argon2 slot", extra={"fields": {"problem": e.strerror}})
                    return False
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                self._held.fd = fd
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(self.POLL_SECONDS)

    def release(self):
        os.close(self._held.fd)  # closing the description drops its lock


# =============================================================================================
# Parameters (typed values, payload rules)
# =============================================================================================
#
# A task may declare named, typed parameters (README §4). Values come from the query string,
# else a JSON object body's top-level field, else a form field; a parameter with `from` takes
# its value only from the JSON payload at that JSON Pointer (RFC 6901). Every value is checked
# (length first, so a pattern never sees more than maxLength characters), put in its canonical
# form, and reaches the command as RTASK_PARAM_<NAME> and as whole argv elements "{name}":
# never through a shell. A refused value is 400 invalid_parameter before a slot is taken;
# messages name the parameter and the rule and never repeat a value.

PARAMETER_TYPES = ("string", "integer", "number", "boolean", "choice")
DEFAULT_PARAMETER_LENGTH = 256  # characters, when maxLength is not given
MAX_PARAMETER_LENGTH = 4096  # the largest maxLength a config may give
MATCH_MAX_CHARS = 4096  # a payload value longer than this never matches a `match` pattern
_PARAMETER_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")  # it becomes RTASK_PARAM_<NAME> and "{name}"
_ARGUMENT_RE = re.compile(r"\{([A-Za-z0-9_.-]+)\}")  # a whole argv element naming a parameter
_JSON_POINTER_RE = re.compile(r"(/([^~/]|~[01])*)*")  # RFC 6901 §3: "~" only as ~0 or ~1
_ARRAY_INDEX_RE = re.compile(r"0|[1-9][0-9]*")  # RFC 6901 §4: no leading zeros, no "-"
_INTEGER_RE = re.compile(r"-?[0-9]+")
_NUMBER_RE = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?(?:[eE]([+-]?[0-9]{1,6}))?")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_BOOLEANS = {"true": "true", "1": "true", "yes": "true", "on": "true",
             "false": "false", "0": "false", "no": "false", "off": "false"}
_ABSENT = object()  # no value at a JSON Pointer, or no such field


@dataclasses.dataclass(frozen=True)
class ParameterSpec:
    """One ``[tasks.<name>.parameters.<param>]`` table, validated."""

    name: str
    type: str = "string"  # string | integer | number | boolean | choice
    pattern: re.Pattern | None = None  # string: re.fullmatch on the whole value
    choices: tuple[str, ...] = ()  # choice: the allowed values, exactly
    max_length: int = DEFAULT_PARAMETER_LENGTH  # characters; checked before anything else
    required: bool = False  # absent → 400; otherwise the default (or empty) is used
    default: str | None = None  # canonical text; None: empty when absent
    source: str | None = None  # `from`: a JSON Pointer into the payload; the only source then
    secret: bool = False  # the value never appears in logs, listings or answers

    @functools.cached_property
    def env_name(self) -> str:
        return "RTASK_PARAM_" + re.sub(r"[^A-Za-z0-9_]", "_", self.name).upper()


@dataclasses.dataclass(frozen=True)
class MatchRule:
    """One ``[tasks.<name>.signedWebhook.match]`` entry: the payload at ``pointer`` must be
    ``exact`` or fully match ``pattern``."""

    pointer: str
    exact: str | None = None
    pattern: re.Pattern | None = None


def _parameter_type(value):
    if value not in PARAMETER_TYPES:
        raise _Invalid(f"must be one of {', '.join(PARAMETER_TYPES)}")
    return value


def _regex(value):
    text = _string(value)
    try:
        return re.compile(text)
    except re.error as e:
        raise _Invalid(f"is not a valid regular expression: {e}") from None


def _json_pointer(value):
    if not isinstance(value, str) or not _JSON_POINTER_RE.fullmatch(value):
        raise _Invalid("must be a JSON Pointer (RFC 6901): \"\" or \"/a/b\", with '~' only as ~0 or ~1")
    return value


def _max_length(value):
    length = _integer(value, positive=True)
    if length > MAX_PARAMETER_LENGTH:
        raise _Invalid(f"must be at most {MAX_PARAMETER_LENGTH}")
    return length


def _default_text(value):
    """A TOML default as the text a caller would send: true/false, numbers as written by
    TOML's reader (canonicalised later by the parameter's own type)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)) or isinstance(value, float) and math.isfinite(value):
        return str(value)
    raise _Invalid("must be a string, number or boolean")


_PARAMETER_OPTIONS = {
    "type": ("type", _parameter_type),
    "pattern": ("pattern", _regex),
    "choices": ("choices", lambda v: _string_list(v, non_empty=True)),
    "maxLength": ("max_length", _max_length),
    "required": ("required", _bool),
    "default": ("default", _default_text),
    "from": ("source", _json_pointer),
    "secret": ("secret", _bool),
}


def parse_parameters(where, table, command, problems: Problems) -> tuple[ParameterSpec, ...]:
    """The ``parameters`` table of a task, every definition checked (type, regex, choices on
    the right type, a default that passes its own rule, env names that do not collide), and
    every ``{name}`` argv element of ``command`` declared."""
    if not isinstance(table, dict):
        problems.errors.append(f"{where}: field 'parameters' must be a table of [tasks.<name>.parameters.<param>] tables")
        return ()
    specs, env_names = [], {}
    for name, fields in table.items():
        spec = _parse_parameter(f"{where}: parameter {name!r}", name, fields, problems)
        if spec is None:
            continue
        other = env_names.setdefault(spec.env_name, name)
        if other != name:
            problems.errors.append(f"{where}: parameters {other!r} and {name!r} both become {spec.env_name}")
        specs.append(spec)
    declared = {spec.name: spec for spec in specs}
    for element in command or ():
        found = _ARGUMENT_RE.fullmatch(element)
        if found and found.group(1) not in table:
            problems.errors.append(f"{where}: field 'command' has {element!r} but the task declares no "
                                   f"parameter {found.group(1)!r}")
        elif found and found.group(1) in declared and declared[found.group(1)].secret:
            # Every local user can read a process's arguments (ps, /proc/<pid>/cmdline), and a
            # program that cannot start is named in the run's stderr: a secret goes by env only.
            problems.errors.append(f"{where}: field 'command' has {element!r}, but parameter {found.group(1)!r} "
                                   f"is secret: a command reads it from ${declared[found.group(1)].env_name}, "
                                   f"since arguments are visible to every local user")
    return tuple(specs)


def _parse_parameter(where, name, table, problems: Problems) -> ParameterSpec | None:
    if not _PARAMETER_NAME_RE.fullmatch(name):
        problems.errors.append(f"{where}: the name may only use letters, digits, '_', '.', '-'")
        return None
    if not isinstance(table, dict):
        problems.errors.append(f"{where}: must be a table")
        return None
    errors_before = len(problems.errors)
    fields = _parse_table(where, table, _PARAMETER_OPTIONS, problems)
    kind = fields.get("type", "string")
    if "pattern" in fields and kind != "string":
        problems.errors.append(f"{where}: field 'pattern' applies to type 'string' only")
    if "choices" in fields and kind != "choice":
        problems.errors.append(f"{where}: field 'choices' applies to type 'choice' only")
    if kind == "choice" and not fields.get("choices"):
        problems.errors.append(f"{where}: type 'choice' needs field 'choices'")
    if fields.get("required") and "default" in fields:
        problems.errors.append(f"{where}: give either 'required = true' or 'default', not both")
    if len(problems.errors) > errors_before:
        return None
    spec = ParameterSpec(name=name, **fields)
    if spec.default is not None:
        try:
            spec = dataclasses.replace(spec, default=canonical_value(spec, spec.default))
        except Reject as r:
            problems.errors.append(f"{where}: field 'default' fails its own rule: {r.message}")
            return None
    return spec


def _match_rules(value) -> tuple[MatchRule, ...]:
    """``signedWebhook.match``: JSON Pointer → exact string or ``{ pattern = "..." }``."""
    if not isinstance(value, dict):
        raise _Invalid("must be a table of JSON Pointer → string or { pattern = \"...\" }")
    rules = []
    for pointer, expected in value.items():
        try:
            _json_pointer(pointer)
            if isinstance(expected, str):
                rules.append(MatchRule(pointer, exact=expected))
            elif isinstance(expected, dict) and list(expected) == ["pattern"]:
                rules.append(MatchRule(pointer, pattern=_regex(expected["pattern"])))
            else:
                raise _Invalid("must be a string or { pattern = \"...\" }")
        except _Invalid as e:
            raise _Invalid(f"entry {pointer!r} {e}") from None
    return tuple(rules)


# -- JSON Pointer (RFC 6901) -------------------------------------------------------------------


def json_pointer_get(document, pointer: str):
    """The value at ``pointer`` in a parsed JSON document, or ``_ABSENT``. RFC 6901: "" is the
    whole document; each reference token is unescaped ~1 → "/" first, then ~0 → "~" (§4); an
    array index is "0" or digits without a leading zero, and "-" (past the end) never names
    a value."""
    if pointer == "":
        return document
    for token in pointer[1:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(document, dict):
            document = document.get(token, _ABSENT)
        elif isinstance(document, list) and _ARRAY_INDEX_RE.fullmatch(token) and int(token) < len(document):
            document = document[int(token)]
        else:
            return _ABSENT
        if document is _ABSENT:
            return _ABSENT
    return document


class _JsonNumber(str):
    """A JSON number kept as the text it was written as, so that "1.50" and 10**400 reach
    the parameter's own canonical form exactly (no float rounding)."""


def _parse_json(data: bytes | str):
    """A JSON document (numbers as _JsonNumber), or ``_ABSENT`` when it is not JSON. NaN and
    Infinity, which Python's reader accepts, are not JSON (RFC 8259) and are refused."""
    def no_constants(name):
        raise ValueError(name)
    try:
        return json.loads(data, parse_int=_JsonNumber, parse_float=_JsonNumber, parse_constant=no_constants)
    except (ValueError, RecursionError):
        return _ABSENT


# -- where values come from --------------------------------------------------------------------


class RequestValues:
    """The places a request's parameter values can come from, each parsed at most once and
    only when a parameter needs it.

    ``query`` is the raw query string, or None when the query is not a source (signed
    webhooks: the signature covers the body, not the URL). The body counts as JSON or as a
    form by its Content-Type alone; the payload (for ``from`` and ``match``) is the JSON body,
    or the JSON in a form's ``payload`` field (GitHub's form-encoded deliveries)."""

    def __init__(self, query: str | None, content_type: str | None, body: bytes):
        self.query = query
        self.media_type = (content_type or "").split(";", 1)[0].strip().lower()
        self.body = body

    @functools.cached_property
    def json_body(self):
        return _parse_json(self.body) if self.media_type == "application/json" else _ABSENT

    @functools.cached_property
    def form(self) -> dict[str, list[str]]:
        if self.media_type != "application/x-www-form-urlencoded":
            return {}
        return _form_fields(self.body.decode("utf-8", "surrogateescape"))

    @functools.cached_property
    def payload(self):
        if self.media_type == "application/json":
            return self.json_body
        field = self.form.get("payload")
        return _parse_json(field[0]) if field and len(field) == 1 else _ABSENT


def request_query(h) -> str:
    """The raw query string of the request target ("" when none), as UTF-8 with any other
    bytes kept as surrogates (refused when such a value is checked)."""
    return h.target.partition("?")[2].encode("latin-1").decode("utf-8", "surrogateescape")


def _form_fields(text: str) -> dict[str, list[str]]:
    """name → values of a query string or form body (RFC 3986 percent-encoding, "+" as space).
    Bytes that are not UTF-8 survive as surrogates and are refused when a value is checked;
    ``name`` without "=" has the empty value."""
    fields: dict[str, list[str]] = {}
    for part in text.split("&"):
        if part:
            name, _, value = part.partition("=")
            fields.setdefault(_form_decode(name), []).append(_form_decode(value))
    return fields


def _form_decode(text: str) -> str:
    """What urllib's parse_qsl does to one name or value, at a third of its cost."""
    if "+" in text:
        text = text.replace("+", " ")
    return unquote(text, errors="surrogateescape") if "%" in text else text


def _query_values(task: TaskSpec, query: str) -> dict[str, str]:
    """The query's values by parameter name. A key the task does not declare, a key given
    twice, or one naming a ``from`` parameter (whose only source is the payload) is refused."""
    by_name = task.parameter_index
    values = {}
    for name, given in _form_fields(query).items():
        spec = by_name.get(name)
        if spec is None:
            raise invalid_parameter(f"The task declares no parameter {_shown(name)}.")
        if len(given) > 1:
            raise invalid_parameter(f"Parameter {name!r} is given more than once.")
        if spec.source is not None:
            raise invalid_parameter(f"Parameter {name!r} takes its value from the payload "
                                    f"(from = {spec.source!r}), not from the query.")
        values[name] = given[0]
    return values


def _shown(name: str) -> str:
    """A caller's name for a message: quoted, escaped, cut to 64 characters."""
    return ascii(name[:64] + ("…" if len(name) > 64 else ""))


# -- checking one value ------------------------------------------------------------------------


def invalid_parameter(message: str) -> Reject:
    return Reject(400, "invalid_parameter", message, "invalid_parameter")


def canonical_value(spec: ParameterSpec, text: str) -> str:
    """``text`` checked against the parameter's rules and put in canonical form; Reject
    (invalid_parameter) naming the parameter and the rule, never the value. Length is checked
    first, so no pattern or conversion ever sees more than maxLength characters."""
    name = spec.name
    if len(text) > spec.max_length:
        raise invalid_parameter(f"Parameter {name!r} is longer than {spec.max_length} characters.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid_parameter(f"Parameter {name!r} is not valid UTF-8.") from None
    if _CONTROL_RE.search(text):
        raise invalid_parameter(f"Parameter {name!r} contains a control character.")
    if spec.type == "string":
        if spec.pattern is not None and not spec.pattern.fullmatch(text):
            raise invalid_parameter(f"Parameter {name!r} does not match the pattern '{spec.pattern.pattern}'.")
        return text
    if spec.type == "choice":
        if text not in spec.choices:
            raise invalid_parameter(f"Parameter {name!r} must be one of: {', '.join(spec.choices)}.")
        return text
    if spec.type == "boolean":
        value = _BOOLEANS.get(text.lower())
        if value is None:
            raise invalid_parameter(f"Parameter {name!r} must be true or false.")
        return value
    if spec.type == "integer":
        if not _INTEGER_RE.fullmatch(text):
            raise invalid_parameter(f"Parameter {name!r} must be a whole number (digits, optional '-').")
        return str(int(text))
    return _canonical_number(spec, text)


def _canonical_number(spec: ParameterSpec, text: str) -> str:
    """A decimal number in its shortest plain form: "1.50", "15e-1" → "1.5"; "042" → "42";
    "1e3" → "1000"; "-0.0" → "0". Exact (no float). A plain form longer than maxLength (a
    huge exponent) is refused rather than written out."""
    found = _NUMBER_RE.fullmatch(text)
    if not found:
        raise invalid_parameter(f"Parameter {spec.name!r} must be a decimal number like 1.5 or 2e3.")
    sign, whole, fraction, exponent = found.groups()
    digits = (whole + (fraction or "")).lstrip("0")
    shift = int(exponent or 0) - len(fraction or "")
    stripped = digits.rstrip("0")
    shift += len(digits) - len(stripped)
    digits = stripped
    if not digits:
        return "0"
    if len(digits) + abs(shift) > spec.max_length:
        raise invalid_parameter(f"Parameter {spec.name!r} is longer than {spec.max_length} characters "
                                "when written out in decimal.")
    if shift >= 0:
        plain = digits + "0" * shift
    elif len(digits) + shift > 0:
        plain = digits[:shift] + "." + digits[shift:]
    else:
        plain = "0." + "0" * -(len(digits) + shift) + digits
    return sign + plain


def _json_scalar_text(spec: ParameterSpec, value, where: str):
    """A JSON value as the text a query would have carried: strings as they are, numbers as
    written, booleans true/false; null is absent; an object or array is refused."""
    if value is None or value is _ABSENT:
        return _ABSENT
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    kind = "an object" if isinstance(value, dict) else "an array"
    raise invalid_parameter(f"Parameter {spec.name!r}: {where} holds {kind}; a parameter takes a "
                            "string, number or boolean.")


# -- the values of one request -----------------------------------------------------------------


def resolve_parameters(task: TaskSpec, values: RequestValues) -> dict[str, str]:
    """Parameter name → canonical value ("" when absent without default) for every declared
    parameter, or Reject 400 invalid_parameter. Sources, first found wins: a ``from``
    parameter only the payload at its pointer; others the query, then the JSON object body's
    top-level field, then the form field. A task that declares no parameters ignores the query
    (webhook senders append their own URL parameters)."""
    if not task.parameters:
        return {}
    given = _query_values(task, values.query) if values.query else {}
    resolved = {}
    for spec in task.parameters:
        text = _raw_value(spec, values, given)
        if text is _ABSENT or text == "":
            if spec.required:
                raise invalid_parameter(f"Parameter {spec.name!r} is required.")
            resolved[spec.name] = spec.default if spec.default is not None else ""
        else:
            resolved[spec.name] = canonical_value(spec, text)
    return resolved


def _raw_value(spec: ParameterSpec, values: RequestValues, given: dict[str, str]):
    """The text given for one parameter, before any check, or ``_ABSENT``."""
    if spec.source is not None:
        at = f"the payload at {spec.source!r}"
        return _json_scalar_text(spec, json_pointer_get(values.payload, spec.source), at)
    if spec.name in given:
        return given[spec.name]
    body = values.json_body
    if isinstance(body, dict) and spec.name in body:
        return _json_scalar_text(spec, body[spec.name], "the JSON body's field")
    form = values.form.get(spec.name)
    if form is not None and len(form) > 1:
        raise invalid_parameter(f"Parameter {spec.name!r} is given more than once.")
    return form[0] if form else _ABSENT


def payload_matches(rules: tuple[MatchRule, ...], values: RequestValues) -> bool:
    """Does the payload hold what every ``match`` rule asks for? A value that is absent, null,
    an object or an array never matches; numbers and booleans compare as their JSON text."""
    for rule in rules:
        value = json_pointer_get(values.payload, rule.pointer)
        if isinstance(value, bool):
            value = "true" if value else "false"
        if not isinstance(value, str):
            return False
        if rule.exact is not None and value != rule.exact:
            return False
        if rule.pattern is not None and (len(value) > MATCH_MAX_CHARS or not rule.pattern.fullmatch(value)):
            return False
    return True


# -- how values reach the command --------------------------------------------------------------


def parameter_environment(task: TaskSpec, resolved: dict[str, str]) -> dict[str, str]:
    """RTASK_PARAM_<NAME> for every declared parameter (empty when absent without default)."""
    return {spec.env_name: resolved[spec.name] for spec in task.parameters}


def task_with_arguments(task: TaskSpec, resolved: dict[str, str]) -> TaskSpec:
    """The task as this run executes it: each argv element that is exactly "{name}" replaced by
    the value as one argument (an absent optional parameter: an empty argument). An element
    that only contains "{name}" (like "--x={name}") stays as written."""
    if not task.argument_slots:
        return task
    command = list(task.command)
    for index, name in task.argument_slots:
        command[index] = resolved[name]
    return dataclasses.replace(task, command=tuple(command))


def parameter_log_fields(task: TaskSpec) -> dict[str, str]:
    """The names of a run's parameters, for its "task finished" line (values never at info)."""
    return {"parameters": ",".join(task.parameter_index)} if task.parameters else {}


def log_parameter_values(run, task: TaskSpec, resolved: dict[str, str]):
    """At debug only: the values of a run's non-secret parameters."""
    if task.parameters and log.isEnabledFor(logging.DEBUG):
        shown = {s.name: resolved[s.name] for s in task.parameters if not s.secret}
        log.debug("task parameter values", extra={"fields": {"task_id": run.id, "values": json.dumps(shown)}})


def describe_parameter(spec: ParameterSpec) -> dict:
    """One parameter in GET /tasks: never the default of a secret parameter."""
    described = {"name": spec.name, "type": spec.type, "required": spec.required, "maxLength": spec.max_length}
    if spec.default is not None and not spec.secret:
        described["default"] = spec.default
    if spec.choices:
        described["choices"] = list(spec.choices)
    if spec.pattern is not None:
        described["pattern"] = spec.pattern.pattern
    if spec.source is not None:
        described["from"] = spec.source
    if spec.secret:
        described["secret"] = True
    return described


# =============================================================================================
# Isolation (identity, environment, limits, networks)
# =============================================================================================
#
# A task may run with less than the server has (README §6): another user and group, a umask, a
# filtered environment, resource limits, and only for callers from some networks. Identity and
# limits are in force before the command's first instruction, without preexec_fn (which can
# deadlock a threaded server). Two small util-linux programs are exec'd in front of the
# command: ``setpriv`` switches user and groups, ``prlimit`` sets the limits on itself; each
# then execs the next. Popen applies the umask in C between fork and exec. (Popen's own user=
# would do the switch too, but it makes Popen fork the whole server instead of vfork: measured
# at half the throughput of setpriv, bench/isolation.py. A Python trampoline costs ~20 ms; a
# spawner process that forks and sets ids and limits itself was no faster than the wrappers.)

SETPRIV = "/usr/bin/setpriv"
PRLIMIT = "/usr/bin/prlimit"
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"  # PATH of a task that inherits no environment

# limits key → (ResourceLimits field, prlimit option, resource name, smallest value allowed)
_LIMIT_OPTIONS = {
    "memoryBytes": ("memory_bytes", "--as", "RLIMIT_AS", 1),
    "processes": ("processes", "--nproc", "RLIMIT_NPROC", 1),
    "openFiles": ("open_files", "--nofile", "RLIMIT_NOFILE", 1),
    "cpuSeconds": ("cpu_seconds", "--cpu", "RLIMIT_CPU", 1),
    "fileSizeBytes": ("file_size_bytes", "--fsize", "RLIMIT_FSIZE", 0),
}


@dataclasses.dataclass(frozen=True)
class ResourceLimits:
    """``[tasks.<name>.limits]``: soft and hard limits of the command and its children (None:
    the server's own). They can only tighten the server's hard limits, never raise them."""

    memory_bytes: int | None = None  # RLIMIT_AS, bytes of address space, > 0
    processes: int | None = None  # RLIMIT_NPROC, processes of the command's REAL user id, > 0
    open_files: int | None = None  # RLIMIT_NOFILE, open file descriptors, > 0
    cpu_seconds: int | None = None  # RLIMIT_CPU, seconds of CPU time (SIGXCPU, then SIGKILL), > 0
    file_size_bytes: int | None = None  # RLIMIT_FSIZE, bytes per written file, >= 0

    def items(self) -> list[tuple[str, int]]:
        """(limits key, value) of the limits that are set, in the reference order."""
        return [(key, getattr(self, field)) for key, (field, *_) in _LIMIT_OPTIONS.items()
                if getattr(self, field) is not None]


@dataclasses.dataclass(frozen=True)
class IsolationSpec:
    """The isolation options of one task. A task with none of them has no IsolationSpec and
    runs exactly as before (the server's user, environment and limits)."""

    user: str | None = None  # user name; None: the server's user
    group: str | None = None  # group name; None: the user's primary group (and its other groups)
    umask: int | None = None  # 0-0o777; None: the server's
    inherit_environment: bool | tuple[str, ...] = True  # False: none; names: only these
    allowed_networks: tuple = ()  # ipaddress networks the caller must be in; (): any address
    limits: ResourceLimits | None = None


def _octal_umask(value):
    """A string of octal digits ("0027"), so that TOML's decimal integers cannot be mistaken."""
    if not isinstance(value, str) or not re.fullmatch(r"[0-7]{1,4}", value) or int(value, 8) > 0o777:
        raise _Invalid('must be an octal string from "0000" to "0777", like "0027"')
    return int(value, 8)


def _known(kind: str, lookup):
    """A validator of a user or group name that must exist on this machine (``lookup`` is
    pwd.getpwnam or grp.getgrnam)."""
    def check(value):
        try:
            lookup(_string(value))
        except KeyError:
            raise _Invalid(f"names the unknown {kind} {value!r}") from None
        return value
    return check


def _inherit_environment(value):
    if isinstance(value, bool):
        return value
    try:
        names = _string_list(value)
    except _Invalid:
        raise _Invalid("must be true, false or an array of variable names") from None
    if any("=" in name for name in names):
        raise _Invalid("has a variable name with '=' in it")
    return names


def _networks(value):
    import ipaddress
    texts = _string_list(value, non_empty=True)
    try:
        return tuple(ipaddress.ip_network(text, strict=False) for text in texts)
    except ValueError as e:
        raise _Invalid(f"has a value that is not an IP address or network: {e}") from None


_ISOLATION_OPTIONS = {
    "user": ("user", _known("user", pwd.getpwnam)),
    "group": ("group", _known("group", grp.getgrnam)),
    "umask": ("umask", _octal_umask),
    "inheritEnvironment": ("inherit_environment", _inherit_environment),
    "allowedNetworks": ("allowed_networks", _networks),
    "limits": (None, None),
}


def parse_isolation(where: str, table: dict, problems: Problems) -> IsolationSpec | None:
    """The task's isolation options (keys of ``_ISOLATION_OPTIONS``), or None when it has
    none. Problems name file, task and field; a ``user`` or ``group`` other than the server's
    own is an error unless the server runs as root, which alone may switch to them."""
    given = {k: v for k, v in table.items() if k in _ISOLATION_OPTIONS}
    if not given:
        return None
    fields = _parse_table(where, given, _ISOLATION_OPTIONS, problems)
    if "limits" in given:
        fields["limits"] = _parse_limits(f"{where}: [limits]", given["limits"], problems)
    _check_identity_allowed(where, fields, problems)
    return IsolationSpec(**fields)


def _parse_limits(where, table, problems: Problems) -> ResourceLimits | None:
    """``[tasks.<name>.limits]``: whole numbers from their minimum (1, or 0 for
    fileSizeBytes) up to the server's own hard limit, which a task can tighten, not raise."""
    if not isinstance(table, dict):
        problems.errors.append(f"{where} must be a table ([tasks.<name>.limits])")
        return None
    import resource
    options = {key: (field, _limit_value(smallest)) for key, (field, _, _, smallest) in _LIMIT_OPTIONS.items()}
    fields = _parse_table(where, table, options, problems)
    if fields and not os.access(PRLIMIT, os.X_OK):  # util-linux; essential on Debian and Ubuntu
        problems.errors.append(f"{where}: limits need {PRLIMIT} (util-linux), which is not installed")
    for key, (field, _, name, _) in _LIMIT_OPTIONS.items():
        hard = resource.getrlimit(getattr(resource, name))[1]
        if field in fields and hard != resource.RLIM_INFINITY and fields[field] > hard:
            problems.errors.append(f"{where}: field {key!r} is {fields[field]}, above the server's "
                                   f"hard limit {hard}; a task's limits can only tighten the server's")
    return ResourceLimits(**fields)


def _limit_value(smallest: int):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid("must be a whole number")
        if value < smallest:
            raise _Invalid(f"must be at least {smallest}")
        if value >= 1 << 63:
            raise _Invalid("is too large")
        return value
    return check


def _check_identity_allowed(where, fields, problems: Problems):
    """Only root may switch users or groups: an ordinary server refuses at start-up (and
    check-config says so) rather than failing every run."""
    if os.geteuid() == 0:
        if ("user" in fields or "group" in fields) and not os.access(SETPRIV, os.X_OK):
            problems.errors.append(f"{where}: fields 'user' and 'group' need {SETPRIV} (util-linux), "
                                   f"which is not installed")
        return
    try:
        me = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid without a passwd entry (containers)
        me = f"uid {os.geteuid()}"
    user, group = fields.get("user"), fields.get("group")
    if user and pwd.getpwnam(user).pw_uid != os.geteuid():
        problems.errors.append(f"{where}: field 'user' is {user!r}, but the server runs as {me}, not root, "
                               f"so it cannot switch users (run it as root, or remove the field)")
    if group and grp.getgrnam(group).gr_gid != os.getegid():
        problems.errors.append(f"{where}: field 'group' is {group!r}, but the server runs as {me}, not root, "
                               f"so it cannot switch groups (run it as root, or remove the field)")


def inherited_environment(task: TaskSpec) -> dict[str, str]:
    """What a task takes of the server's environment (built once per task): everything by
    default, with HOME, USER and LOGNAME of the task's ``user`` instead of the server's; with
    inheritEnvironment = false nothing but PATH=DEFAULT_PATH; with a list, only those
    variables (plus PATH=DEFAULT_PATH when PATH is not one of them). The task's
    ``environment`` goes on top of this."""
    iso = task.isolation
    if iso is None:
        return dict(os.environ)
    if iso.inherit_environment is not True:
        names = iso.inherit_environment or ()
        return {"PATH": DEFAULT_PATH, **{n: os.environ[n] for n in names if n in os.environ}}
    env = dict(os.environ)
    if iso.user:
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(iso.user)
            env.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name)
    return env


def network_allowed(task: TaskSpec, client: str) -> bool:
    """Is the caller's address (after --trusted-proxy resolution) in allowedNetworks?"""
    if task.isolation is None or not task.isolation.allowed_networks:
        return True
    import ipaddress
    try:
        address = ipaddress.ip_address(client)
    except ValueError:  # not an IP address (a Unix socket): not in any network
        return False
    address = getattr(address, "ipv4_mapped", None) or address
    return any(address in network for network in task.isolation.allowed_networks)


def network_not_allowed(task: TaskSpec) -> Reject:
    return Reject(403, "forbidden", f"Task {task.name!r} cannot be called from this address.",
                  "network_not_allowed")


def isolated_spawn(task: TaskSpec, env: dict[str, str]) -> tuple[list[str], dict]:
    """The argv and the extra subprocess.Popen arguments that run the task's command with its
    identity, umask and limits. Raises OSError (a -2 result) for what would stop the command
    from starting: an unknown user or group, a limit above the server's hard limit, a program
    missing or not executable by that user.

    The argv is ``[setpriv --reuid=U --regid=G --groups=.. --] [prlimit --as=N .. --]
    /resolved/program args``. The program is resolved and checked here, with the run's PATH
    and identity, so that the wrappers' own exit codes 126/127 ("cannot execute") never stand
    for a missing program: that is a -2, as without wrappers."""
    iso = task.isolation
    if iso is None:
        return list(task.command), {}
    options = {} if iso.umask is None else {"umask": iso.umask}
    wrappers, uid, gids = [], os.geteuid(), None
    if os.geteuid() == 0 and (iso.user or iso.group):
        uid, gid, gids = _identity(iso)
        wrappers += [SETPRIV, f"--reuid={uid}", f"--regid={gid}", "--groups=" + ",".join(map(str, gids)), "--"]
    if iso.limits and iso.limits.items():
        _check_limits(iso.limits)
        wrappers += [PRLIMIT, *(f"{_LIMIT_OPTIONS[key][1]}={value}" for key, value in iso.limits.items()), "--"]
    if not wrappers:
        return list(task.command), options
    return [*wrappers, _resolve_program(task, env, uid, gids), *task.command[1:]], options


def _identity(iso: IsolationSpec) -> tuple[int, int, list[int]]:
    """(uid, gid, supplementary gids), looked up at each run so that a changed user database
    counts: the user's primary and other groups, or only ``group`` when it is given."""
    try:
        entry = pwd.getpwnam(iso.user) if iso.user else pwd.getpwuid(os.geteuid())
    except KeyError:
        raise OSError(0, f"unknown user {iso.user!r}") from None
    if iso.group:
        try:
            gid = grp.getgrnam(iso.group).gr_gid
        except KeyError:
            raise OSError(0, f"unknown group {iso.group!r}") from None
        return entry.pw_uid, gid, [gid]
    return entry.pw_uid, entry.pw_gid, os.getgrouplist(entry.pw_name, entry.pw_gid)


def _check_limits(limits: ResourceLimits):
    """A limit above the server's hard limit would make prlimit fail (exit 1, indistinct from
    the command's own); it is a -2 here instead. (Checked at start-up too; this catches a
    hard limit lowered since.)"""
    import resource
    for key, value in limits.items():
        hard = resource.getrlimit(getattr(resource, _LIMIT_OPTIONS[key][2]))[1]
        if hard != resource.RLIM_INFINITY and value > hard:
            raise OSError(1, f"limit {key} = {value} is above the server's hard limit {hard}")


def _resolve_program(task: TaskSpec, env: dict[str, str], uid: int, gids) -> str:
    """The path that exec would run, as execvp finds it: a name with '/' relative to the
    workdir, else the first executable match on the run's PATH. OSError ENOENT or EACCES
    (with the program's name) when there is none."""
    import errno
    program, base = task.command[0], task.workdir or os.getcwd()
    dirs = [""] if "/" in program else os.get_exec_path(env)
    denied = False
    for directory in dirs:
        path = os.path.join(base, directory, program)
        try:
            st = os.stat(path)
        except OSError:
            continue
        if _may_execute(st, path, uid, gids):
            return path
        denied = True
    code = errno.EACCES if denied else errno.ENOENT
    raise OSError(code, os.strerror(code), program)


def _may_execute(st: os.stat_result, path: str, uid: int, gids) -> bool:
    """Can ``uid`` with ``gids`` (None: the server's own identity, which os.access answers)
    execute this regular file, reaching it through its directories? Judged from the mode bits
    as the kernel checks them (ACLs are not read): root needs an x bit on the file and none on
    directories, the owner the owner's bit, a group member the group's, others the rest."""
    import stat
    if not stat.S_ISREG(st.st_mode):
        return False
    if gids is None:
        return os.access(path, os.X_OK)
    if uid == 0:
        return bool(st.st_mode & 0o111)
    directory, parents = os.path.dirname(os.path.abspath(path)), []
    while directory not in parents:
        parents.append(directory)
        directory = os.path.dirname(directory)
    try:
        return all(_x_bit(os.stat(d), uid, gids) for d in parents) and _x_bit(st, uid, gids)
    except OSError:
        return False


def _x_bit(st: os.stat_result, uid: int, gids) -> bool:
    import stat
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in gids:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def isolation_summary(task: TaskSpec) -> dict:
    """The isolation settings for GET /config (no environment values: names only)."""
    iso = task.isolation or IsolationSpec()
    inherit = iso.inherit_environment
    return {"user": iso.user, "group": iso.group,
            "umask": None if iso.umask is None else f"{iso.umask:04o}",
            "inheritEnvironment": inherit if isinstance(inherit, bool) else list(inherit),
            "allowedNetworks": [str(n) for n in iso.allowed_networks],
            "limits": dict(iso.limits.items()) if iso.limits else {}}


# =============================================================================================
# Execution (process groups, output capture, timeouts)
# =============================================================================================
#
# An event loop watches each child: its stdin (the request body, written without blocking),
# stdout and stderr (read into bounded buffers as they come, so a chatty child never blocks on
# a full pipe), its exit (a pidfd), and its deadline. A sync run is watched by the thread of
# the request that waits for it, with a loop of its own (that thread waits anyway, and every
# hand-over between threads costs CPU); async and event-stream runs by one reactor thread. A
# thread per async run would cost more memory and context switches.


class Output:
    """One captured stream: the first ``limit`` bytes are kept, the rest is read and dropped."""

    __slots__ = ("data", "limit", "truncated")

    def __init__(self, limit: int):
        self.data = bytearray()
        self.limit = limit
        self.truncated = False

    def append(self, chunk: bytes):
        room = self.limit - len(self.data)
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[:max(room, 0)]
        self.data += chunk

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


class Run:
    """One execution of a task, from spawn to result; shared by the loop watching it (which writes it)
    and the handlers that wait for it or read it."""

    def __init__(self, task: TaskSpec, caller: Caller, client: str):
        self.id = base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()
        self.task = task
        self.caller = caller
        self.client = client  # the caller's address (see RequestHandler.client)
        self.created_at = time.time()
        self.started_at: float | None = None  # when the process was started (after any queue)
        self.started = 0.0
        self.finished_at: float | None = None
        self.duration = 0.0
        self.status = "queued"
        self.exit_code = -1
        self.launch = None  # while queued: the callable waiting in the task's line
        self.holds_slot = False  # a concurrency slot is its (admitted or granted): shown running
        self.short_of_resources = False  # not started for want of processes, descriptors or memory
        self.pgid: int | None = None  # its process group once spawned (the leader's pid)
        self.proc_start: int | None = None  # that leader's start time (see process_start_time)
        self.owner = os.getpid()  # the process running it
        self.recorded = threading.Event()  # set once the state store holds its row: any worker finds it
        self.stdout = Output(task.max_output_bytes)
        self.stderr = Output(task.max_output_bytes)
        self.done = threading.Event()
        self.changed = threading.Condition()  # notified on output and on the end

    def mark_started(self):
        with self.changed:
            self.started_at, self.started = time.time(), time.monotonic()
            self.status = "running"
            self.changed.notify_all()

    def add_output(self, stream: Output, chunk: bytes):
        with self.changed:
            stream.append(chunk)
            self.changed.notify_all()

    def finish(self, status: str, exit_code: int):
        """Record the outcome. Waiters are woken by ``publish``, after the slot is given back,
        so that a caller who gets the answer and calls again finds the slot free."""
        with self.changed:
            if self.started_at is None:  # cancelled in the queue: it never started
                self.finished_at = time.time()
            else:
                self.duration = time.monotonic() - self.started
                self.finished_at = self.started_at + self.duration
            self.status, self.exit_code = status, exit_code

    def publish(self):
        with self.changed:
            self.done.set()
            self.changed.notify_all()

    def shown_status(self) -> str:
        """The status callers see. ``finish`` records the outcome before ``publish`` wakes
        the waiters; in between, readers still see the run going, so that no answer shows
        an ended run without its output and end time. A run is "running" from the moment it
        holds a slot, before its process is spawned (and, seen from another worker, recorded),
        so that no answer shows it queued after another said running."""
        if self.done.is_set():
            return self.status
        return "running" if self.started_at is not None or self.holds_slot else "queued"

    def summary(self) -> dict:
        """One line of GET /tasks/<name>: no output."""
        with self.changed:
            published = self.done.is_set()
            return {"task_id": self.id, "status": self.shown_status(), "caller": self.caller.name,
                    "created_at": _rfc3339(self.created_at),
                    "started_at": self.started_at and _rfc3339(self.started_at),
                    "finished_at": published and _rfc3339(self.finished_at) or None}

    def to_json(self) -> dict:
        with self.changed:
            published = self.done.is_set()
            result = {"status": self.shown_status(), "exit_code": self.exit_code if published else -1,
                      "task_id": self.id}
            if self.started_at is not None:
                result["started_at"] = _rfc3339(self.started_at)
            if not published:
                return result
            result["finished_at"] = _rfc3339(self.finished_at)
            result["duration_seconds"] = round(self.duration, 6)
            for key, out in (("stdout", self.stdout), ("stderr", self.stderr)):
                if out.data:
                    result[key] = out.text()
                if out.truncated:
                    result[key + "_truncated"] = True
            return result


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def build_environment(task: TaskSpec, run: Run, headers: Headers) -> dict[str, str]:
    """The server's environment, then the task's, then passed headers, then RTASK_* (last, so
    that nothing a caller sends can change what the command is told about its own run)."""
    env = task.base_environment.copy()
    for header, var in task.env_names.items():
        env[var] = ",".join(headers.get_all(header))
    env["RTASK_TASK_NAME"] = task.name
    env["RTASK_TASK_ID"] = run.id
    env["RTASK_CALLER"] = run.caller.name
    return env


def spawn(task: TaskSpec, env: dict[str, str], stdin: int, stdout: int, stderr: int):
    """Start the task's command directly (no shell) as the leader of a new session, and so of
    its own process group, with the given pipe ends as fds 0-2.

    subprocess.Popen (vfork-based here) releases the GIL while it spawns; os.posix_spawn was
    measured slower under concurrent load (662 vs 980 requests/s, bench/), so Popen it is."""
    import subprocess
    argv, isolation = isolated_spawn(task, env)  # identity, umask and limits (README §6)
    try:
        return subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, cwd=task.workdir,
                                env=env, start_new_session=True, close_fds=True, **isolation)
    except subprocess.SubprocessError as e:
        raise OSError(str(e)) from None


# Errors of a start that mean the machine is short of something (processes, descriptors,
# memory) rather than that the task is wrong: a caller still waiting gets 503 and may retry.
_START_SHORTAGE_ERRNOS = frozenset({errno.EAGAIN, errno.EMFILE, errno.ENFILE, errno.ENOMEM})


def guarded(where: str, fn, *args):
    """Call ``fn``; a bug in it is logged, not raised: ``where`` (the reactor, the state
    store's group write) serves every run, and one callback must not stop it."""
    try:
        fn(*args)
    except Exception:
        log.exception(f"internal error in {where}")


class _Child:
    """One running process, as seen by the loop that watches it (only that loop's thread
    touches it)."""

    def __init__(self, run: Run, process, on_end, loop: "_Loop"):
        self.run, self.proc, self.on_end, self.loop = run, process, on_end, loop
        self.streams: dict[int, Output] = {}  # open output fds
        self.stdin_fd: int | None = None
        self.stdin_data = memoryview(b"")
        self.pidfd: int | None = None  # open until the process is reaped
        self.exited = False
        self.ended = False
        self.killed_as: str | None = None  # "timeout" or "cancelled" once we signalled it
        self.timers: list = []


class _Loop:
    """An event loop: a selector, a heap of timers, and calls handed in by other threads.

    The reactor thread runs one for ever; a request thread that waits for its sync run runs
    one of its own until that run ends (Executor.start with ``wait``). Only the loop's thread
    touches its selector and timers; other threads use ``call_soon``."""

    def __init__(self, selector: selectors.BaseSelector, after_events):
        self.selector = selector
        self.after_events = after_events  # called after each round of events and timers
        self._timers: list = []  # heap of [when, seq, callback or None when cancelled]
        self._cancelled = 0  # cancelled entries still in the heap
        self._seq = itertools.count()
        self._incoming: collections.deque = collections.deque()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            selector.register(self._wake, selectors.EVENT_READ, self._drain_wakeups)
        except BaseException:
            self.close()
            raise

    def call_soon(self, fn):
        """Have the loop's thread call ``fn()`` (any thread may call this, until ``close``)."""
        self._incoming.append(fn)
        os.eventfd_write(self._wake, 1)

    def after(self, delay: float, callback) -> list:
        """Schedule ``callback`` in ``delay`` seconds. Returns a handle; ``cancel(handle)``
        drops the callback at once, so a cancelled 30-second timeout does not keep its run in
        memory."""
        handle = [time.monotonic() + delay, next(self._seq), callback]
        heapq.heappush(self._timers, handle)
        return handle

    def cancel(self, handle: list):
        handle[2] = None
        self._cancelled += 1
        if self._cancelled > 1024 and 2 * self._cancelled > len(self._timers):
            # Most entries are dead (a run's timeout outlives the run): rebuild the heap, so
            # its size follows the running runs, not request rate × timeout.
            self._timers = [t for t in self._timers if t[2] is not None]
            heapq.heapify(self._timers)
            self._cancelled = 0

    def run_once(self):
        """Wait for the next event or timer, and handle everything that is due."""
        timeout = None
        if self._timers:
            timeout = min(max(0.0, self._timers[0][0] - time.monotonic()), 3600.0)
        registered = self.selector.get_map()
        for key, mask in self.selector.select(timeout):
            # An earlier callback of this batch may have closed this fd (and a new child
            # may even have reused its number): only a still-registered key is current.
            if registered.get(key.fd) is key:
                guarded("the process reactor", key.data, key.fd, mask)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            callback = heapq.heappop(self._timers)[2]
            if callback is None:
                self._cancelled -= 1
            else:
                guarded("the process reactor", callback)
        guarded("the process reactor", self.after_events)

    def _drain_wakeups(self, fd, mask):
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass
        while self._incoming:
            self._incoming.popleft()()

    def close(self):
        self.selector.close()
        os.close(self._wake)


class Executor:
    """Runs commands in their own process groups and reports each run's end.

    - The command runs directly (no shell) with ``start_new_session``, so the whole group can be
      signalled and a Ctrl-C on the server's terminal does not reach it.
    - On timeout the group gets SIGTERM and, 2 s later, SIGKILL, even if the direct child is
      already gone: a grandchild that ignores SIGTERM must not survive. The run ends as soon as
      the direct child is gone, even if a grandchild still holds the pipes.
    - After a normal exit, pipes held open by background processes are waited for at most
      PIPE_GRACE_SECONDS; such processes are left running (a task may start a daemon).
    """

    def __init__(self, on_spawn=lambda run: None, after_events=lambda: None):
        # Both are called on the thread watching the run: on_spawn(run) RECORD_SPAWN_AFTER
        # seconds after a run's process was spawned, if it is still going (a run that ends
        # sooner has its process group recorded with its end); after_events() after each
        # round of events and timers (where the ends of that round are recorded together:
        # StateStore).
        self.on_spawn, self.after_events = on_spawn, after_events
        self._reactor = _Loop(selectors.DefaultSelector(), after_events)
        self._children: set[_Child] = set()
        # Cancelled while their process was being spawned. Weak: a run that a DELETE found
        # just as it left the line for good (its queue timeout) never spawns, and goes with it.
        self._doomed: weakref.WeakSet[Run] = weakref.WeakSet()
        self.running = 0  # processes started and not yet ended (any thread may read it)
        self.pending_kills = 0  # process groups sent SIGTERM whose SIGKILL is still to come
        self._lock = threading.Lock()  # the two sets and the two counts: every loop's thread
        threading.Thread(target=self._serve_reactor, name="rtask-reactor", daemon=True).start()

    def _serve_reactor(self):
        while True:
            self._reactor.run_once()

    # -- called from handler threads ---------------------------------------------------------

    def later(self, fn):
        """Call ``fn()`` on the reactor thread, after its current round: for work that, done
        inline, could recurse (an end that hands a slot on, whose grantee ends at once...)."""
        self._reactor.call_soon(fn)

    def start(self, run: Run, body: bytes, env: dict[str, str], on_end, wait: bool = False) -> None:
        """Spawn the run's command; ``on_end(run)`` is called (on the thread watching it) when
        the run has its result, and publishes it (Run.publish) once that is recorded; if on_end
        fails, the run is published here. A command that cannot start ends the run at once
        with -2 (``run.pgid`` stays None).

        ``wait``: the caller waits for the end anyway (a sync request's thread). Then, while
        fewer than WATCH_HERE_BELOW runs are running in this process, the calling thread
        watches the run itself and returns once it has been reported: that spares every event
        of the run a hand-over to the reactor thread and back. With more, the reactor watches
        it: one thread taking the events of many runs in each round costs less than many
        threads each woken for its own (bench/workers.py, README §14)."""
        task = run.task
        wait = wait and self.running < WATCH_HERE_BELOW
        pipes, loop = [], self._reactor
        try:
            if wait:
                loop = _Loop(selectors.PollSelector(), self.after_events)
            for _ in range(2 if task.merge_stderr else 3):  # a loop: on EMFILE, close what was made
                pipes.append(os.pipe2(os.O_CLOEXEC))
            stdin, stdout = pipes[0], pipes[1]
            stderr = pipes[1] if task.merge_stderr else pipes[2]
            process = spawn(task, env, stdin[0], stdout[1], stderr[1])
        except (OSError, ValueError) as e:
            for fd in itertools.chain.from_iterable(pipes):
                os.close(fd)
            if loop is not self._reactor:
                loop.close()
            self._end_unstarted(run, e, on_end)
            return
        run.pgid = process.pid
        for _, write_end in pipes[1:]:
            os.close(write_end)
        os.close(stdin[0])
        child = _Child(run, process, on_end, loop)
        child.streams[stdout[0]] = run.stdout
        if not task.merge_stderr:
            child.streams[stderr[0]] = run.stderr
        child.stdin_fd = stdin[1]
        child.stdin_data = memoryview(body)
        with self._lock:
            self.running += 1
        if not wait:
            loop.call_soon(lambda: self._watch(child))
            return
        try:
            self._watch(child)
            while not child.ended:
                loop.run_once()
        finally:
            loop.close()
        guarded("the process reactor", self.after_events)  # (for a run that ended within _watch)

    def cancel(self, run: Run) -> bool:
        """Stop a run's process group (TERM, then KILL); False if the run had ended. A run
        already being stopped (by its timeout or an earlier cancel) keeps that outcome. A run
        that has its slot but whose process is still being spawned is stopped on arrival."""
        with self._lock:
            found = [c for c in self._children if c.run is run and not c.ended]
            for child in found:  # (under the lock: a child still listed has its loop open)
                child.loop.call_soon(lambda c=child: self._signal_group(c, "cancelled"))
            if not found and run.finished_at is None:
                self._doomed.add(run)
                return True
            return bool(found)

    def stop_all(self):
        """Stop every running run's process group (TERM, then KILL), as a cancel would."""
        with self._lock:
            for child in self._children:
                child.loop.call_soon(lambda c=child: self._signal_group(c, "cancelled"))

    # -- on the thread watching the run ------------------------------------------------------

    def _watch(self, child: _Child):
        with self._lock:
            self._children.add(child)
            doomed = child.run in self._doomed
            self._doomed.discard(child.run)
        loop = child.loop
        for fd in child.streams:
            os.set_blocking(fd, False)
            loop.selector.register(fd, selectors.EVENT_READ, self._on_output(child))
        if child.stdin_data:
            os.set_blocking(child.stdin_fd, False)
            loop.selector.register(child.stdin_fd, selectors.EVENT_WRITE, self._on_stdin(child))
        else:
            os.close(child.stdin_fd)
            child.stdin_fd = None
        try:
            pidfd = os.pidfd_open(child.proc.pid)
        except (AttributeError, OSError):  # no pidfd (not Linux ≥ 5.3): poll for the exit
            self._poll_exit(child)
        else:
            loop.selector.register(pidfd, selectors.EVENT_READ, self._on_exit(child))
            child.pidfd = pidfd
        child.timers.append(loop.after(child.run.task.timeout_seconds,
                                       lambda: self._signal_group(child, "timeout")))
        child.timers.append(loop.after(RECORD_SPAWN_AFTER, lambda: self.on_spawn(child.run)))
        if doomed:
            self._signal_group(child, "cancelled")

    def _on_output(self, child: _Child):
        def readable(fd, mask):
            self._read(child, fd)
            if child.streams:
                return
            if child.exited:
                self._end(child)
            elif child.proc.poll() is not None:  # (its exit came with its last output: no round more)
                self._reap(child)
        return readable

    def _read(self, child: _Child, fd: int):
        """Read what ``fd`` holds now (READS_PER_EVENT chunks at most: a chatty command must
        not keep the loop from its other runs), and close it at its end. Reading until the
        pipe is empty usually finds the end with the last output: a round of the loop less."""
        for _ in range(READS_PER_EVENT):
            try:
                chunk = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._close_stream(child, fd)
                return
            child.run.add_output(child.streams[fd], chunk)

    def _on_stdin(self, child: _Child):
        def writable(fd, mask):
            try:
                written = os.write(fd, child.stdin_data[:READ_CHUNK])
                child.stdin_data = child.stdin_data[written:]
            except BlockingIOError:
                return
            except OSError:  # EPIPE: the command does not read its input; that is its right
                child.stdin_data = memoryview(b"")
            if not child.stdin_data:
                self._close_stdin(child)
        return writable

    def _on_exit(self, child: _Child):
        def exited(fd, mask):
            self._reap(child)
        return exited

    def _poll_exit(self, child: _Child):
        if child.proc.poll() is None:
            child.timers.append(child.loop.after(0.02, lambda: self._poll_exit(child)))
        else:
            self._reap(child)

    def _reap(self, child: _Child):
        if child.pidfd is not None:
            child.loop.selector.unregister(child.pidfd)
            os.close(child.pidfd)
            child.pidfd = None
        child.proc.wait()
        child.exited = True
        for fd in list(child.streams):  # its last output and the ends of its pipes, usually there
            self._read(child, fd)
        if child.killed_as or not child.streams:
            self._end(child)  # a killed run answers now, whoever still holds its pipes
        else:
            child.timers.append(child.loop.after(PIPE_GRACE_SECONDS, lambda: self._end(child)))

    def _signal_group(self, child: _Child, why: str):
        """SIGTERM the run's process group now and SIGKILL it after KILL_GRACE_SECONDS. The
        first reason wins: a cancelled run does not turn into a timeout while it dies. A run
        that ended meanwhile (a cancel handed in just as it ended) is left alone: the
        daemons it may have started are not the cancel's to stop."""
        if child.killed_as or child.ended:
            return
        if child.exited and why == "timeout":  # ended already; only pipe holders remain, ignored
            self._end(child)
            return
        child.killed_as = why
        pgid = child.proc.pid  # start_new_session: the child leads its own group
        _killpg(pgid, signal.SIGTERM)
        # On the reactor, not in child.timers: the KILL must still come after the run has
        # ended (and its own loop is gone), for the grandchildren that ignored the TERM (and
        # a drain waits for it: pending_kills).
        with self._lock:
            self.pending_kills += 1
        self._reactor.call_soon(
            lambda: self._reactor.after(KILL_GRACE_SECONDS, lambda: self._kill_group(pgid)))
        if child.exited:  # cancelled while daemons held its pipes: it ends now, they go too
            self._end(child)

    def _kill_group(self, pgid: int):
        _killpg(pgid, signal.SIGKILL)
        with self._lock:
            self.pending_kills -= 1

    def _close_stream(self, child: _Child, fd: int):
        child.loop.selector.unregister(fd)
        os.close(fd)
        del child.streams[fd]

    def _close_stdin(self, child: _Child):
        if child.stdin_fd is not None:
            child.loop.selector.unregister(child.stdin_fd)
            os.close(child.stdin_fd)
            child.stdin_fd = None

    def _end(self, child: _Child):
        if child.ended:
            return
        child.ended = True
        for handle in child.timers:
            child.loop.cancel(handle)
        for fd in list(child.streams):
            self._close_stream(child, fd)
        self._close_stdin(child)
        code = child.proc.returncode
        if child.killed_as:
            status, exit_code = child.killed_as, -1
        elif code < 0:  # killed by a signal we did not send
            status, exit_code = "failure", -1
        else:
            status, exit_code = ("success" if code == 0 else "failure"), code
        child.run.finish(status, exit_code)
        with self._lock:  # (after finish: a cancel that no longer finds it sees it finished)
            self._children.discard(child)
            self.running -= 1
        self._report_end(child.run, child.on_end)

    @staticmethod
    def _report_end(run: Run, on_end):
        try:
            on_end(run)
        except BaseException:  # whatever failed there, whoever waits for the run gets its answer
            run.publish()
            raise

    def _end_unstarted(self, run: Run, error: Exception, on_end):
        reason = getattr(error, "strerror", None) or str(error)
        target = getattr(error, "filename", None)
        message = f"cannot start {run.task.command[0]}: {reason}"
        if target and target != run.task.command[0]:
            message += f" ({target})"
        run.add_output(run.stderr, message.encode())
        run.short_of_resources = getattr(error, "errno", None) in _START_SHORTAGE_ERRNOS
        run.finish("failure", -2)
        # On the reactor, later: a failed start of a queued run hands its slot to the next in
        # line, which may fail too; done inline, a long line of them would recurse.
        self._reactor.call_soon(lambda: self._report_unstarted(run, on_end))

    def _report_unstarted(self, run: Run, on_end):
        with self._lock:
            self._doomed.discard(run)
        self._report_end(run, on_end)


def _killpg(pgid: int, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# =============================================================================================
# Results and state (retention, the durable store)
# =============================================================================================

ENDED_STATUSES = ("success", "failure", "timeout", "cancelled")
CRASH_REASON = "rtask: the server running this task ended unexpectedly; its process group was stopped at restart"
NEVER_STARTED_REASON = "rtask: never started: the server ended while the run waited for a slot"


class StateStore:
    """The durable record of runs, shared by every process serving one state directory.

    - One SQLite database, ``<state dir>/state.db`` (WAL, synchronous=NORMAL: a committed row
      survives a kill -9 of any process; only an OS crash may lose the last commits).
    - A run's row is written when it waits in line or takes a slot of a limited task (in the
      limiter's transaction), when its process has been spawned (with the process group and
      that process's start time, for crash recovery), and when it ends (status, exit code,
      output). The last two are committed in groups (``write_pending``): each event loop
      commits the ends of its round of events at once, and a sync run's process group is recorded
      only if it is still going RECORD_SPAWN_AFTER seconds after its spawn (a run that ends
      sooner is one row write, not two). A commit costs 55-77 µs of CPU and each handing of
      work to another thread ~50 µs on the 2-core machine measured (README §14), more than
      the rest of a run's bookkeeping: hence no writer thread, one statement per group, and
      one write per short run.
      The end is committed before any waiter is woken and an async run's id is answered
      only once its row is committed, so whoever is answered and asks again, on any worker,
      finds the run. A worker killed within RECORD_SPAWN_AFTER of a sync run's spawn leaves
      that one process group unrecorded.
    - Ended rows are kept until ``expires_at`` (wall clock: asyncResultRetentionSeconds after
      the end) and at most MAX_RESULTS_KEPT per task, oldest ended first; readers never see an
      expired row, and the purge runs on writes at most every PURGE_INTERVAL seconds.
    - ``open_exclusive`` is for the one process that owns the directory (the supervisor of
      the workers): it holds ``<state dir>/lock`` for its lifetime, so a second
      server on the same directory is refused, and it stops what a crashed predecessor left.
    One connection per process behind a lock: SQLite serialises writers anyway, and a
    connection per handler thread would cost an open per connection (measured in bench/).
    Writers of all processes also queue on ``<state dir>/write.lock`` (see _writing)."""

    PURGE_INTERVAL = 0.5
    BUSY_TIMEOUT = 10.0  # seconds a write waits for another writer before it gives up (and is logged)
    _COLUMNS = ("id", "task", "caller", "client", "status", "exit_code", "created_at", "started_at",
                "finished_at", "duration", "stdout", "stderr", "stdout_truncated", "stderr_truncated",
                "owner", "pgid", "proc_start", "retention", "expires_at")
    _VALUES = f"({', '.join('?' * len(_COLUMNS))})"
    _INSERT = f"INSERT INTO runs ({', '.join(_COLUMNS)}) VALUES {_VALUES}"
    _ON_CONFLICT = " ON CONFLICT (id) DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[1:]) + \
        " WHERE runs.expires_at IS NULL"
    _UPSERT = _INSERT + _ON_CONFLICT
    ROWS_PER_STATEMENT = 256  # × 19 columns: well under SQLite's 32766 parameters
    _SCHEMA = """
        CREATE TABLE IF NOT EXISTS runs (
            seq INTEGER PRIMARY KEY,  -- admission order (FIFO of the queues): always above every row left
            id TEXT NOT NULL UNIQUE, task TEXT NOT NULL, caller TEXT NOT NULL, client TEXT NOT NULL,
            status TEXT NOT NULL, exit_code INTEGER NOT NULL,
            created_at REAL NOT NULL, started_at REAL, finished_at REAL, duration REAL NOT NULL,
            stdout BLOB, stderr BLOB, stdout_truncated INTEGER NOT NULL, stderr_truncated INTEGER NOT NULL,
            owner INTEGER NOT NULL,  -- pid of the process that runs it
            pgid INTEGER, proc_start INTEGER,  -- its process group, and the leader's start time
            retention REAL NOT NULL,  -- seconds the result is kept after the end
            expires_at REAL  -- NULL while queued or running
        );
        CREATE INDEX IF NOT EXISTS runs_by_task ON runs (task, created_at);
        CREATE INDEX IF NOT EXISTS runs_live ON runs (task, status) WHERE expires_at IS NULL;
        CREATE TABLE IF NOT EXISTS buckets (  -- RateLimiter
            task TEXT PRIMARY KEY, tokens REAL NOT NULL, last REAL NOT NULL, rate REAL NOT NULL);
        CREATE TABLE IF NOT EXISTS limits (  -- ConcurrencyLimit: maxConcurrentTasks, for promotions
            task TEXT PRIMARY KEY, max_running INTEGER NOT NULL);
    """

    def __init__(self, directory: str):
        self.directory = directory
        self._lock_fd: int | None = None
        self._lock = threading.RLock()  # re-entered by a run written inside a limiter's transaction
        self._next_purge = 0.0
        self._unsaved: dict[str, tuple] = {}  # run id → its end row that failed to be written
        self._pending: dict[str, list] = {}  # run id → [run, retention or None, callbacks]: see write_pending
        self._pending_lock = threading.Lock()
        self._write_depth = 0  # nesting of _writing() in the thread holding self._lock
        self.hands_on_slots = True  # off in a worker whose supervisor died (watch_supervisor)
        self.grants = Grants(self)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            self._write_fd = os.open(os.path.join(directory, "write.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                     0o600)
            self._db = sqlite3.connect(os.path.join(directory, "state.db"), timeout=self.BUSY_TIMEOUT,
                                       isolation_level=None, check_same_thread=False)
            with self._writing():
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(self._SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise ConfigError(f"cannot use the state directory {directory}: "
                              f"{getattr(e, 'strerror', None) or e}") from None

    @classmethod
    def open_exclusive(cls, directory: str) -> StateStore:
        """The store of the process that owns ``directory``: locked, and recovered."""
        store = cls(directory)
        fd = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"the state directory {directory} is in use by another rtask server; "
                              "stop it or give this one its own --state-dir") from None
        store._lock_fd = fd
        with contextlib.suppress(FileNotFoundError):
            os.unlink(store._draining_path)  # (left by a server that was stopped while draining)
        store.recover_crashed(None, CRASH_REASON)
        return store

    # -- the server's drain ------------------------------------------------------------------

    @property
    def _draining_path(self) -> str:
        return os.path.join(self.directory, "draining")

    def mark_draining(self):
        """(The supervisor, on SIGTERM, before it passes the signal on.) Every worker sees the
        drain at once, also one that has not handled its own SIGTERM yet: a slot it is granted
        then must not start an async run that waited in line (App.start_from_line)."""
        with contextlib.suppress(OSError):
            os.close(os.open(self._draining_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))

    def server_draining(self) -> bool:
        return os.path.exists(self._draining_path)

    # -- writes ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self):
        """Hold the right to write: this process's lock (its threads), then the server's (its
        processes): an flock on ``<state dir>/write.lock``, tried every millisecond at most
        (a holder is done within a commit). SQLite's own busy handler instead sleeps 1, 2, 5,
        ... up to 100 ms between tries: with 8 and 16 processes writing, the slowest write
        took 28-69 ms through the flock against 84-464 ms without it (bench/store.py,
        README §14). Raises sqlite3.OperationalError, like a busy database, after
        BUSY_TIMEOUT (a stopped process holding the lock must not stop every other)."""
        with self._lock:
            self._write_depth += 1
            try:
                if self._write_depth == 1:
                    self._lock_out_other_writers()
                yield
            finally:
                self._write_depth -= 1
                if self._write_depth == 0:
                    fcntl.flock(self._write_fd, fcntl.LOCK_UN)

    def _lock_out_other_writers(self):
        delay, deadline = 0.0001, time.monotonic() + self.BUSY_TIMEOUT
        while True:
            try:
                fcntl.flock(self._write_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise sqlite3.OperationalError("the state store's write lock is held by another "
                                                   "process for too long") from None
            time.sleep(delay)
            delay = min(2 * delay, 0.001)

    @contextlib.contextmanager
    def transaction(self):
        """One write transaction (BEGIN IMMEDIATE: the write lock is taken at once, so what it
        reads cannot change before it writes), committed at the end, rolled back on error."""
        with self._writing():
            self._write_unsaved()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # (a failed COMMIT may have rolled back already)
                    self._db.execute("ROLLBACK")
                raise

    def insert_run(self, db, run: Run, status: str):
        """Within a transaction: a new row for ``run`` with ``status`` (a limiter's admission)."""
        db.execute(self._INSERT, self._row(run, status, None, None))

    def save(self, run: Run):
        """Record a run that runs (its process group and the leader's start time) with the
        next ``write_pending``."""
        self._hand_over(run, None, None)

    def finish(self, run: Run, retention: float, then):
        """Record a run's end with its output, readable until ``retention`` seconds have
        passed, with the next ``write_pending``; ``then()`` is called once it is committed (or
        its write failed and was kept to be written again)."""
        self._hand_over(run, retention, then)

    def _hand_over(self, run: Run, retention: float | None, then):
        with self._pending_lock:
            entry = self._pending.setdefault(run.id, [run, None, []])
            if retention is not None:
                entry[1] = retention
            if then is not None:
                entry[2].append(then)

    def write_pending(self):
        """Write every row handed over so far in one statement, then set each run's
        ``recorded`` and call its callbacks. Any thread may call it; each event loop does after
        a round of events. Group commit: the runs that ended in one round cost one commit, a
        spawn and an end that wait together are one row, and a thread that finds another
        writing waits, then writes what was handed over meanwhile (its own row and those of
        the threads behind it, which then find nothing left to do)."""
        with self._pending_lock:
            if not self._pending:
                return
        with self._lock:  # (the writer before is done: what it did not take is ours to write)
            with self._pending_lock:
                batch, self._pending = list(self._pending.values()), {}
            guarded("the state store", self._write_batch, batch)  # (whatever fails, the waiters are told)
        for run, _, callbacks in batch:
            run.recorded.set()
            for then in callbacks:
                guarded("the state store", then)

    def _write_batch(self, batch: list):
        """The rows of ``batch`` ([run, retention or None, callbacks]), in as few statements as
        may be. A row is taken from its run now, so it holds the latest state; an ended row
        is final. If a write fails (disk full, the database locked past its timeout), that is
        logged and the runs go on: their processes are running and their waiters must get an
        answer. Their ends are kept and written again before every later read and write until
        they land, since until then their rows still hold concurrency slots."""
        rows = [self._row_now(run, retention) for run, retention, _ in batch]
        written = 0
        try:
            with self._writing():
                self._write_unsaved()
                while written < len(rows):
                    # One statement (one commit, one release of the GIL: each costs more
                    # than a row) for up to ROWS_PER_STATEMENT rows.
                    chunk = rows[written:written + self.ROWS_PER_STATEMENT]
                    self._db.execute(self._upsert_statement(len(chunk)), [v for row in chunk for v in row])
                    written += len(chunk)
                if time.monotonic() >= self._next_purge:
                    self._purge()
        except sqlite3.Error as e:
            log.error("cannot record runs in the state store", extra={"fields": {
                "task_ids": ",".join(row[0] for row in rows[written:]), "state_dir": self.directory,
                "problem": str(e)}})
            with self._lock:
                self._unsaved.update((row[0], row) for row in rows[written:] if row[-1] is not None)

    @classmethod
    @functools.lru_cache(maxsize=8)
    def _upsert_statement(cls, count: int) -> str:
        return f"INSERT INTO runs ({', '.join(cls._COLUMNS)}) VALUES {', '.join([cls._VALUES] * count)}" + \
            cls._ON_CONFLICT

    def _row_now(self, run: Run, retention: float | None) -> tuple:
        if retention is not None:
            return self._row(run, run.status, run.finished_at + retention, retention)
        if run.pgid and run.proc_start is None and run.finished_at is None:
            # Read now, not at the spawn: most runs end first and never need it. The leader
            # is reaped (its pid freed) just before its run finishes, and the kernel hands a
            # pid out again only after going round the whole pid space: a run not finished
            # yet still has its own leader.
            run.proc_start = process_start_time(run.pgid)
        return self._row(run, run.shown_status(), None, None)

    def _write_unsaved(self):
        """Under the lock: the ends that failed to be written, again (oldest first). Called
        before every read and write of the store, so a run's end is never seen missing once
        the database takes writes again."""
        if not self._unsaved:
            return
        with contextlib.suppress(sqlite3.Error), self._writing():  # (kept for the next try)
            for run_id, row in list(self._unsaved.items()):
                self._db.execute(self._UPSERT, row)
                del self._unsaved[run_id]

    @staticmethod
    def _row(run: Run, status: str, expires_at: float | None, retention: float | None) -> tuple:
        ended = expires_at is not None
        return (run.id, run.task.name, run.caller.name, run.client, status, run.exit_code if ended else -1,
                run.created_at, run.started_at, run.finished_at if ended else None, run.duration,
                bytes(run.stdout.data) if ended else None, bytes(run.stderr.data) if ended else None,
                run.stdout.truncated, run.stderr.truncated, run.owner, run.pgid, run.proc_start,
                run.task.retention_seconds if retention is None else retention, expires_at)

    def _purge(self):
        now = time.time()
        with contextlib.suppress(sqlite3.Error), self._writing():  # retried on the next write
            self._next_purge = time.monotonic() + self.PURGE_INTERVAL
            self._db.execute("DELETE FROM runs WHERE expires_at <= ?", (now,))
            crowded = self._db.execute("SELECT task FROM runs WHERE expires_at IS NOT NULL GROUP BY task "
                                       "HAVING count(*) > ?", (MAX_RESULTS_KEPT,)).fetchall()
            for (task,) in crowded:
                self._db.execute("DELETE FROM runs WHERE task = ? AND expires_at IS NOT NULL AND seq NOT IN "
                                 "(SELECT seq FROM runs WHERE task = ? AND expires_at IS NOT NULL "
                                 "ORDER BY finished_at DESC LIMIT ?)", (task, task, MAX_RESULTS_KEPT))

    # -- reads -------------------------------------------------------------------------------

    def query_one(self, sql: str, params=()):
        with self._lock:
            self._write_unsaved()  # (a slot count must not see a run as going that has ended)
            return self._db.execute(sql, params).fetchone()[0]

    def query_all(self, sql: str, params=()) -> list[tuple]:
        with self._lock:
            self._write_unsaved()
            return self._db.execute(sql, params).fetchall()

    def load(self, task: TaskSpec, run_id: str) -> Run | None:
        """A kept run of ``task`` (output included), as a Run; None if unknown or expired."""
        with self._lock:
            self._write_unsaved()
            row = self._db.execute(f"SELECT {', '.join(self._COLUMNS)} FROM runs WHERE id = ? AND task = ? "
                                   "AND (expires_at IS NULL OR expires_at > ?)",
                                   (run_id, task.name, time.time())).fetchone()
        return row and self._as_run(task, dict(zip(self._COLUMNS, row)))

    def newest_first(self, task: TaskSpec) -> list[Run]:
        """The kept runs of ``task`` without their output, newest first."""
        columns = [c for c in self._COLUMNS if c not in ("stdout", "stderr")]
        with self._lock:
            self._write_unsaved()
            rows = self._db.execute(f"SELECT {', '.join(columns)} FROM runs WHERE task = ? AND "
                                    "(expires_at IS NULL OR expires_at > ?) ORDER BY created_at DESC LIMIT ?",
                                    (task.name, time.time(), MAX_RESULTS_KEPT + MAX_RUNS_IN_FLIGHT)).fetchall()
        return [self._as_run(task, dict(zip(columns, row))) for row in rows]

    def ended_count(self, task_name: str) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM runs WHERE task = ? AND expires_at > ?",
                                    (task_name, time.time())).fetchone()[0]

    @staticmethod
    def _as_run(task: TaskSpec, row: dict) -> Run:
        """A Run object for a row, so that every handler reads stored and live runs alike. A row
        still going (another process's run) stays unpublished: it shows as queued while it
        waits in line, else as running, as soon as it holds a slot (row status starting or
        granted, as /health/detailed counts it): its process and start time are recorded up
        to RECORD_SPAWN_AFTER later, and until then its started_at is null."""
        run = Run(task, Caller(row["caller"], "stored"), row["client"])
        run.id, run.created_at, run.started_at = row["id"], row["created_at"], row["started_at"]
        run.status, run.exit_code, run.duration = row["status"], row["exit_code"], row["duration"]
        run.holds_slot = row["expires_at"] is None and run.status in ConcurrencyLimit.HOLDING
        run.pgid, run.proc_start, run.owner = row["pgid"], row["proc_start"], row["owner"]
        for name in ("stdout", "stderr"):
            getattr(run, name).data[:] = row.get(name) or b""
            getattr(run, name).truncated = bool(row[name + "_truncated"])
        if row["expires_at"] is not None:
            run.finished_at = row["finished_at"]
            run.done.set()
        return run

    # -- crash recovery ----------------------------------------------------------------------

    def recover_crashed(self, owner: int | None, reason: str) -> int:
        """End the runs left going by a process that died (``owner``; None: every one, at start):
        stop their process groups (TERM, then KILL after KILL_GRACE_SECONDS) where they are
        still the same processes, and record them as ``failure`` (exit_code -1) with ``reason``
        in stderr; a run that never started gets the never-started reason; their slots go to
        the lines (unless ``hands_on_slots`` is off). Returns the count."""
        where, params = ("expires_at IS NULL", ()) if owner is None else \
            ("expires_at IS NULL AND owner = ?", (owner,))
        with self._lock:
            rows = self._db.execute(f"SELECT id, pgid, proc_start, started_at, retention FROM runs WHERE {where}",
                                    params).fetchall()
        groups = [pgid for _, pgid, start, _, _ in rows if pgid and _same_process_group(pgid, start)]
        stop_process_groups(groups)
        now = time.time()
        with self.transaction() as db:
            for run_id, pgid, _, started_at, retention in rows:
                message = (reason if started_at is not None else NEVER_STARTED_REASON).encode()
                db.execute("UPDATE runs SET status = 'failure', exit_code = -1, finished_at = ?, "
                           "duration = ?, stderr = ?, expires_at = ? WHERE id = ?",
                           (now, now - started_at if started_at else 0.0, message, now + retention, run_id))
        if rows:
            log.warning("runs of an ended server process recorded as failed", extra={"fields": {
                "runs": len(rows), "groups_stopped": len(groups), "state_dir": self.directory}})
            if self.hands_on_slots:
                self.promote_all()  # their slots are free now
        return len(rows)

    def save_limits(self, tasks: dict[str, TaskSpec]):
        """Every task's maxConcurrentTasks (0: unlimited), in one transaction, so a failure
        changes none (whoever promotes a line for another process reads them: promote_all)."""
        with self.transaction() as db:
            db.executemany("INSERT OR REPLACE INTO limits (task, max_running) VALUES (?, ?)",
                           [(name, task.max_concurrent) for name, task in tasks.items()])

    def promote_all(self):
        """Hand the free slots of every limited task to its line (see ConcurrencyLimit)."""
        with self.transaction() as db:
            granted = [row for task, limit in db.execute("SELECT task, max_running FROM limits").fetchall()
                       for row in promote_queued(db, task, limit)]
        self.grants.start(granted)


def _proc_stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat from field 3 (state) on, or None when there is no such
    process. The command name (field 2) may hold spaces and parentheses, so fields are
    counted after its closing one."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        text = os.read(fd, 4096)
    except OSError:  # ESRCH: reaped after the open
        return None
    finally:
        os.close(fd)
    return text[text.rindex(b")") + 2:].split() if text else None


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (starttime, in clock ticks after boot), or None when
    there is no such process."""
    fields = _proc_stat_fields(pid)
    return int(fields[19]) if fields else None


def process_alive(pid: int) -> bool:
    """Is ``pid`` a process that has not exited? (A dead worker stays a zombie until the
    supervisor reaps it; its state, field 3, is then Z.)"""
    fields = _proc_stat_fields(pid)
    return bool(fields) and fields[0] not in (b"Z", b"X")


def _same_process_group(pgid: int, proc_start: int | None) -> bool:
    """Is group ``pgid`` still the one a run started? Its leader (pid == pgid) must have the
    recorded start time. If the leader is gone, the id cannot have been reused: Linux never
    gives a pid that is still some group's id to a new process, so members left in a group
    with that id are the run's own (grandchildren that outlived it)."""
    start = process_start_time(pgid)
    return start is None or start == proc_start


def stop_process_groups(groups: list[int]):
    """SIGTERM each group, then SIGKILL those with members left after KILL_GRACE_SECONDS
    (the same grace as a timeout: a task gets time to clean up)."""
    for pgid in groups:
        _killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE_SECONDS
    while groups and time.monotonic() < deadline:
        groups = [g for g in groups if _group_exists(g)]
        time.sleep(0.05)
    for pgid in groups:
        _killpg(pgid, signal.SIGKILL)


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


_PROGRESS = {"queued": 0, "running": 1}  # how far along a shown status is (any other: ended, 2)


class RunStore:
    """The runs of one task: live ones (queued or running here) in memory, with their output
    buffers and waiters; every run also in the StateStore, where ended ones are read from.

    The retention is per task and applies to runs that end from now on."""

    def __init__(self, retention: float, store: StateStore):
        self.retention = retention
        self.store = store
        self._live: dict[str, Run] = {}
        self._lock = threading.Lock()

    def add(self, run: Run):
        with self._lock:
            self._live[run.id] = run

    def discard(self, run: Run):
        with self._lock:
            self._live.pop(run.id, None)

    def finished(self, run: Run, then):
        """Record ``run``'s end; ``then()`` once it is in the store (it is read from there on)."""
        def recorded():
            with self._lock:
                self._live.pop(run.id, None)
            then()
        self.store.finish(run, self.retention, recorded)

    def get(self, task: TaskSpec, run_id: str) -> Run | None:
        with self._lock:
            run = self._live.get(run_id)
        if run and run.launch is not None:
            self._learn_grant(run)
        return run or self.store.load(task, run_id)

    def live(self) -> list[Run]:
        with self._lock:
            return list(self._live.values())

    def finished_count(self, task_name: str) -> int:
        return self.store.ended_count(task_name)

    def listing(self, task: TaskSpec) -> list[dict]:
        """Every kept run's summary, newest first: this process's live runs as they are now,
        then the stored rows as they are a moment later. Of a run that is both, the one
        further along is shown (a row may already hold a slot granted by another process, or
        the committed end of a run whose waiters are not woken yet), so that one listing never
        shows more runs running than may run, nor more queued than may wait. A run still
        asking for a place in line (which may be refused: 429) is not listed yet."""
        with self._lock:
            live = [run for run in self._live.values() if run.launch is None or run.recorded.is_set()]
        lines = {run.id: (run.created_at, run.summary()) for run in live}  # (before the rows are read)
        for stored in self.store.newest_first(task):
            line = stored.summary()
            mine = lines.get(stored.id)
            if mine is None or _PROGRESS.get(line["status"], 2) > _PROGRESS.get(mine[1]["status"], 2):
                lines[stored.id] = (stored.created_at, line)
        return [line for _, line in sorted(lines.values(), key=lambda entry: entry[0], reverse=True)]

    def _learn_grant(self, run: Run):
        """Before an answer about a run of this process waiting in line: another process may
        have granted it a slot since this one's poller last looked (every
        GRANT_POLL_SECONDS), and every listing already shows it running. Starting it now
        keeps a later answer from showing it queued again."""
        try:
            self.store.grants.check([run.id])
        except sqlite3.Error as e:  # the poller tries again
            log.warning("cannot read granted slots", extra={"fields": {"problem": str(e)}})


# =============================================================================================
# HTTP (routing, handler, responses)
# =============================================================================================


class Headers:
    """Request headers: lower-cased name → values in arrival order (repeats are kept)."""

    __slots__ = ("_values",)

    def __init__(self):
        self._values: dict[str, list[str]] = {}

    def add(self, name: str, value: str):
        self._values.setdefault(name.lower(), []).append(value)

    def get(self, name: str, default=None):
        values = self._values.get(name)
        return values[0] if values else default

    def get_all(self, name: str) -> list[str]:
        return self._values.get(name, [])

    def items(self):
        """(lower-cased name, values) pairs."""
        return self._values.items()


class TaskState:
    """The live state of a configured task: its limits and its kept runs."""

    def __init__(self, task: TaskSpec, store: StateStore):
        self.task = task
        self.rate = RateLimiter(task.name, task.rate_limit, store)
        self.slots = ConcurrencyLimit(task.name, task.max_concurrent, task.queue_size, store)
        self.runs = RunStore(task.retention_seconds, store)

    def reconfigure(self, task: TaskSpec) -> TaskState:
        """Take a reloaded spec; kept runs, running executions and held slots stay."""
        if task.rate_limit != self.task.rate_limit:
            self.rate = RateLimiter(task.name, task.rate_limit, self.runs.store)
        self.slots.set_limits(task.max_concurrent, task.queue_size)
        self.runs.retention = task.retention_seconds  # applies to runs that end from now on
        self.task = task
        return self


class App:
    """Everything a request handler needs: config, credentials, task states, executor."""

    def __init__(self, config: Config, keyring: KeyRing, metrics: Metrics, store: StateStore):
        self.config = config
        self.store = store
        self.keyring = keyring
        self.metrics = metrics
        self.auth = Authenticator(config, keyring, metrics)
        store.save_limits(config.tasks)
        self.tasks = {name: TaskState(task, store) for name, task in config.tasks.items()}
        self._dropped: dict[str, TaskState] = {}  # states of tasks a reload removed
        self.webhooks = config.webhook_index()
        self.executor = Executor(on_spawn=self._record_spawn, after_events=store.write_pending)
        self.started = time.monotonic()
        self.starting = self.auth.fetches_keys()  # until prepare_auth has run: /health/ready is 503
        self.draining = False
        self.inflight = 0  # requests being answered
        self._inflight_lock = threading.Lock()
        metrics.configure(config)

    def prepare_auth(self):
        """The last step of start-up: fetch the JWKS (up to its 10-second timeout) while the
        listener already answers, /health/ready with 503 "starting"."""
        self.auth.prepare()
        self.starting = False
        log.info("rtask ready")

    def reload(self, config: Config):
        """Use a new configuration (SIGHUP). Everything that can fail is done first (the
        authenticator, the store's limits in one transaction), so a failure leaves the old
        configuration in force; running executions are untouched."""
        auth = Authenticator(config, self.keyring, self.metrics)
        auth.prepare()
        self.store.save_limits(config.tasks)
        known = self._dropped | self.tasks
        tasks = {name: known[name].reconfigure(task) if name in known else TaskState(task, self.store)
                 for name, task in config.tasks.items()}
        self.metrics.configure(config)
        # A dropped task's state is kept: its running processes still hold slots and its runs
        # still end there, so a task that comes back finds its limits taken and its results.
        self._dropped = {n: s for n, s in known.items() if n not in tasks}
        self.config, self.auth, self.tasks, self.webhooks = config, auth, tasks, config.webhook_index()

    def request_started(self):
        with self._inflight_lock:
            self.inflight += 1

    def request_ended(self):
        with self._inflight_lock:
            self.inflight -= 1

    def busy(self) -> bool:
        """Anything still to finish before the process may exit?"""
        return bool(self.inflight or self.executor.running or self.executor.pending_kills or
                    any(s.slots.waiting_here for s in self.tasks.values()))

    def launch(self, state: TaskState, run: Run, body: bytes, env: dict[str, str], wait: bool = False):
        """Start the run's process; it must hold a concurrency slot, which is given back, its
        metric observed and its log line written when it ends. With ``wait``, the calling
        thread watches the run and returns once it has ended (Executor.start). An async run's
        process group is recorded at once: its id is answered next, and any worker must find it."""
        run.launch = None
        run.mark_started()
        self.executor.start(run, body, env, lambda r: self._run_ended(state, r), wait)
        if run.task.is_async and run.pgid is not None:
            self.store.save(run)
            self.store.write_pending()

    def start_from_line(self, state: TaskState, run: Run, start):
        """A slot was granted to an async run waiting in line: ``start()`` it, unless the
        server is draining (this worker, or any: StateStore.mark_draining): then it never
        starts (README, Signals) but ends cancelled, and the slot goes to the next in line."""
        run.holds_slot = True
        if not (self.draining or self.store.server_draining()):
            start()
            return
        run.launch = None
        self.executor.later(lambda: self._cancel_granted(state, run))  # (its end grants the next: no recursion)

    def _cancel_granted(self, state: TaskState, run: Run):
        run.finish("cancelled", -1)
        self._run_ended(state, run)
        self.store.write_pending()

    def _record_spawn(self, run: Run):
        """(The loop watching a run still going RECORD_SPAWN_AFTER seconds after its spawn.)"""
        if not run.task.is_async:  # (an async one was recorded by launch)
            self.store.save(run)

    def cancel_queued(self, state: TaskState, run: Run) -> bool:
        """Take a run that waits for a slot out of the line; False if it has started."""
        if run.launch is None or not state.slots.withdraw(run):
            return False
        run.launch = None
        run.finish("cancelled", -1)
        self._record_end(state, run, run.publish)
        self.store.write_pending()
        return True

    def _run_ended(self, state: TaskState, run: Run):
        self._record_end(state, run, lambda: state.slots.release(then=run.publish))  # (may start the next in line)

    def _record_end(self, state: TaskState, run: Run, then):
        """Observe and log the run's end and record it; ``then()`` is called once it is
        recorded, so that whoever is woken by it and asks again, on any worker, finds it."""
        state.runs.finished(run, then)
        self.metrics.observe_run(run)
        log.info("task finished", extra={"fields": {
            "task": run.task.name, "task_id": run.id, "caller": run.caller.name, "client": run.client,
            "status": run.status, "exit_code": run.exit_code,
            "duration": round(run.duration, 3), **parameter_log_fields(run.task)}})
        if run.stdout.data or run.stderr.data:
            log.debug("task output", extra={"fields": {
                "task_id": run.id, "stdout": run.stdout.text(), "stderr": run.stderr.text()}})


class RequestHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive. Request parsing is done here rather than by http.server so
    that every limit is ours (line and header sizes, read deadlines) and every answer,
    protocol errors included, is JSON written in one send."""

    protocol_version = "HTTP/1.1"
    server_version = "rtask/" + __version__
    app: App  # set on the subclass made by make_server

    # -- connection ---------------------------------------------------------------------------

    def authenticate(self) -> Caller:
        """The request's credentials as a Caller, or Reject(401)."""
        return self.app.auth.authenticate(self.headers)

    def setup(self):
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request.settimeout(SOCKET_WRITE_TIMEOUT)
        self.handshake_failed = False
        if self.server.tls:
            # A handshake is bounded as a whole (not per read) and counts as idle: at the
            # connection cap, a client that never finishes it is closed first to make room.
            raw = self.request
            self.server.watchdog.arm(raw, REQUEST_READ_TIMEOUT, idle=True)
            try:
                self.request = self.server.tls.wrap_socket(raw, server_side=True)
                self.request.settimeout(SOCKET_WRITE_TIMEOUT)
            except OSError as e:  # ssl.SSLError included: a client that cannot speak TLS
                log.debug("TLS handshake failed", extra={"fields": {"client": self.client_address[0], "problem": str(e)}})
                self.handshake_failed = True
            finally:
                self.server.watchdog.disarm(raw)
        super().setup()

    def handle(self):
        if not self.handshake_failed:
            super().handle()

    def client(self) -> str:
        """The caller's address for the logs: the TCP peer, unless the peer is a trusted proxy
        (run --trusted-proxy); then the nearest X-Forwarded-For hop that is not one. Hops are
        read from the right, because only those that trusted proxies added can be believed."""
        trusted = self.server.trusted_proxies
        client = self.client_address[0]
        if not trusted:
            return client
        import ipaddress
        hops = ",".join(self.headers.get_all("x-forwarded-for")).split(",")[::-1]
        for hop in [client, *hops]:
            try:
                address = ipaddress.ip_address(hop.strip())
            except ValueError:
                break  # missing or garbled: keep the last address that was believable
            address = getattr(address, "ipv4_mapped", None) or address
            client = str(address)
            if not any(address in network for network in trusted):
                break
        return client

    def handle_one_request(self):
        """Read one request and answer it; sets close_connection when the connection ends."""
        self.close_connection = True
        self.body_pending = False
        watchdog = self.server.watchdog
        watchdog.arm(self.connection, KEEPALIVE_IDLE_TIMEOUT, idle=True)
        try:
            line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        except OSError:
            return
        finally:
            watchdog.disarm(self.connection)
        if not line:
            return
        self._arm_request_read()
        self.app.request_started()
        try:
            self._answer(line)
        except OSError:
            self.close_connection = True  # the client went away; nothing more to do
        finally:
            watchdog.disarm(self.connection)
            self.app.request_ended()

    def _answer(self, line: bytes):
        # Known before the line is parsed, so that even a refused HEAD gets no body.
        self.command, self.path = ("HEAD" if line.startswith(b"HEAD ") else ""), ""
        try:
            self._parse_head(line)
        except Reject as r:
            r = self._explain_late(r)
            self.send_json(r.status, {"error": r.code, "message": r.message}, close=True)
            return
        self.server.watchdog.disarm(self.connection)  # read_body arms it again for the body
        if self.app.draining and not self.path.startswith("/health"):
            self.send_json(503, {"error": "unavailable", "message": "The server is shutting down."},
                           headers=[("Retry-After", "1")], close=True)
            return
        try:
            route(self)
        except (ConnectionError, TimeoutError):
            raise  # the client went away (e.g. closed its event stream): not our error
        except Exception:
            log.exception("internal error", extra={"fields": {"method": self.command}})
            self.send_json(500, {"error": "internal", "message": "Internal server error."}, close=True)

    def _arm_request_read(self):
        self.server.watchdog.arm(self.connection, REQUEST_READ_TIMEOUT, answer=not self.server.tls)

    def _explain_late(self, r: Reject) -> Reject:
        """A read the watchdog cut short fails as incomplete; say what really happened."""
        if not self.server.watchdog.expired(self.connection):
            return r
        self.close_connection = True
        return Reject(400, "bad_request", f"The request was not sent within {REQUEST_READ_TIMEOUT:g} seconds.",
                      r.reason)

    def _read_framing(self):
        """How the body is delimited, from Content-Length and Transfer-Encoding, decided once
        for every request. Ambiguous framing is how requests are smuggled past a proxy, so it
        is never guessed at: ``framing_error`` is raised by read_body, and a route that does
        not read the body closes the connection instead of draining it (discard_body)."""
        lengths = self.headers.get_all("content-length")
        encodings = self.headers.get_all("transfer-encoding")
        self.chunked, self.body_length, self.framing_error = bool(encodings), 0, None
        if encodings and (len(encodings) > 1 or encodings[0].lower() != "chunked"):
            self.framing_error = Reject(400, "bad_request", "Only chunked transfer encoding is supported.",
                                        "invalid_content")
        elif len(set(lengths)) > 1 or (encodings and lengths):
            self.framing_error = Reject(400, "bad_request", "The body's length is given ambiguously.",
                                        "invalid_content")
        elif lengths and not _is_decimal(lengths[0]):
            self.framing_error = Reject(400, "bad_request", "Content-Length is not a number.", "invalid_content")
        elif lengths:
            digits = lengths[0].lstrip("0")
            self.body_length = int(digits or "0") if len(digits) <= 18 else 10 ** 18  # int() refuses 4300+ digits
        self.body_pending = bool(self.chunked or self.body_length or self.framing_error)

    def _parse_head(self, line: bytes):
        if len(line) > MAX_REQUEST_LINE:
            raise Reject(414, "bad_request", "The request line is too long.")
        parts = line.decode("latin-1").rstrip("\r\n").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise Reject(400, "bad_request", "The request line is malformed.")
        self.command, target, self.request_version = parts
        self.raw_requestline = line
        self.headers = Headers()
        for _ in range(MAX_HEADERS + 1):
            raw = self.rfile.readline(MAX_HEADER_LINE + 1)
            if len(raw) > MAX_HEADER_LINE:
                raise Reject(431, "bad_request", "A request header is too long.")
            if raw in (b"\r\n", b"\n"):
                break
            if not raw:
                raise Reject(400, "bad_request", "The request headers are incomplete.")
            # UTF-8 with surrogateescape: any byte the client sent survives, and goes back to
            # the same byte when the value is encoded for the environment or a signature.
            name, sep, value = raw.decode("utf-8", "surrogateescape").removesuffix("\n").removesuffix("\r").partition(":")
            # A header name is a token; a bare CR or a NUL is a line end to some parsers and
            # must not mean something else here (and a NUL cannot go into an environment).
            if not sep or not _HEADER_NAME.fullmatch(name) or "\r" in value or "\0" in value:
                raise Reject(400, "bad_request", "A request header is malformed.")
            self.headers.add(name, value.strip(" \t"))
        else:
            raise Reject(431, "bad_request", "Too many request headers.")
        connection = (self.headers.get("connection") or "").lower()
        self.close_connection = connection == "close" or (
            self.request_version == "HTTP/1.0" and connection != "keep-alive")
        if target[:8].lower().startswith(("http://", "https://")):  # absolute form: http://host/path
            target = "/" + target.split("://", 1)[1].partition("/")[2]
        self.target = target  # as sent (origin form), for a request forwarded to another worker
        path, _, query = target.partition("?")
        if not path.startswith("/"):  # "*" (OPTIONS), "host:port" (CONNECT) or garbage
            raise Reject(400, "bad_request", "The request target must be a path.")
        try:
            if not path.isascii():  # raw bytes, read as latin-1 above: must be UTF-8 like %XX
                path = path.encode("latin-1").decode("utf-8")
            self.path = unquote(path, errors="strict") if "%" in path else path
        except UnicodeDecodeError:
            raise Reject(400, "bad_request", "The request path is not valid UTF-8.") from None
        self.query = _form_fields(request_query(self)) if query else {}  # name → values
        self._read_framing()

    # -- body ---------------------------------------------------------------------------------

    def read_body(self, limit: int) -> bytes:
        """The request body, at most ``limit`` bytes: Reject 413 when larger, 400 when not
        readable as framed. Honours ``Expect: 100-continue`` once the checks have passed."""
        if self.framing_error:
            self.close_connection = True
            raise self.framing_error
        if self.body_length > limit:
            raise Reject(413, "payload_too_large", f"The body is larger than {limit} bytes.", "input_too_large")
        if self._expects_continue():
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._arm_request_read()
        try:
            body = self._read_chunked(limit) if self.chunked else self._read_exact(self.body_length)
        except Reject as r:
            raise self._explain_late(r) from None
        finally:
            self.server.watchdog.disarm(self.connection)
        self.body_pending = False
        return body

    def _read_exact(self, n: int) -> bytes:
        data = self.rfile.read(n) if n else b""
        if len(data) != n:
            self.close_connection = True
            raise Reject(400, "bad_request", "The body is shorter than its Content-Length.", "invalid_content")
        return data

    def _read_chunked(self, limit: int) -> bytes:
        body = bytearray()
        try:
            while True:
                size_field = self._read_line(1024).split(b";", 1)[0]
                if not re.fullmatch(rb"[0-9A-Fa-f]{1,16}[ \t]*", size_field):
                    raise ValueError  # int(..., 16) would also take "0x5", "+5", "5_0"
                size = int(size_field, 16)
                if size == 0:
                    break
                if len(body) + size > limit:
                    self.close_connection = True
                    raise Reject(413, "payload_too_large", f"The body is larger than {limit} bytes.", "input_too_large")
                body += self._read_exact(size)
                if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                    raise ValueError
            for _ in range(MAX_HEADERS):  # trailers, ignored
                if not self._read_line(MAX_HEADER_LINE):
                    return bytes(body)
        except ValueError:
            pass
        self.close_connection = True
        raise Reject(400, "bad_request", "The chunked body is malformed.", "invalid_content")

    def _read_line(self, limit: int) -> bytes:
        """One line of a chunked body without its line end; ValueError when the line is longer
        than ``limit`` or the input ends before its line end (a cut-off body is not a body)."""
        line = self.rfile.readline(limit + 2)
        if not line.endswith(b"\n"):
            raise ValueError
        return line.rstrip(b"\r\n")

    def _expects_continue(self) -> bool:
        """``Expect: 100-continue`` from an HTTP/1.1 client (1.0 clients do not know 100)."""
        return self.request_version == "HTTP/1.1" and (self.headers.get("expect") or "").lower() == "100-continue"

    def discard_body(self):
        """Before answering a request whose body was never read: drain a small body so the
        connection stays usable, or close the connection for a large one."""
        if not self.body_pending:
            return
        self.body_pending = False
        if not (self.framing_error or self.chunked or self._expects_continue()) \
                and self.body_length <= DISCARD_BODY_LIMIT:
            self._arm_request_read()
            try:
                self._read_exact(self.body_length)
                return
            except Reject:
                pass
            finally:
                self.server.watchdog.disarm(self.connection)
        self.close_connection = True

    # -- responses ----------------------------------------------------------------------------

    def send_json(self, status: int, payload: dict, headers=(), close=False):
        if close or self.app.draining:
            self.close_connection = True
        if not close:
            self.discard_body()
        body = json.dumps(payload).encode() + b"\n"  # a JSON body is a line, as curl users expect
        head = [f"HTTP/1.1 {status} {_reason_phrase(status)}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"Date: {_http_date()}\r\nServer: {self.server_version}\r\n"]
        head += [f"{name}: {value}\r\n" for name, value in headers]
        if self.close_connection:
            head.append("Connection: close\r\n")
        head.append("\r\n")
        if self.command == "HEAD":  # RFC 9110 §9.3.2: GET's status and headers, never a body
            body = b""
        self.wfile.write("".join(head).encode("latin-1") + body)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (e.g. a header read failure) as JSON too."""
        self.close_connection = True
        self.send_json(code, {"error": "bad_request" if code < 500 else "internal",
                              "message": message or _reason_phrase(code)}, close=True)

    def log_message(self, format, *args):
        log.debug(format % args)


def _is_decimal(text: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts "²", which int() refuses."""
    return text.isascii() and text.isdigit()


def _reason_phrase(status: int) -> str:
    return BaseHTTPRequestHandler.responses.get(status, ("",))[0]


_date_cache = [0, ""]


def _http_date() -> str:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[:] = [now, time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))]
    return _date_cache[1]


# -- routing ----------------------------------------------------------------------------------


def route(h: RequestHandler):
    """Dispatch by path, then method; a known path with a wrong method is 405 with Allow.
    Starred path segments are passed to the handler as arguments.

    A trailing slash names the same resource (``/tasks/echo/`` is ``/tasks/echo``, as in the
    Go RTask), except under /wh/, where everything after the prefix, a final "/" included, is
    the secret. HEAD is GET without the body (RFC 9110 §9.3.2): every GET route only reads,
    and send_json / stream_events leave the body out."""
    if h.path.startswith("/wh/") and len(h.path) > len("/wh/"):
        if h.command == "POST":
            post_webhook(h, h.path[len("/wh/"):])
        else:
            send_not_found(h)  # any other method: 404, so that no answer confirms a secret
        return
    path = h.path[:-1] if h.path.endswith("/") and len(h.path) > 1 else h.path
    parts = path.split("/")[1:]
    shape = _route_shape(parts)
    allowed = ROUTES.get(shape)
    if allowed is None:
        send_not_found(h)
        return
    handler = allowed.get("GET" if h.command == "HEAD" else h.command)
    if handler is None:
        allow = ", ".join(m for method in allowed for m in ([method, "HEAD"] if method == "GET" else [method]))
        h.send_json(405, {"error": "method_not_allowed", "message": f"Use {allow} on this path."},
                    headers=[("Allow", allow)])
        return
    args = [p for p, s in zip(parts, shape.split("/")[1:]) if s == "*"]
    try:
        handler(h, *args)
    except Reject as r:
        answer_reject(h, r, parts[1] if parts[0] in ("tasks", "hooks") and len(parts) > 1 else None)


def _route_shape(parts: list[str]) -> str:
    """The path with its variable segments starred: /tasks/deploy/abc → /tasks/*/*."""
    if parts[0] == "tasks" and len(parts) == 4 and parts[3] == "events":
        return "/tasks/*/*/events"
    if parts[0] == "tasks" and len(parts) <= 3 or parts[0] == "hooks" and len(parts) == 2:
        return "/" + parts[0] + "/*" * (len(parts) - 1)
    return "/" + "/".join(parts)


def send_not_found(h: RequestHandler):
    h.send_json(404, {"error": "not_found", "message": "There is nothing at this path."})


def answer_reject(h: RequestHandler, r: Reject, task_name: str | None):
    if r.reason and task_name in h.app.tasks:
        h.app.metrics.count_rejection(task_name, r.reason)
        log.info("request rejected", extra={"fields": {
            "task": task_name, "reason": r.reason, "status": r.status, "client": h.client()}})
    h.send_json(r.status, {"error": r.code, "message": r.message}, headers=r.headers)


def task_state(h: RequestHandler, name: str) -> TaskState:
    """The task named in a /tasks path. A task without apiKeyNames has no /tasks routes
    unless [auth] can grant permissions on it (keyPermissions or JWT)."""
    state = h.app.tasks.get(name)
    if state is None or not (state.task.api_key_names or h.app.config.open_task_routes):
        raise Reject(404, "not_found", f"There is no task named {name!r}.")
    if not network_allowed(state.task, h.client()):  # before any credential is looked at
        raise network_not_allowed(state.task)
    return state


def authorize(h: RequestHandler, permission: str) -> Caller:
    h.caller = h.authenticate()
    require_permission(h.caller, permission, h.app.metrics)
    return h.caller


def find_run(state: TaskState, run_id: str) -> Run:
    """An id that is not of the task-id form is simply unknown."""
    run = state.runs.get(state.task, run_id) if TASK_ID_RE.fullmatch(run_id) else None
    if run is None:
        raise Reject(404, "not_found", "No such run (unknown, or its result has expired).")
    return run


def post_task(h: RequestHandler, name: str):
    """POST /tasks/<name>: credentials → rate → concurrency → body size → parameters → run."""
    state = task_state(h, name)
    caller = authorize(h, f"tasks:run:{name}")
    execute(h, state, caller)


def post_webhook(h: RequestHandler, secret: str):
    """POST /wh/<secret>: the secret is the credential; logged and counted by its name only."""
    found = h.app.webhooks.get(_digest(secret))
    if found is None:
        h.app.metrics.auth_result("webhook", "unknown_webhook")
        send_not_found(h)
        return
    task, webhook_name = found
    if not network_allowed(task, h.client()):
        # 404 as for an unknown secret: a 403 would confirm the secret to the wrong network.
        answer_reject(h, Reject(404, "not_found", "There is nothing at this path.", "network_not_allowed"), task.name)
        return
    h.app.metrics.auth_result("webhook", None)
    try:
        execute(h, h.app.tasks[task.name], Caller(webhook_name, "webhook"))
    except Reject as r:
        answer_reject(h, r, task.name)


def post_signed_hook(h: RequestHandler, name: str):
    """POST /hooks/<name>: a GitHub, GitLab or HMAC-signed webhook. The body is read (up to
    maxInputBytes) before the signature is checked; the answer never hints at the expected
    signature. A GitHub ping is answered without running; an event not in ``events`` gets
    202 and runs nothing."""
    state = h.app.tasks.get(name)
    hook = state.task.signed_webhook if state else None
    if hook is None:
        send_not_found(h)
        return
    if not network_allowed(state.task, h.client()):
        raise network_not_allowed(state.task)
    body = h.read_body(state.task.max_input_bytes)
    if not signature_valid(hook, h.headers, body):
        h.app.metrics.auth_result("webhook", "invalid_signature")
        raise unauthorized("invalid_signature", "The webhook signature is missing or not valid.")
    h.app.metrics.auth_result("webhook", None)
    event = h.headers.get("x-github-event") or h.headers.get("x-gitlab-event")
    if hook.provider == "github" and event == "ping":
        h.send_json(200, {"status": "pong"})
    elif hook.events and event not in hook.events:
        h.send_json(202, {"status": "ignored", "message": "This event is not configured to run the task."})
    elif hook.match and not payload_matches(hook.match, RequestValues(None, h.headers.get("content-type"), body)):
        h.send_json(202, {"status": "ignored", "message": "The payload does not match the task's rules."})
    else:
        execute(h, state, Caller(hook.provider, "webhook"), body)


def signature_valid(hook: SignedWebhookSpec, headers: Headers, body: bytes) -> bool:
    """Constant-time check of the sender's proof: GitLab sends the secret itself, GitHub and
    hmac-sha256 send the hex HMAC-SHA256 of the raw body (GitHub with a ``sha256=`` prefix)."""
    secret = hook.secret.encode("utf-8")
    if hook.provider == "gitlab":
        return hmac.compare_digest(_header_bytes(headers.get("x-gitlab-token") or ""), secret)
    header = "x-hub-signature-256" if hook.provider == "github" else hook.signature_header.lower()
    given = _header_bytes((headers.get(header) or "").strip())
    if given.startswith(b"sha256="):
        given = given[len(b"sha256="):]
    elif hook.provider == "github":
        return False
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest().encode("ascii")
    return hmac.compare_digest(given.lower(), expected)


def _header_bytes(value: str) -> bytes:
    """A header value as the bytes the client sent (see RequestHandler._parse_head)."""
    return value.encode("utf-8", "surrogateescape")


def execute(h: RequestHandler, state: TaskState, caller: Caller, body: bytes | None = None):
    """The checks after authentication, in order (rate, concurrency room, body size,
    parameters), then the run. A request refused here never starts a process and holds no
    slot; one refused for concurrency has spent its rate token (as in Go). ``body`` is given
    when it had to be read first (signed webhooks)."""
    task = state.task
    if not state.rate.allow():
        raise Reject(429, "rate_limited", f"Task {task.name!r} allows {task.rate_limit:g} requests per second.",
                     "limit_exceeded", [("Retry-After", state.rate.retry_after)])
    if h.app.executor.running >= MAX_RUNS_IN_FLIGHT or not state.slots.has_room():
        raise too_many_running(task)
    signed = body is not None  # a signed webhook's values come from its signed body only
    if body is None:
        body = h.read_body(task.max_input_bytes)
    resolved = resolve_parameters(task, RequestValues(None if signed else request_query(h),
                                                      h.headers.get("content-type"), body))
    run = Run(task_with_arguments(task, resolved), caller, h.client())
    env = build_environment(task, run, h.headers)
    env.update(parameter_environment(task, resolved))
    log_parameter_values(run, task, resolved)
    streamed = "text/event-stream" in (h.headers.get("accept") or "")
    here = not (task.is_async or streamed)  # this thread only waits for the end: it watches the run
    start_when_admitted(h.app, state, run, lambda: h.app.launch(state, run, body, env, here))
    if run.short_of_resources:
        # Answered once its slot is given back (the reactor ends the run at once). A run
        # started later from the line has no caller waiting: its result says why it did not start.
        run.done.wait()
        state.runs.discard(run)
        raise Reject(503, "unavailable", "The server cannot start a process right now; retry shortly.",
                     headers=[("Retry-After", "1")])
    if task.is_async:
        run.recorded.wait()  # the caller may ask any worker for it next
        h.send_json(200, {"task_id": run.id, "status": run.shown_status()})
    elif streamed:
        stream_events(h, run)
    else:
        run.done.wait()
        h.send_json(200, run.to_json())


def start_when_admitted(app: App, state: TaskState, run: Run, start):
    """Start now if a slot is free; else an async run waits in line (answered ``queued``)
    and a sync request waits for its turn. Refused (429) when the line is full."""
    if run.task.is_async:
        run.launch = start
        state.runs.add(run)  # before it can be granted, so that its end finds it stored
        admission = state.slots.admit(run, lambda: app.start_from_line(state, run, start))
        if admission == "full":
            state.runs.discard(run)
            raise too_many_running(run.task)
        if admission == "now":
            start()
    else:
        wait_in_line(state, run, start)


def wait_in_line(state: TaskState, run: Run, start):
    """A sync request starts now, or waits up to queueTimeoutSeconds for a slot (then 429).
    While it waits it is listed, and a DELETE takes it out of the line (App.cancel_queued):
    it never starts, and its caller gets the cancelled result."""
    granted = threading.Event()

    def grant():
        granted.set()
        with run.changed:
            run.holds_slot = True  # (listed running before its thread starts it)
            run.changed.notify_all()
    admission = state.slots.admit(run, grant)
    if admission == "full":
        raise too_many_running(state.task)
    state.runs.add(run)  # (before it can end: GET, DELETE and its end find it)
    if admission == "queued":
        run.launch = start  # what marks a run waiting in line
        with run.changed:
            run.changed.wait_for(lambda: granted.is_set() or run.done.is_set(), state.task.queue_timeout_seconds)
        if not granted.is_set() and state.slots.withdraw(run, forget=True):  # its time in line is up
            # Ended for a DELETE that found it just now (it answers at once, 409 or as here):
            # it never started, and is forgotten (no row: 429 is the caller's answer).
            run.launch = None
            run.finish("cancelled", -1)
            run.publish()
            state.runs.discard(run)
            raise too_many_running(state.task)
        if not granted.is_set():  # a DELETE took it out of the line (maybe just now): never started
            run.done.wait()
            return
    start()


def too_many_running(task: TaskSpec) -> Reject:
    return Reject(429, "too_many_running", f"Task {task.name!r} is already running as often as it may.",
                  "max_concurrent", [("Retry-After", "1")])


def get_result(h: RequestHandler, name: str, run_id: str):
    """GET /tasks/<name>/<id>[?wait=S]: the result; with wait, answered as soon as the run
    ends or after S seconds (at most 60) with the running state."""
    state = task_state(h, name)
    authorize(h, f"tasks:read:{name}")
    run = answered_by_owner(h, state, find_run(state, run_id))
    if run is None:
        return
    wait = h.query.get("wait")
    if wait:
        try:
            seconds = float(wait[0])
            if not math.isfinite(seconds) or "_" in wait[0]:  # float() also takes "1_0"
                raise ValueError
        except ValueError:
            raise Reject(400, "bad_request", "wait must be a number of seconds.") from None
        seconds = min(max(seconds, 0.0), MAX_LONG_POLL_SECONDS)
        run.done.wait(seconds)
    h.send_json(200, run.to_json())


def get_events(h: RequestHandler, name: str, run_id: str):
    """GET /tasks/<name>/<id>/events: the run's output as Server-Sent Events."""
    state = task_state(h, name)
    authorize(h, f"tasks:read:{name}")
    run = answered_by_owner(h, state, find_run(state, run_id))
    if run is not None:
        stream_events(h, run)


def delete_run(h: RequestHandler, name: str, run_id: str):
    """DELETE /tasks/<name>/<id>: stop the run's process group (TERM, then KILL after the
    grace), answer with the final result; 409 when the run had already ended."""
    state = task_state(h, name)
    authorize(h, f"tasks:cancel:{name}")
    run = answered_by_owner(h, state, find_run(state, run_id))
    if run is None:
        return
    if not (h.app.cancel_queued(state, run) or h.app.executor.cancel(run)):
        raise Reject(409, "conflict", "The run has already ended.")
    run.done.wait(KILL_GRACE_SECONDS + 5)
    h.send_json(200, run.to_json())


def list_tasks(h: RequestHandler):
    """GET /tasks: the tasks the caller may run, with their limits."""
    caller = h.authenticate()
    names = [n for n in h.app.tasks if holds_permission(caller.grants, f"tasks:list:{n}")]
    if not names:
        require_permission(caller, "tasks:list", h.app.metrics)
    tasks = [task_summary(h.app.tasks[n].task) for n in names
             if holds_permission(caller.grants, f"tasks:run:{n}")
             and network_allowed(h.app.tasks[n].task, h.client())]
    h.send_json(200, {"tasks": tasks})


def task_summary(task: TaskSpec) -> dict:
    return {"name": task.name, "async": task.is_async, "rateLimit": task.rate_limit,
            "maxConcurrentTasks": task.max_concurrent, "queueSize": task.queue_size,
            "maxInputBytes": task.max_input_bytes, "maxOutputBytes": task.max_output_bytes,
            "executionTimeoutSeconds": task.timeout_seconds, "queueTimeoutSeconds": task.queue_timeout_seconds,
            "parameters": [describe_parameter(p) for p in task.parameters]}


def list_runs(h: RequestHandler, name: str):
    """GET /tasks/<name>: the task's kept runs, newest first."""
    state = task_state(h, name)
    authorize(h, f"tasks:list:{name}")
    h.send_json(200, {"task": name, "runs": state.runs.listing(state.task)})


def get_health(h: RequestHandler):
    h.send_json(200, {"status": "healthy"})


def get_live(h: RequestHandler):
    h.send_json(200, {"status": "alive"})


def get_ready(h: RequestHandler):
    if h.app.draining or h.app.starting:
        h.send_json(503, {"status": "draining" if h.app.draining else "starting"})
    else:
        h.send_json(200, {"status": "ready"})


def get_health_detailed(h: RequestHandler):
    tasks = {}
    for name, state in h.app.tasks.items():
        kept = state.runs.finished_count(name)
        tasks[name] = {"running": state.slots.running, "queued": state.slots.queued, "results_kept": kept}
    status = "draining" if h.app.draining else "starting" if h.app.starting else "healthy"
    h.send_json(200, {"status": status, "version": __version__,
                      "uptime_seconds": round(time.monotonic() - h.app.started, 3), "tasks": tasks})


def get_config(h: RequestHandler):
    """GET /config (only when configEndpointEnabled): a whitelist of settings. Never a secret,
    a key hash, a webhook secret or an environment value: only names and limits."""
    if not h.app.config.auth.config_endpoint_enabled:
        send_not_found(h)
        return
    authorize(h, "system:config_read")
    config = h.app.config
    tasks = {}
    for task in config.tasks.values():
        tasks[task.name] = {**task_summary(task), "command": task.command[0],
                            "apiKeyNames": list(task.api_key_names),
                            "webhooks": [name for name, _ in task.webhooks],
                            "environment": [name for name, _ in task.environment],
                            "passRequestHeaders": list(task.pass_request_headers),
                            "asyncResultRetentionSeconds": task.retention_seconds,
                            **isolation_summary(task)}
    auth = config.auth
    summary = {"apiKeyHeader": auth.api_key_header, "strictValidation": auth.strict_validation,
               "keyPermissions": {n: list(p) for n, p in auth.key_permissions},
               "keys": sorted(h.app.keyring.names), "jwt": None}
    if auth.jwt:
        summary["jwt"] = {"verificationMethod": auth.jwt.verification_method, "issuer": auth.jwt.issuer,
                          "audience": auth.jwt.audience, "allowedAlgorithms": list(auth.jwt.allowed_algorithms),
                          "jwksUrl": auth.jwt.jwks_url}
    h.send_json(200, {"tasks": tasks, "auth": summary})


ROUTES = {
    "/hooks/*": {"POST": post_signed_hook},
    "/tasks": {"GET": list_tasks},
    "/tasks/*": {"POST": post_task, "GET": list_runs},
    "/tasks/*/*": {"GET": get_result, "DELETE": delete_run},
    "/tasks/*/*/events": {"GET": get_events},
    "/health": {"GET": get_health},
    "/health/live": {"GET": get_live},
    "/health/ready": {"GET": get_ready},
    "/health/detailed": {"GET": get_health_detailed},
    "/config": {"GET": get_config},
}


# -- live output (Server-Sent Events) ---------------------------------------------------------


def stream_events(h: RequestHandler, run: Run):
    """Send the run's output as SSE: what is already written first, then new output as it
    comes, then one ``result`` event; the connection then closes. Each event's data is a JSON
    string (so newlines and odd bytes survive). A slow reader only slows its own thread (the
    output it reads from is the run's bounded buffer); a reader that goes away stops here and
    the run goes on."""
    h.close_connection = True
    h.discard_body()
    # X-Accel-Buffering: nginx (and proxies copying it) would otherwise hold the events back.
    h.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                  b"X-Accel-Buffering: no\r\nConnection: close\r\n\r\n")
    if h.command == "HEAD":  # the headers of the stream, and no stream
        return
    sent = {"stdout": 0, "stderr": 0}
    decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in sent}
    while True:
        with run.changed:
            if not run.done.is_set() and all(sent[n] == len(getattr(run, n).data) for n in sent):
                run.changed.wait(SSE_HEARTBEAT_SECONDS)
            chunks = {n: bytes(getattr(run, n).data[sent[n]:]) for n in sent}
            ended = run.done.is_set()
        events = []
        for name, chunk in chunks.items():
            sent[name] += len(chunk)
            text = decoders[name].decode(chunk, final=ended)
            if text:
                events.append(f"event: {name}\ndata: {json.dumps(text)}\n\n")
        if ended:
            events.append(f"event: result\ndata: {json.dumps(run.to_json())}\n\n")
        h.wfile.write("".join(events).encode() if events else b": keep-alive\n\n")
        if ended:
            return


# -- server -----------------------------------------------------------------------------------


class ReadWatchdog:
    """Cuts off clients that are too slow: idle keep-alive past its timeout, or a request
    (headers, body) not fully sent in REQUEST_READ_TIMEOUT. One thread checks all deadlines;
    a per-recv socket timeout alone would let a client send a byte every few seconds forever
    (slowloris).

    An idle connection is shut both ways. A late request is shut for reading only, when the
    arm asked for an answer: the handler's read then ends, ``expired`` says why, and the
    handler can still write a 400. (Not under TLS: shutting an SSLSocket drops its TLS layer,
    so a later write would go out in the clear; there the connection is shut both ways.)

    A socket armed as ``idle`` waits for its next request (a fresh connection for its first):
    ``close_idle`` may close it early to make room when the connection cap is reached."""

    def __init__(self):
        self._deadlines: dict[socket.socket, tuple[float, bool, bool]] = {}  # → (when, answer, idle)
        self._expired: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._loop, name="rtask-watchdog", daemon=True).start()

    def arm(self, sock, seconds: float, answer=False, idle=False):
        with self._lock:
            self._deadlines[sock] = (time.monotonic() + seconds, answer, idle)

    def close_idle(self) -> bool:
        """Shut the connection that has waited longest for its next request, whose thread then
        ends at once; False when no connection is idle."""
        with self._lock:
            idle = [(when, s) for s, (when, _, is_idle) in self._deadlines.items() if is_idle]
            if not idle:
                return False
            sock = min(idle, key=lambda entry: entry[0])[1]
            del self._deadlines[sock]
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        return True

    def disarm(self, sock):
        with self._lock:
            self._deadlines.pop(sock, None)
            self._expired.discard(sock)

    def expired(self, sock) -> bool:
        """Did the deadline cut this socket's read short (since it was last armed)?"""
        with self._lock:
            return sock in self._expired

    def _loop(self):
        while True:
            time.sleep(0.25)
            now = time.monotonic()
            with self._lock:
                late = [(s, answer) for s, (t, answer, _) in self._deadlines.items() if t <= now]
                for s, answer in late:
                    del self._deadlines[s]
                    if answer:
                        self._expired.add(s)
            for s, answer in late:
                try:
                    s.shutdown(socket.SHUT_RD if answer else socket.SHUT_RDWR)
                except OSError:
                    pass


class ResourceShortage:
    """A resource the server cannot always have (a thread, a file descriptor at accept), as
    one warning when its failures begin and one line when it is back, never a line per
    failure: an exhausted server must not flood its log too. ``failed`` returns how long an
    accept loop should pause: ACCEPT_BACKOFF_FIRST, doubling up to ACCEPT_BACKOFF_MAX."""

    def __init__(self, what: str):
        self.what = what  # "start API connection threads", for the log
        self._failures = 0
        self._since = 0.0
        self._pause = 0.0
        self._lock = threading.Lock()

    def failed(self, error: BaseException) -> float:
        with self._lock:
            first = not self._failures
            self._failures += 1
            if first:
                self._since, self._pause = time.monotonic(), ACCEPT_BACKOFF_FIRST
            else:
                self._pause = min(2 * self._pause, ACCEPT_BACKOFF_MAX)
            pause = self._pause
        if first:
            log.warning("resource exhausted; refusing until it is back", extra={"fields": {
                "cannot": self.what, "problem": getattr(error, "strerror", None) or str(error)}})
        return pause

    def succeeded(self):
        if not self._failures:  # the usual case, without the lock
            return
        with self._lock:
            failures, self._failures = self._failures, 0
        if failures:
            log.info("resource available again", extra={"fields": {
                "can": self.what, "failures": failures, "seconds": round(time.monotonic() - self._since, 1)}})


# accept() errors that mean a resource ran out (rather than one client's connection failing)
_EXHAUSTED_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def connection_share(cap: int) -> int:
    """The connections one peer address may hold by default: CONNECTION_SHARE_PER_ADDRESS of the cap."""
    return max(1, int(cap * CONNECTION_SHARE_PER_ADDRESS))


class ConnectionLimit:
    """The open connections of one listener (one handler thread each), per process: at most
    ``cap`` in all and ``per_address`` from one peer address (README §5 "Fairness under
    exhaustion"). Used by both listeners, around their accept loop:

    - ``accept`` pauses the loop (growing delay) while accept() fails for want of descriptors
      or memory, instead of spinning on a listening socket that stays readable;
    - ``start`` admits a connection and starts its thread, or refuses it: a peer over its
      share, a full cap with nothing ``make_room`` could close, or a thread that cannot start
      (which gives its slot back: the server recovers by itself when threads can start again);
    - ``release`` gives the slot back when the connection's thread ends.

    A connection closed by ``make_room`` keeps its slot until its thread has ended, a moment
    later, so the count may pass ``cap`` by the connections being closed that way."""

    def __init__(self, name: str, cap: int, per_address: int):
        self.cap, self.per_address = cap, per_address
        self.total = 0
        self._by_address: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self._accepts = ResourceShortage(f"accept {name} connections")
        self._threads = ResourceShortage(f"start {name} connection threads")

    def accept(self, accept):
        try:
            connection = accept()
        except OSError as e:
            if e.errno in _EXHAUSTED_ERRNOS:
                time.sleep(self._accepts.failed(e))
            raise  # the accept loop skips the failed accept
        self._accepts.succeeded()
        return connection

    def start(self, start_thread, request, address: str, refuse, make_room=lambda: False):
        """Call ``start_thread()`` if the connection is admitted, else ``refuse(request)``."""
        if not self._admit(address, make_room):
            refuse(request)
            return
        try:
            start_thread()
        except (RuntimeError, MemoryError) as e:  # "can't start new thread": a process, cgroup or memory limit
            self.release(address)
            self._threads.failed(e)
            refuse(request)
            return
        self._threads.succeeded()

    def _admit(self, address: str, make_room) -> bool:
        with self._lock:
            if self._by_address[address] >= self.per_address:
                return False
            if self.total >= self.cap and not make_room():
                return False
            self.total += 1
            self._by_address[address] += 1
            return True

    def release(self, address: str):
        with self._lock:
            self.total -= 1
            self._by_address[address] -= 1
            if not self._by_address[address]:
                del self._by_address[address]


class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer whose connections (one thread each) are bounded by a
    ConnectionLimit; at the cap, idle keep-alive connections are closed to make room."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, address, handler, app: App, tls=None, trusted_proxies=(),
                 max_connections=MAX_CONNECTIONS, per_address=None, bind_and_activate=True):
        self.app = app
        self.tls = tls  # ssl.SSLContext (SIGHUP may replace it); the handshake happens in the connection's own thread
        self.trusted_proxies = trusted_proxies  # ipaddress networks whose X-Forwarded-For counts
        self.watchdog = ReadWatchdog()
        self.limit = ConnectionLimit("API", max_connections, per_address or connection_share(max_connections))
        super().__init__(address, handler, bind_and_activate)

    def get_request(self):
        return self.limit.accept(super().get_request)

    def process_request(self, request, client_address):
        # Under TLS a refusal is a plain close: an answer needs a handshake, which the accept
        # loop must not wait for (and plain text on a TLS port only confuses the client).
        refuse = _close_connection if self.tls else _refuse_connection
        self.limit.start(lambda: super(Server, self).process_request(request, client_address),
                         request, client_address[0], refuse, self.watchdog.close_idle)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.limit.release(client_address[0])

    def handle_error(self, request, client_address):
        log.exception("connection error", extra={"fields": {"client": client_address[0]}})


def _refuse_connection(sock):
    """Answer 503 without blocking the accept loop: the short answer fits the socket buffer.
    What the client already sent is read first, since closing a socket with unread data makes
    the kernel reset the connection, which can destroy the answer in flight."""
    body = b'{"error": "unavailable", "message": "Too many connections; retry shortly."}\n'
    try:
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.recv(65536)
        sock.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                  b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.close()


def _close_connection(sock):
    with contextlib.suppress(OSError):
        sock.close()


def make_server(sock: socket.socket, app: App, tls=None, trusted_proxies=(),
                max_connections=MAX_CONNECTIONS, per_address=None) -> Server:
    """The API server of a worker, serving ``sock`` (the listener the supervisor bound,
    shared with the other workers: non-blocking, so that a worker that loses the race for a
    connection returns to its loop instead of blocking in accept)."""
    handler = type("BoundRequestHandler", (RequestHandler,), {"app": app})
    server = Server(sock.getsockname(), handler, app, tls, trusted_proxies, max_connections, per_address,
                    bind_and_activate=False)
    server.socket.close()
    sock.setblocking(False)
    server.socket, server.server_address = sock, sock.getsockname()
    return server


# =============================================================================================
# Workers (supervisor, shared counters)
# =============================================================================================

MAX_WORKERS = 256
QUICK_DEATH_SECONDS = 5.0  # a worker dying sooner than this after its start died "at start-up"
MAX_QUICK_DEATHS = 5  # that many in a row: the supervisor gives up (exit 1) instead of looping
SUPERVISOR_CHECK_SECONDS = 0.5  # how often a worker checks that its supervisor still lives
STOP_CHECK_SECONDS = 0.05  # how often a stopping supervisor looks for workers that ended
WORKER_START_SECONDS = 30.0  # the longest the supervisor waits for its first workers to serve


def parse_workers(text: str) -> int:
    """--workers: a count, or ``auto`` (the CPUs this process may run on)."""
    if text == "auto":
        return len(os.sched_getaffinity(0))
    if text.isdigit() and 1 <= int(text) <= MAX_WORKERS:
        return int(text)
    raise ConfigError(f"--workers {text!r} must be a number from 1 to {MAX_WORKERS}, or auto")


def bind_listener(address: tuple[str, int]) -> socket.socket:
    """The API's listening socket, bound by the supervisor and served by every worker."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(Server.request_queue_size)
    except OSError:
        sock.close()
        raise
    return sock


class Supervisor:
    """``run --workers N`` (every ``run``; N = 1 by default): one supervising process and N
    worker processes that serve the API on the listening socket the supervisor bound and
    passed on. The supervisor serves /metrics (the workers' values summed) and logs
    "rtask listening" once its workers serve; it runs no task itself.

    - Start-up: signal handlers first (a SIGHUP sent as soon as the port answers must reload,
      not kill: its default action), then config and keys validated, the state directory
      taken (lock, crash recovery), the listeners bound, each user mistake one ConfigError
      sentence; only then are workers started, each re-executing rtask.py (``_worker``):
      never a fork of this process, whose threads (metrics) a fork would copy in an unknown
      state.
    - SIGHUP: the config is validated here, then the signal goes to every worker (each
      reloads config and keys); an invalid config is logged and not passed on.
    - SIGTERM/SIGINT: every worker gets SIGTERM, drains, and exits; then the supervisor exits 0.
    - A worker that dies unexpectedly is logged, its runs' process groups are stopped (if still
      the same processes) and those runs recorded as ``failure`` with the reason, and a new
      worker takes its place. After MAX_QUICK_DEATHS deaths in a row at start-up, exit 1.
    - Workers watch this process (``watch_supervisor``): a kill -9 of the supervisor leaves
      no worker and no run behind, and frees the port."""

    def __init__(self, args, count: int):
        self.args, self.count = args, count
        self.workers: dict[int, tuple] = {}  # pid → (Popen, monotonic start)
        self.quick_deaths = 0
        self.listener: socket.socket | None = None
        self.store: StateStore | None = None
        self.metrics_server = None  # the metrics listener (SIGHUP re-reads its TLS pair)

    def run(self) -> int:
        received = catch_signals()
        config, keys = self._validated_config()
        args = self.args
        warn_if_keys_missing(args, config)
        api = parse_address(args.api_address, "--api-address")
        metrics_address = parse_address(args.metrics_address, "--metrics-address")
        tls = tls_context(args.tls_cert, args.tls_key)
        parse_networks(args.trusted_proxy, "--trusted-proxy")
        self.store = StateStore.open_exclusive(state_directory(args))
        # Sockets left by the workers of a server that was killed: their pids may come back.
        shutil.rmtree(os.path.dirname(worker_socket_path(self.store.directory, 0)), ignore_errors=True)
        self.listener = listen(args.api_address, lambda: bind_listener(api))
        self.task_names = list(config.tasks)
        registry = self._metrics_registry()
        self.metrics_server = listen(args.metrics_address, lambda: start_metrics_server(
            *metrics_address, registry, args.tls_cert, args.tls_key))
        for _ in range(self.count):
            self._start_worker()
        self._wait_until_serving()
        log.info("rtask listening", extra={"fields": {
            "api": f"{'https' if tls else 'http'}://{api[0]}:{self.listener.getsockname()[1]}",
            "metrics": f"{metrics_address[0]}:{self.metrics_server.server_address[1]}", "tasks": len(config.tasks),
            "keys": len(keys),
            "workers": self.count}})
        while True:
            for signum in received():
                if signum == signal.SIGHUP:
                    self._reload()
                else:
                    return self._stop()
            if not self._replace_dead_workers():
                self._stop()
                return 1

    def _metrics_registry(self):
        """The supervisor's /metrics: the workers' values summed from their files
        (``<state dir>/metrics``, emptied at start: the values of a previous server are not
        this one's), the queue lengths from the state store, and this process's process and
        platform collectors."""
        from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
        from prometheus_client.multiprocess import MultiProcessCollector
        self.metrics_dir = os.path.join(self.store.directory, "metrics")
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        os.makedirs(self.metrics_dir, mode=0o700)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.metrics_dir)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        registry.register(QueueLengths(self))
        return registry

    def _wait_until_serving(self):
        """Until every worker serves (its Unix socket exists: config and keys loaded), one
        has died (the main loop replaces it), or WORKER_START_SECONDS have passed. Only then
        is "rtask listening" logged, so that a key added after that line is in every worker."""
        deadline = time.monotonic() + WORKER_START_SECONDS
        while time.monotonic() < deadline:
            if any(proc.poll() is not None for proc, _ in self.workers.values()) or all(
                    os.path.exists(worker_socket_path(self.store.directory, pid)) for pid in self.workers):
                return
            time.sleep(0.02)

    def _validated_config(self):
        config, keys, problems = load_everything(self.args)
        for warning in problems.warnings:
            log.warning(warning)
        problems.raise_if_errors()
        return config, keys

    def _start_worker(self):
        import subprocess
        args = self.args
        argv = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--api-keys-file",
                args.api_keys_file, "--log-format", args.log_format, "_worker", "--listen-fd",
                str(self.listener.fileno()), "--supervisor", str(os.getpid()), "--state-dir", self.store.directory]
        if args.tls_cert:
            argv += ["--tls-cert", args.tls_cert, "--tls-key", args.tls_key]
        for proxy in args.trusted_proxy:
            argv += ["--trusted-proxy", proxy]
        argv += ["--max-connections", str(args.max_connections)]
        if args.max_connections_per_address:
            argv += ["--max-connections-per-address", str(args.max_connections_per_address)]
        # The worker starts with the signals it catches blocked (a signal mask survives exec)
        # and unblocks them once its handlers are in place: until then a signal passed on to
        # it (a SIGHUP's default action is to kill) waits instead.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, CAUGHT_SIGNALS)
        try:
            proc = subprocess.Popen(argv, pass_fds=[self.listener.fileno()], env=self._worker_environment())
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.workers[proc.pid] = (proc, time.monotonic())

    def _worker_environment(self) -> dict[str, str]:
        return {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir}

    def _replace_dead_workers(self) -> bool:
        """Restart each worker that died; False when workers keep dying at start-up."""
        for pid, (proc, started) in list(self.workers.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.workers[pid]
            log.error("worker died; starting another", extra={"fields": {"pid": pid, "how": how_it_ended(code)}})
            self.worker_ended(pid, worker_death_reason(code))
            quick = time.monotonic() - started < QUICK_DEATH_SECONDS
            self.quick_deaths = self.quick_deaths + 1 if quick else 0
            if self.quick_deaths >= MAX_QUICK_DEATHS:
                log.error("workers keep dying at start-up; giving up", extra={"fields": {"deaths": self.quick_deaths}})
                return False
            if quick:
                time.sleep(min(0.2 * 2 ** self.quick_deaths, 5.0))  # back off a crash loop
            self._start_worker()
        return True

    def worker_ended(self, pid: int, reason: str):
        """Everything a dead worker held: its runs (groups stopped, recorded as failed, their
        slots passed on) and its live metric files."""
        from prometheus_client import multiprocess
        try:
            self.store.recover_crashed(pid, reason)
        except sqlite3.Error as e:  # the supervisor must outlive a busy or full database
            log.error("cannot record the end of a dead worker's runs; the next start will",
                      extra={"fields": {"pid": pid, "problem": str(e)}})
        multiprocess.mark_process_dead(pid, self.metrics_dir)
        self._remove_socket(pid)

    def _remove_socket(self, pid: int):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(worker_socket_path(self.store.directory, pid))

    def _reload(self):
        log.info("SIGHUP: validating the configuration before passing it on to the workers")
        try:
            self.task_names = list(self._validated_config()[0].tasks)
        except ConfigError as e:
            log.error("reload failed; the previous configuration stays in force", extra={"fields": {"problem": str(e)}})
            return
        reload_tls(self.args, None, self.metrics_server)  # the workers read it for the API
        for proc, _ in self.workers.values():
            proc.send_signal(signal.SIGHUP)

    def _stop(self) -> int:
        """SIGTERM every worker and wait until all have drained and exited."""
        log.info("shutting down: the workers finish their running tasks")
        self.store.mark_draining()
        self.listener.close()  # the workers' copies close as each one starts draining
        for proc, _ in self.workers.values():
            proc.send_signal(signal.SIGTERM)
        draining = dict(self.workers)
        while draining:  # each as it ends: a worker killed while the others drain is handled at once
            for pid, (proc, _) in list(draining.items()):
                code = proc.poll()
                if code is None:
                    continue
                del draining[pid]
                if code < 0:
                    self.worker_ended(pid, worker_death_reason(code))
                elif code:
                    self.worker_ended(pid, "rtask: the worker process running this task did not drain cleanly")
                self._remove_socket(pid)
            time.sleep(STOP_CHECK_SECONDS)
        log.info("stopped")
        return 0


def how_it_ended(returncode: int) -> str:
    """A worker's end as Popen reports it (negative: killed by that signal), in words."""
    return f"signal {-returncode}" if returncode < 0 else f"exit status {returncode}"


def worker_death_reason(returncode: int) -> str:
    """The stderr of the runs of a worker that died (README, Workers)."""
    return f"rtask: the worker process running this task died ({how_it_ended(returncode)})"


class QueueLengths:
    """task_queue_length for the supervisor's /metrics: the runs waiting in line in every
    worker, read from the state store (a callback gauge cannot cross processes)."""

    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        family = GaugeMetricFamily("task_queue_length", "Requests waiting for a concurrency slot.", labels=["handler"])
        counts = dict(self.supervisor.store.query_all(
            "SELECT task, count(*) FROM runs WHERE status = 'queued' AND expires_at IS NULL GROUP BY task"))
        for name in self.supervisor.task_names:
            family.add_metric([name], counts.get(name, 0))
        yield family

    def describe(self):
        return []


def watch_supervisor(supervisor: int, store: StateStore):
    """A worker's guard against becoming an orphan: once its supervisor is gone (kill -9),
    stop this worker's runs (their groups, recorded as failed) and exit, so that nothing runs
    unsupervised and the listening port is freed."""
    def watch():
        while os.getppid() == supervisor:
            time.sleep(SUPERVISOR_CHECK_SECONDS)
        store.write_pending()  # every spawned run's row that waits, so that its group is found
        # A slot freed from now on is not handed on: the run it would start, maybe in another
        # orphaned worker that has not noticed yet, would have nobody left to stop it.
        store.hands_on_slots = False
        store.recover_crashed(os.getpid(), "rtask: the supervisor of the worker running this task died")
        os._exit(1)
    threading.Thread(target=watch, name="rtask-supervisor-watch", daemon=True).start()


# -- any worker answers: forwarding to the worker that runs the run ---------------------------

# What the first worker found out about a request, for the worker it forwards it to: the
# caller's address (--trusted-proxy included: for allowedNetworks and logs) and who the caller
# is (so the credential is not checked, counted and maybe Argon2-hashed a second time).
# Believed only on the workers' Unix sockets (mode 0600, reachable by the server's own user);
# a client's own headers of these names are dropped there, and ignored over TCP.
FORWARDED_CLIENT_HEADER = "X-Rtask-Client"
FORWARDED_CALLER_HEADER = "X-Rtask-Caller"
_FORWARDING_HEADERS = {FORWARDED_CLIENT_HEADER.lower(), FORWARDED_CALLER_HEADER.lower()}
FORWARD_TIMEOUT = MAX_LONG_POLL_SECONDS + SSE_HEARTBEAT_SECONDS + 15  # silence from the owner's answer
OWNER_GONE_WAIT = KILL_GRACE_SECONDS + 8  # seconds to wait for the end of a dead worker's run to be recorded
OWNER_GONE_POLL = 0.05
OWNER_EXIT_WAIT = 1.0  # seconds a worker that closed a relayed answer early has to be seen exited
_RESULT_EVENT = b"\nevent: result\n"  # (data lines are JSON strings: no newline within)


def owner_unreachable() -> Reject:
    return Reject(503, "unavailable", "The worker running this run cannot be reached; retry shortly.",
                  None, [("Retry-After", "1")])


def worker_socket_path(state_dir: str, pid: int) -> str:
    return os.path.join(state_dir, "workers", f"{pid}.sock")


def answered_by_owner(h: RequestHandler, state: TaskState, run: Run) -> Run | None:
    """A request about a run that is live in another worker is answered by that worker (see
    _relay_to_owner): None then. Else the run to answer here: this worker's own, an ended
    one, or, when its owner has died before answering, the run's end as the supervisor
    records it (it first stops the run's process group: up to KILL_GRACE_SECONDS), so that
    a long-poll, an event stream or a read of a dead worker's run still gets its result."""
    if run.done.is_set() or run.owner == os.getpid() or getattr(h, "forwarded", False):
        return run
    relayed = _relay_to_owner(h, run)
    if relayed.complete:
        return None
    ended = _recorded_end(state, run)
    if relayed.stream_started:  # the owner died mid-stream: the stream gets its result here
        if ended:
            h.wfile.write(f"event: result\ndata: {json.dumps(ended.to_json())}\n\n".encode())
        return None
    if ended is None:
        raise owner_unreachable()
    return ended


def _recorded_end(state: TaskState, run: Run) -> Run | None:
    """The ended run as stored, once the supervisor has recorded the end of its dead owner's
    runs; None if its owner is alive (its connection line was full) or that takes too long."""
    if not _owner_died(run):
        return None
    deadline = time.monotonic() + OWNER_GONE_WAIT
    while time.monotonic() < deadline:
        stored = state.runs.store.load(run.task, run.id)
        if stored is None or stored.done.is_set():
            return stored
        time.sleep(OWNER_GONE_POLL)
    return None


@dataclasses.dataclass
class _Relayed:
    complete: bool  # the owner's whole answer reached the client (or the client left)
    stream_started: bool = False  # an event stream was relayed, but not its result event


def _relay_to_owner(h: RequestHandler, run: Run) -> _Relayed:
    """Pass the request (line, headers, ``Connection: close``, no body) to the owner's Unix
    socket and its answer's bytes back as they arrive (so an event stream stays live). Not
    complete when the owner cannot be reached or its answer ends early: it died. An answer
    ends with the owner closing the connection; an event stream's last event is ``result``."""
    try:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:  # out of descriptors
        raise owner_unreachable() from None
    upstream.settimeout(FORWARD_TIMEOUT)
    try:
        upstream.connect(worker_socket_path(h.app.store.directory, run.owner))
    except OSError:  # it died (the supervisor records its runs' end in a moment) or its line is full
        upstream.close()
        return _Relayed(complete=False)
    with upstream:
        h.discard_body()
        h.close_connection = True
        caller = {"name": h.caller.name, "kind": h.caller.kind, "grants": sorted(h.caller.grants)}
        head_lines = [f"{h.command} {h.target} HTTP/1.1", f"{FORWARDED_CLIENT_HEADER}: {h.client()}",
                      f"{FORWARDED_CALLER_HEADER}: {json.dumps(caller)}"]  # JSON escapes all but ASCII
        head_lines += [f"{name}: {value}" for name, values in h.headers.items()
                       if name not in ("connection", "content-length", "transfer-encoding", *_FORWARDING_HEADERS)
                       for value in values]
        try:
            # Header values are the client's bytes (read as UTF-8 with surrogateescape): sent back as they came.
            upstream.sendall(("\r\n".join(head_lines) + "\r\nConnection: close\r\n\r\n").encode("utf-8", "surrogateescape"))
        except OSError:  # it died just now (else it is unreachable: 503)
            return _Relayed(complete=False)
        head, tail, result_seen = b"", b"", False
        while True:
            try:
                chunk = upstream.recv(READ_CHUNK)
            except TimeoutError:  # the owner fell silent: the connection ends
                log.debug("forwarded answer cut off", extra={"fields": {"owner": run.owner, "problem": "timeout"}})
                return _Relayed(complete=True)
            except OSError:  # (reset: it died mid-answer)
                chunk = b""
            if not chunk:
                break
            try:
                h.wfile.write(chunk)
            except OSError:  # the client left
                return _Relayed(complete=True)
            head += chunk[:1024 - len(head)]  # the status line and headers
            window = tail + chunk  # (a marker split between two reads is still found)
            result_seen = result_seen or _RESULT_EVENT in window
            tail = window[-len(_RESULT_EVENT):]
    # Closed. An answer with a head is whole (the owner closes after it), but for an event
    # stream without its result: then, and with nothing at all, the owner may have died.
    stream_cut = b"text/event-stream" in head and not result_seen and h.command != "HEAD"
    if (head and not stream_cut) or not _owner_died(run):
        return _Relayed(complete=True)
    return _Relayed(complete=False, stream_started=stream_cut)


def _owner_died(run: Run) -> bool:
    """Has the run's owner exited? Its sockets close before it becomes a zombie, so a
    connection closed by a dying worker may come just before: allow it a moment."""
    deadline = time.monotonic() + OWNER_EXIT_WAIT
    while process_alive(run.owner):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


class _ForwardedRequestHandler(RequestHandler):
    """A request that another worker forwarded over this worker's Unix socket: no TCP, no
    TLS, and never forwarded again."""

    forwarded = True

    def client(self) -> str:
        return self.headers.get(FORWARDED_CLIENT_HEADER.lower()) or "worker"

    def authenticate(self) -> Caller:
        """The caller the forwarding worker authenticated (a request is only forwarded after
        its credential passed there)."""
        try:
            fields = json.loads(self.headers.get(FORWARDED_CALLER_HEADER.lower()) or "")
            return Caller(fields["name"], fields["kind"], frozenset(fields["grants"]))
        except (ValueError, KeyError, TypeError):
            raise unauthorized("invalid_header", "A forwarded request must name its caller.") from None

    def setup(self):
        self.request.settimeout(SOCKET_WRITE_TIMEOUT)
        self.handshake_failed = False
        BaseHTTPRequestHandler.setup(self)


class _ForwardingListener(Server):
    """The API on ``<state dir>/workers/<pid>.sock`` (mode 0600) for the other workers."""

    def get_request(self):
        request, _ = self.limit.accept(self.socket.accept)
        return request, ("worker", 0)  # the peer of a Unix socket has no address


def serve_forwarded_requests(app: App):
    """Start this worker's Unix listener (the supervisor removes it when the worker ends)."""
    path = worker_socket_path(app.store.directory, os.getpid())
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a dead worker's, whose pid this one got
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(Server.request_queue_size)
    handler = type("BoundForwardedRequestHandler", (_ForwardedRequestHandler,), {"app": app})
    # Every request here comes from the other workers: one peer, which may use the whole cap.
    server = _ForwardingListener(path, handler, app, per_address=MAX_CONNECTIONS, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    threading.Thread(target=server.serve_forever, name="rtask-forwarded", daemon=True).start()


# =============================================================================================
# Metrics (separate listener)
# =============================================================================================


class Metrics:
    """The Prometheus metrics of README §11 and §8, as a worker records them.

    prometheus_client gives one bucket set per metric, but each task may configure its own
    (durationHistogramBuckets), so task_duration_seconds is one client Histogram per bucket set,
    outside any registry; the rest are the client library's own types. Every value lives in
    the files of PROMETHEUS_MULTIPROC_DIR (set by the supervisor), which the supervisor's
    MultiProcessCollector sums (its labels keep each task's buckets apart); the queue gauge is
    the supervisor's (QueueLengths), read from the state store."""

    DEFAULT_BUCKETS = (.005, .01, .025, .05, .075, .1, .25, .5, .75, 1.0, 2.5, 5.0, 7.5, 10.0)

    def __init__(self):
        from prometheus_client import Counter, Histogram
        self._buckets: dict[str, tuple[float, ...]] = {}
        self._durations: dict[tuple[float, ...], Histogram] = {}  # bucket set → its histogram
        self._histograms: dict[str, Histogram] = {}  # task name → its histogram (set by configure)
        self._lock = threading.Lock()
        self.rejections = Counter("task_rejection_total", "Requests refused before running, by reason.",
                                  ["handler", "reason"])
        self.auth_requests = Counter("auth_requests_total", "Credential checks.", ["method", "result"])
        self.auth_failures = Counter("auth_failures_total", "Failed credential checks, by reason.", ["reason"])
        self.permission_denials = Counter("permission_denials_total", "Valid credentials lacking a permission.",
                                          ["permission"])
        self.jwt_seconds = Histogram("auth_jwt_verification_duration_seconds", "Time to verify a JWT.",
                                     ["result"], buckets=(.0005, .001, .0025, .005, .01, .025, .1, 1.0, 10.0))

    def observe_run(self, run: Run):
        histogram = self._histograms.get(run.task.name) or self._duration_histogram(self.DEFAULT_BUCKETS)
        status = run.status if run.status in ("success", "timeout") else "failure"
        histogram.labels(run.task.name, run.caller.name, status).observe(run.duration)

    def _duration_histogram(self, buckets: tuple[float, ...]):
        from prometheus_client import Histogram
        with self._lock:
            histogram = self._durations.get(buckets)
            if histogram is None:
                histogram = self._durations[buckets] = Histogram(
                    "task_duration_seconds", "Duration of task executions.", ["handler", "api_key_used", "status"],
                    buckets=buckets, registry=None)
            return histogram

    def count_rejection(self, task: str, reason: str):
        self.rejections.labels(task, reason).inc()

    def auth_result(self, method: str, failure_reason: str | None):
        self.auth_requests.labels(method, "failure" if failure_reason else "success").inc()
        if failure_reason:
            self.auth_failures.labels(failure_reason).inc()

    def permission_denied(self, permission: str):
        self.permission_denials.labels(permission).inc()

    def jwt_verification(self, seconds: float, result: str):
        self.jwt_seconds.labels(result).observe(seconds)

    def configure(self, config: Config):
        """Per-task buckets, at start and on reload. A task whose buckets changed starts new
        series (old counts in other buckets cannot be carried over)."""
        buckets = {name: t.histogram_buckets or self.DEFAULT_BUCKETS for name, t in config.tasks.items()}
        with self._lock:
            changed = {name for name in self._buckets if buckets.get(name) != self._buckets[name]}
            self._buckets = buckets
            histograms = list(self._durations.values())
        for histogram in histograms:
            for labels in [k for k in histogram._metrics if k[0] in changed]:
                histogram.remove(*labels)
        self._histograms = {name: self._duration_histogram(b) for name, b in buckets.items()}
        self._preinitialise(config)

    # README §5's table: the reasons every task can be refused for, as in the Go RTask.
    REJECTION_REASONS = ("missing_key", "invalid_header", "invalid_key_encoding", "invalid_key",
                         "key_not_allowed", "limit_exceeded", "max_concurrent", "input_too_large",
                         "invalid_content")
    JWT_REJECTION_REASONS = ("invalid_token", "token_expired", "unknown_permission")
    STATUSES = ("success", "failure", "timeout")

    def _preinitialise(self, config: Config):
        """Create at 0 every series whose labels are known now (README §11), so that increase()
        and alerts see a task's first failure: a series born at its first event has no earlier
        sample to compare with. Series of callers or tasks that went away keep their counts."""
        for name, task in config.tasks.items():
            reasons = self.REJECTION_REASONS + (self.JWT_REJECTION_REASONS if config.auth.jwt else ())
            reasons += ("invalid_signature",) if task.signed_webhook else ()
            reasons += ("invalid_parameter",) if task.parameters else ()
            reasons += ("network_not_allowed",) if task.isolation and task.isolation.allowed_networks else ()
            for reason in reasons:
                self.rejections.labels(name, reason)
            histogram = self._duration_histogram(self._buckets[name])
            for caller in self._callers(config, task):
                for status in self.STATUSES:
                    histogram.labels(name, caller, status)

    @staticmethod
    def _callers(config: Config, task: TaskSpec) -> set[str]:
        """The api_key_used values a task's runs can have that are known before any request:
        its keys (apiKeyNames, and keyPermissions grants that cover it), its webhook names,
        and its signed webhook's provider. JWT subjects are not known in advance."""
        names = set(task.api_key_names) | {name for name, _ in task.webhooks}
        names |= {key for key, _ in config.auth.key_permissions
                  if holds_permission(config.key_grants(key), f"tasks:run:{task.name}")}
        if task.signed_webhook:
            names.add(task.signed_webhook.provider)
        return names


def start_metrics_server(host: str, port: int, registry, cert=None, key=None):
    """Serve the supervisor's ``registry`` on /metrics with the client library's own server
    (HTTPS with the API's certificate when given; its default context allows TLS 1.2 or
    newer); returns that server (its ``server_address`` holds the bound port)."""
    from prometheus_client import start_http_server
    httpd, _ = start_http_server(port, addr=host, certfile=cert, keyfile=key, registry=registry)
    _bound_connections(httpd)
    _answer_head_like_get(httpd)
    if cert:
        # The library wraps the listening socket, so each handshake would run in its single
        # accept loop, where one silent client stalls every scrape. Deferred, the handshake
        # happens in the connection's own thread on its first read.
        httpd.socket.do_handshake_on_connect = False
    return httpd


def reload_metrics_tls(httpd, cert: str, key: str):
    """SIGHUP: new metrics connections get the pair now in the files. The library wrapped its
    listening socket with its own context, which cannot be swapped, but a context can load a
    new pair (connections already open keep theirs). The caller has checked the pair with
    tls_context first, since a failed load could leave the context half changed."""
    httpd.socket.context.load_cert_chain(cert, key)


def _answer_head_like_get(httpd):
    """The library's WSGI app answers HEAD with 405 and a body; a HEAD is a GET without the
    body (RFC 9110 §9.3.2), as on the API listener: same status and headers, Content-Length
    included, nothing after them."""
    app = httpd.get_app()

    def head_as_get(environ, start_response):
        if environ.get("REQUEST_METHOD") != "HEAD":
            return app(environ, start_response)
        answer = []
        body = b"".join(app({**environ, "REQUEST_METHOD": "GET"}, lambda *a: answer.extend(a)))
        status, headers = answer[0], list(answer[1])
        if not any(name.lower() == "content-length" for name, _ in headers):
            headers.append(("Content-Length", str(len(body))))  # wsgiref adds it for GET only
        start_response(status, headers)
        return []

    httpd.set_app(head_as_get)


def _bound_connections(httpd):
    """The library's server gives each connection a thread for as long as the client likes.
    Bound both, on this instance (its accept loop looks the methods up on it), as the API
    listener is bound: at most METRICS_MAX_CONNECTIONS at once and a share of them per peer
    address (ConnectionLimit), each given METRICS_REQUEST_TIMEOUT in all to send its request
    and be answered (a per-read timeout alone lets a client trickle a header byte every few
    seconds forever) and dropped after METRICS_SOCKET_TIMEOUT of silence."""
    limit = ConnectionLimit("metrics", METRICS_MAX_CONNECTIONS, connection_share(METRICS_MAX_CONNECTIONS))
    watchdog = ReadWatchdog()
    accept, process, process_in_thread = httpd.get_request, httpd.process_request, httpd.process_request_thread

    def get_request():
        request, address = limit.accept(accept)
        request.settimeout(METRICS_SOCKET_TIMEOUT)
        return request, address

    def process_request(request, address):
        limit.start(lambda: process(request, address), request, address[0], httpd.shutdown_request)

    def process_request_thread(request, address):
        watchdog.arm(request, METRICS_REQUEST_TIMEOUT)
        try:
            process_in_thread(request, address)
        finally:
            watchdog.disarm(request)
            limit.release(address[0])

    httpd.get_request, httpd.process_request = get_request, process_request
    httpd.process_request_thread = process_request_thread


# =============================================================================================
# Logging (one line per event, text or JSON, never a secret)
# =============================================================================================

log = logging.getLogger("rtask")


class TextFormatter(logging.Formatter):
    """``time level message key=value ...``: one line, values quoted when they need it."""

    def format(self, record):
        fields = getattr(record, "fields", {})
        parts = [_utc_stamp(record.created), record.levelname.lower(), _quote(record.getMessage())]
        parts += [f"{k}={_quote(str(v))}" for k, v in fields.items()]
        if record.exc_info:
            parts.append("error=" + _quote(self.formatException(record.exc_info)))
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record):
        entry = {"time": _utc_stamp(record.created), "level": record.levelname.lower(),
                 "msg": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _utc_stamp(t: float) -> str:
    return f"{_utc_second(int(t))}.{int(t % 1 * 1000):03d}Z"


@functools.lru_cache(maxsize=4)
def _utc_second(second: int) -> str:
    """The stamp up to the second: formatted once a second, not on every line (strftime was
    a sixth of a line's cost under load)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


_UNQUOTED = re.compile(r"[^\s\"=]+")


def _quote(text: str) -> str:
    return text if _UNQUOTED.fullmatch(text) else json.dumps(text)


def setup_logging(log_format: str):
    # Per the logging HOWTO's optimization notes: no caller frame walk, thread or process
    # lookup per record; rtask's lines do not show them, and they cost ~20% of a request.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    source = "RTASK_LOG" if os.environ.get("RTASK_LOG") else "GO_LOG"
    level_name = (os.environ.get(source) or "info").lower()
    levels = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "warn": logging.WARNING, "error": logging.ERROR}
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(levels.get(level_name, logging.INFO))
    if level_name not in levels:
        log.warning(f"unknown log level {level_name!r} in {source}; using info")


# =============================================================================================
# CLI
# =============================================================================================


def parse_address(text: str, option: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{option} {text!r} must be HOST:PORT, like localhost:8800")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_networks(texts: list[str], option: str) -> tuple:
    import ipaddress
    networks = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigError(f"{option} {text!r} must be an IP address or network, like 127.0.0.1 or 10.0.0.0/8") from None
    return tuple(networks)


def load_everything(args) -> tuple[Config, dict[str, StoredKey], Problems]:
    """Config and keys exactly as ``run`` uses them, with every problem collected."""
    problems = Problems()
    config = load_config(args.config, problems)
    try:
        keys = parse_key_file(args.api_keys_file)
    except ConfigError as e:
        problems.errors.append(str(e))
        keys = {}
    warn_about_key_names(config, set(keys), args.api_keys_file, problems)
    return config, keys, problems


def cmd_run(args) -> int:
    """``run``: the supervisor, with --workers worker processes (see Supervisor)."""
    return Supervisor(args, parse_workers(args.workers)).run()


def cmd_worker(args) -> int:
    """The hidden ``_worker`` command: one of the supervisor's workers (see Supervisor)."""
    # First, before any thread: the supervisor started this process with the signals
    # blocked, and a SIGHUP or SIGTERM it passed on since then waits in line until the loop
    # of serve_worker (a worker killed by a SIGHUP's default action while it loaded was
    # replaced by one that met the next SIGHUP: a stream of them stopped the server).
    received = catch_signals()
    store = StateStore(state_directory(args))
    watch_supervisor(args.supervisor, store)
    return serve_worker(args, socket.socket(fileno=args.listen_fd), store, received)


def serve_worker(args, sock: socket.socket, store: StateStore, received) -> int:
    """A worker's body: serve the API on the supervisor's listener ``sock`` until SIGTERM/
    SIGINT (drain, exit 0); SIGHUP reloads config, keys and the API's TLS pair. The
    supervisor has validated everything and owns the state directory and /metrics.
    ``received`` gives the signals caught (catch_signals)."""
    config, keys, problems = load_everything(args)
    for warning in problems.warnings:
        log.warning(warning)
    problems.raise_if_errors()
    tls = tls_context(args.tls_cert, args.tls_key)
    trusted_proxies = parse_networks(args.trusted_proxy, "--trusted-proxy")
    metrics = Metrics()
    app = App(config, KeyRing(args.api_keys_file, keys, Argon2Slots(store.directory)), metrics, store)
    server = make_server(sock, app, tls, trusted_proxies, args.max_connections, args.max_connections_per_address)
    gc.freeze()  # start-up objects never become garbage; keep them out of every collection
    serve_forwarded_requests(app)
    if not start_thread(server.serve_forever, "rtask-accept"):
        raise ConfigError("cannot start the thread that accepts connections; check the process limit "
                          "(ulimit -u, systemd TasksMax)")
    log.debug("worker serving", extra={"fields": {"pid": os.getpid(), "keys": len(keys)}})
    if app.starting and not start_thread(app.prepare_auth, "rtask-prepare"):
        app.prepare_auth()  # here, then: signals wait until it is done (at most the JWKS timeout)
    while True:
        for signum in received():
            if signum == signal.SIGHUP:
                reload_files(args, app)
                reload_tls(args, server, None)
            else:
                drain(server, app)
                return 0


CAUGHT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def catch_signals():
    """Catch SIGTERM, SIGINT and SIGHUP from now on (installed before anything can observe the
    server: a SIGHUP's default action is to kill) and keep them for the main loop. Returns
    ``received()``: waits up to 0.25 s for one, then gives the signals caught since the last
    call, each once, SIGHUP first (so a SIGTERM that came with it is the last word).

    The handler takes no lock and allocates nothing that grows: a signal can interrupt the
    handler of the one before, or the main thread anywhere, and a handler that took a lock
    (threading.Event.set) deadlocked there, and a burst of them overflowed the stack. The
    interpreter's own C handler writes to the wakeup pipe, so the main thread wakes at once
    whichever thread the kernel delivered the signal to; the timeout is only a backstop."""
    pending: set[int] = set()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for sig in CAUGHT_SIGNALS:
        signal.signal(sig, lambda signum, frame: pending.add(signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, CAUGHT_SIGNALS)  # (a worker starts with them blocked)
    wakeup = select.poll()
    wakeup.register(wake_r, select.POLLIN)

    def received() -> list[int]:
        wakeup.poll(250)
        try:
            while os.read(wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        caught = [sig for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT) if sig in pending]
        pending.difference_update(caught)  # (one coming now is one just seen: nothing is lost)
        return caught
    return received


def start_thread(target, name: str) -> bool:
    """Start one of the server's own daemon threads; False, with one warning line, when a
    process or thread limit refuses it (the caller decides what to do without it)."""
    try:
        threading.Thread(target=target, name=name, daemon=True).start()
    except (RuntimeError, MemoryError) as e:
        log.warning("cannot start a thread", extra={"fields": {"thread": name, "problem": str(e)}})
        return False
    return True


def state_directory(args) -> str:
    """--state-dir, by default ``rtask-state`` next to the config file."""
    return args.state_dir or os.path.join(os.path.dirname(os.path.abspath(args.config)), "rtask-state")


def listen(address: str, start):
    try:
        return start()
    except OSError as e:
        raise ConfigError(f"cannot listen on {address}: {e.strerror}") from None


def tls_context(cert: str | None, key: str | None):
    """TLS 1.2 or newer for the API listener, or None for plain HTTP."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise ConfigError("--tls-cert and --tls-key go together; give both")
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot use the TLS certificate {cert} with key {key}: "
                          f"{getattr(e, 'strerror', None) or e}") from None
    return context


def reload_tls(args, server: Server | None, metrics_server):
    """SIGHUP: read the certificate and key again (a renewed certificate), for the connections
    that come next on the listeners this process serves (a worker serves only the API, its
    supervisor only the metrics). A pair that cannot be used is reported and the pair in use
    stays."""
    if not args.tls_cert:
        return
    try:
        context = tls_context(args.tls_cert, args.tls_key)
        if metrics_server:
            reload_metrics_tls(metrics_server, args.tls_cert, args.tls_key)
    except (ConfigError, OSError, ValueError) as e:  # ssl.SSLError is an OSError
        log.error("TLS certificate reload failed; the previous certificate stays in use",
                  extra={"fields": {"problem": str(e)}})
        return
    if server:
        server.tls = context
    log.info("TLS certificate reloaded", extra={"fields": {"cert": args.tls_cert}})


def reload_files(args, app: App):
    """SIGHUP: load config.toml and keys.toml again; an invalid config is reported and the old
    one stays in force."""
    log.info("SIGHUP: reloading the configuration and keys")
    try:
        config, _, problems = load_everything(args)
        for warning in problems.warnings:
            log.warning(warning)
        problems.raise_if_errors()
        app.reload(config)
    except (ConfigError, sqlite3.Error) as e:
        log.error("reload failed; the previous configuration stays in force", extra={"fields": {"problem": str(e)}})
        return
    app.keyring.reload_if_changed(force=True)
    log.info("configuration reloaded", extra={"fields": {"tasks": len(config.tasks)}})


def drain(server: Server, app: App):
    """Stop accepting (new requests on open connections get 503), cancel async runs still
    waiting for a slot, let running executions finish within their timeouts and answer them.
    Whatever still runs at the deadline is stopped, so that no process outlives the server."""
    log.info("shutting down: finishing running tasks")
    app.draining = True  # from now on a slot granted to an async run in line does not start it
    for state in app.tasks.values():
        for run in state.runs.live():
            if run.task.is_async:  # (a sync request waiting in line may still get its slot)
                app.cancel_queued(state, run)
    server.shutdown()  # (up to half a second: the accept loop's poll interval)
    server.server_close()
    longest = max((t.timeout_seconds + t.queue_timeout_seconds for t in app.config.tasks.values()), default=0)
    deadline = time.monotonic() + longest + KILL_GRACE_SECONDS + 1
    while app.busy() and time.monotonic() < deadline:
        time.sleep(0.05)
    if app.executor.running:
        log.warning("stopping the runs still going at the drain deadline")
        app.executor.stop_all()
        deadline = time.monotonic() + KILL_GRACE_SECONDS + 1
        while (app.executor.running or app.executor.pending_kills) and time.monotonic() < deadline:
            time.sleep(0.05)
    app.store.write_pending()
    log.info("stopped")


def cmd_add_key(args) -> int:
    token = add_key(args.api_keys_file, args.name)
    print(f"API-KEY: {token}")
    return 0


def cmd_list_keys(args) -> int:
    keys = parse_key_file(args.api_keys_file)
    if not keys:
        print(f"no keys in {args.api_keys_file} (create one with: rtask add-key NAME)", file=sys.stderr)
    for key in sorted(keys.values(), key=lambda k: k.id):
        print(f"{key.id:>3}  {key.name}")
    return 0


def cmd_remove_key(args) -> int:
    remove_key(args.api_keys_file, args.name)
    print(f"removed key {args.name!r}", file=sys.stderr)
    return 0


def cmd_check_config(args) -> int:
    config, keys, problems = load_everything(args)
    for warning in problems.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for error in problems.errors:
        print(f"error: {error}", file=sys.stderr)
    if problems.errors:
        return 1
    print(f"{args.config}: OK, {len(config.tasks)} task(s), {len(keys)} key(s)")
    return 0


def cmd_show_permissions(args) -> int:
    """The permission vocabulary, then the grants in force from config.toml (if readable)."""
    rows = [("tasks:run / tasks:run:<task>", "POST /tasks/<task>"),
            ("tasks:read / tasks:read:<task>", "GET /tasks/<task>/<id>, .../events"),
            ("tasks:list / tasks:list:<task>", "GET /tasks, GET /tasks/<task>"),
            ("tasks:cancel / tasks:cancel:<task>", "DELETE /tasks/<task>/<id>"),
            ("system:config_read", "GET /config (when configEndpointEnabled)"),
            ("tasks:*, system:*", "every permission of that resource"),
            ("*", "everything (a warning is logged when granted)")]
    print("PERMISSION                            ALLOWS")
    for permission, allows in rows:
        print(f"{permission:<37} {allows}")
    try:
        config = load_config(args.config, Problems())
    except ConfigError:
        return 0
    print(f"\nGrants in force ({args.config}):")
    names = sorted({n for t in config.tasks.values() for n in t.api_key_names}
                   | {n for n, _ in config.auth.key_permissions})
    for name in names:
        print(f"  key {name}: {', '.join(sorted(config.key_grants(name)))}")
    if config.auth.jwt:
        print(f"  JWTs: what their {config.auth.jwt.permissions_claim!r} claim lists")
    return 0


def cmd_generate_keys(args) -> int:
    """An RSA key pair for signing tokens: private key 0600, written atomically."""
    _import_jwt()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    if not 2048 <= args.key_size <= 16384:
        raise ConfigError(f"--key-size {args.key_size} is out of range; use 2048 to 16384 (4096 is plenty)")
    private_path = os.path.join(args.output_dir, "jwt-private-key.pem")
    public_path = os.path.join(args.output_dir, "jwt-public-key.pem")
    for path in (private_path, public_path):
        if os.path.exists(path):  # tokens signed with the old key would stop working
            raise ConfigError(f"{path} already exists; move it away first or use another --output-dir")
    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {args.output_dir}: {e.strerror}") from None
    private = rsa.generate_private_key(public_exponent=65537, key_size=args.key_size)
    private_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    write_file_atomically(private_path, private_pem, 0o600)
    write_file_atomically(public_path, public_pem, 0o644)
    print(f"wrote {private_path} (keep it secret) and {public_path}", file=sys.stderr)
    return 0


def cmd_generate_token(args) -> int:
    jwt = _import_jwt()
    permissions = [p.strip() for p in args.permissions.split(",") if p.strip()]
    unknown = [p for p in permissions if not is_known_permission(p)]
    if unknown:
        raise ConfigError(f"unknown permission {unknown[0]!r} (see rtask show-permissions)")
    try:
        with open(args.private_key, "rb") as f:
            private_key = f.read()
    except OSError as e:
        raise ConfigError(f"{args.private_key}: cannot read the private key: {e.strerror}") from None
    now = int(time.time())
    claims = {"sub": args.subject, "iss": args.issuer, "aud": args.audience, "iat": now,
              "exp": now + int(args.expiry_hours * 3600), "permissions": permissions}
    try:
        token = jwt.encode(claims, private_key, algorithm="RS256",
                           headers={"kid": args.kid} if args.kid else None)
    except (ValueError, TypeError, jwt.PyJWTError):
        raise ConfigError(f"{args.private_key}: not an RSA private key in PEM form") from None
    print(token)
    return 0


def cmd_validate_token(args) -> int:
    """Check a token against a public key (or [auth.jwt] of the config) and show its claims."""
    jwt = _import_jwt()
    if args.public_key:
        problems = Problems()
        pem = _jwt_public_key(f"--public-key {args.public_key}", os.getcwd(),
                              {"public_key_path": args.public_key}, problems)
        problems.raise_if_errors()
        spec = JwtSpec(public_key=pem, issuer=args.issuer, audience=args.audience)
    else:
        problems = Problems()
        config = load_config(args.config, problems)
        problems.raise_if_errors()
        if not config.auth.jwt:
            raise ConfigError(f"{args.config} has no [auth.jwt]; pass --public-key PATH")
        spec = config.auth.jwt
    lenient = AuthSpec(strict_validation=False, log_unknown_permissions=False)
    verifier = JwtVerifier(spec, lenient, Metrics())
    verifier.prepare()
    try:
        caller = verifier.verify(args.token)
    except Reject as r:
        print(f"invalid: {r.message}", file=sys.stderr)
        return 1
    claims = jwt.decode(args.token, options={"verify_signature": False})
    print(f"valid token for subject {caller.name!r}")
    print(f"issuer: {claims['iss']}")
    audience = claims["aud"]
    print(f"audience: {', '.join(audience) if isinstance(audience, list) else audience}")
    for claim, label in (("iat", "issued"), ("nbf", "not before"), ("exp", "expires")):
        if claim in claims:
            print(f"{label}: {_rfc3339(claims[claim])}")
    print("permissions:")
    for permission in sorted(caller.grants):
        print(f"  {permission}{'' if is_known_permission(permission) else '   (unknown permission)'}")
    return 0


# -- rtask call: the CI client ----------------------------------------------------------------


class CallRefused(Exception):
    """The server refused the call (or could not be reached): exit 2 with its message."""


class CallClient:
    """A small HTTP client for ``rtask call``: credentials from the environment, JSON or
    Server-Sent Events back, one connection per request, an overall deadline."""

    def __init__(self, url: str, timeout: float | None):
        from urllib.parse import urlsplit
        try:
            parts = urlsplit(url)
            port = parts.port  # ValueError for a port that is not a number below 65536
        except ValueError:
            parts = port = None
        if not parts or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"RTASK_URL / --url {url!r} must look like http://host:8800")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, port
        self.prefix = parts.path.rstrip("/")
        self.deadline = time.monotonic() + timeout if timeout else None
        self.following: str | None = None  # path of the async run being followed (for Ctrl-C)
        self.headers = {}
        if token := os.environ.get("RTASK_AUTH_TOKEN"):
            self.headers["Authorization"] = f"Bearer {token}"
        elif key := os.environ.get("RTASK_API_KEY"):
            self.headers[os.environ.get("RTASK_API_KEY_HEADER") or "X-API-Key"] = key
        for name, value in self.headers.items():
            if not _HEADER_NAME.fullmatch(name) or not value.isprintable() or not value.isascii():
                raise ConfigError(f"the credential for the {name!r} header (from the environment) "
                                  "holds a character that cannot go into a header")

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def open(self, method: str, path: str, body: bytes = b"", stream=False):
        """Send a request; the response object, or CallRefused for any non-2xx answer."""
        import http.client
        timeout = self.remaining()
        if timeout is not None and timeout <= 0:
            raise TimeoutError
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=timeout)  # None: as long as the task takes
        headers = dict(self.headers)
        if stream:
            headers["Accept"] = "text/event-stream"
        try:
            conn.request(method, self.prefix + path, body=body, headers=headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, TimeoutError):
                raise
            raise CallRefused(f"cannot reach {self.scheme}://{self.host}:{self.port}: {e}") from None
        if response.status >= 300:
            try:
                message = json.loads(response.read()).get("message", "")
            except ValueError:
                message = ""
            raise CallRefused(f"{response.status} {response.reason}: {message}".rstrip(": "))
        return response

    def json(self, method: str, path: str, body: bytes = b"") -> dict:
        response = self.open(method, path, body)
        try:
            return json.loads(response.read())
        except ValueError:
            raise CallRefused("the server's answer is not JSON") from None

    @staticmethod
    def events(response):
        """(event, data) pairs of an SSE answer, data decoded from JSON."""
        event, data = None, []
        for raw in response:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif not line and event:
                yield event, json.loads("\n".join(data))
                event, data = None, []


def call_exit_code(result: dict) -> int:
    """The task's exit code; 124 for a timeout, 125 when the command could not start."""
    status, code = result.get("status"), result.get("exit_code", -1)
    if status == "timeout":
        return 124
    if code == -2:
        return 125
    if status == "success":
        return 0
    return code if isinstance(code, int) and 0 < code < 256 else 1


def explain_unsuccessful_run(task: str, result: dict) -> str | None:
    """One sentence for a run that did not succeed when the task itself wrote nothing on
    stderr (README §9), so that a CI log shows why and not only an exit code. None when the
    run succeeded or its stderr already says something (for a command that could not start,
    stderr holds rtask's reason)."""
    status, code, seconds = result.get("status"), result.get("exit_code"), result.get("duration_seconds")
    if status == "success" or result.get("stderr"):
        return None
    if status == "timeout":
        took = f" after {seconds:.1f} s" if isinstance(seconds, (int, float)) else ""
        what = f"timed out{took} (executionTimeoutSeconds) and was killed"
    elif status == "cancelled":
        what = "was cancelled before it finished"
    elif code == -1:
        what = "was killed by a signal"
    elif code == -2:
        what = "could not start"
    else:
        what = f"failed with exit code {code}"
    return f"rtask call: task {task!r} {what}."


def cmd_call(args) -> int:
    import http.client
    url = args.url or os.environ.get("RTASK_URL") or "http://localhost:8800"
    client = CallClient(url, args.timeout)
    body = read_call_body(args)
    path = "/tasks/" + quote(args.task, safe="")  # a name may hold ':', ' ', '?', '%', ...
    query = call_query(args.param)
    try:
        if args.follow:
            result = follow_call(client, path, body, query)
        else:
            answer = client.json("POST", path + query, body)
            if "exit_code" in answer:  # a sync task answered with its result
                result = answer
            elif args.no_wait:
                print(answer["task_id"])
                return 0
            else:
                client.following = f"{path}/{answer['task_id']}"
                result = wait_for_result(client, client.following)
            sys.stdout.write(result.get("stdout", ""))
            sys.stderr.write(result.get("stderr", ""))
        if sentence := explain_unsuccessful_run(args.task, result):
            print(sentence, file=sys.stderr)
        return call_exit_code(result)
    except KeyboardInterrupt:
        if client.following:
            run_url = url.rstrip("/") + client.following
            print(f"rtask call: interrupted; run {client.following.rpartition('/')[2]} goes on on the server "
                  f"(read its result with GET {run_url}, cancel it with DELETE {run_url}).", file=sys.stderr)
        else:
            print("rtask call: interrupted; a run already started goes on on the server until it ends.",
                  file=sys.stderr)
        return 130
    except CallRefused as e:
        print(f"rtask call: refused: {e}", file=sys.stderr)
        return 2
    except TimeoutError:
        print(f"rtask call: gave up after --timeout {args.timeout} s", file=sys.stderr)
        return 124
    except (OSError, http.client.HTTPException) as e:  # the connection broke mid-answer
        print(f"rtask call: refused: the connection to the server was lost: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, KeyError, AttributeError):  # an answer rtask never sends
        print("rtask call: refused: the server's answer is not one rtask sends (a proxy in the way?)",
              file=sys.stderr)
        return 2


def call_query(params: list[str]) -> str:
    """``-p NAME=VALUE`` options as a query string ("?a=1&b=x%20y"; "" when none): every byte
    percent-encoded except unreserved characters, so a value arrives exactly as given."""
    pairs = []
    for param in params:
        name, sep, value = param.partition("=")
        if not sep or not name:
            raise ConfigError(f"-p {param!r} must look like NAME=VALUE")
        pairs.append(f"{quote(name, safe='')}={quote(os.fsencode(value), safe='')}")
    return "?" + "&".join(pairs) if pairs else ""


def read_call_body(args) -> bytes:
    if args.data is not None:
        return os.fsencode(args.data)  # bytes the shell passed that are not UTF-8 go as they came
    if args.data_file == "-":
        return sys.stdin.buffer.read()
    if args.data_file:
        try:
            with open(args.data_file, "rb") as f:
                return f.read()
        except OSError as e:
            raise ConfigError(f"{args.data_file}: cannot read it: {e.strerror}") from None
    return b""


def wait_for_result(client: CallClient, path: str) -> dict:
    """Long-poll an async run; on a terminal, show the elapsed time while waiting (never in
    CI logs, which are not terminals)."""
    started = time.monotonic()
    show = sys.stderr.isatty()
    while True:
        step = 1.0 if show else 30.0
        remaining = client.remaining()
        if remaining is not None:
            step = min(step, max(remaining, 0.1))
        result = client.json("GET", f"{path}?wait={step:.3f}")
        if result.get("status") not in ("running", "queued"):
            if show:
                sys.stderr.write("\r\033[K")
            return result
        if show:
            sys.stderr.write(f"\r{result['status']}… {time.monotonic() - started:.0f}s")
            sys.stderr.flush()


def follow_call(client: CallClient, path: str, body: bytes, query: str = "") -> dict:
    """--follow: print output as the task writes it. A sync task streams its POST answer; an
    async one answers with its task id, and its events stream is followed instead."""
    response = client.open("POST", path + query, body, stream=True)
    if not response.getheader("Content-Type", "").startswith("text/event-stream"):
        task_id = json.loads(response.read())["task_id"]
        client.following = f"{path}/{task_id}"
        response = client.open("GET", f"{client.following}/events", stream=True)
    for event, data in client.events(response):
        if event == "stdout":
            sys.stdout.write(data)
            sys.stdout.flush()
        elif event == "stderr":
            sys.stderr.write(data)
            sys.stderr.flush()
        elif event == "result":
            return data
    raise CallRefused("the event stream ended without a result")


def _positive_number(text: str) -> float:
    """An argparse type: float() alone would take "nan", "inf" and "-3"."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _positive_integer(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1 or len(text) > 9:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to 999999999")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    def add_globals(p, default):
        p.add_argument("--config", default=default(DEFAULT_CONFIG_PATH), help="config file (default ./config.toml)")
        p.add_argument("--api-keys-file", default=default(DEFAULT_KEYS_PATH), help="key store (default ./keys.toml)")
        p.add_argument("--log-format", choices=["text", "json"],
                       default=default(os.environ.get("LOG_FORMAT", "text")), help="log format (env LOG_FORMAT)")

    parser = argparse.ArgumentParser(prog="rtask", description="Run configured commands as authenticated HTTP endpoints.")
    add_globals(parser, lambda d: d)
    parser.add_argument("--version", action="version", version=f"rtask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, func, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_globals(p, lambda d: argparse.SUPPRESS)  # also accepted after the subcommand
        p.set_defaults(func=func)
        return p

    run = command("run", cmd_run, "serve the configured tasks")
    run.add_argument("--api-address", default=DEFAULT_API_ADDRESS, help="HOST:PORT (default localhost:8800)")
    run.add_argument("--metrics-address", default=DEFAULT_METRICS_ADDRESS, help="HOST:PORT (default localhost:9090)")
    run.add_argument("--tls-cert", help="PEM certificate: serve HTTPS (TLS 1.2+) on both listeners")
    run.add_argument("--tls-key", help="PEM private key of --tls-cert")
    run.add_argument("--trusted-proxy", action="append", default=[], metavar="ADDRESS",
                     help="a proxy (IP or network) whose X-Forwarded-For names the client in logs; repeatable")
    run.add_argument("--max-connections", type=_positive_integer, default=MAX_CONNECTIONS, metavar="N",
                     help=f"open API connections at most (default {MAX_CONNECTIONS})")
    run.add_argument("--max-connections-per-address", type=_positive_integer, metavar="N",
                     help="API connections one client address may hold (default a quarter of --max-connections)")
    run.add_argument("--state-dir", metavar="PATH",
                     help="kept results and crash-recovery records (default: rtask-state next to the config)")
    run.add_argument("--workers", default="1", metavar="N|auto",
                     help="API processes sharing the listener (default 1; auto: one per usable CPU)")
    worker = sub.add_parser("_worker")  # no help: hidden; started by the supervisor (see Supervisor)
    add_globals(worker, lambda d: argparse.SUPPRESS)
    worker.set_defaults(func=cmd_worker)
    for action in run._actions:  # the worker takes run's own options (as the supervisor got them)
        if action.dest not in ("help", "config", "api_keys_file", "log_format", "workers"):
            worker._add_action(action)
    worker.add_argument("--listen-fd", type=int, required=True)
    # The supervisor's pid, given rather than read: a worker started just as its supervisor
    # died would otherwise watch its new parent (init) and never notice.
    worker.add_argument("--supervisor", type=int, required=True)
    command("add-key", cmd_add_key, "create a key and print it once").add_argument("name")
    command("list-keys", cmd_list_keys, "list key names and ids (never secrets)")
    command("remove-key", cmd_remove_key, "revoke a key").add_argument("name")
    command("check-config", cmd_check_config, "validate config and keys as run would; exit 0/1")
    command("show-permissions", cmd_show_permissions, "the permission table and the grants in force")
    keys = command("generate-keys", cmd_generate_keys, "create an RSA key pair for JWTs (needs PyJWT[crypto])")
    keys.add_argument("--output-dir", default="keys")
    keys.add_argument("--key-size", type=int, default=2048)
    token = command("generate-token", cmd_generate_token, "sign a JWT (needs PyJWT[crypto]); prints it alone")
    token.add_argument("--permissions", required=True, help="comma-separated, e.g. tasks:run:deploy,tasks:read")
    token.add_argument("--subject", default="rtask-client")
    token.add_argument("--private-key", default="keys/jwt-private-key.pem")
    token.add_argument("--expiry-hours", type=_positive_number, default=24.0)
    token.add_argument("--issuer", default=JwtSpec.issuer)
    token.add_argument("--audience", default=JwtSpec.audience)
    token.add_argument("--kid", help="key id header, for JWKS set-ups")
    check = command("validate-token", cmd_validate_token, "verify a JWT and show its claims (needs PyJWT[crypto])")
    check.add_argument("--token", required=True)
    check.add_argument("--public-key", help="PEM public key (default: [auth.jwt] of the config)")
    check.add_argument("--issuer", default=JwtSpec.issuer)
    check.add_argument("--audience", default=JwtSpec.audience)
    call = command("call", cmd_call, "run a task on a server and exit with its exit code (the CI client)")
    call.add_argument("task")
    call.add_argument("--url", help="server URL (env RTASK_URL, default http://localhost:8800)")
    data = call.add_mutually_exclusive_group()
    data.add_argument("--data", help="request body")
    data.add_argument("--data-file", metavar="PATH", help="request body from a file")
    data.add_argument("-", dest="data_file", action="store_const", const="-", help="request body from stdin")
    call.add_argument("--no-wait", action="store_true", help="async task: print the task id and exit")
    call.add_argument("--follow", action="store_true", help="print output live while the task runs")
    call.add_argument("--timeout", type=_positive_number, help="give up after S seconds (exit 124)")
    call.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                      help="a task parameter, sent in the query string (repeatable)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.log_format not in ("text", "json"):
        print(f"rtask: LOG_FORMAT {args.log_format!r} must be text or json", file=sys.stderr)
        return 1
    setup_logging(args.log_format)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"rtask: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a file or directory the user named cannot be used
        print(f"rtask: {e.filename or 'error'}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
