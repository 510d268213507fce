"""Benchmark: what custom_finstep.py adds on top of the upstream it forwards.

One command, standard library only, traffic on 127.0.0.1 only, stops by itself:

    python bench/bench_proxy.py                      # full run (under a minute on 2 cores)
    python bench/bench_proxy.py --quick              # a few seconds: proves the benchmark works
    python bench/bench_proxy.py --json results.json  # also write the figures as JSON
    python bench/bench_proxy.py --compare http://127.0.0.1:4000/v1 --upstream-port 9100
                                                     # a third column: any OpenAI-compatible
                                                     # endpoint pointed at the fake upstream
    delay-link.sh 8443 20 -- python bench/bench_proxy.py --network --upstream-port 8443
                                                     # time to first token over a TLS upstream
                                                     # behind a link delaying port 8443

It starts a fake Finstep upstream and the proxy as separate processes and measures
every workload twice in the same run, interleaved: through the proxy, and read
directly from the fake upstream (the floor). The fake upstream answers a query
"bench n=<chunks> every=<seconds>" with that many `RESPONSING` events, each its own
HTTP chunk written the moment it is due, each text being its send time (time.time()).
"""

import argparse
import json
import os
import re
import selectors
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
PROXY_SCRIPT = os.path.join(os.path.dirname(HERE), "custom_finstep.py")
CERTIFICATE = os.path.join(HERE, "localhost.pem")  # self-signed, 127.0.0.1: the TLS upstream's
STAMP = re.compile(rb"(\d{10}\.\d{6})")


# --- The fake upstream (runs in its own process) ------------------------------------

class FakeFinstep(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        query = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["query"]
        words = query.split()  # "bench n=<chunks> every=<seconds>"; any other query: one chunk at once
        fields = dict(part.split("=", 1) for part in words[1:] if "=" in part) if words[:1] == ["bench"] else {}
        count, every = int(fields.get("n", 1)), float(fields.get("every", 0))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream;charset=UTF-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        send = self.connection.sendall
        for line in (b'data:{"status": "THINKING"}\n', b'data:{"status": "MSG_START"}\n'):
            send(b"%x\r\n%s\r\n" % (len(line), line))
        start = time.monotonic()
        for index in range(count):
            if every:
                delay = start + index * every - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            line = b'data:{"status": "RESPONSING", "type": "text", "text": "%.6f"}\n' % time.time()
            send(b"%x\r\n%s\r\n" % (len(line), line))
        tail = b'data:{"status": "MSG_DONE"}\ndata:{"status": "DONE"}\n'
        send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))  # kept alive unless the client said close

    def log_message(self, *args):
        pass


class FakeFinstepServer(ThreadingHTTPServer):
    request_queue_size = 2048
    daemon_threads = True
    context = None  # an SSLContext: TLS, its handshake in the connection's own thread

    def finish_request(self, request, client_address):
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as servers do: no Nagle stalls
        if self.context is not None:
            try:
                request = self.context.wrap_socket(request, server_side=True)
            except OSError:
                return
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address):
        pass  # a client that left: nothing to report


def serve_upstream(port: int, certificate=None) -> None:
    server = FakeFinstepServer(("127.0.0.1", port), FakeFinstep)
    if certificate:
        server.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.context.load_cert_chain(certificate)
    print(server.server_address[1], flush=True)
    server.serve_forever()


# --- Targets: the same workload read through the proxy, directly, or elsewhere ----------

