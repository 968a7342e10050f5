"""What a site accepts: its own minimum threshold and variant, never the server's word for them."""

from __future__ import annotations

from dataclasses import dataclass

from secure_fl.errors import ConfigError, PolicyError
from secure_fl.secagg.config import SecAggConfig
from secure_fl.secagg.graph import (
    DEFAULT_SIGMA,
    assumed_corrupt,
    consistency_quorum,
    minimum_threshold,
)


@dataclass(frozen=True)
class SitePolicy:
    """A site's own requirements on a round's configuration, which the server distributes.

    * ``corrupt_fraction`` — the fraction of sites this site assumes may collude with the server;
      it sets the minimum threshold through :func:`~secure_fl.secagg.graph.minimum_threshold`.
    * ``require_active`` — refuse the semi-honest variant (default). A site that accepts a
      semi-honest round must say so by name: ``SitePolicy(require_active=False)``.
    * ``sigma`` — statistical security parameter of the SecAgg+ threshold bound.

    Guarantee: a client built with this policy never joins a round whose threshold lets a server
    colluding with ``corrupt_fraction`` of the sites collect both secrets of an honest site (or,
    semi-honest, lets the corrupt holders alone reconstruct), nor a round in which every other
    participant may be a colluder (``n - c < 2`` with ``c = ceil(corrupt_fraction * n)``: the sum
    minus the colluders' inputs would be the site's own input). In the active variant it reveals
    shares only for a survivor set signed by :meth:`consistency_quorum` sites of the round.

    Errors: ConfigError on construction with a field out of range.
    """

    corrupt_fraction: float = 0.0
    require_active: bool = True
    sigma: int = DEFAULT_SIGMA

    def __post_init__(self) -> None:
        if not 0.0 <= self.corrupt_fraction < 1.0:
            raise ConfigError(f"corrupt_fraction must be in [0, 1), got {self.corrupt_fraction!r}")
        if not isinstance(self.sigma, int) or self.sigma < 1:
            raise ConfigError(f"sigma must be an integer >= 1, got {self.sigma!r}")

    def required_threshold(self, config: SecAggConfig) -> int:
        """The smallest threshold this site accepts for ``config``'s size, degree and variant.

        Errors: PolicyError when no threshold is secure for this configuration.
        """
        try:
            return minimum_threshold(
                len(config.site_ids),
                config.degree,
                self.corrupt_fraction,
                active=config.active,
                sigma=self.sigma,
            )
        except ConfigError as exc:
            raise PolicyError(f"site policy: {exc}") from exc

    def colluders(self, config: SecAggConfig) -> int:
        """The number of the round's sites this site assumes may collude with the server:
        ``ceil(corrupt_fraction * n)``, ``n = len(config.site_ids)``."""
        return assumed_corrupt(len(config.site_ids), self.corrupt_fraction)

    def consistency_quorum(self, config: SecAggConfig) -> int:
        """How many distinct sites of the round must have signed a survivor set before this site
        reveals shares for it (active variant): more than ``(n + c) / 2``, see
        :func:`~secure_fl.secagg.graph.consistency_quorum`. Two different sets cannot both reach
        it without an honest site signing both, which no honest site does."""
        return consistency_quorum(len(config.site_ids), self.corrupt_fraction)

    def check(self, config: SecAggConfig) -> None:
        """Raise PolicyError (naming the field) when ``config`` is not acceptable to this site:
        the semi-honest variant without ``require_active=False``; a round with fewer than two
        participants beyond the assumed colluders (``n - c < 2``); a threshold below
        :meth:`required_threshold`."""
        if self.require_active and not config.active:
            raise PolicyError(
                "site policy: the semi-honest variant (active=False) is refused; a site accepts it "
                "only with SitePolicy(require_active=False)"
            )
        n = len(config.site_ids)
        colluders = self.colluders(config)
        if n - colluders < 2:
            raise PolicyError(
                f"site policy: the round has {n} sites and this site assumes {colluders} may "
                f"collude (corrupt_fraction={self.corrupt_fraction}); with fewer than 2 sites "
                "beyond the colluders the sum minus their inputs is this site's input. A round "
                f"needs n - c >= 2 (here at least {colluders + 2} sites)"
            )
        required = self.required_threshold(config)
        if config.threshold < required:
            raise PolicyError(
                f"site policy: threshold {config.threshold} is below this site's minimum "
                f"{required} (n={len(config.site_ids)}, k={config.degree}, "
                f"corrupt_fraction={self.corrupt_fraction}, active={config.active})"
            )
