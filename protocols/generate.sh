#!/usr/bin/env sh
# Regenerate secure_fl/transport/_generated/ from protocols/*.proto (grpcio-tools + mypy-protobuf).
# Check without writing: protocols/generate.sh --check
set -eu
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
exec "$PY" -m secure_fl.transport.codegen "$@"
