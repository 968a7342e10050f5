"""Real-data evaluation of a run: what it trains on, what it keeps apart, and the final test.

:func:`resolve_data` turns an experiment's ``data`` section into a :class:`DataPlan`:

* the **training pool**: the datalist's ``training`` section minus the held-out institutions;
  the runner splits it per site into training and validation cases
  (:func:`secure_fl.data.split_by_site`; a site with one case trains on it and has no
  validation case, so its validation Dice is absent, never invented);
* the **test set**: the datalist's ``test`` section (when it has one; case ids disjoint from
  ``training``) plus every case of the sites named in ``data.holdout_sites``. These cases never
  reach a trainer: they are evaluated once, at the end of the run, pooled and per site
  (:func:`secure_fl.training.final_eval.final_evaluation`). Held-out whole institutions measure out-of-sample generalisation
  (Sheller et al. 2020);
* the **target** (``data.target``: whole tumour, tumour core or enhancing tumour; the label
  values come from :func:`secure_fl.data.regions.target_labels` and the label scheme) and the
  **modalities** stacked as input channels (``data.modalities``), as the effective
  :class:`~secure_fl.data.PreprocessConfig` every trainer and test dataset uses.

The final evaluation (:mod:`secure_fl.training.final_eval`) scores Dice and Hausdorff 95 on every
site's validation cases and on the test set, and writes ``evaluation.json``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secure_fl.data import Case, PreprocessConfig, group_by_site, load_datalist
from secure_fl.data.datalist.cases import MODALITIES
from secure_fl.data.regions import (
    LABEL_SCHEMES,
    TARGETS,
    datalist_label_scheme,
    scheme_values,
    target_labels,
)
from secure_fl.errors import ConfigError
from secure_fl.training.model import ModelConfig, build_unet


@dataclass(frozen=True)
class DataPlan:
    """The cases of a run and how they are read (see the module docstring).

    ``train_pool``: the cases split into per-site training and validation. ``test``: the cases
    evaluated once at the end (datalist ``test`` section and held-out institutions).
    ``holdout_sites``: the institutions that do not train. ``label_scheme``: what the label
    values mean (None: unknown, only the whole tumour can be asked). ``preprocess``: the
    experiment's preprocessing with the target's label values and the modalities filled in.
    """

    train_pool: tuple[Case, ...]
    test: tuple[Case, ...]
    holdout_sites: tuple[str, ...]
    label_scheme: str | None
    preprocess: PreprocessConfig

    @property
    def label_values(self) -> frozenset[int] | None:
        """The label values the data may hold (for the data check): the scheme's, else any."""
        return scheme_values(self.label_scheme) if self.label_scheme is not None else None


_DEFAULT_MODALITIES = ("flair",)


def check_data_options(data: Any) -> None:
    """Validate the real-data options of a ``DataConfig``: ``holdout_sites`` (distinct non-empty
    names), ``target`` (one of :data:`~secure_fl.data.regions.TARGETS`), ``label_scheme``
    (``"auto"`` or a scheme), ``modalities`` (distinct names of ``flair``, ``t1``, ``t1c``,
    ``t2``, at least one) and ``hd95_units`` (``"mm"`` or ``"voxel"``).

    Errors: ConfigError naming ``data.<field>`` and what is allowed.
    """
    held = data.holdout_sites
    if any(not isinstance(s, str) or not s.strip() for s in held) or len(set(held)) != len(held):
        raise ConfigError(f"data.holdout_sites must list distinct site names, got {list(held)}")
    if data.target not in TARGETS:
        raise ConfigError(f"data.target must be one of {list(TARGETS)}, got {data.target!r}")
    if data.label_scheme != "auto" and data.label_scheme not in LABEL_SCHEMES:
        raise ConfigError(
            f"data.label_scheme must be 'auto' or one of {sorted(LABEL_SCHEMES)}, "
            f"got {data.label_scheme!r}"
        )
    mods = data.modalities
    if not mods or any(m not in MODALITIES for m in mods) or len(set(mods)) != len(mods):
        raise ConfigError(
            f"data.modalities must list distinct names from {list(MODALITIES)}, at least one, "
            f"got {list(mods)}"
        )
    if data.hd95_units not in ("mm", "voxel"):
        raise ConfigError(f"data.hd95_units must be 'mm' or 'voxel', got {data.hd95_units!r}")


def check_experiment_data(config: Any) -> None:
    """Checks of an ``ExperimentConfig`` that span sections: the target must be expressible
    with the labels when the scheme is known before any file is read (an explicit
    ``data.label_scheme``, or the synthetic federation's labels); ``preprocess.foreground`` and
    ``preprocess.modalities`` are set through ``data.target`` and ``data.modalities`` only.

    Errors: ConfigError naming the key (for example ``data.target='enhancing_tumour' cannot be
    expressed with the 'synthetic' labels``).
    """
    data = config.data
    if config.preprocess.foreground != () or config.preprocess.modalities != _DEFAULT_MODALITIES:
        raise ConfigError(
            "preprocess.foreground and preprocess.modalities are set through data.target and "
            "data.modalities; remove them from the preprocess section"
        )
    scheme = data.label_scheme
    if scheme == "auto" and not data.datalist:
        scheme = "synthetic"
    if scheme != "auto":
        target_labels(data.target, scheme)


