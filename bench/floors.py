"""The floors under two of the proxy's figures: what no Python proxy on this machine gets under.

    python bench/floors.py               # CPU per request, then start-up (medians of 11 starts)
    python bench/floors.py --starts 1 --requests 200   # seconds: proves it runs (CI)

CPU per request, over 2,000 streaming requests on one kept-alive client connection (as
bench_proxy.py counts the proxy's), for three processes in one run, on the same fake
Finstep upstream as bench_proxy.py:
  syscalls         a relay of a few lines of Python that makes the proxy's system calls for
                   each request (read the request; one upstream request on a kept-alive
                   connection; one write per upstream read: a chunk, the response head
                   with the first, the end with the last;
                   sockets with timeouts, as the proxy's) and does nothing else;
  syscalls + JSON  the same relay doing also the JSON that every request needs: the question
                   read from the request's JSON, the upstream request's JSON body, the answer
                   event decoded (the other events are recognised by their bytes alone) and
                   the client's chunk encoded;
  proxy            `python custom_finstep.py`, as bench_proxy.py runs and measures it.

Start to listening as a script, medians of alternated starts:
  python           the interpreter starting and running an empty script;
  + compiling      the interpreter compiling custom_finstep.py and nothing else: what
                   `python custom_finstep.py` does before its first line runs;
  + http.server    that, then importing http.server (and with it email, http.client, ssl),
                   which the proxy is built on;
  proxy            `python custom_finstep.py` until its port accepts; and, for comparison,
                   `python -m custom_finstep` with its bytecode cached, as the image runs it.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_proxy as bench  # noqa: E402  (the fake upstream and the helpers of the benchmark)

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
UPSTREAM_HEAD = (b"POST /completion HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Authorization: k\r\nContent-Length: %d\r\n\r\n%s")


# --- The relays (each runs in a process of its own) -----------------------------------------

def upstream_body(question: str) -> bytes:
    return json.dumps({"userId": "1", "sessionId": "0" * 32, "query": question, "sessionTitle": "bench"}).encode()


def connections(listener: socket.socket, upstream_port: int):
    """The next client, and an upstream connection for it: timeouts and no Nagle stalls, as the proxy's."""
    client, _ = listener.accept()
    upstream = socket.create_connection(("127.0.0.1", upstream_port))
    for sock in (client, upstream):
        sock.settimeout(30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client, upstream


def relay_syscalls(listener: socket.socket, upstream_port: int) -> None:
    body = upstream_body(bench.FIRST_TOKEN_QUERY)
    request = UPSTREAM_HEAD % (len(body), body)
    while True:
        client, upstream = connections(listener, upstream_port)
        while client.recv(65536):
            upstream.sendall(request)
            received, head = b"", HEAD
            while not received.endswith(b"0\r\n\r\n"):
                data = upstream.recv(65536)
                received += data
                end = b"0\r\n\r\n" if received.endswith(b"0\r\n\r\n") else b""  # with the last read's
                client.sendall(head + b"%x\r\n%s\r\n" % (len(data), data) + end)
                head = b""


def relay_json(listener: socket.socket, upstream_port: int) -> None:
    while True:
        client, upstream = connections(listener, upstream_port)
        while True:
            data = client.recv(65536)
            if not data:
                break
            question = json.loads(data.partition(b"\r\n\r\n")[2])["messages"][-1]["content"]
            body = upstream_body(question)
            upstream.sendall(UPSTREAM_HEAD % (len(body), body))
            received, pending, out = b"", b"", HEAD
            while not received.endswith(b"0\r\n\r\n"):
                data = upstream.recv(65536)
                received += data
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    if line.startswith(b"data:") and b'"RESPONSING"' in line:
                        event = json.loads(line[5:])
                        chunk = b"data: %s\n\n" % json.dumps({
                            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                            "choices": [{"index": 0, "delta": {"content": event["text"]}, "finish_reason": None}],
                        }).encode()
                        out += b"%x\r\n%s\r\n" % (len(chunk), chunk)
                if received.endswith(b"0\r\n\r\n"):
                    out += b"0\r\n\r\n"  # the end leaves with the last read's chunk
                if out:
                    client.sendall(out)
                    out = b""


RELAYS = {"syscalls": relay_syscalls, "syscalls + JSON": relay_json}


# --- Measuring --------------------------------------------------------------------------------

def relay_cpu(name: str, upstream_port: int, requests: int) -> float:
    relay = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", name, str(upstream_port)],
                             stdout=subprocess.PIPE)
    try:
        target = bench.openai_target(name, int(relay.stdout.readline()), "/")
        target.answer_marker = b'"RESPONSING"' if name == "syscalls" else b'"content"'
        return bench.cpu_per_request(target, relay.pid, requests)
    finally:
        relay.kill()
        relay.wait()


