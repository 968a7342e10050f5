"""What a site accepts from the server: :class:`SitePolicy`, pinned in the site's own config.

Every host of a site half (the gRPC site, a Flower node, the in-process driver) checks the
server's round against this one policy before anything derived from the site's data is sent.
It lives in the round layer so that no host depends on another's transport.

Errors: ConfigError naming ``policy.<field>`` and its allowed range.
"""

from __future__ import annotations

from dataclasses import dataclass

from secure_fl.errors import ConfigError

#: Every aggregation a round can announce.
AGGREGATIONS = ("secagg", "secagg+", "plain", "ckks")

DEFAULT_POLICY_AGGREGATIONS = ("secagg", "secagg+", "ckks")


@dataclass(frozen=True)
class SitePolicy:
    """What a site accepts from the server, pinned in the site's own config (``policy``).

    The server is untrusted: whatever it announces is checked against this policy before the
    site computes, reports or sends anything derived from its data (see
    :mod:`secure_fl.transport.policy`). A round that breaks the policy is refused with a WARNING
    and the site leaves it without sending anything.

    ``aggregations``: the aggregations accepted. ``plain`` (updates in the clear) is accepted
    only when listed *and* ``allow_plain`` is true. ``require_active``: refuse the semi-honest
    SecAgg variant (default true). ``corrupt_fraction`` / ``dropout_rate``: the fraction of
    corrupt sites and of dropouts this site assumes; with the round's ``n`` (and ``k``) they give
    the smallest threshold (and, for SecAgg+, the smallest degree) the site accepts.
    ``vector_length``: the exact length of the flattened update, when known (else the size of the
    downloaded model is required). The privacy floor (distributed DP, checked by
    :class:`secure_fl.transport.privacy.SitePrivacy` before anything is sent): ``require_dp``
    refuses a SecAgg round without distributed DP noise; ``min_noise_multiplier`` refuses a
    round whose noise multiplier is below it (null: no floor on the multiplier);
    ``max_dp_rounds`` is the most DP rounds this site takes part in (counted by the site itself
    in ``state_dir/dp_rounds.jsonl``, :mod:`secure_fl.transport.site_dp`; null: no limit). A
    floor or a budget implies ``require_dp`` (a round without noise would bypass them): it is
    set to true here, and the config loader refuses ``require_dp: false`` written beside them.

    Errors: ConfigError naming the field and its allowed range.
    """

    aggregations: tuple[str, ...] = DEFAULT_POLICY_AGGREGATIONS
    allow_plain: bool = False
    require_active: bool = True
    corrupt_fraction: float = 0.0
    dropout_rate: float = 0.1
    vector_length: int | None = None
    require_dp: bool = False
    min_noise_multiplier: float | None = None
    max_dp_rounds: int | None = None

    def __post_init__(self) -> None:
        aggs = self.aggregations
        if (
            not isinstance(aggs, tuple)
            or not aggs
            or any(a not in AGGREGATIONS for a in aggs)
            or len(set(aggs)) != len(aggs)
        ):
            raise ConfigError(
                f"policy.aggregations must be a non-empty list of distinct values from "
                f"{AGGREGATIONS}, got {aggs!r}"
            )
        if "plain" in aggs and self.allow_plain is not True:
            raise ConfigError(
                "policy.aggregations lists 'plain' (updates in the clear): set "
                "policy.allow_plain to true to accept it"
            )
        for name in ("corrupt_fraction", "dropout_rate"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0.0 <= float(value) < 0.5
            ):
                raise ConfigError(f"policy.{name} must be a number in [0, 0.5), got {value!r}")
        length = self.vector_length
        if length is not None and (
            isinstance(length, bool) or not isinstance(length, int) or length < 1
        ):
            raise ConfigError(
                f"policy.vector_length must be an integer >= 1 or null, got {length!r}"
            )
        if not isinstance(self.require_dp, bool):
            raise ConfigError(f"policy.require_dp must be true or false, got {self.require_dp!r}")
        floor = self.min_noise_multiplier
        if floor is not None and (
            isinstance(floor, bool)
            or not isinstance(floor, int | float)
            or not 0.0 < float(floor) < float("inf")
        ):
            raise ConfigError(
                f"policy.min_noise_multiplier must be a finite number > 0 or null, got {floor!r}"
            )
        budget = self.max_dp_rounds
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, int) or budget < 1
        ):
            raise ConfigError(
                f"policy.max_dp_rounds must be an integer >= 1 or null, got {budget!r}"
            )
        if floor is not None or budget is not None:
            # A floor or a budget implies require_dp (class docstring).
            object.__setattr__(self, "require_dp", True)

    def accepts(self, aggregation: str) -> bool:
        """Whether this policy accepts ``aggregation`` at all."""
        if aggregation == "plain":
            return self.allow_plain and "plain" in self.aggregations
        return aggregation in self.aggregations


__all__ = ["AGGREGATIONS", "DEFAULT_POLICY_AGGREGATIONS", "SitePolicy"]
