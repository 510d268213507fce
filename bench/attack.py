"""Stress: hostile clients against custom_finstep.py, as an attacker would try them.

One command, standard library only, traffic on 127.0.0.1 only, stops by itself:

    python bench/attack.py                       # every attack, about two minutes
    python bench/attack.py --only slowloris      # one attack: headers, bodies, chunks, slowloris,
                                                 # think, keys, responses
    python bench/attack.py --proxy-script OLD.py # the same attacks against another version
    python bench/attack.py --json out.json       # also write the figures as JSON

Each attack gets a fresh proxy with default settings (a fake Finstep upstream behind it)
and reports the proxy's peak resident memory (VmHWM), and for the slowloris flood the
share of normal requests served while it lasts:

    headers    150 connections, each sending 99 header lines of 65 KB and never finishing
    bodies     100 connections, each sending all but the last byte of an 8 MB body
    chunks     4 connections, each sending an 8 MB body in 2-byte chunks (28 MB on the wire)
    slowloris  1,500 connections sending their heads a byte a second, reconnecting when
               closed, for 30 s, while one client asks a question every 0.2 s
    think      8 MB bodies of unclosed <think> tags (and 100,000 messages with one each), to
               chat completions and count_tokens, one after another, while /health is asked
               every 0.05 s: the proxy's CPU per request and the longest /health wait
    keys       1,100 requests each with another 60 KB pass-through key (a pass-through proxy)
    responses  3,000 Responses requests each asking 19,000 characters of Chinese, every one
               remembered for its continuations (FINSTEP_SESSION_MEMORY bounds them)

Not part of CI and never timed by a test: a machine that measures, not a check.
"""

import argparse
import json
import os
import selectors
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_proxy as bench  # noqa: E402  (the fake upstream and process helpers)

CHAT = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def start_proxy(script: str, upstream_port: int, pass_through: bool = False):
    """The proxy with default settings but for its upstream and port (and, `pass_through`,
    no key of its own, each client bringing one, and the default log level, since a line
    logged is where a pass-through key is hidden: the others log errors only)."""
    port = bench.free_port()
    env = dict(os.environ, FINSTEP_API_KEY="" if pass_through else "attack-key-0123456789", HOST="127.0.0.1",
               PORT=str(port), FINSTEP_API_URL="http://127.0.0.1:%d/completion" % upstream_port,
               LOG_LEVEL="INFO" if pass_through else "ERROR")
    process = subprocess.Popen([sys.executable, script], env=env, stderr=subprocess.DEVNULL)
    bench.wait_for_port(port, time.monotonic() + 10)
    return process, port


