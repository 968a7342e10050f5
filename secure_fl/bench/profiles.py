"""Profiles of the privacy-utility benchmark: how big a grid of runs, on how big a federation.

``smoke`` (tests: a few one-round runs on 16^3 volumes, the pretraining step included),
``quick`` (a 2-core CPU in under 20 minutes: 4 sites x 64 patients at a 24^3 grid, a small
group-norm UNet, 10 rounds; sized so that the goal - sample-level DP at epsilon 8, delta 1e-5,
keeps at least 90 % of the non-private Dice - can be met by DP fine-tuning of the public
pretrained model) and ``full`` (the paper-style grid: more epsilons, rounds and cohort sizes).
:func:`get_profile` applies the command line's overrides.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from secure_fl.errors import ConfigError

#: The epsilon of the utility goal and of the cohort-size sweep ("Dice against cohort size").
GOAL_EPSILON = 8.0
COHORT_EPSILON = GOAL_EPSILON

#: DP modes: ``sample`` / ``site`` / ``site-distributed`` train from scratch; ``sample-ft``
#: fine-tunes the public pretrained model (only ``trainable`` parameters) under DP-SGD.
MODES: tuple[str, ...] = ("sample", "sample-ft", "site", "site-distributed")
#: Non-private lines: ``none`` (FedAvg from scratch), ``local`` (every site alone),
#: ``pretrained`` (the public pretrained model, not trained on any private site) and
#: ``finetune`` (FedAvg fine-tuning of the pretrained model's ``trainable`` parameters).
BASELINES: tuple[str, ...] = ("none", "local", "pretrained", "finetune")
#: What needs the pretrained checkpoint.
PRETRAINED_MODES: frozenset[str] = frozenset({"sample-ft", "pretrained", "finetune"})
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv", "pld")
NORMS: tuple[str, ...] = ("instance", "group")


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")


def _int_at_least(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class BenchProfile:
    """The grid of one benchmark.

    * ``rounds`` federated rounds of every run; ``epsilons`` the target epsilons of the DP runs
      (delta ``delta``, accountant ``accountant``); ``modes`` the DP modes run at each epsilon
      (:data:`MODES`): ``"sample"`` (DP-SGD at every site), ``"sample-ft"`` (DP-SGD
      fine-tuning of the pretrained model), ``"site"`` (DP-FedAvg, central noise),
      ``"site-distributed"`` (DP-FedAvg, discrete Gaussian shares under SecAgg+);
    * ``baselines`` (:data:`BASELINES`): ``"none"``, ``"local"``, ``"pretrained"``,
      ``"finetune"``;
    * the pretraining step (made once per output folder when a mode or baseline needs it):
      ``pretrain_cases`` patients of a public synthetic cohort (its own institutions, never a
      private site), ``pretrain_epochs`` epochs; ``trainable``: the parameter groups that
      ``sample-ft`` and ``finetune`` train (``train.trainable``);
    * ``cohorts``: cases per site of the cohort-size sweep at :data:`COHORT_EPSILON`, one run per
      mode of ``cohort_modes`` (``sample``, ``sample-ft``) per size (empty: no sweep; the batch
      is ``min(batch_size, N // 4)``, at least 1); ``cohort_baseline``: also a non-private run
      per cohort size;
    * the federation: ``sites``, ``cases_per_site`` (None: the generator's default 10, 8, 6, 12),
      ``shape`` of the volumes; training: ``grid``, ``patch``, UNet ``channels``,
      ``res_units`` (residual units per level), ``norm`` (instance, group), ``local_epochs``,
      ``lr``, ``lr_schedule``, ``batch_size``; DP: ``sample_clip`` (per patient),
      ``site_clip`` (per site update);
    * ``goal_fraction``: the utility goal (summary.md): the best audited sample-level DP run at
      :data:`GOAL_EPSILON` keeps at least this fraction of the best non-private Dice;
    * ``canaries`` / ``guesses``: the empirical audit of every central site-level run (0: none).

    Errors: ConfigError naming the field and its allowed range.
    """

    name: str
    rounds: int
    epsilons: tuple[float, ...]
    modes: tuple[str, ...] = ("sample", "site")
    baselines: tuple[str, ...] = ("none", "local")
    cohorts: tuple[int, ...] = ()
    cohort_modes: tuple[str, ...] = ("sample",)
    cohort_baseline: bool = False
    sites: int = 4
    cases_per_site: int | None = None
    shape: tuple[int, int, int] = (32, 32, 32)
    grid: tuple[int, int, int] = (32, 32, 32)
    patch: tuple[int, int, int] = (16, 16, 16)
    channels: tuple[int, ...] = (8, 16, 32)
    res_units: int = 1
    norm: str = "instance"
    local_epochs: int = 1
    lr: float = 3e-3
    lr_schedule: str = "cosine"
    batch_size: int = 2
    delta: float = 1e-5
    accountant: str = "rdp"
    sample_clip: float = 1.0
    site_clip: float = 0.5
    pretrain_cases: int = 32
    pretrain_epochs: int = 15
    trainable: tuple[str, ...] = ("head", "norm")
    goal_fraction: float = 0.9
    canaries: int = 500
    guesses: int = 200

    @property
    def needs_pretrained(self) -> bool:
        """Whether a mode, baseline or cohort mode needs the pretrained checkpoint."""
        used = {*self.modes, *self.baselines, *(self.cohort_modes if self.cohorts else ())}
        return bool(used & PRETRAINED_MODES)

    def __post_init__(self) -> None:
        _int_at_least("rounds", self.rounds, 1)
        _int_at_least("sites", self.sites, 2)
        _int_at_least("local_epochs", self.local_epochs, 1)
        _int_at_least("res_units", self.res_units, 0)
        _int_at_least("batch_size", self.batch_size, 1)
        if self.cases_per_site is not None:
            _int_at_least("cases_per_site", self.cases_per_site, 2)
        for eps in self.epsilons:
            if not (math.isfinite(eps) and eps > 0):
                raise ConfigError(f"epsilons must be finite numbers > 0, got {eps!r}")
        for mode in self.modes:
            if mode not in MODES:
                raise ConfigError(f"modes must be among {MODES}, got {mode!r}")
        for base in self.baselines:
            if base not in BASELINES:
                raise ConfigError(f"baselines must be among {BASELINES}, got {base!r}")
        for n in self.cohorts:
            _int_at_least("cohorts[]", n, 2)
        for mode in self.cohort_modes:
            if mode not in ("sample", "sample-ft"):
                raise ConfigError(
                    f"cohort_modes must be among ('sample', 'sample-ft'), got {mode!r}"
                )
        _choice("norm", self.norm, NORMS)
        _choice("accountant", self.accountant, ACCOUNTANTS)
        _choice("lr_schedule", self.lr_schedule, ("constant", "cosine"))
        _int_at_least("pretrain_cases", self.pretrain_cases, 1)
        _int_at_least("pretrain_epochs", self.pretrain_epochs, 1)
        if not self.trainable or not all(isinstance(t, str) and t for t in self.trainable):
            raise ConfigError(
                f"trainable must list non-empty parameter-group names, got {self.trainable!r}"
            )
        if not (math.isfinite(self.goal_fraction) and 0 < self.goal_fraction <= 1):
            raise ConfigError(f"goal_fraction must be in (0, 1], got {self.goal_fraction!r}")
        for name in ("lr", "delta", "sample_clip", "site_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
        if self.delta >= 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.canaries:
            _int_at_least("canaries", self.canaries, 2)
            if self.guesses % 2 or not 2 <= self.guesses <= self.canaries:
                raise ConfigError(
                    f"guesses must be even and in [2, canaries={self.canaries}], "
                    f"got {self.guesses!r}"
                )


PROFILES: dict[str, BenchProfile] = {
    "smoke": BenchProfile(
        name="smoke",
        rounds=1,
        epsilons=(8.0,),
        modes=("site", "sample-ft"),
        baselines=("none", "pretrained"),
        cases_per_site=4,
        shape=(16, 16, 16),
        grid=(16, 16, 16),
        patch=(8, 8, 8),
        channels=(2, 4),
        norm="group",
        pretrain_cases=4,
        pretrain_epochs=1,
        canaries=50,
        guesses=20,
    ),
    # Sized for the goal: n = 64 patients per site (48 train), d = trainable head + norm of a
    # pretrained (8, 16, 32) group-norm UNet (1,125 of 35,034 parameters); the "DP that learns"
    # measurement (0.724 at epsilon 8 against 0.703 non-private from scratch) had these settings.
    "quick": BenchProfile(
        name="quick",
        rounds=10,
        epsilons=(2.0, 8.0, 32.0),
        modes=("sample", "sample-ft", "site"),
        baselines=("none", "local", "pretrained", "finetune"),
        cohorts=(8, 32),
        cohort_modes=("sample", "sample-ft"),
        cohort_baseline=True,
        cases_per_site=64,
        shape=(24, 24, 24),
        grid=(24, 24, 24),
        patch=(16, 16, 16),
        channels=(8, 16, 32),
        norm="group",
        lr_schedule="constant",
        batch_size=8,
        accountant="prv",
        pretrain_cases=64,
        pretrain_epochs=15,
    ),
    "full": BenchProfile(
        name="full",
        rounds=20,
        epsilons=(1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0),
        modes=("sample", "sample-ft", "site", "site-distributed"),
        baselines=("none", "local", "pretrained", "finetune"),
        cohorts=(8, 32, 128, 512),
        cohort_modes=("sample", "sample-ft"),
        cohort_baseline=True,
        cases_per_site=128,
        shape=(48, 48, 48),
        grid=(48, 48, 48),
        patch=(32, 32, 32),
        channels=(16, 32, 64, 128),
        res_units=2,
        norm="group",
        local_epochs=2,
        batch_size=16,
        accountant="prv",
        pretrain_cases=128,
        pretrain_epochs=20,
        canaries=1000,
        guesses=400,
    ),
}


def get_profile(
    name: str,
    *,
    rounds: int | None = None,
    epsilons: Sequence[float] | None = None,
    cohorts: Sequence[int] | None = None,
) -> BenchProfile:
    """The profile ``name`` (``smoke``, ``quick``, ``full``) with the overrides that are not None.

    Errors: ConfigError naming an unknown profile or an out-of-range override.
    """
    if name not in PROFILES:
        raise ConfigError(f"--profile must be one of {sorted(PROFILES)}, got {name!r}")
    changes: dict[str, object] = {}
    if rounds is not None:
        changes["rounds"] = rounds
    if epsilons is not None:
        changes["epsilons"] = tuple(float(e) for e in epsilons)
    if cohorts is not None:
        changes["cohorts"] = tuple(int(n) for n in cohorts)
    return dataclasses.replace(PROFILES[name], **changes)  # type: ignore[arg-type]
