#!/usr/bin/env python3
"""The least a Python server can do for `POST /tasks/echo`: the ceiling rtask is measured against.

A keep-alive HTTP/1.1 server that, for every request, runs /bin/echo hi (stdout and stderr
piped, waited for) and answers its output as JSON. No authentication, limits, logging,
metrics or store: what is left is HTTP, the concurrency model and spawning. PROCESSES
processes share the listening socket (as rtask's workers do). Two models:

- ``threads`` (default): a thread per connection and subprocess.run, as rtask serves;
- ``asyncio``: one event loop per process (asyncio streams), the child watched by that loop
  (its pipes and a pidfd), no thread: what a rewrite of rtask's request path around an
  event loop could reach at most.

    python3 bench/python_ceiling.py PORT [PROCESSES] [threads|asyncio]

SIGTERM stops all of them. Used by bench/workers.py.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading

COMMAND = ["/bin/echo", "hi"]


def answer(returncode: int, stdout: bytes) -> bytes:
    body = json.dumps({"status": "success" if returncode == 0 else "failure",
                       "exit_code": returncode, "stdout": stdout.decode()}).encode() + b"\n"
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


# -- the thread model (as rtask) ---------------------------------------------------------------

def serve_connection(conn: socket.socket):
    with conn, conn.makefile("rb") as reader:
        while True:
            if not reader.readline():  # the request line; b"" when the client closed
                return
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            reader.read(length)
            done = subprocess.run(COMMAND, capture_output=True)
            conn.sendall(answer(done.returncode, done.stdout))


def serve(listener: socket.socket):
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=guarded, args=(conn,), daemon=True).start()


def guarded(conn: socket.socket):
    try:
        serve_connection(conn)
    except (OSError, ValueError):  # a client gone mid-request: nothing to report
        pass


# -- the event-loop model ----------------------------------------------------------------------

async def run_watched_by_the_loop() -> tuple[int, bytes]:
    """COMMAND's exit code and stdout; its pipes and its pidfd are read by the running loop."""
    loop = asyncio.get_running_loop()
    proc = subprocess.Popen(COMMAND, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pidfd = os.pidfd_open(proc.pid)
    output = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    watched, ended = set(output) | {pidfd}, loop.create_future()

    def readable(fd):
        chunk = os.read(fd, 65536) if fd != pidfd else b""
        if chunk:
            output[fd] += chunk
            return
        loop.remove_reader(fd)
        watched.discard(fd)
        if not watched:
            ended.set_result(None)
    for fd in watched:
        loop.add_reader(fd, readable, fd)
    await ended
    stdout = bytes(output[proc.stdout.fileno()])
    os.close(pidfd)
    proc.stdout.close()
    proc.stderr.close()
    return proc.wait(), stdout  # (it has exited: the pidfd said so)


async def serve_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    try:
        while await reader.readline():  # the request line; b"" when the client closed
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            writer.write(answer(*await run_watched_by_the_loop()))
            await writer.drain()
    except (OSError, ValueError, asyncio.IncompleteReadError):  # a client gone mid-request
        pass
    finally:
        writer.close()


async def serve_asyncio(listener: socket.socket):
    """Accept one connection a wake-up (asyncio's server takes up to its backlog at once, so
    one process would take every connection of a burst and leave the other idle)."""
    loop, tasks = asyncio.get_running_loop(), set()
    listener.setblocking(False)
    while True:
        conn, _ = await loop.sock_accept(listener)
        task = asyncio.create_task(serve_stream(*await asyncio.open_connection(sock=conn)))
        tasks.add(task)  # (the loop keeps only weak references to tasks)
        task.add_done_callback(tasks.discard)


def main():
    port = int(sys.argv[1])
    processes = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    model = sys.argv[3] if len(sys.argv) > 3 else "threads"
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    children = []
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            serve(listener) if model == "threads" else asyncio.run(serve_asyncio(listener))
        children.append(pid)

    def stop(signum, frame):
        for child in children:
            os.kill(child, signal.SIGTERM)
        for child in children:
            os.waitpid(child, 0)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
