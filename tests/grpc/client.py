#!/usr/bin/env python3
"""gRPC Echo test client for the end-to-end tests: makes calls, prints one JSON line.

Modes: ``unary --count N``, ``bidi --messages N``, ``fail --code C``. Exits 0 only if
the calls behaved as expected, 1 if they did not (the JSON says how), 2 on bad
arguments. See README.md for the exact output of each mode.
"""

import argparse
import json
import os
import queue
import sys

import grpc

# Keep the source tree clean of __pycache__ when importing the helper beside us.
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _stubs  # noqa: E402

echo_pb2, echo_pb2_grpc = _stubs.load()

FAIL_DETAILS = "failing as asked"


def status_code(number):
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return None


def rpc_error(error):
    return {"code": error.code().name, "details": error.details()}


def unary(stub, args, metadata):
    servers = {}
    ok = 0
    for index in range(args.count):
        message = f"{args.message}-{index}"
        try:
            reply = stub.Unary(
                echo_pb2.EchoRequest(message=message), timeout=args.timeout, metadata=metadata
            )
        except grpc.RpcError as error:
            return {"ok": ok, "servers": servers, "error": rpc_error(error)}, False
        if reply.message != message:
            return {
                "ok": ok,
                "servers": servers,
                "error": {"code": "WRONG_REPLY", "details": f"sent {message!r}, got {reply.message!r}"},
            }, False
        ok += 1
        servers[reply.server_id] = servers.get(reply.server_id, 0) + 1
    return {"ok": ok, "servers": servers}, ok == args.count


def bidi(stub, args, metadata):
    # Ping-pong: message i+1 is sent only after reply i arrived, so a hop that
    # buffers a stream instead of forwarding each message makes this time out.
    outgoing = queue.Queue()
    done = object()

    def requests():
        while True:
            item = outgoing.get()
            if item is done:
                return
            yield item

    sent = [f"{args.message}-{index}" for index in range(args.messages)]
    received = []
    servers = {}
    call = stub.Bidi(requests(), timeout=args.timeout, metadata=metadata)
    try:
        if sent:
            outgoing.put(echo_pb2.EchoRequest(message=sent[0]))
        else:
            outgoing.put(done)
        for reply in call:
            received.append(reply.message)
            servers[reply.server_id] = servers.get(reply.server_id, 0) + 1
            if len(received) < len(sent):
                outgoing.put(echo_pb2.EchoRequest(message=sent[len(received)]))
            else:
                outgoing.put(done)
    except grpc.RpcError as error:
        outgoing.put(done)
        return {"messages": received, "servers": servers, "error": rpc_error(error)}, False
    return {"messages": received, "servers": servers}, received == sent


def fail(stub, args, metadata):
    expected = status_code(args.code)
    try:
        reply = stub.Fail(
            echo_pb2.EchoRequest(message="fail", status=args.code),
            timeout=args.timeout,
            metadata=metadata,
        )
    except grpc.RpcError as error:
        result = rpc_error(error)
        return result, error.code() == expected and error.details() == FAIL_DETAILS
    return {"code": "OK", "details": "", "server_id": reply.server_id}, False


def parse_metadata(pairs):
    metadata = []
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise ValueError(f"--metadata wants KEY=VALUE, got {pair!r}")
        metadata.append((key.lower(), value))
    return metadata


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT to dial (insecure h2c)")
    parser.add_argument("--authority", help="value of :authority (default: the target)")
    parser.add_argument(
        "--metadata", action="append", default=[], help="KEY=VALUE sent with every call"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per RPC")
    parser.add_argument("--message", default="hello", help="message prefix")
    modes = parser.add_subparsers(dest="mode", required=True)
    unary_parser = modes.add_parser("unary", help="N unary calls on one channel")
    unary_parser.add_argument("--count", type=int, default=1)
    bidi_parser = modes.add_parser("bidi", help="one bidi stream, N messages ping-pong")
    bidi_parser.add_argument("--messages", type=int, default=3)
    fail_parser = modes.add_parser("fail", help="one Fail call expected to end with CODE")
    fail_parser.add_argument("--code", type=int, required=True)
    args = parser.parse_args()
    if args.mode == "fail" and status_code(args.code) in (None, grpc.StatusCode.OK):
        parser.error(f"--code {args.code} is not a failing gRPC status code (1 to 16)")
    if args.mode == "unary" and args.count < 0 or args.mode == "bidi" and args.messages < 0:
        parser.error("counts must not be negative")

    options = []
    if args.authority:
        options.append(("grpc.default_authority", args.authority))
    try:
        metadata = parse_metadata(args.metadata)
    except ValueError as error:
        parser.error(str(error))
    with grpc.insecure_channel(args.target, options=options) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        run = {"unary": unary, "bidi": bidi, "fail": fail}[args.mode]
        result, as_expected = run(stub, args, metadata)
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    sys.stdout.flush()
    return 0 if as_expected else 1


if __name__ == "__main__":
    sys.exit(main())
