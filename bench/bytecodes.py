"""Where a request's work goes: the Python bytecodes the handler thread executes per
request, by function (its own, not its callees'), from a trace (sys.settrace with opcode
events). Deterministic but for how the upstream's writes happen to be read; work done in C
(JSON, hashing, system calls) is not counted: bench/instructions.py counts everything.

    python bench/bytecodes.py [--requests 200] [--top 40]

The proxy runs in this process, on the benchmark's fake upstream, and answers sequential
streaming chat requests on one kept-alive connection; only its handler thread is traced.
"""

import argparse
import collections
import os
import sys
import threading
import time

import bench_proxy as bench

sys.path.insert(0, os.path.dirname(bench.HERE))
import custom_finstep  # noqa: E402  (the proxy beside this folder)



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="requests traced (default 200)")
    parser.add_argument("--top", type=int, default=40, help="functions listed (default 40)")
    args = parser.parse_args()
    upstream, upstream_port = bench.start_upstream(0)
    bench.wait_for_port(upstream_port, time.monotonic() + 10)
    custom_finstep.log.setLevel("WARNING")
    config = custom_finstep.Config(api_keys=("k-0123456789",), host="127.0.0.1", port=0,
                                   upstream_url="http://127.0.0.1:%d/c" % upstream_port)
    server = custom_finstep.ProxyServer(config)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    counts, calls, tracing = collections.Counter(), collections.Counter(), [False]

    def trace(frame, event, arg):
        code = frame.f_code
        where = "%s:%d(%s)" % (os.path.basename(code.co_filename), code.co_firstlineno, code.co_name)
        if event == "call":
            calls[where] += 1
            frame.f_trace_opcodes = True
        elif event == "opcode":
            counts[where] += 1
        return trace

    handle = custom_finstep.ProxyHandler.handle_one_request

    def traced(handler):
        if not tracing[0]:
            return handle(handler)
        sys.settrace(trace)
        try:
            return handle(handler)
        finally:
            sys.settrace(None)
    custom_finstep.ProxyHandler.handle_one_request = traced
    target = bench.openai_target("proxy", port, "/v1/chat/completions")
    try:
        bench.ask_in_turn(port, target, 50)  # warm: the first requests compile patterns and fill caches
        tracing[0] = True
        bench.ask_in_turn(port, target, args.requests)  # this thread is not traced: only the handler's
        tracing[0] = False
    finally:
        server.shutdown()
        server.server_close()
        upstream.kill()
    total = sum(counts.values())
    print("%.0f bytecodes and %.0f Python calls a request (%d sequential streaming requests, kept alive)"
          % (total / args.requests, sum(calls.values()) / args.requests, args.requests))
    for where, count in counts.most_common(args.top):
        print("%8.1f %5.1f%% %6.2f calls  %s" % (count / args.requests, 100 * count / total,
                                                  calls[where] / args.requests, where))
    return 0


if __name__ == "__main__":
    sys.exit(main())
