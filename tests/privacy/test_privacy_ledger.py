"""Privacy ledger: append/confirm, tamper evidence (edit, delete, reorder, insert, truncate), crashes."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from privacy_testutils import sample_entry

from secure_fl.errors import ConfigError
from secure_fl.privacy import (
    LedgerHead,
    LedgerIntegrityError,
    PrivacyLedger,
    compute_epsilon,
    epsilon_of_events,
)
from secure_fl.privacy.ledger import canonical_json, entry_event

SITES = ("a", "b")


def fill(path: Path, rounds: int = 3) -> list[LedgerHead]:
    """``rounds`` rounds of intents and confirmations for two sites; the head after each round."""
    heads = []
    with PrivacyLedger(path) as ledger:
        for rnd in range(rounds):
            ids = [ledger.record_intent(sample_entry(s, rnd)) for s in SITES]
            for i in ids:
                ledger.confirm(i)
            heads.append(ledger.head())
    return heads


def sql(path: Path, *statements: str, params: tuple[Any, ...] = ()) -> None:
    conn = sqlite3.connect(path)
    with conn:
        for s in statements:
            conn.execute(s, params)
    conn.close()


def rows(path: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    out = [dict(r) for r in conn.execute("SELECT * FROM records ORDER BY seq")]
    conn.close()
    return out


def forge_hash(row: dict[str, Any]) -> str:
    """What an attacker who knows the (public) scheme computes for a forged row."""
    cols = [c for c in row if c != "hash"]
    return hashlib.sha256(canonical_json({c: row[c] for c in cols}).encode()).hexdigest()


def insert(path: Path, row: dict[str, Any]) -> None:
    cols = list(row)
    sql(
        path,
        f"INSERT INTO records ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
        params=tuple(row[c] for c in cols),
    )


def verify(path: Path) -> None:
    with PrivacyLedger(path, readonly=True) as ledger:
        ledger.verify()


# ---------------------------------------------------------------------------------------------


def test_append_confirm_read_back(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with PrivacyLedger(path) as ledger:
        e = sample_entry("a", 0, params={"sigma_per_site": [0.5, 0.25], "threshold": 2})
        i = ledger.record_intent(e)
        c = ledger.confirm(i, steps=25, survivors=3)
        assert (i, c) == (1, 2)
        (record,) = ledger.entries()
        assert record.entry == e
        assert record.confirmed and record.confirmed_steps == 25 and record.accounted_steps == 25
        assert record.accounted_survivors == 3
        ledger.verify()
        head = ledger.head()
    assert head.count == 2
    verify(path)  # reopened read-only, with the head anchor file
    assert json.loads((tmp_path / "ledger.sqlite.head").read_text())["count"] == 2


def test_confirm_misuse(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "l.sqlite") as ledger:
        i = ledger.record_intent(sample_entry("a", 0))
        c = ledger.confirm(i)
        with pytest.raises(ConfigError, match="already confirmed"):
            ledger.confirm(i)
        with pytest.raises(ConfigError, match="intent_id"):
            ledger.confirm(c)  # a confirmation, not an intent
        with pytest.raises(ConfigError, match="intent_id"):
            ledger.confirm(99)
        with pytest.raises(ConfigError, match="steps"):
            ledger.confirm(ledger.record_intent(sample_entry("a", 1)), steps=-1)
    with (
        PrivacyLedger(tmp_path / "l.sqlite", readonly=True) as ro,
        pytest.raises(ConfigError, match="read-only"),
    ):
        ro.record_intent(sample_entry("a", 2))


def test_entry_validation_names_the_field() -> None:
    with pytest.raises(ConfigError, match="noise_multiplier"):
        sample_entry("a", 0, noise_multiplier=-0.1)
    with pytest.raises(ConfigError, match="level"):
        sample_entry("a", 0, level="patient")
    with pytest.raises(ConfigError, match="params"):
        sample_entry("a", 0, params={"x": float("nan")})
    with pytest.raises(ConfigError, match="round"):
        sample_entry("a", -1)


# ---------------------------------------------------------------------------------------------
# tampering


def test_intact_ledger_verifies(tmp_path: Path) -> None:
    heads = fill(tmp_path / "l.sqlite")
    with PrivacyLedger(tmp_path / "l.sqlite", readonly=True) as ledger:
        ledger.verify(anchors=heads)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("noise_multiplier", 2.0),
        ("steps", 1),
        ("sample_rate", 0.01),
        ("site", "c"),
        ("round", 7),
        ("params", "{}"),
        ("recorded_at", "2020-01-01T00:00:00+00:00"),
        ("survivors", 5),
    ],
)
def test_edit_any_field_is_detected(tmp_path: Path, column: str, value: object) -> None:
    path = tmp_path / "l.sqlite"
    fill(path)
    sql(path, f"UPDATE records SET {column}=? WHERE seq=3", params=(value,))
    with pytest.raises(LedgerIntegrityError, match="record 3"):
        verify(path)


def test_delete_middle_record_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    fill(path)
    sql(path, "DELETE FROM records WHERE seq=4")
    with pytest.raises(LedgerIntegrityError, match="record 4 is missing"):
        verify(path)


@pytest.mark.parametrize("how_many", [1, 4])
def test_delete_last_records_is_detected(tmp_path: Path, how_many: int) -> None:
    path = tmp_path / "l.sqlite"
    fill(path)  # 12 records
    sql(path, f"DELETE FROM records WHERE seq > {12 - how_many}")
    with pytest.raises(LedgerIntegrityError, match="truncated"):
        verify(path)
    # and nothing more is written to a truncated ledger
    with PrivacyLedger(path) as ledger, pytest.raises(LedgerIntegrityError, match="truncated"):
        ledger.record_intent(sample_entry("a", 9))


def test_reorder_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    fill(path)
    sql(
        path,
        "UPDATE records SET seq=-1 WHERE seq=5",
        "UPDATE records SET seq=5 WHERE seq=6",
        "UPDATE records SET seq=6 WHERE seq=-1",
    )
    with pytest.raises(LedgerIntegrityError, match="record 5"):
        verify(path)


def test_forged_record_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    fill(path)
    last = rows(path)[-1]
    forged = {**last, "seq": last["seq"] + 1, "kind": "intent", "intent": None, "round": 3}
    forged["prev_hash"] = last["hash"]
    forged["hash"] = "0" * 64
    insert(path, forged)
    with pytest.raises(LedgerIntegrityError, match="record 13"):
        verify(path)


def test_forged_record_with_recomputed_hash_is_caught_by_the_head_anchor(tmp_path: Path) -> None:
    """An attacker who knows the scheme recomputes the chain; the head anchor still catches it."""
    path = tmp_path / "l.sqlite"
    fill(path)
    last = rows(path)[-1]
    forged = {**last, "seq": last["seq"] + 1, "kind": "intent", "intent": None, "round": 3}
    forged["prev_hash"] = last["hash"]
    forged["hash"] = forge_hash(forged)
    insert(path, forged)
    with pytest.raises(LedgerIntegrityError, match="beyond the head anchor"):
        verify(path)


def test_rewritten_chain_and_head_are_caught_by_external_anchors(tmp_path: Path) -> None:
    """Documented limit: rewriting the records *and* the head file consistently passes verify();
    the anchors copied elsewhere (metrics.jsonl) catch it."""
    path = tmp_path / "l.sqlite"
    heads = fill(path)
    # lower round 0's noise... and recompute every hash after it, and the head file
    all_rows = rows(path)
    all_rows[0]["noise_multiplier"] = 5.0
    prev = all_rows[0]["prev_hash"]
    for row in all_rows:
        row["prev_hash"] = prev
        row["hash"] = forge_hash(row)
        prev = row["hash"]
    sql(path, "DELETE FROM records")
    for row in all_rows:
        insert(path, row)
    head_file = tmp_path / "l.sqlite.head"
    head = json.loads(head_file.read_text())
    head["hash"] = prev
    head_file.write_text(json.dumps(head))
    verify(path)  # undetectable from the database and head file alone
    with PrivacyLedger(path, readonly=True) as ledger:
        with pytest.raises(LedgerIntegrityError, match="anchor"):
            ledger.verify(anchors=heads)
        with pytest.raises(LedgerIntegrityError, match="record 4 does not match"):
            ledger.check_anchor(heads[0])


def test_missing_head_file_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    fill(path, rounds=1)
    (tmp_path / "l.sqlite.head").unlink()
    with pytest.raises(LedgerIntegrityError, match="head anchor"):
        verify(path)


def test_head_file_of_another_ledger_is_detected(tmp_path: Path) -> None:
    fill(tmp_path / "one.sqlite", rounds=1)
    fill(tmp_path / "two.sqlite", rounds=1)
    (tmp_path / "one.sqlite.head").write_bytes((tmp_path / "two.sqlite.head").read_bytes())
    with pytest.raises(LedgerIntegrityError, match="another ledger"):
        verify(tmp_path / "one.sqlite")


def test_confirmation_of_another_site_is_detected(tmp_path: Path) -> None:
    """Even with a recomputed hash and head anchor, a confirmation must match its intent."""
    path = tmp_path / "l.sqlite"
    fill(path, rounds=1)  # 1: intent a, 2: intent b, 3: confirm a, 4: confirm b
    last = rows(path)[-1]
    assert (last["kind"], last["site"], last["intent"]) == ("confirm", "b", 2)
    last["site"] = "a"
    last["hash"] = forge_hash(last)
    sql(path, "UPDATE records SET site=?, hash=? WHERE seq=4", params=(last["site"], last["hash"]))
    head_file = tmp_path / "l.sqlite.head"
    head = json.loads(head_file.read_text())
    head["hash"] = last["hash"]
    head_file.write_text(json.dumps(head))
    with pytest.raises(LedgerIntegrityError, match="record 4 confirms intent 2 of another site"):
        verify(path)


# ---------------------------------------------------------------------------------------------
# accounting semantics and crashes


def test_spent_counts_unconfirmed_intents(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "l.sqlite") as ledger:
        ledger.confirm(ledger.record_intent(sample_entry("a", 0)))
        ledger.record_intent(sample_entry("a", 1))  # the round crashed before confirm
        assert ledger.spent("a", 1e-5) == compute_epsilon(1.0, 0.05, 40, 1e-5)
        assert ledger.spent("b", 1e-5) == 0.0
        assert ledger.spent("a", 1e-5, upto=2) == compute_epsilon(1.0, 0.05, 20, 1e-5)


def test_confirmation_never_lowers_the_spend(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "l.sqlite") as ledger:
        planned = ledger.spent("a", 1e-5)
        assert planned == 0.0
        i = ledger.record_intent(sample_entry("a", 0, steps=20))
        before = ledger.spent("a", 1e-5)
        ledger.confirm(i, steps=5)  # fewer steps than intended: ignored
        assert ledger.spent("a", 1e-5) == before
        j = ledger.record_intent(sample_entry("a", 1, steps=20))
        ledger.confirm(j, steps=30)  # more steps than intended: counted
        assert ledger.spent("a", 1e-5) == compute_epsilon(1.0, 0.05, 50, 1e-5)


def test_survivors_below_threshold_raise_the_spend(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "l.sqlite") as ledger:
        entry = sample_entry(
            "a",
            0,
            level="site",
            mechanism="skellam",
            sample_rate=1.0,
            steps=1,
            survivors=4,
            params={"threshold": 4},
        )
        i = ledger.record_intent(entry)
        # Skellam is accounted at integer orders only
        assert ledger.spent("a", 1e-5) == compute_epsilon(1.0, 1.0, 1, 1e-5, integer_orders=True)
        ledger.confirm(i, survivors=2)
        (record,) = ledger.entries()
        assert record.effective_noise_multiplier == pytest.approx(2**-0.5)
        assert ledger.spent("a", 1e-5) == compute_epsilon(
            2**-0.5, 1.0, 1, 1e-5, integer_orders=True
        )


def test_spend_counts_only_honest_survivors(tmp_path: Path) -> None:
    """Distributed noise sized for t - c = 2 honest survivors (t = 3, c = 1): when only 2 sites
    survive, one may be a colluder, so only 1 honest share is left - sqrt(1/2) of the noise, not
    sqrt(2/3) as counting every survivor as honest would claim."""
    with PrivacyLedger(tmp_path / "l.sqlite") as ledger:
        entry = sample_entry(
            "a",
            0,
            level="site",
            mechanism="discrete_gaussian",
            sample_rate=1.0,
            steps=1,
            survivors=4,
            params={"threshold": 3, "honest_survivors": 2, "colluders": 1},
        )
        i = ledger.record_intent(entry)
        assert ledger.spent("a", 1e-5) == compute_epsilon(1.0, 1.0, 1, 1e-5)
        assert entry_event(entry).noise_multiplier == 1.0  # 4 - 1 = 3 honest >= 2
        ledger.confirm(i, survivors=2)
        (record,) = ledger.entries()
        assert record.effective_noise_multiplier == pytest.approx(2**-0.5)
        assert ledger.spent("a", 1e-5) == compute_epsilon(2**-0.5, 1.0, 1, 1e-5)
        assert entry_event(entry, survivors=2).noise_multiplier == pytest.approx(2**-0.5)
        assert entry_event(entry, survivors=1).noise_multiplier == 0.0


def test_skellam_records_are_accounted_at_integer_orders(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "l.sqlite") as ledger:
        for site, mechanism in (("a", "skellam"), ("b", "discrete_gaussian")):
            ledger.record_intent(
                sample_entry(site, 0, level="site", mechanism=mechanism, sample_rate=1.0, steps=1)
            )
        assert ledger.events_for("a")[0].integer_orders
        assert not ledger.events_for("b")[0].integer_orders
        assert ledger.spent("a", 1e-5) > ledger.spent("b", 1e-5)


def test_confirmed_noise_multiplier_can_only_lower_the_noise(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "l.sqlite") as ledger:
        ledger.confirm(ledger.record_intent(sample_entry("a", 0)), noise_multiplier=3.0)
        assert ledger.spent("a", 1e-5) == compute_epsilon(1.0, 0.05, 20, 1e-5)
        ledger.confirm(ledger.record_intent(sample_entry("b", 0)), noise_multiplier=0.7)
        assert ledger.spent("b", 1e-5) == compute_epsilon(0.7, 0.05, 20, 1e-5)
        ledger.verify()


def test_real_crash_between_intent_and_confirm(tmp_path: Path) -> None:
    """A process killed after record_intent: the reopened ledger verifies and counts the intent."""
    path = tmp_path / "l.sqlite"
    fill(path, rounds=1)
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from privacy_testutils import sample_entry
        from secure_fl.privacy import PrivacyLedger
        ledger = PrivacyLedger({str(path)!r})
        ledger.record_intent(sample_entry("a", 1))
        os._exit(3)  # no confirm, no close, no cleanup
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == 3, proc.stderr.decode()
    with PrivacyLedger(path) as ledger:
        ledger.verify()
        (unconfirmed,) = [r for r in ledger.entries() if not r.confirmed]
        assert unconfirmed.entry.round == 1
        assert ledger.spent("a", 1e-5) == compute_epsilon(1.0, 0.05, 40, 1e-5)
        ledger.confirm(unconfirmed.id)  # the restarted runner may still confirm it
        ledger.verify()


class Crash(BaseException):
    pass


@pytest.mark.parametrize("when", ["before-commit", "after-commit"])
def test_crash_around_the_commit_leaves_a_verifiable_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """The head anchor is written (with the pending record) before the commit and again after it;
    a crash at either point must neither look like tampering nor lose a committed record."""
    path = tmp_path / "l.sqlite"
    fill(path, rounds=1)
    original = PrivacyLedger._write_head

    def crashing(self: PrivacyLedger, head: LedgerHead, *, pending: LedgerHead | None) -> None:
        if when == "before-commit" and pending is not None:
            original(self, head, pending=pending)
            raise Crash
        if when == "after-commit" and pending is None:
            raise Crash
        original(self, head, pending=pending)

    with PrivacyLedger(path) as ledger:
        monkeypatch.setattr(PrivacyLedger, "_write_head", crashing)
        with pytest.raises(Crash):
            ledger.record_intent(sample_entry("a", 1))
        monkeypatch.setattr(PrivacyLedger, "_write_head", original)
    with PrivacyLedger(path) as ledger:
        ledger.verify()
        n = len(ledger.entries())
        assert n == (3 if when == "after-commit" else 2)
        ledger.record_intent(sample_entry("b", 1))  # and the ledger carries on
        ledger.verify()


def test_events_for_filters_by_strategy(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "l.sqlite") as ledger:
        ledger.record_intent(sample_entry("a", 0, strategy="fedavg"))
        ledger.record_intent(sample_entry("a", 0, strategy="fedprox", noise_multiplier=2.0))
        assert len(ledger.events_for("a")) == 2
        (only,) = ledger.events_for("a", strategy="fedprox")
        assert only.noise_multiplier == 2.0
        assert ledger.spent("a", 1e-5) == epsilon_of_events(ledger.events_for("a"), 1e-5)


@pytest.mark.parametrize("readonly", [False, True])
def test_a_file_that_is_not_a_ledger_is_refused(tmp_path: Path, readonly: bool) -> None:
    path = tmp_path / "l.sqlite"
    path.write_bytes(b"this is not an SQLite database, it is a forgery" * 100)
    with pytest.raises(LedgerIntegrityError, match="unreadable"):
        PrivacyLedger(path, readonly=readonly)
