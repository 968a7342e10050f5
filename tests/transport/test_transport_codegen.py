"""The generated code is reproducible from protocols/*.proto, and matches what the server serves."""

from __future__ import annotations

import subprocess
import sys

import pytest

from secure_fl.transport import codegen
from secure_fl.transport._generated import federation_pb2 as pb

pytest.importorskip("grpc_tools")


def test_checked_in_generated_code_is_current() -> None:
    stale = codegen.stale_files()
    assert stale == [], f"regenerate with protocols/generate.sh: {stale}"


def test_check_command_reports_staleness(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Point the check at a copy of the generated code with one file altered: it must fail.
    fake = tmp_path / "_generated"
    fake.mkdir()
    for name in codegen.OUTPUTS:
        (fake / name).write_bytes((codegen.GENERATED_DIR / name).read_bytes())
    (fake / "federation_pb2.py").write_text("# edited by hand\n")
    monkeypatch.setattr(codegen, "GENERATED_DIR", fake)
    assert codegen.stale_files() == ["federation_pb2.py"]
    assert codegen.main(["--check"]) == 1


def test_generate_script_runs_the_check() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "secure_fl.transport.codegen", "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "current" in out.stdout


def test_service_and_versions_are_named() -> None:
    service = pb.DESCRIPTOR.services_by_name["Federation"]
    assert service.full_name == "secure_fl.federation.v1.Federation"
    assert pb.DESCRIPTOR.package == "secure_fl.federation.v1"
    from secure_fl.transport.server import SERVICE

    assert service.full_name == SERVICE
    phases = {
        "SendAdvertiseKeys",
        "SendShareKeys",
        "UploadMaskedInput",
        "SendConsistencySignature",
        "SendUnmaskResponse",
        "UploadCiphertext",
        "DownloadModel",
    }
    assert phases <= {m.name for m in service.methods}