class Target:
    """An endpoint to stream from: `request(query)` is the raw HTTP request for a query;
    `is_answer(event)` tells an answer event from the others."""

    def __init__(self, name: str, port: int, path: str, body, answer_marker: bytes, headers: str = ""):
        self.name, self.port, self.path, self.body, self.answer_marker = name, port, path, body, answer_marker
        self.headers = headers

    def request(self, query: str) -> bytes:
        body = json.dumps(self.body(query)).encode()
        return (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n%s"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (self.path.encode(), self.headers.encode(), len(body), body))


def direct_target(port: int) -> Target:
    return Target("direct", port, "/completion",
                  lambda q: {"userId": "1", "sessionId": "0" * 32, "query": q, "sessionTitle": "bench"},
                  b'"RESPONSING"')


def openai_target(name: str, port: int, path: str, key: str = "bench") -> Target:
    return Target(name, port, path,
                  lambda q: {"model": "finstep-proxy", "stream": True, "messages": [{"role": "user", "content": q}]},
                  b'"content":"1', "Authorization: Bearer %s\r\n" % key)


def stream_once(target: Target, query: str, timeout: float = 30.0):
    """Stream one answer over a raw socket: (seconds to the first answer event, answer events,
    seconds in all). Counting markers in raw bytes keeps the client out of the measurement."""
    began = time.perf_counter()
    first, events, tail = None, 0, b""
    with socket.create_connection(("127.0.0.1", target.port), timeout=timeout) as sock:
        sock.sendall(target.request(query))
        marker = target.answer_marker
        while True:
            data = sock.recv(262144)
            if not data:
                break
            found = (tail + data).count(marker)
            if found and first is None:
                first = time.perf_counter() - began
            events += found
            tail = data[-len(marker) + 1:]
    return first, events, time.perf_counter() - began


def stream_many(target: Target, query: str, count: int, timeout: float):
    """`count` simultaneous streams on one selector thread: (completed streams, per-chunk delays
    in seconds from the upstream's send stamp to arrival here)."""
    selector = selectors.DefaultSelector()
    pending = {}
    request = target.request(query)
    for _ in range(count):
        # Connect without blocking: a slow accept must never stop this loop reading the others.
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", target.port))
        selector.register(sock, selectors.EVENT_WRITE)
        pending[sock] = [b"", False]
    delays, completed = [], 0
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for key, events in selector.select(0.5):
            sock = key.fileobj
            if events & selectors.EVENT_WRITE:
                sock.sendall(request)  # a small request fits the empty send buffer at once
                selector.modify(sock, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(262144)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            now = time.time()
            state = pending[sock]
            if data:
                buffer = state[0] + data
                lines = buffer.split(b"\n")
                state[0] = lines.pop()
                for line in lines:
                    if target.answer_marker in line:
                        stamp = STAMP.search(line)
                        if stamp:
                            delays.append(now - float(stamp.group(1)))
                    elif b"[DONE]" in line or b'"DONE"' in line:
                        state[1] = True
                continue
            completed += state[1]
            selector.unregister(sock)
            sock.close()
            del pending[sock]
    for sock in pending:
        sock.close()
    selector.close()
    return completed, delays


# --- Processes ------------------------------------------------------------------------------

def wait_for_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.001)
    raise RuntimeError("port %d never opened" % port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_upstream(port: int, tls: bool = False):
    process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-upstream", str(port)]
                               + (["--tls"] if tls else []), stdout=subprocess.PIPE)
    port = int(process.stdout.readline())
    return process, port


def start_proxy(upstream_port: int, command=None, cwd=None, tls=False, system_ca=False, **settings):
    """The proxy as a user runs it (`python custom_finstep.py` unless `command` says otherwise);
    returns (process, port, seconds from start to listening). With `tls` its upstream is
    https and trusts the fake upstream's certificate; `system_ca` leaves it the system's
    CA bundle instead, as in a deployment (no request then reaches the fake upstream)."""
    port = free_port()
    environment = dict(os.environ, FINSTEP_API_KEY="bench-key", FINSTEP_API_URL="%s://127.0.0.1:%d/completion"
                       % ("https" if tls else "http", upstream_port), HOST="127.0.0.1", PORT=str(port),
                       FINSTEP_MAX_STREAMS="4000", LOG_LEVEL="WARNING", **settings)
    if tls and not system_ca:
        environment["SSL_CERT_FILE"] = CERTIFICATE  # trust the fake upstream's certificate, as a CA
    began = time.monotonic()
    process = subprocess.Popen(command or [sys.executable, PROXY_SCRIPT], env=environment,
                               stderr=subprocess.DEVNULL, cwd=cwd)
    wait_for_port(port, began + 10)
    return process, port, time.monotonic() - began


def lay_out_image(script: str, folder: str) -> str:
    """`script` copied into `folder` as custom_finstep.py with its bytecode beside it, as the
    Docker image has them; returns the copy's path. Wait a second before starting it: the
    proxy tells bytecode from an earlier start (or the image build) by its age."""
    copy = os.path.join(folder, "custom_finstep.py")
    shutil.copy(script, copy)
    subprocess.run([sys.executable, "-m", "compileall", "-q", folder], check=True)
    return copy


# The ways the proxy is started for its footprint: (name, as reported, as a module, an https
# upstream with the system's CA bundle as a deployment has it; the benchmark's own is plain http).
START_WAYS = (("script", "python custom_finstep.py", False, False),
              ("module", "python -m custom_finstep (Docker)", True, False),
              ("module_https", "python -m custom_finstep, https upstream (its CA bundle)", True, True))


def footprint(upstream_port: int, starts: int = 1, scripts=(PROXY_SCRIPT,)):
    """Idle memory and start-up time of the ways to run the proxy (START_WAYS): as a script,
    and as the Docker image does, `python -m custom_finstep` from bytecode compiled at build
    time; with several `starts`, the median of each figure (start-up swings by tens of
    milliseconds). Several `scripts` (versions of custom_finstep.py) take turns, start by
    start: {script: figures}."""
    figures = {script: {name: [] for name, _, _, _ in START_WAYS} for script in scripts}
    with tempfile.TemporaryDirectory() as root:
        images = {}
        for index, script in enumerate(scripts):
            images[script] = os.path.join(root, str(index))
            os.mkdir(images[script])
            lay_out_image(script, images[script])
        time.sleep(1.1)  # bytecode from an earlier start (or the image build), as the proxy tells by its age
        for _ in range(starts):
            for script, image in images.items():
                for name, _, as_module, https in START_WAYS:
                    command = [sys.executable] + (["-m", "custom_finstep"] if as_module else
                                                  [os.path.join(image, "custom_finstep.py")])
                    process, _, startup = start_proxy(upstream_port, command, cwd=image, tls=https, system_ca=True)
                    time.sleep(0.3)  # settled, idle
                    figures[script][name].append((memory_kb(process.pid, "VmRSS") / 1024, startup * 1000))
                    process.kill()
                    process.wait()
    return {script: {name: {"idle_rss_mb": statistics.median(rss for rss, _ in runs),
                            "startup_ms": statistics.median(ms for _, ms in runs), "starts": starts}
                     for name, runs in ways.items()}
            for script, ways in figures.items()}


def memory_kb(pid: int, field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of a process, from /proc."""
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) a process has used, from /proc."""
    with open("/proc/%d/stat" % pid) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values, fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


# --- Workloads --------------------------------------------------------------------------------

def time_to_first_token(targets, requests: int, proxy_pid: int):
    """Time to the first answer event, sequential requests on new connections; and the proxy's
    CPU time per request over these requests (it is idle while the others are measured)."""
    firsts = {t.name: [] for t in targets}
    cpu_before = cpu_seconds(proxy_pid)
    for index in range(requests):
        for target in targets[::-1] if index % 2 else targets:  # interleaved, in turns: drift and order hit all alike
            first, events, _ = stream_once(target, "bench n=1 every=0")
            assert events == 1, (target.name, events)
            firsts[target.name].append(first)
    cpu = cpu_seconds(proxy_pid) - cpu_before
    out = {name: {"p50_ms": percentile(v, 0.5) * 1000, "p99_ms": percentile(v, 0.99) * 1000}
           for name, v in firsts.items()}
    out["proxy"]["cpu_ms_per_request"] = cpu / requests * 1000
    return out


def cpu_per_request(target: Target, pid: int, requests: int) -> float:
    """The proxy's CPU time (user and system, from /proc) per request, over `requests`
    sequential streaming requests on one kept-alive connection, as SDK clients send them."""
    request = target.request(FIRST_TOKEN_QUERY).replace(b"Connection: close\r\n", b"")
    with socket.create_connection(("127.0.0.1", target.port), timeout=30) as sock:
        for _ in range(50):  # warm-up: the upstream connection pooled, the code paths run once
            ask_kept_alive(sock, request, target.answer_marker)
        before = cpu_seconds(pid)
        for _ in range(requests):
            ask_kept_alive(sock, request, target.answer_marker)
        return (cpu_seconds(pid) - before) / requests


def forwarding_rate(targets, chunks: int, rounds: int):
    rates = {t.name: [] for t in targets}
    for index in range(rounds):
        for target in targets[::-1] if index % 2 else targets:  # the first of a round runs faster here
            _, events, seconds = stream_once(target, "bench n=%d every=0" % chunks, timeout=120)
            assert events == chunks, (target.name, events)
            rates[target.name].append(chunks / seconds)
    return {name: {"chunks_per_s": max(v)} for name, v in rates.items()}


def concurrency(targets, streams: int, chunks: int, every: float):
    out = {}
    for target in targets:
        completed, delays = stream_many(target, "bench n=%d every=%g" % (chunks, every), streams,
                                        timeout=chunks * every + 30)
        out[target.name] = {"completed": completed, "streams": streams, "chunks": len(delays),
                            "delay_p50_ms": percentile(delays, 0.5) * 1000,
                            "delay_p99_ms": percentile(delays, 0.99) * 1000}
    return out


# --- Over a real network: the upstream behind TLS and a delayed link -------------------------

FIRST_TOKEN_QUERY = "bench n=1 every=0"


class TlsUpstreamClient:
    """A direct client of the TLS fake upstream, as a well-built client is: `fresh()` asks on a
    new connection (TCP and TLS handshakes first), `on(sock)` on a kept-alive one."""

    def __init__(self, port: int):
        self.port = port
        self.context = ssl.create_default_context(cafile=CERTIFICATE)
        # The loopback benchmark's direct request, kept alive.
        self.request = direct_target(port).request(FIRST_TOKEN_QUERY).replace(b"Connection: close\r\n", b"")

    def connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.context.wrap_socket(raw, server_hostname="127.0.0.1")

    def on(self, sock: ssl.SSLSocket, began=None) -> float:
        return ask_kept_alive(sock, self.request, b'"RESPONSING"', began)

    def fresh(self) -> float:
        began = time.perf_counter()
        with self.connect() as sock:
            return self.on(sock, began)


def ask_in_turn(port: int, target: "Target", count: int) -> None:
    """`target`'s first-token request `count` times in turn on one kept-alive connection."""
    request = target.request(FIRST_TOKEN_QUERY).replace(b"Connection: close\r\n", b"")
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for _ in range(count):
            ask_kept_alive(sock, request, target.answer_marker)


def ask_kept_alive(sock: socket.socket, request: bytes, marker: bytes, began=None) -> float:
    """Seconds from `began` (default: now) to the first answer event of `request` on a kept-alive
    connection; the chunked response is read to its end, ready for the next question."""
    began = time.perf_counter() if began is None else began
    sock.sendall(request)
    first, buffer = None, b""
    while not re.search(rb"\r\n\r\n(?:.*\r\n)?0\r\n\r\n$", buffer, re.S):  # the head, then the last chunk
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("the connection closed mid-answer")
        buffer += data
        if first is None and marker in buffer:
            first = time.perf_counter()
    if first is None:
        raise RuntimeError("an answer without its answer event: %r" % buffer[-300:])
    return first - began


class ProxyClient:
    """A client of the proxy on loopback, keeping its connection alive as the `openai` SDK does."""

    def __init__(self, port: int):
        self.target = openai_target("proxy", port, "/v1/chat/completions")
        self.request = self.target.request(FIRST_TOKEN_QUERY).replace(b"Connection: close\r\n", b"")
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def ask(self) -> float:
        return ask_kept_alive(self.sock, self.request, self.target.answer_marker)


def together(functions):
    """Call every function at once, each in its own thread released by one barrier; their results."""
    barrier = threading.Barrier(len(functions))
    results = [None] * len(functions)

    def run(index):
        barrier.wait()
        results[index] = functions[index]()
    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(functions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def summary(seconds):
    return {"p50_ms": percentile(seconds, 0.5) * 1000, "p90_ms": percentile(seconds, 0.9) * 1000,
            "count": len(seconds)}


def network(args) -> int:
    """Time to first token over a delayed link to a TLS upstream: a direct client with a new
    connection per request, one with a kept-alive connection (the floor), and the proxy."""
    sizes = dict(sequential=5, rounds=2, concurrent=20, idle_rounds=2) if args.quick else \
        dict(sequential=40, rounds=5, concurrent=20, idle_rounds=6)
    idle = 1.0  # FINSTEP_UPSTREAM_IDLE of the idle-timeout workload, shortened to keep the run short
    upstream, port = start_upstream(args.upstream_port, tls=True)
    processes = [upstream]
    try:
        wait_for_port(port, time.monotonic() + 10)
        connects = []
        for _ in range(5):
            began = time.perf_counter()
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
            connects.append(time.perf_counter() - began)
        client = TlsUpstreamClient(port)
        proxy, proxy_port, _ = start_proxy(port, tls=True)
        cold, cold_port, _ = start_proxy(port, tls=True, FINSTEP_UPSTREAM_IDLE=str(idle))
        warm, warm_port, _ = start_proxy(port, tls=True, FINSTEP_UPSTREAM_IDLE=str(idle), FINSTEP_PREWARM="1")
        processes += [proxy, cold, warm]
        kept, asker = client.connect(), ProxyClient(proxy_port)
        client.on(kept)
        asker.ask()  # warm-up: the proxy's pool has its connection
        other = None
        if args.proxy_script:  # another version of the proxy, measured in the same run
            other_process, other_port, _ = start_proxy(port, [sys.executable, args.proxy_script], tls=True)
            processes.append(other_process)
            other = ProxyClient(other_port)
            other.ask()
        print("sequential: %d questions each..." % sizes["sequential"], flush=True)
        sequential = {"floor": [], "new connection": [], "proxy": []}
        if other:
            sequential[args.proxy_script] = []
        for _ in range(sizes["sequential"]):  # interleaved, so drift hits every column alike
            sequential["floor"].append(client.on(kept))
            sequential["new connection"].append(client.fresh())
            sequential["proxy"].append(asker.ask())
            if other:
                sequential[args.proxy_script].append(other.ask())
        print("%d concurrent, %d rounds..." % (sizes["concurrent"], sizes["rounds"]), flush=True)
        kept_many = [client.connect() for _ in range(sizes["concurrent"])]
        askers = [ProxyClient(proxy_port) for _ in range(sizes["concurrent"])]
        together([lambda sock=sock: client.on(sock) for sock in kept_many])
        together([one.ask for one in askers])  # warm-up: as many connections pooled
        concurrent = {"floor": [], "proxy": []}
        proxy_cpu = 0.0
        for _ in range(sizes["rounds"]):
            concurrent["floor"] += together([lambda sock=sock: client.on(sock) for sock in kept_many])
            before = cpu_seconds(proxy.pid)
            concurrent["proxy"] += together([one.ask for one in askers])
            proxy_cpu += cpu_seconds(proxy.pid) - before
        print("first question after the idle timeout, %d rounds of %gs..." % (sizes["idle_rounds"], idle + 0.5),
              flush=True)
        after_idle = {"floor": [], "proxy": [], "proxy, FINSTEP_PREWARM=1": []}
        cold_asker, warm_asker = ProxyClient(cold_port), ProxyClient(warm_port)
        cold_asker.ask()
        warm_asker.ask()
        for _ in range(sizes["idle_rounds"]):
            time.sleep(idle + 0.5)
            after_idle["floor"].append(client.on(kept))
            after_idle["proxy"].append(cold_asker.ask())
            after_idle["proxy, FINSTEP_PREWARM=1"].append(warm_asker.ask())
        for sock in [kept, asker.sock, cold_asker.sock, warm_asker.sock] + kept_many + [a.sock for a in askers]:
            sock.close()
    finally:
        for process in processes:
            process.kill()
            process.wait()
    results = {"machine": {"python": sys.version.split()[0], "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d")},
               "quick": args.quick, "tcp_connect": summary(connects),
               "sequential": {name: summary(v) for name, v in sequential.items()},
               "concurrent": {name: summary(v) for name, v in concurrent.items()},
               "after_idle": {name: summary(v) for name, v in after_idle.items()},
               "proxy_cpu_ms_per_request": proxy_cpu / len(concurrent["proxy"]) * 1000}
    print("\nlink: TCP connect p50 %.1f ms (one round trip)" % results["tcp_connect"]["p50_ms"])
    for workload, title in (("sequential", "sequential questions"),
                            ("concurrent", "%d concurrent streams after warm-up" % sizes["concurrent"]),
                            ("after_idle", "first question after the idle timeout")):
        floor = results[workload]["floor"]["p50_ms"]
        print("\ntime to first token, %s:" % title)
        for name, figures in results[workload].items():
            print("  %-32s p50 %7.1f ms  p90 %7.1f ms  %s" % (
                name, figures["p50_ms"], figures["p90_ms"],
                "" if name == "floor" else "over the floor %+.1f ms" % (figures["p50_ms"] - floor)))
    print("\nproxy CPU per request in the concurrent rounds: %.2f ms (simultaneous requests take turns "
          "on one interpreter)" % results["proxy_cpu_ms_per_request"])
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: small workloads")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    parser.add_argument("--compare", metavar="URL", help="another OpenAI-compatible base URL (…/v1)")
    parser.add_argument("--compare-key", default="bench", help="API key for --compare")
    parser.add_argument("--upstream-port", type=int, default=0, help="fixed port for the fake upstream")
    parser.add_argument("--network", action="store_true",
                        help="time to first token over a TLS upstream behind a delayed link (run it inside one, "
                             "with --upstream-port set to the delayed port)")
    parser.add_argument("--proxy-script", metavar="PATH",
                        help="another custom_finstep.py measured beside this one: with --network its sequential "
                             "requests, else its start-up and idle memory, start by start in turns")
    parser.add_argument("--starts", type=int, default=1, metavar="N",
                        help="start the proxy N times each way for the start-up and idle figures (their median)")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tls", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_upstream is not None:
        serve_upstream(args.serve_upstream, CERTIFICATE if args.tls else None)
        return 0
    if args.network:
        return network(args)
    sizes = dict(ttft=20, cpu=100, chunks=2000, rounds=1, streams=20, stream_chunks=5, every=0.02, many=50,
                 many_chunks=3, many_every=0.1) if args.quick else \
        dict(ttft=300, cpu=2000, chunks=20000, rounds=3, streams=200, stream_chunks=20, every=0.1, many=1000,
             many_chunks=10, many_every=1.0)
    upstream, upstream_port = start_upstream(args.upstream_port)
    proxy = None
    try:
        wait_for_port(upstream_port, time.monotonic() + 10)
        scripts = (PROXY_SCRIPT,) + ((args.proxy_script,) if args.proxy_script else ())
        footprints = footprint(upstream_port, args.starts, scripts)
        results_footprint = footprints[PROXY_SCRIPT]
        proxy, proxy_port, _ = start_proxy(upstream_port)
        targets = [openai_target("proxy", proxy_port, "/v1/chat/completions"), direct_target(upstream_port)]
        if args.compare:
            match = re.match(r"http://(?:127\.0\.0\.1|localhost):(\d+)(/.*)?$", args.compare.rstrip("/"))
            if not match:
                parser.error("--compare must be http://127.0.0.1:PORT/... (loopback only)")
            targets.append(openai_target("compare", int(match.group(1)),
                                         (match.group(2) or "") + "/chat/completions", args.compare_key))
        results = {"machine": {"python": sys.version.split()[0], "cores": os.cpu_count(),
                               "platform": sys.platform, "date": time.strftime("%Y-%m-%d")},
                   "quick": args.quick}
        print("time to first token: %d sequential streams each..." % sizes["ttft"], flush=True)
        results["ttft"] = time_to_first_token(targets, sizes["ttft"], proxy.pid)
        print("proxy CPU: %d sequential streams on a kept-alive connection..." % sizes["cpu"], flush=True)
        results["cpu_ms_per_request"] = cpu_per_request(targets[0], proxy.pid, sizes["cpu"]) * 1000
        print("forwarding rate: one stream of %d chunks..." % sizes["chunks"], flush=True)
        results["rate"] = forwarding_rate(targets, sizes["chunks"], sizes["rounds"])
        print("concurrency: %d streams x %d chunks every %gs..." % (sizes["streams"], sizes["stream_chunks"],
                                                                   sizes["every"]), flush=True)
        results["concurrency"] = concurrency(targets, sizes["streams"], sizes["stream_chunks"], sizes["every"])
        print("many open streams: %d slow streams..." % sizes["many"], flush=True)
        results["many"] = concurrency(targets[:2], sizes["many"], sizes["many_chunks"], sizes["many_every"])
        results["many"]["proxy"]["peak_rss_mb"] = memory_kb(proxy.pid, "VmHWM") / 1024
        results["footprint"] = results_footprint
        if args.proxy_script:
            results["footprint_other"] = footprints[args.proxy_script]
    finally:
        for process in (proxy, upstream):
            if process is not None:
                process.kill()
                process.wait()
    report(results, [t.name for t in targets])
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    complete = all(c["completed"] == c["streams"]
                   for workload in ("concurrency", "many") for c in results[workload].values())
    return 0 if complete else 1


def report(results, names) -> None:
    ttft, rate, conc = results["ttft"], results["rate"], results["concurrency"]
    many, foot = results["many"]["proxy"], results["footprint"]
    rows = [("time to first token p50 (ms)", [ttft[n]["p50_ms"] for n in names]),
            ("time to first token p99 (ms)", [ttft[n]["p99_ms"] for n in names]),
            ("forwarding rate, one stream (chunks/s)", [rate[n]["chunks_per_s"] for n in names]),
            ("concurrent streams completed", ["%d/%d" % (conc[n]["completed"], conc[n]["streams"]) for n in names]),
            ("per-chunk delay p50 (ms)", [conc[n]["delay_p50_ms"] for n in names]),
            ("per-chunk delay p99, streams started at once (ms)", [conc[n]["delay_p99_ms"] for n in names])]
    width = max(len(r[0]) for r in rows) + 2
    print("\n" + "figure".ljust(width) + "".join(n.rjust(14) for n in names) + "added by proxy".rjust(16))
    for label, values in rows:
        cells = "".join((v if isinstance(v, str) else "%.2f" % v if v < 1000 else "%.0f" % v).rjust(14)
                        for v in values)
        added = ""
        if label.endswith("(ms)"):
            added = "%+.2f" % (values[0] - values[1])
        print(label.ljust(width) + cells + added.rjust(16))
    print("\nproxy CPU per request (user and system): %.3f ms on a kept-alive connection, %.3f ms with a new "
          "connection each (the time-to-first-token requests)"
          % (results["cpu_ms_per_request"], ttft["proxy"]["cpu_ms_per_request"]))
    direct = results["many"]["direct"]
    print("\nmany open streams: %d/%d completed through the proxy (%d/%d direct), proxy peak RSS %.1f MB"
          % (many["completed"], many["streams"], direct["completed"], direct["streams"], many["peak_rss_mb"]))
    for title, figures in (("", foot), ("the other version, ", results.get("footprint_other"))):
        for name, label, _, _ in START_WAYS:
            if figures:
                print("footprint, %s%s: idle RSS %.1f MB, start to listening %.0f ms%s"
                      % (title, label, figures[name]["idle_rss_mb"], figures[name]["startup_ms"],
                         " (medians of %d starts)" % figures[name]["starts"] if figures[name]["starts"] > 1 else ""))


if __name__ == "__main__":
    sys.exit(main())