def datalist_path(config: Any) -> Path:
    """The experiment's datalist: ``data.datalist``, or the synthetic federation's (under
    ``data.synthetic_dir``; :func:`secure_fl.training.runner.resolve_cases` generates it)."""
    if config.data.datalist:
        return Path(config.data.datalist)
    from secure_fl.data.synthetic import DATALIST_NAME

    return Path(config.data.synthetic_dir) / DATALIST_NAME


def _has_section(path: Path, section: str) -> bool:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # load_datalist reports the file itself
    return isinstance(document, dict) and section in document


def resolve_data(config: Any, cases: Sequence[Case]) -> DataPlan:
    """The :class:`DataPlan` of an :class:`~secure_fl.training.config.ExperimentConfig` whose
    ``training`` cases are ``cases`` (:func:`secure_fl.training.runner.resolve_cases`).

    Label scheme: ``data.label_scheme``, or with ``"auto"`` the one the datalist declares
    (:func:`secure_fl.data.regions.datalist_label_scheme`; the synthetic generator's is
    ``synthetic``).

    Guarantee: no case of ``test`` is in ``train_pool`` (by case id) and no held-out site has a
    case in ``train_pool``; every case has every modality asked.

    Errors: ConfigError if a held-out site is not a site of the datalist, or every site is held
    out; the ``test`` section shares a case id with ``training`` or is malformed
    (:func:`~secure_fl.data.load_datalist`); the target cannot be expressed with the labels
    (:func:`~secure_fl.data.regions.target_labels`); a case lacks an asked modality (naming the
    case and the modality).
    """
    data = config.data
    path = datalist_path(config)
    cases = list(cases)
    scheme = data.label_scheme if data.label_scheme != "auto" else datalist_label_scheme(path)
    foreground = target_labels(data.target, scheme)
    test: list[Case] = []
    if _has_section(path, "test"):
        test = load_datalist(path, section="test")
        train_ids = {c.case_id for c in cases}
        shared = sorted(c.case_id for c in test if c.case_id in train_ids)
        if shared:
            raise ConfigError(
                f"datalist {path}: the test section shares case ids with training: {shared[:5]}; "
                "a test case must never be trained or validated on"
            )
    sites = group_by_site(cases)
    unknown = [s for s in data.holdout_sites if s not in sites]
    if unknown:
        raise ConfigError(
            f"data.holdout_sites: {unknown} are not sites of the datalist; sites: {sorted(sites)}"
        )
    if data.holdout_sites and len(set(data.holdout_sites)) == len(sites):
        raise ConfigError(
            f"data.holdout_sites holds out every site ({sorted(sites)}): at least one must train"
        )
    held = set(data.holdout_sites)
    pool = [c for c in cases if c.site not in held]
    test = test + [c for c in cases if c.site in held]
    check_modalities([*pool, *test], data.modalities)
    preprocess = dataclasses.replace(
        config.preprocess, foreground=foreground, modalities=tuple(data.modalities)
    )
    return DataPlan(tuple(pool), tuple(test), tuple(data.holdout_sites), scheme, preprocess)


def check_modalities(cases: Sequence[Case], modalities: Sequence[str]) -> None:
    """Every case has a file for every modality asked (FLAIR: its image).

    Errors: ConfigError naming the first cases that lack one, and the modality.
    """
    missing = [
        (case.case_id, name)
        for case in cases
        for name in modalities
        if name != "flair" and name not in case.modalities
    ]
    if missing:
        shown = ", ".join(f"case {cid} has no {name!r} image" for cid, name in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConfigError(
            f"data.modalities={list(modalities)}: {shown}{more}; give the datalist entries a "
            "path under that key, or drop the modality"
        )


def model_factory(model: ModelConfig, in_channels: int) -> Callable[[], Any] | None:
    """A factory of the experiment's UNet taking ``in_channels`` input channels; None for one
    channel (the trainer's default network).

    The network is :func:`~secure_fl.training.model.build_unet`'s, rebuilt with the same
    architecture and ``in_channels`` (through ``ModelConfig.in_channels`` when the model
    configuration has that field).

    Errors: ConfigError if ``in_channels`` is not an int in [1, 4].
    """
    if (
        isinstance(in_channels, bool)
        or not isinstance(in_channels, int)
        or not 1 <= in_channels <= 4
    ):
        raise ConfigError(f"in_channels must be an int in [1, 4], got {in_channels!r}")
    if in_channels == 1:
        return None
    names = {f.name for f in dataclasses.fields(model)}
    if "in_channels" in names:
        config = dataclasses.replace(model, in_channels=in_channels)  # type: ignore[call-arg]
        return lambda: build_unet(config)

    def build() -> Any:
        from monai.networks.nets.unet import UNet

        base = build_unet(model)
        return UNet(
            spatial_dims=base.dimensions,
            in_channels=in_channels,
            out_channels=base.out_channels,
            channels=base.channels,
            strides=base.strides,
            kernel_size=base.kernel_size,
            up_kernel_size=base.up_kernel_size,
            num_res_units=base.num_res_units,
            act=base.act,
            norm=base.norm,
            dropout=base.dropout,
            bias=base.bias,
            adn_ordering=base.adn_ordering,
        )

    return build