def send_forever(port: int, data: bytes, hold: float) -> None:
    """Send `data` on a new connection as fast as the proxy takes it, then hold it open."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=hold + 5) as sock:
            sock.sendall(data)
            time.sleep(hold)
    except OSError:
        pass  # refused or closed by the proxy: exactly what a bounded proxy may do


def flood(port: int, connections: int, data: bytes, hold: float = 3.0) -> None:
    threads = [threading.Thread(target=send_forever, args=(port, data, hold)) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def headers_attack(port: int) -> None:
    head = b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 65000) for i in range(99))
    flood(port, 150, head)  # no blank line: the head never ends


def bodies_attack(port: int) -> None:
    size = 8388608
    flood(port, 100, CHAT + b"Content-Length: %d\r\n\r\n" % size + b"a" * (size - 1))


def chunks_attack(port: int) -> None:
    body = CHAT + b"Transfer-Encoding: chunked\r\n\r\n" + b"2\r\nab\r\n" * (8388608 // 2 - 1)
    flood(port, 4, body, hold=12.0)


def normal_request(port: int) -> bool:
    body = json.dumps({"stream": True, "messages": [{"role": "user", "content": "bench n=3 every=0"}]}).encode()
    answer = post(port, "/v1/chat/completions", body, b"Authorization: Bearer attack-client-key-0123\r\n",
                  timeout=5)  # the key for a pass-through proxy; one that holds its own ignores it
    return answer.startswith(b"HTTP/1.1 200 ") and answer.count(b'"content":"1') == 3


def slowloris_attack(port: int, connections: int = 1500, seconds: float = 30.0) -> dict:
    """Slow heads a byte a second, each reconnected when the proxy closes it; meanwhile one
    client asks a question every 0.2 s. Returns the served share and the attack's size."""
    head = CHAT + b"Content-Length: 10\r\n" + b"X-Slow: " + b"z" * 4000
    selector = selectors.DefaultSelector()
    progress = {}  # socket -> bytes of `head` sent
    reconnects = [0]

    def connect() -> None:
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        selector.register(sock, selectors.EVENT_READ)
        progress[sock] = 0

    def closed(sock) -> None:
        selector.unregister(sock)
        sock.close()
        del progress[sock]
        reconnects[0] += 1
        connect()

    stop, served, asked = threading.Event(), [0], [0]

    def normal_client() -> None:
        while not stop.is_set():
            asked[0] += 1
            served[0] += normal_request(port)
            time.sleep(0.2)

    for _ in range(connections):
        connect()
    client = threading.Thread(target=normal_client)
    began = time.monotonic()
    client.start()
    next_byte = began
    while time.monotonic() - began < seconds:
        for key, _ in selector.select(0.05):
            try:
                if not key.fileobj.recv(65536):
                    closed(key.fileobj)
            except BlockingIOError:
                pass
            except OSError:
                closed(key.fileobj)
        if time.monotonic() >= next_byte:
            next_byte += 1.0
            for sock in list(progress):
                try:
                    sock.send(head[progress[sock]:progress[sock] + 1])
                    progress[sock] += 1
                except BlockingIOError:
                    pass
                except OSError:
                    closed(sock)
    stop.set()
    client.join()
    for sock in list(progress):
        sock.close()
    selector.close()
    return {"normal_served": served[0], "normal_asked": asked[0],
            "served_percent": 100.0 * served[0] / max(1, asked[0]), "reconnects": reconnects[0]}


