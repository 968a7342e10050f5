"""Label schemes and tumour sub-regions: which label values make up the segmentation target.

A *label scheme* names what each integer of a label volume means; a *target* names the tumour
sub-region to segment. :func:`target_labels` turns a (target, scheme) pair into the set of label
values that count as foreground, and refuses a sub-region the scheme cannot express.

Label schemes (value: meaning):

* ``brats`` - BraTS 2013-2020: 1 necrosis (2017-2020: necrotic and non-enhancing core),
  2 oedema, 3 non-enhancing tumour (2013-2015 only), 4 enhancing tumour.
* ``brats2023`` - BraTS 2021 onwards relabelled (2023 GLI): 1 necrotic core, 2 oedema,
  3 enhancing tumour.
* ``synthetic`` - this library's generator (:mod:`secure_fl.data.synthetic`): 1 oedema,
  2 tumour core (no enhancing part).
* ``binary`` - any 0/1 mask: 1 tumour.

Targets (BraTS definitions, Menze et al. 2015):

============================  ============  ===========  =========  ======
target                        brats         brats2023    synthetic  binary
============================  ============  ===========  =========  ======
``whole_tumour``              1, 2, 3, 4    1, 2, 3      1, 2       1
``tumour_core``               1, 3, 4       1, 3         2          refused
``enhancing_tumour``          4             3            refused    refused
============================  ============  ===========  =========  ======

``whole_tumour`` needs no scheme (every label > 0 is tumour, whatever the scheme).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from secure_fl.errors import ConfigError

__all__ = [
    "LABEL_SCHEMES",
    "TARGETS",
    "datalist_label_scheme",
    "scheme_values",
    "target_labels",
]

#: Scheme name -> {label value: meaning}; 0 is background in every scheme.
LABEL_SCHEMES: dict[str, dict[int, str]] = {
    "brats": {1: "necrosis", 2: "oedema", 3: "non-enhancing tumour", 4: "enhancing tumour"},
    "brats2023": {1: "necrotic core", 2: "oedema", 3: "enhancing tumour"},
    "synthetic": {1: "oedema", 2: "tumour core"},
    "binary": {1: "tumour"},
}

_REGIONS: dict[str, dict[str, tuple[int, ...]]] = {
    "whole_tumour": {
        "brats": (1, 2, 3, 4),
        "brats2023": (1, 2, 3),
        "synthetic": (1, 2),
        "binary": (1,),
    },
    "tumour_core": {"brats": (1, 3, 4), "brats2023": (1, 3), "synthetic": (2,)},
    "enhancing_tumour": {"brats": (4,), "brats2023": (3,)},
}

#: The segmentation targets, in the order of the table above.
TARGETS: tuple[str, ...] = tuple(_REGIONS)


def _check_scheme(scheme: str, where: str) -> None:
    if scheme not in LABEL_SCHEMES:
        raise ConfigError(f"{where} must be one of {sorted(LABEL_SCHEMES)}, got {scheme!r}")


def scheme_values(scheme: str) -> frozenset[int]:
    """Every label value the scheme defines, background 0 included (for the data check).

    Errors: ConfigError naming ``data.label_scheme`` if ``scheme`` is unknown.
    """
    _check_scheme(scheme, "data.label_scheme")
    return frozenset({0, *LABEL_SCHEMES[scheme]})


def target_labels(target: str, scheme: str | None) -> tuple[int, ...]:
    """The label values that make up ``target`` under ``scheme``; ``()`` for ``whole_tumour``
    (meaning every label > 0, which needs no scheme).

    Guarantee: the returned values are sorted and all defined by ``scheme``.

    Errors: ConfigError naming ``data.target`` if the target is unknown, if a sub-region other
    than ``whole_tumour`` is asked without a known scheme (``scheme=None``: set
    ``data.label_scheme``), or if the scheme cannot express it (for example
    ``enhancing_tumour`` on the synthetic labels, which have no enhancing part); the message
    states the scheme's labels.
    """
    if target not in _REGIONS:
        raise ConfigError(f"data.target must be one of {list(TARGETS)}, got {target!r}")
    if target == "whole_tumour":
        return ()
    if scheme is None:
        raise ConfigError(
            f"data.target={target!r} needs to know what the label values mean: set "
            f"data.label_scheme to one of {sorted(LABEL_SCHEMES)} (or give the datalist a "
            "top-level 'label_scheme')"
        )
    _check_scheme(scheme, "data.label_scheme")
    values = _REGIONS[target].get(scheme)
    if values is None:
        meanings = ", ".join(f"{v} {m}" for v, m in LABEL_SCHEMES[scheme].items())
        possible = [t for t in TARGETS if scheme in _REGIONS[t]]
        raise ConfigError(
            f"data.target={target!r} cannot be expressed with the {scheme!r} labels ({meanings}); "
            f"targets this data supports: {possible}"
        )
    return values


def _scheme_from_names(labels: Mapping[str, Any]) -> str | None:
    """The scheme whose meanings match a Decathlon-style ``labels`` table, if any."""
    names = {str(k): str(v).strip().lower() for k, v in labels.items() if str(k) != "0"}
    for scheme, meanings in LABEL_SCHEMES.items():
        if names == {str(v): m for v, m in meanings.items()}:
            return scheme
    return None


def datalist_label_scheme(path: str | os.PathLike[str]) -> str | None:
    """The label scheme a datalist declares: its top-level ``label_scheme`` string, else the
    scheme whose meanings its ``labels`` table matches (the synthetic generator writes
    ``{"1": "oedema", "2": "tumour core"}``); None when it declares none.

    Errors: ConfigError if the file is not a JSON object or ``label_scheme`` is not a known
    scheme.
    """
    p = Path(path)
    try:
        document = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"datalist {p}: cannot read it as JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ConfigError(f"datalist {p} must hold a JSON object")
    declared = document.get("label_scheme")
    if declared is not None:
        if not isinstance(declared, str):
            raise ConfigError(f"datalist {p}: label_scheme must be a string, got {declared!r}")
        _check_scheme(declared, f"datalist {p}: label_scheme")
        return declared
    labels = document.get("labels")
    if isinstance(labels, Mapping):
        return _scheme_from_names(labels)
    return None
