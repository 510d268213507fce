"""Two versions of the proxy side by side, in alternated rounds: where this machine's speed
drifts by tens of per cent within an hour, only figures measured in turns compare.

    python bench/ab.py OTHER/custom_finstep.py                  # CPU per request, 12 rounds
    python bench/ab.py OTHER/custom_finstep.py --workload burst --rounds 8
    python bench/ab.py OTHER/custom_finstep.py --workload forwarding

Both versions are laid out as the Docker image has them (bytecode compiled beside the file),
run as `python -m custom_finstep` with LOG_LEVEL=WARNING against one fake Finstep upstream
(bench_proxy.py's), and measured in turns: rounds alternate which goes first. Workloads:
  cpu         1,000 sequential streaming requests on one kept-alive connection a round; the
              proxy's CPU time (every thread's, in nanoseconds, from /proc/PID/task/*/schedstat)
              per request
  forwarding  one stream of 20,000 chunks a round; chunks per second
  burst       200 streams started at once, 20 chunks each 100 ms apart, a round; the p99 of
              each chunk's delay from the upstream's send to the client
Prints each version's median over the rounds, and every round's figure. Never run by CI.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import bench_proxy as bench


def cpu_nanoseconds(pid: int) -> int:
    """CPU time every thread of a process has used (those still running)."""
    total = 0
    for thread in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/schedstat" % (pid, thread)) as stat:
                total += int(stat.read().split()[0])
        except OSError:
            pass  # a thread that ended meanwhile
    return total


def cpu_round(target: bench.Target, pid: int, requests: int) -> float:
    """Microseconds of CPU a request, over `requests` on one kept-alive connection (counted
    while it is open: the thread serving it is one of those counted)."""
    request = target.request(bench.FIRST_TOKEN_QUERY).replace(b"Connection: close\r\n", b"")
    with socket.create_connection(("127.0.0.1", target.port), timeout=30) as sock:
        bench.ask_kept_alive(sock, request, target.answer_marker)
        before = cpu_nanoseconds(pid)
        for _ in range(requests):
            bench.ask_kept_alive(sock, request, target.answer_marker)
        return (cpu_nanoseconds(pid) - before) / requests / 1000


def forwarding_round(target: bench.Target) -> float:
    _, events, seconds = bench.stream_once(target, "bench n=20000 every=0", timeout=120)
    return events / seconds


def burst_round(target: bench.Target) -> float:
    out = bench.concurrency([target], 200, 20, 0.1)[target.name]
    if out["completed"] != out["streams"]:
        raise SystemExit("%s: %d of %d streams completed" % (target.name, out["completed"], out["streams"]))
    return out["delay_p99_ms"]


WORKLOADS = {"cpu": "µs of CPU a request", "forwarding": "chunks/s", "burst": "ms, per-chunk delay p99"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", help="the other version's custom_finstep.py")
    parser.add_argument("--this", default=bench.PROXY_SCRIPT, help="this version's (default: the one beside bench/)")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="cpu")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--requests", type=int, default=1000, help="requests a round, for cpu (default 1000)")
    args = parser.parse_args(argv)
    upstream, upstream_port = bench.start_upstream(0)
    proxies, folders = [], []
    try:
        bench.wait_for_port(upstream_port, time.monotonic() + 10)
        for name, script in (("this", args.this), ("other", args.other)):
            folder = tempfile.TemporaryDirectory()
            folders.append(folder)
            bench.lay_out_image(script, folder.name)
            port = bench.free_port()
            env = dict(os.environ, FINSTEP_API_KEY="bench-key", HOST="127.0.0.1", PORT=str(port),
                       FINSTEP_API_URL="http://127.0.0.1:%d/completion" % upstream_port, LOG_LEVEL="WARNING",
                       FINSTEP_MAX_STREAMS="4000")
            process = subprocess.Popen([sys.executable, "-m", "custom_finstep"], cwd=folder.name, env=env,
                                       stderr=subprocess.DEVNULL)
            proxies.append((name, process, bench.openai_target(name, port, "/v1/chat/completions")))
        for _, process, target in proxies:
            bench.wait_for_port(target.port, time.monotonic() + 10)
            cpu_round(target, process.pid, 50)  # warm: the upstream connection pooled, the code run once
        figures = {name: [] for name, _, _ in proxies}
        for index in range(args.rounds):
            for name, process, target in proxies if index % 2 == 0 else proxies[::-1]:
                if args.workload == "cpu":
                    figures[name].append(cpu_round(target, process.pid, args.requests))
                elif args.workload == "forwarding":
                    figures[name].append(forwarding_round(target))
                else:
                    figures[name].append(burst_round(target))
        print("%s, %d alternated rounds (%s):" % (args.workload, args.rounds, WORKLOADS[args.workload]))
        for name, script in (("this", args.this), ("other", args.other)):
            values = figures[name]
            print("  %-5s median %10.1f   rounds %s   %s" % (name, statistics.median(values),
                                                           " ".join("%.1f" % v for v in values), script))
    finally:
        for _, process, _ in proxies:
            process.kill()
        upstream.kill()
        for folder in folders:
            folder.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