def proxy_cpu(upstream_port: int, requests: int) -> float:
    proxy, port, _ = bench.start_proxy(upstream_port)
    try:
        return bench.cpu_per_request(bench.openai_target("proxy", port, "/v1/chat/completions"), proxy.pid, requests)
    finally:
        proxy.kill()
        proxy.wait()


def seconds_to_exit(command) -> float:
    began = time.monotonic()
    subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
    return time.monotonic() - began


def seconds_to_listen(upstream_port: int, command, cwd: str) -> float:
    proxy, _, seconds = bench.start_proxy(upstream_port, command, cwd=cwd)
    proxy.kill()
    proxy.wait()
    return seconds


def startups(upstream_port: int, starts: int):
    """Medians (ms) of `starts` alternated starts of each way, from an image laid out as the
    Docker image is: the script and its bytecode compiled beforehand."""
    with tempfile.TemporaryDirectory() as image:
        script = bench.lay_out_image(bench.PROXY_SCRIPT, image)
        empty = os.path.join(image, "empty.py")
        open(empty, "w").close()
        compiling = "compile(open(%r, 'rb').read(), %r, 'exec')" % (script, script)
        ways = {
            "python (an empty script)": lambda: seconds_to_exit([sys.executable, empty]),
            "python compiling custom_finstep.py": lambda: seconds_to_exit([sys.executable, "-c", compiling]),
            "  and importing http.server": lambda: seconds_to_exit(
                [sys.executable, "-c", compiling + "; import http.server"]),
            "proxy: python custom_finstep.py": lambda: seconds_to_listen(
                upstream_port, [sys.executable, script], image),
            "proxy: python -m custom_finstep": lambda: seconds_to_listen(
                upstream_port, [sys.executable, "-m", "custom_finstep"], image),
        }
        time.sleep(1.1)  # the bytecode older than a second, as after an image build
        runs = {name: [] for name in ways}
        for _ in range(starts):
            for name, start in ways.items():
                runs[name].append(start() * 1000)
    return {name: statistics.median(ms) for name, ms in runs.items()}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:  # a relay, in a process of its own
        listener = socket.create_server(("127.0.0.1", 0))
        print(listener.getsockname()[1], flush=True)
        RELAYS[argv[1]](listener, int(argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--starts", type=int, default=11, help="starts of each way to take the median of")
    parser.add_argument("--requests", type=int, default=2000, help="requests per CPU figure")
    args = parser.parse_args(argv)
    upstream, upstream_port = bench.start_upstream(0)
    try:
        bench.wait_for_port(upstream_port, time.monotonic() + 10)
        print("CPU per request (user and system), %d kept-alive streaming requests each:" % args.requests)
        for name in RELAYS:
            print("  %-34s %.3f ms" % (name, relay_cpu(name, upstream_port, args.requests) * 1000), flush=True)
        print("  %-34s %.3f ms" % ("proxy", proxy_cpu(upstream_port, args.requests) * 1000), flush=True)
        print("Start (to exit, or to listening for the proxy), medians of %d alternated starts:" % args.starts)
        for name, ms in startups(upstream_port, args.starts).items():
            print("  %-34s %.0f ms" % (name, ms))
    finally:
        upstream.kill()
        upstream.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
