"""Regenerate (or check) the Python code of the federation protocol from ``protocols/*.proto``.

``python -m secure_fl.transport.codegen`` rewrites ``secure_fl/transport/_generated/`` from
``protocols/federation.proto`` with grpcio-tools (messages, service stubs) and mypy-protobuf (type
stubs); ``--check`` regenerates into a temporary directory and exits 1 when the checked-in files
differ, naming them. The output depends only on the ``.proto`` files and the pinned versions of
grpcio-tools and mypy-protobuf (development dependencies).

This is a development tool: it needs the source tree (``protocols/`` next to ``secure_fl/``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from secure_fl.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
GENERATED_DIR = PACKAGE_DIR / "_generated"
REPO_ROOT = PACKAGE_DIR.parent.parent
PROTO_DIR = REPO_ROOT / "protocols"
PROTO_FILES = ("federation.proto",)
# Generated files, relative to GENERATED_DIR. __init__.py is written by hand.
OUTPUTS = tuple(
    f"{Path(p).stem}{suffix}"
    for p in PROTO_FILES
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
)
# The virtual import path of the protos: generated imports then read
# ``from secure_fl.transport._generated import federation_pb2``.
_VIRTUAL = "secure_fl/transport/_generated"


def _plugin(name: str) -> str:
    found = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if found is None:
        raise ConfigError(f"{name} not found: install the dev extra (mypy-protobuf)")
    return found


def generate(out_dir: Path) -> list[Path]:
    """Generate the code for every proto into ``out_dir`` (mirroring the package layout) and
    return the generated files' paths.

    Errors: ConfigError when grpcio-tools or mypy-protobuf is missing, the protos are not found,
    or protoc fails.
    """
    spec = importlib.util.find_spec("grpc_tools")
    if spec is None or spec.origin is None:  # pragma: no cover - dev dependency
        raise ConfigError("grpcio-tools is not installed: install the dev extra")
    include = Path(spec.origin).resolve().parent / "_proto"
    for name in PROTO_FILES:
        if not (PROTO_DIR / name).is_file():
            raise ConfigError(f"{PROTO_DIR / name} not found: run from a source checkout")
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{include}",
        f"-I{_VIRTUAL}={PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(str(PROTO_DIR / name) for name in PROTO_FILES),
    ]
    # protoc runs in its own process: grpc_tools carries its own protobuf runtime, which must not
    # share a process with the one that imported the generated code.
    done = subprocess.run(args, capture_output=True, text=True, check=False)  # noqa: S603
    if done.returncode != 0:
        raise ConfigError(f"protoc failed with status {done.returncode}: {done.stderr.strip()}")
    target = out_dir / _VIRTUAL
    return [target / name for name in OUTPUTS]


def stale_files() -> list[str]:
    """Names of the checked-in generated files that differ from a fresh generation (empty when
    everything is current). Errors: as :func:`generate`."""
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        for fresh in generate(Path(tmp)):
            current = GENERATED_DIR / fresh.name
            if not current.is_file() or current.read_bytes() != fresh.read_bytes():
                stale.append(fresh.name)
        return stale


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: regenerate, or with ``--check`` report stale files (exit status 1)."""
    parser = argparse.ArgumentParser(prog="python -m secure_fl.transport.codegen")
    parser.add_argument(
        "--check", action="store_true", help="do not write; exit 1 if the generated code is stale"
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale generated code: {', '.join(stale)}; run protocols/generate.sh")
            return 1
        print("generated code is current")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for fresh in generate(Path(tmp)):
            shutil.copyfile(fresh, GENERATED_DIR / fresh.name)
            print(f"wrote {(GENERATED_DIR / fresh.name).relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
