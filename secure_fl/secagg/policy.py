"""What a site accepts: its own minimum threshold and variant, never the server's word for them."""

from __future__ import annotations

from dataclasses import dataclass

from secure_fl.errors import ConfigError, PolicyError
from secure_fl.secagg.config import SecAggConfig
from secure_fl.secagg.graph import DEFAULT_SIGMA, minimum_threshold


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
    semi-honest, lets the corrupt holders alone reconstruct).

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

    def check(self, config: SecAggConfig) -> None:
        """Raise PolicyError (naming the field) when ``config`` is not acceptable to this site."""
        if self.require_active and not config.active:
            raise PolicyError(
                "site policy: the semi-honest variant (active=False) is refused; a site accepts it "
                "only with SitePolicy(require_active=False)"
            )
        required = self.required_threshold(config)
        if config.threshold < required:
            raise PolicyError(
                f"site policy: threshold {config.threshold} is below this site's minimum "
                f"{required} (n={len(config.site_ids)}, k={config.degree}, "
                f"corrupt_fraction={self.corrupt_fraction}, active={config.active})"
            )
