#!/usr/bin/env python3
"""The least a Python server can do for `POST /tasks/echo`: the ceiling rtask is measured against.

A keep-alive HTTP/1.1 server with a thread per connection (as rtask) that, for every request,
runs /bin/echo hi with subprocess.run (pipes, wait) and answers its output as JSON. No
authentication, limits, logging, metrics or store: what is left is HTTP, threads, the GIL and
spawning. PROCESSES processes share the listening socket (as rtask's workers do).

    python3 bench/python_ceiling.py PORT [PROCESSES]

SIGTERM stops all of them. Used by bench/workers.py.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading

COMMAND = ["/bin/echo", "hi"]


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
            body = json.dumps({"status": "success" if done.returncode == 0 else "failure",
                               "exit_code": done.returncode, "stdout": done.stdout.decode()}).encode() + b"\n"
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


def serve(listener: socket.socket):
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=guarded, args=(conn,), daemon=True).start()


def guarded(conn: socket.socket):
    try:
        serve_connection(conn)
    except (OSError, ValueError):  # a client gone mid-request: nothing to report
        pass


def main():
    port = int(sys.argv[1])
    processes = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    children = []
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            serve(listener)
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
