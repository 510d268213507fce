"""Stress: hostile clients against custom_finstep.py, as an attacker would try them.

One command, standard library only, traffic on 127.0.0.1 only, stops by itself:

    python bench/attack.py                       # every attack, about a minute and a half
    python bench/attack.py --only slowloris      # one attack: headers, bodies, chunks, slowloris
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

CHAT = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def start_proxy(script: str, upstream_port: int):
    """The proxy with default settings but for its upstream and port."""
    port = bench.free_port()
    env = dict(os.environ, FINSTEP_API_KEY="attack-key-0123456789", HOST="127.0.0.1", PORT=str(port),
               FINSTEP_API_URL="http://127.0.0.1:%d/completion" % upstream_port, LOG_LEVEL="ERROR")
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
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(CHAT + b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            answer = b""
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        return answer.startswith(b"HTTP/1.1 200 ") and answer.count(b'"content":"1') == 3
    except OSError:
        return False


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


ATTACKS = {"headers": headers_attack, "bodies": bodies_attack, "chunks": chunks_attack,
           "slowloris": slowloris_attack}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(ATTACKS), action="append", help="run just this attack")
    parser.add_argument("--proxy-script", default=bench.PROXY_SCRIPT, help="the proxy to attack")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = parser.parse_args(argv)
    upstream, upstream_port = bench.start_upstream(0)
    results = {}
    try:
        bench.wait_for_port(upstream_port, time.monotonic() + 10)
        for name in args.only or ["headers", "bodies", "chunks", "slowloris"]:
            print("%s..." % name, flush=True)
            proxy, port = start_proxy(os.path.abspath(args.proxy_script), upstream_port)
            try:
                idle = bench.memory_kb(proxy.pid, "VmRSS") / 1024
                outcome = ATTACKS[name](port) or {}
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
