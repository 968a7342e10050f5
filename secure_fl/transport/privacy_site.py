"""The site's side of DP over gRPC: its privacy floor and the noise hook it gives its SecAgg round.

Re-exported by :mod:`secure_fl.transport.privacy` (module docstring there: what travels in
``SecAggSetup.distributed_dp_json`` for each trust model)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from secure_fl.errors import ConfigError, PolicyError
from secure_fl.privacy.codec_noise import KIND as CODEC_NOISE_KIND
from secure_fl.privacy.codec_noise import CodecNoiseConfig, NoiseHook, make_noise_hook

CENTRAL_CLIP_KIND = "central_clip/v1"


@dataclass(frozen=True)
class CentralClip:
    """Central trust: the L2 bound every site applies (the server adds the noise)."""

    clip: float

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace): what the round is bound to."""
        body = {"clip": self.clip, "kind": CENTRAL_CLIP_KIND}
        return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)


class SitePrivacy:
    """A site's privacy floor (its own ``policy``, never the server's word).

    ``check(json)`` parses the setup's ``distributed_dp_json`` and refuses (PolicyError, nothing
    sent): a round without distributed noise when ``policy.require_dp``; noise whose
    Gaussian-equivalent multiplier (at the honest shares it is sized for) is below
    ``policy.min_noise_multiplier``; noise sized for fewer colluders than this site assumes
    (``ceil(policy.corrupt_fraction * roster size)``); an unknown kind or malformed JSON.
    """

    def __init__(self, policy: Any, *, roster_size: int | None = None) -> None:
        self.policy = policy
        self.roster_size = roster_size

    @classmethod
    def from_config(cls, config: Any) -> SitePrivacy:
        """From a :class:`~secure_fl.transport.config.SiteConfig` (its policy and roster)."""
        return cls(config.policy, roster_size=len(config.roster))

    def check(self, distributed_dp_json: str) -> CodecNoiseConfig | CentralClip | None:
        """The round's DP configuration, after the floor (class docstring); None when none.
        DP is required when ``policy.require_dp`` or implied by a floor / a budget
        (:func:`secure_fl.transport.policy.dp_required`). The JSON is length- and depth-checked
        before it is parsed (:func:`secure_fl.transport.policy.bounded_json`)."""
        from secure_fl.transport.policy import bounded_json, dp_required

        require = dp_required(self.policy)
        if not distributed_dp_json:
            if require:
                raise PolicyError(
                    "the setup carries no distributed DP noise; this site's policy requires it "
                    "(policy.require_dp, implied by policy.min_noise_multiplier and "
                    "policy.max_dp_rounds)"
                )
            return None
        try:
            data = bounded_json(distributed_dp_json, "SecAggSetup.distributed_dp_json")
            kind = data.get("kind")
        except (ValueError, AttributeError) as exc:
            raise PolicyError(f"the setup's distributed_dp_json is malformed: {exc}") from exc
        if kind == CENTRAL_CLIP_KIND:
            if require:
                raise PolicyError(
                    "the server adds the noise itself (trust 'central'); this site's policy "
                    "requires distributed noise added by the sites (policy.require_dp, implied "
                    "by policy.min_noise_multiplier and policy.max_dp_rounds)"
                )
            clip = data.get("clip")
            if set(data) != {"kind", "clip"} or isinstance(clip, bool):
                raise PolicyError("central_clip JSON must hold exactly kind and clip")
            if not isinstance(clip, int | float) or not (math.isfinite(clip) and clip > 0):
                raise PolicyError(f"central_clip.clip must be a finite number > 0, got {clip!r}")
            return CentralClip(float(clip))
        if kind != CODEC_NOISE_KIND:
            raise PolicyError(f"unknown distributed DP kind {kind!r}")
        try:
            cfg = CodecNoiseConfig.from_json(distributed_dp_json)
        except ConfigError as exc:
            raise PolicyError(
                f"the setup's distributed DP configuration is invalid: {exc}"
            ) from exc
        effective = cfg.effective_noise_multiplier()
        floor = getattr(self.policy, "min_noise_multiplier", None)
        if require and effective <= 0.0:
            raise PolicyError("the setup's distributed DP noise is zero (policy.require_dp)")
        if floor is not None and effective < float(floor):
            raise PolicyError(
                f"the setup's distributed noise has Gaussian-equivalent multiplier "
                f"{effective:.4g} (nominal {cfg.noise_multiplier:.4g}, {cfg.honest_threshold} "
                f"honest shares), below this site's floor policy.min_noise_multiplier={floor:g}"
            )
        fraction = float(getattr(self.policy, "corrupt_fraction", 0.0))
        assumed = math.ceil(fraction * (self.roster_size or cfg.num_sites))
        if cfg.colluders < assumed:
            raise PolicyError(
                f"the setup's noise is sized for {cfg.colluders} colluders; this site assumes "
                f"{assumed} (policy.corrupt_fraction={fraction:g})"
            )
        return cfg

    def noise_hook(self, cfg: CodecNoiseConfig | CentralClip) -> NoiseHook:
        """The hook the site's SecAgg round half calls on its encoded integers: the noise share
        (:func:`~secure_fl.privacy.codec_noise.make_noise_hook`, from the OS CSPRNG), or for
        central trust a hook that checks the round clips at ``clip`` and adds nothing."""
        if isinstance(cfg, CodecNoiseConfig):
            return make_noise_hook(cfg)
        if not isinstance(cfg, CentralClip):
            raise ConfigError(f"cfg must come from check(), got {type(cfg).__name__}")

        def clip_only(values: np.ndarray, setup: Any) -> np.ndarray:
            l2 = getattr(setup, "l2_clip", None)
            if l2 is None or float(l2) > cfg.clip:
                raise PolicyError(
                    f"the round clips at l2_clip={l2!r}, not at the central bound {cfg.clip:g}"
                )
            if getattr(setup, "distributed_dp_json", cfg.to_json()) != cfg.to_json():
                raise PolicyError("the round is bound to another DP configuration")
            return values

        return clip_only


__all__ = ["CENTRAL_CLIP_KIND", "CentralClip", "SitePrivacy"]
