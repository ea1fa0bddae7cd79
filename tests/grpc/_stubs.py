"""Generates the Echo stubs from echo.proto at run time and imports them.

Owns stub generation only: nothing generated is committed. Stubs go into
``$HYBRIDGE_GRPC_STUBS/<sha256 of echo.proto>/`` when that variable is set (shared
by many concurrent test processes: each generates into a private directory and
renames it into place, so readers never see a half-written module), otherwise into
a temporary directory removed at exit.
"""

import atexit
import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import tempfile

PROTO_DIR = os.path.dirname(os.path.abspath(__file__))
PROTO_FILE = "echo.proto"


def _generate(out_dir):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={PROTO_DIR}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            PROTO_FILE,
        ],
        check=True,
    )


def _stub_dir():
    root = os.environ.get("HYBRIDGE_GRPC_STUBS")
    if not root:
        out_dir = tempfile.mkdtemp(prefix="hybridge-grpc-stubs-")
        atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
        _generate(out_dir)
        return out_dir

    with open(os.path.join(PROTO_DIR, PROTO_FILE), "rb") as proto:
        digest = hashlib.sha256(proto.read()).hexdigest()[:16]
    out_dir = os.path.join(root, digest)
    if os.path.isfile(os.path.join(out_dir, "echo_pb2_grpc.py")):
        return out_dir
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=root)
    try:
        _generate(staging)
        try:
            os.rename(staging, out_dir)
        except OSError:
            # Another process put its copy in place first; use that one.
            if not os.path.isfile(os.path.join(out_dir, "echo_pb2_grpc.py")):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def load():
    """Returns the generated modules ``(echo_pb2, echo_pb2_grpc)``."""
    out_dir = _stub_dir()
    if out_dir not in sys.path:
        sys.path.insert(0, out_dir)
    return importlib.import_module("echo_pb2"), importlib.import_module("echo_pb2_grpc")
