"""Code generated from ``protocols/federation.proto`` by grpcio-tools and mypy-protobuf.

Do not edit: regenerate with ``python -m secure_fl.transport.codegen`` (``protocols/generate.sh``);
``tests/transport/test_transport_codegen.py`` fails when these files are stale.
"""
