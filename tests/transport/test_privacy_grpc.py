"""Site-level DP over gRPC end to end: a provisioned federation with privacy, four sites on
loopback, and ``secure-fl audit`` on the server's run folder; a site refuses noise below its floor.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Callable

import pytest
import transport_helpers
from transport_helpers import REPO, Federation, wait_until

from secure_fl.privacy import PrivacyConfig, PrivacyLedger, audit_run
from secure_fl.transport.provision import provision
from secure_fl.transport.provision_privacy import add_privacy_arguments, privacy_from_args

NAMES = ["a", "b", "c", "d"]


def _privacy(*flags: str) -> PrivacyConfig:
    """What ``secure-fl provision ... --privacy site --target-epsilon 8 FLAGS`` configures."""
    import argparse

    parser = argparse.ArgumentParser()
    add_privacy_arguments(parser)
    privacy = privacy_from_args(
        parser.parse_args(["--privacy", "site", "--target-epsilon", "8", *flags])
    )
    assert privacy is not None
    return privacy


def _federation(
    make: Callable[..., Federation], monkeypatch: pytest.MonkeyPatch, privacy: PrivacyConfig
) -> Federation:
    monkeypatch.setattr(
        transport_helpers, "provision", functools.partial(provision, privacy=privacy)
    )
    return make(NAMES, protocol="secagg+", rounds=3)


@pytest.mark.slow
@pytest.mark.parametrize("trust", ["central", "distributed"])
def test_dp_federation_over_grpc_audits_pass(
    federation: Callable[..., Federation], monkeypatch: pytest.MonkeyPatch, trust: str
) -> None:
    privacy = _privacy("--trust", trust)
    fed = _federation(federation, monkeypatch, privacy)
    fed.start_all()
    codes = fed.wait_all(timeout=180)
    assert codes == dict.fromkeys(["server", *NAMES], 0), fed.all_logs()
    run = fed.state_dir
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    result = audit_run(run)
    assert result.status == "PASS", [f.message for f in result.findings]
    assert max(result.federation_epsilon.values()) <= 8.0 + 1e-6
    audit = subprocess.run(
        [sys.executable, "-m", "secure_fl.cli", "audit", str(run)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr
    if trust == "distributed":
        for name in NAMES:
            assert '"distributed_dp":true' in fed.log_text(name).replace(" ", "")


@pytest.mark.slow
def test_a_site_refuses_distributed_noise_below_its_floor_over_grpc(
    federation: Callable[..., Federation], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Site d pins a floor above what the server sends: it refuses every setup before sending
    anything (no key advertisement, no masked input); the three others (t = 3) carry on."""
    fed = _federation(federation, monkeypatch, _privacy("--trust", "distributed"))
    policy = json.loads(fed.site_configs["d"].read_text())["policy"]
    floor = float(policy["min_noise_multiplier"])
    fed.patch_site("d", policy={**policy, "min_noise_multiplier": floor * 4})
    deadlines = json.loads(fed.server_config.read_text())["deadlines"]
    fed.patch_server(deadlines={**deadlines, "phase_s": 3.0})  # d's key advert never comes
    fed.start_all()
    codes = fed.wait_all(timeout=180)
    assert codes["server"] == 0, fed.all_logs()
    refusals = [
        json.loads(line) for line in fed.log_text("d").splitlines() if '"policy-refused"' in line
    ]
    assert len(refusals) == 3, fed.all_logs()
    assert all("min_noise_multiplier" in r["reason"] for r in refusals)
    for r in range(3):
        record = fed.round_record(r)
        assert fed.ids["d"] not in record["survivors"], record
    assert "answered" not in fed.log_text("d")  # d took part in no protocol phase
    result = audit_run(fed.state_dir)
    assert result.status == "PASS", [f.message for f in result.findings]


@pytest.mark.slow
def test_a_restarted_dp_server_recalibrates_and_stays_within_the_target(
    federation: Callable[..., Federation], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL in the middle of round 2 leaves its intents unconfirmed (counted in full); the
    restarted server raises the remaining rounds' noise so that epsilon stays <= 8, and the audit
    finds nothing but the interrupted round's unconfirmed intents."""
    privacy = _privacy()
    monkeypatch.setattr(
        transport_helpers, "provision", functools.partial(provision, privacy=privacy)
    )
    fed = federation(NAMES, protocol="secagg+", rounds=3, task_options={"delay_s": 1.5})
    fed.start_all()

    head = fed.state_dir / "privacy_ledger.sqlite.head"

    def second_round_recorded() -> bool:
        """Round 1 confirmed (8 records) and round 2's 4 intents written, not confirmed."""
        try:
            count = json.loads(head.read_text())["count"]
        except (OSError, ValueError, KeyError):
            return False
        return isinstance(count, int) and count >= 12

    wait_until(second_round_recorded, 90, "the second round's intents")
    fed.kill("server")  # while the sites "train" for round 2 (1.5 s)
    port = fed.address.rsplit(":", 1)[1]
    fed.patch_server(listen=f"127.0.0.1:{port}")
    fed.start_server()
    codes = fed.wait_all(timeout=180)
    assert codes == dict.fromkeys(["server", *NAMES], 0), fed.all_logs()
    result = audit_run(fed.state_dir)
    assert max(result.federation_epsilon.values()) <= 8.0 + 1e-6
    problems = [f for f in result.findings if f.severity != "info"]
    assert problems, "a killed round must leave unconfirmed intents"
    assert {f.code for f in problems} == {"UNCONFIRMED_INTENT"}, [f.message for f in problems]
    with PrivacyLedger(fed.state_dir / "privacy_ledger.sqlite", readonly=True) as ledger:
        scales = {r.entry.params.get("resume_scale") for r in ledger.entries(strict=False)}
    assert any(isinstance(s, float) and s > 1.0 for s in scales), scales