def post(port: int, path: str, body: bytes, headers: bytes = b"", method: bytes = b"POST",
         timeout: float = 120.0) -> bytes:
    """One request on its own connection; the whole answer (b"" when the proxy hung up)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n%s"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n"
                         % (method, path.encode(), headers, len(body)))
            sock.sendall(body)
            answer = b""
            while True:
                data = sock.recv(65536)
                if not data:
                    return answer
                answer += data
    except OSError:
        return b""


THINK_BYTES = [8 * 1024 * 1024]  # --think-bytes: the size of the think attack's bodies


def think_attack(port: int, pid: int) -> dict:
    """Bodies that cost a quadratic regular expression seconds to hours, 12 one after another
    (each fits the body budget alone), while /health is timed: CPU per request and the longest
    /health wait. Against a version with that expression, --think-bytes 210000 takes minutes."""
    size = THINK_BYTES[0]
    thinks = json.dumps({"model": "m", "max_tokens": 1, "stream": True, "messages": [
        {"role": "user", "content": "bench n=1 every=0"}, {"role": "assistant", "content": "<think>" * (size // 8)},
        {"role": "user", "content": "bench n=1 every=0"}]}).encode()
    many = json.dumps({"model": "m", "max_tokens": 1, "stream": True, "messages": [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "问<think>"} for i in range(size // 84)]
        + [{"role": "user", "content": "bench n=1 every=0"}]}, ensure_ascii=False).encode()
    jobs = [(path, body) for path in ("/v1/chat/completions", "/v1/messages/count_tokens") for body in (thinks, many)]
    jobs = (jobs * 3)[:12]
    stop, waits, answers = threading.Event(), [], []

    def health() -> None:
        while not stop.is_set():
            began = time.monotonic()
            post(port, "/health", b"", method=b"GET")
            waits.append(time.monotonic() - began)
            time.sleep(0.05)

    def attacker(queue) -> None:
        while queue:
            path, body = queue.pop()
            answers.append(post(port, path, body).split(b" ", 2)[1:2])

    watcher = threading.Thread(target=health)
    watcher.start()
    cpu = bench.cpu_seconds(pid)
    attacker(jobs)
    cpu = bench.cpu_seconds(pid) - cpu
    stop.set()
    watcher.join()
    return {"requests": len(answers), "statuses": sorted({b"".join(a).decode() for a in answers}),
            "cpu_seconds_per_request": round(cpu / max(1, len(answers)), 3),
            "longest_health_wait_ms": round(1000 * max(waits), 1)}


def keys_attack(port: int, pid: int) -> dict:
    """Every request with another 60 KB key, each answered 401, as a pass-through proxy must."""
    body = json.dumps({"messages": [{"role": "user", "content": "bench n=1 every=0"}]}).encode()
    statuses = set()
    for index in range(1100):
        key = b"%06d" % index + b"k" * 60000
        statuses.add(post(port, "/v1/chat/completions", body, b"Authorization: Bearer %s\r\n" % key)[9:12])
    return {"requests": 1100, "statuses": sorted(status.decode() for status in statuses)}


def responses_attack(port: int, pid: int) -> dict:
    """Responses that each stay remembered for a continuation or a fork: 3,000 questions of
    19,000 Chinese characters (just under what a fold keeps), some 170 MB in all as text."""
    statuses = set()
    for index in range(3000):
        body = json.dumps({"model": "m", "input": "%06d" % index + "问" * 19000}, ensure_ascii=False).encode()
        statuses.add(post(port, "/v1/responses", body)[9:12])
    return {"requests": 3000, "statuses": sorted(status.decode() for status in statuses)}


ATTACKS = {"headers": headers_attack, "bodies": bodies_attack, "chunks": chunks_attack,
           "slowloris": slowloris_attack, "think": think_attack, "keys": keys_attack,
           "responses": responses_attack}
NEEDS_PID = ("think", "keys", "responses")  # attacks given the proxy's process id too


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(ATTACKS), action="append", help="run just this attack")
    parser.add_argument("--proxy-script", default=bench.PROXY_SCRIPT, help="the proxy to attack")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    parser.add_argument("--think-bytes", type=int, default=THINK_BYTES[0],
                        help="size of the think attack's bodies (default 8 MB)")
    args = parser.parse_args(argv)
    THINK_BYTES[0] = args.think_bytes
    upstream, upstream_port = bench.start_upstream(0)
    results = {}
    try:
        bench.wait_for_port(upstream_port, time.monotonic() + 10)
        for name in args.only or list(ATTACKS):
            print("%s..." % name, flush=True)
            proxy, port = start_proxy(os.path.abspath(args.proxy_script), upstream_port, pass_through=name == "keys")
            try:
                idle = bench.memory_kb(proxy.pid, "VmRSS") / 1024
                outcome = (ATTACKS[name](port, proxy.pid) if name in NEEDS_PID else ATTACKS[name](port)) or {}
                time.sleep(0.5)
                alive = proxy.poll() is None and normal_request(port)
                results[name] = dict(outcome, idle_rss_mb=round(idle, 1), alive_after=alive,
                                     peak_rss_mb=round(bench.memory_kb(proxy.pid, "VmHWM") / 1024, 1))
            finally:
                proxy.kill()
                proxy.wait()
    finally:
        upstream.kill()
        upstream.wait()
    for name, figures in results.items():
        line = "%-10s peak RSS %7.1f MB (idle %.1f MB), serves afterwards: %s" % (
            name, figures["peak_rss_mb"], figures["idle_rss_mb"], "yes" if figures["alive_after"] else "NO")
        if "cpu_seconds_per_request" in figures:
            line += "; %d requests (%s), proxy CPU %.3f s a request, longest /health wait %.1f ms" % (
                figures["requests"], ", ".join(figures["statuses"]), figures["cpu_seconds_per_request"],
                figures["longest_health_wait_ms"])
        elif "statuses" in figures:
            line += "; %d requests (%s)" % (figures["requests"], ", ".join(figures["statuses"]))
        if "served_percent" in figures:
            line += "; normal requests served during it: %d/%d (%.1f %%), %d attacker reconnects" % (
                figures["normal_served"], figures["normal_asked"], figures["served_percent"], figures["reconnects"])
        print(line)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
