"""The README's recipe end to end: `secure-fl provision --task unet`, then a server and two site
processes train the 3D-UNet over gRPC with no JSON edited by hand, and each site's final model
loads into the UNet (as the README shows)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from transport_helpers import REPO, wait_until

pytest.importorskip("monai")

from secure_fl.transport.cli import main as cli_main


def _patch(path: Path, **values: object) -> None:
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config, indent=1))


@pytest.mark.slow
def test_provisioned_unet_federation_trains_over_grpc(tmp_path: Path) -> None:
    from secure_fl.data import generate_federation
    from secure_fl.training import ModelConfig, build_unet, set_state
    from secure_fl.transport.tensors import loads

    datalist = generate_federation(tmp_path / "data", sites=2, shape=(24, 24, 24))
    root = tmp_path / "fed"
    argv = ["provision", str(root), "--sites", "site-A,site-B", "--no-ckks", "--rounds", "1"]
    argv += ["--listen", "127.0.0.1:0", "--task", "unet", "--datalist-template", str(datalist)]
    argv += ["--grid", "16,16,16", "--patch", "16,16,16", "--channels", "4,8"]
    assert cli_main(argv) == 0
    # Only what a test needs: a free port, and deadlines that fail fast instead of hanging.
    server_json = root / "server" / "server.json"
    _patch(server_json, deadlines={"wait_for_sites_s": 60.0, "update_s": 120.0, "linger_s": 3.0})
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(key: str, *args: str) -> None:
        with open(logs / f"{key}.log", "ab") as log:
            procs[key] = subprocess.Popen(
                [sys.executable, "-m", "secure_fl.transport.cli", *args],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "SECURE_FL_THREADS": "1"},
            )

    def all_logs() -> str:
        return "\n".join(f"--- {k} ---\n{(logs / f'{k}.log').read_text()[-4000:]}" for k in procs)

    try:
        spawn("server", "server", str(server_json))
        endpoint = root / "server" / "state" / "endpoint.json"
        wait_until(lambda: endpoint.exists() and endpoint.stat().st_size > 0, 60, "the server")
        address = json.loads(endpoint.read_text())["address"]
        for name in ("site-A", "site-B"):
            site_json = root / "sites" / name / "site.json"
            _patch(site_json, server=address, reconnect_timeout_s=60.0)
            spawn(name, "site", str(site_json))
        codes = {key: proc.wait(240) for key, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
    assert codes == {"server": 0, "site-A": 0, "site-B": 0}, all_logs()
    lines = (logs / "server.log").read_text().splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    done = [e for e in events if e.get("event") == "round-completed"]
    assert [(e["round"], e["round_id"]) for e in done] == [(1, 0)]
    for name in ("site-A", "site-B"):
        state = loads((root / "sites" / name / "final_model.tensors").read_bytes())
        set_state(build_unet(ModelConfig(channels=(4, 8))), state)  # the README's recipe
