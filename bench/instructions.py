"""Instructions the proxy executes per request, counted by valgrind (callgrind): unlike CPU
time, the count hardly moves between runs (about 1 %: how the upstream's writes happen to
be read), so a change of a few per cent shows in one run.

    python bench/instructions.py [--requests 400] [--warm 50] [--proxy-script PATH]

It starts the proxy under valgrind twice, each time against the benchmark's fake upstream,
and sends sequential streaming chat requests on one kept-alive connection (WARM, then
WARM + REQUESTS); the difference of the two totals, divided by REQUESTS, is the user-space
instructions of a request, the start-up and the first requests left out. Needs valgrind
(Debian: apt-get install valgrind); takes about a minute. Never run by CI.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import bench_proxy as bench


def instructions(script: str, upstream_port: int, requests: int, log_level: str = "WARNING") -> int:
    """The instructions valgrind counted for one start of `script` and `requests` requests."""
    port = bench.free_port()
    env = dict(os.environ, FINSTEP_API_KEY="k-0123456789", HOST="127.0.0.1", PORT=str(port),
               FINSTEP_API_URL="http://127.0.0.1:%d/c" % upstream_port, LOG_LEVEL=log_level)
    with tempfile.TemporaryDirectory() as folder:
        bench.lay_out_image(script, folder)
        errors = open(os.path.join(folder, "stderr"), "w+b")  # a file, not a pipe: log lines never block
        proxy = subprocess.Popen(["valgrind", "--tool=callgrind", "--cache-sim=no",
                                  "--callgrind-out-file=" + os.path.join(folder, "callgrind.out"),
                                  sys.executable, "-m", "custom_finstep"], cwd=folder, env=env,
                                 stdout=subprocess.DEVNULL, stderr=errors)
        try:
            bench.wait_for_port(port, time.monotonic() + 120)
            bench.ask_in_turn(port, bench.openai_target("proxy", port, "/v1/chat/completions"), requests)
        finally:
            proxy.send_signal(signal.SIGTERM)
            proxy.wait(timeout=120)
            with errors:
                errors.seek(0)
                report = errors.read().decode("utf-8", "replace")
    found = re.search(r"Collected : (\d+)", report)
    if found is None:
        raise SystemExit("valgrind reported no count:\n" + report[-2000:])
    return int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="requests counted (default 400)")
    parser.add_argument("--warm", type=int, default=50, help="requests before them, left out (default 50)")
    parser.add_argument("--proxy-script", default=bench.PROXY_SCRIPT, help="the custom_finstep.py to count")
    parser.add_argument("--log-level", default="WARNING",
                        help="the proxy's LOG_LEVEL (default WARNING, as the benchmark runs it: no line per request; "
                             "INFO, the proxy's default, writes one)")
    args = parser.parse_args()
    upstream, upstream_port = bench.start_upstream(0)
    try:
        bench.wait_for_port(upstream_port, time.monotonic() + 10)
        before = instructions(args.proxy_script, upstream_port, args.warm, args.log_level)
        after = instructions(args.proxy_script, upstream_port, args.warm + args.requests, args.log_level)
    finally:
        upstream.kill()
    print("%s: %.0f instructions a request (%d sequential streaming requests, kept alive, after %d; LOG_LEVEL=%s)"
          % (args.proxy_script, (after - before) / args.requests, args.requests, args.warm, args.log_level))
    return 0


if __name__ == "__main__":
    sys.exit(main())
