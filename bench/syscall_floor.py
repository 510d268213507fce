"""The floor under the proxy's CPU per request: the same system calls, and nothing else.

    python bench/syscall_floor.py

A relay of a few lines, in Python, on the same fake Finstep upstream as bench_proxy.py:
for each request on a kept-alive client connection it reads the request, sends one
upstream request on a kept-alive upstream connection, reads the answer and writes the
client a response head and one chunk per upstream read, then the end: the system calls
the proxy makes (sockets with timeouts, as the proxy's), with none of its work (no
parsing, no JSON, no sessions, no logs). Its CPU per request, over 2,000 requests as
bench_proxy.py counts the proxy's, is what no Python proxy on this machine gets under.
"""

import json
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_proxy as bench  # noqa: E402  (the fake upstream and the helpers of the benchmark)

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def relay(listener: socket.socket, upstream_port: int) -> None:
    body = json.dumps({"userId": "1", "sessionId": "0" * 32, "query": bench.FIRST_TOKEN_QUERY,
                       "sessionTitle": "bench"}).encode()
    request = (b"POST /completion HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Authorization: k\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    while True:
        client, _ = listener.accept()
        client.settimeout(30)
        upstream = socket.create_connection(("127.0.0.1", upstream_port), timeout=30)
        while client.recv(65536):
            upstream.sendall(request)
            received, head = b"", HEAD
            while not received.endswith(b"0\r\n\r\n"):
                data = upstream.recv(65536)
                received += data
                client.sendall(head + b"%x\r\n%s\r\n" % (len(data), data))
                head = b""
            client.sendall(b"0\r\n\r\n")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:  # the relay, in a process of its own
        listener = socket.create_server(("127.0.0.1", 0))
        print(listener.getsockname()[1], flush=True)
        relay(listener, int(argv[1]))
        return 0
    upstream, upstream_port = bench.start_upstream(0)
    floor = None
    try:
        bench.wait_for_port(upstream_port, time.monotonic() + 10)
        floor = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", str(upstream_port)],
                                 stdout=subprocess.PIPE)
        target = bench.openai_target("floor", int(floor.stdout.readline()), "/")
        target.answer_marker = b'"RESPONSING"'
        seconds = bench.cpu_per_request(target, floor.pid, 2000)
    finally:
        for process in (floor, upstream):
            if process is not None:
                process.kill()
                process.wait()
    print("the same system calls alone: %.3f ms of CPU per request (user and system)" % (seconds * 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
