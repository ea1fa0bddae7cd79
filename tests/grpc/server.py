#!/usr/bin/env python3
"""gRPC Echo test server for the end-to-end tests (insecure h2c on loopback).

Prints exactly one stdout line, ``LISTENING <port>``, once it accepts calls, then
serves until SIGTERM, SIGINT or end of standard input. Logs go to stderr. See
README.md for the protocol the Rust tests rely on.
"""

import argparse
import logging
import os
import signal
import sys
import threading
from concurrent import futures

import grpc

# Keep the source tree clean of __pycache__ when importing the helper beside us.
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _stubs  # noqa: E402

echo_pb2, echo_pb2_grpc = _stubs.load()

FAIL_DETAILS = "failing as asked"


def status_code(number):
    """The grpc.StatusCode numbered ``number``, or None."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return None


class Echo(echo_pb2_grpc.EchoServicer):
    def __init__(self, server_id):
        self.server_id = server_id

    def Unary(self, request, context):
        return echo_pb2.EchoReply(message=request.message, server_id=self.server_id)

    def Bidi(self, request_iterator, context):
        for request in request_iterator:
            yield echo_pb2.EchoReply(message=request.message, server_id=self.server_id)

    def Fail(self, request, context):
        code = status_code(request.status)
        if code is None or code == grpc.StatusCode.OK:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"status {request.status} is not a failing gRPC status code",
            )
        context.abort(code, FAIL_DETAILS)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port to bind (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--id", required=True, help="server id returned in every reply")
    parser.add_argument(
        "--ignore-stdin",
        action="store_true",
        help="do not exit at end of standard input (for runs without a stdin pipe)",
    )
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    # No SO_REUSEPORT: a second server on a busy port must fail, not share it.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=32), options=[("grpc.so_reuseport", 0)]
    )
    echo_pb2_grpc.add_EchoServicer_to_server(Echo(args.id), server)
    host = f"[{args.host}]" if ":" in args.host else args.host
    try:
        port = server.add_insecure_port(f"{host}:{args.port}")
    except RuntimeError:
        # Newer grpcio raises where older versions returned port 0.
        port = 0
    if port == 0:
        print(f"server.py: could not bind {host}:{args.port}", file=sys.stderr)
        return 1
    server.start()
    sys.stdout.write(f"LISTENING {port}\n")
    sys.stdout.flush()

    if not args.ignore_stdin:

        def watch_stdin():
            # The parent holds our stdin; its end (or the parent's death) stops us.
            # Raw reads of fd 0: a daemon thread blocked in sys.stdin's buffered
            # reader holds its lock and aborts interpreter shutdown.
            try:
                while os.read(0, 4096):
                    pass
            except OSError:
                pass
            stop.set()

        threading.Thread(target=watch_stdin, daemon=True).start()

    stop.wait()
    server.stop(grace=2).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
