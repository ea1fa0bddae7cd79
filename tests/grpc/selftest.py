#!/usr/bin/env python3
"""Self-check of the gRPC test kit: starts server.py, drives client.py in every mode
against it directly, and checks the exact JSON each prints.

Run with the kit's venv python (``$(.ci/install-test-deps) tests/grpc/selftest.py``);
ends with the line ``N passed, N failed`` and exits non-zero on any failure.
"""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
FAIL_DETAILS = "failing as asked"


def run_client(port, *args):
    completed = subprocess.run(
        [sys.executable, os.path.join(HERE, "client.py"), "--target", f"127.0.0.1:{port}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = completed.stdout.strip()
    return completed.returncode, json.loads(output) if output else None


def main():
    server = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "server.py"), "--port", "0", "--id", "selftest"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    passed = failed = 0
    try:
        # Readiness: the one line the server prints once it accepts calls.
        line = server.stdout.readline().strip()
        name, _, port = line.partition(" ")
        assert name == "LISTENING" and port.isdigit(), f"unexpected first line {line!r}"
        cases = [
            (("unary", "--count", "5"), 0, {"ok": 5, "servers": {"selftest": 5}}),
            (
                ("bidi", "--messages", "3"),
                0,
                {"messages": ["hello-0", "hello-1", "hello-2"], "servers": {"selftest": 3}},
            ),
            (("fail", "--code", "7"), 0, {"code": "PERMISSION_DENIED", "details": FAIL_DETAILS}),
            (("fail", "--code", "5"), 0, {"code": "NOT_FOUND", "details": FAIL_DETAILS}),
        ]
        for args, want_code, want_output in cases:
            code, output = run_client(port, *args)
            if (code, output) == (want_code, want_output):
                passed += 1
                print(f"ok   {' '.join(args)}: {json.dumps(output, sort_keys=True)}")
            else:
                failed += 1
                print(f"FAIL {' '.join(args)}: exit {code}, {output!r}; wanted {want_output!r}")
    finally:
        server.stdin.close()  # end of stdin stops the server
        server.wait(timeout=30)
    if server.returncode != 0:
        failed += 1
        print(f"FAIL server exited with {server.returncode}")
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
