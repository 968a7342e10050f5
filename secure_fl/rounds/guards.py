"""A site's memory across rounds: one participation per round id, one unmasking per round id.

The round objects keep no memory across rounds, so without a guard a server can run two rounds
under the same round id (or ask for a second unmasking with another survivor set) and difference
two sums into one site's exact update. A :class:`ReleaseGuard` is that memory;
:class:`~secure_fl.rounds.secagg.SecAggSiteRound` calls it

* ``claim(round_id, None)`` in :meth:`~secure_fl.rounds.secagg.SecAggSiteRound.on_setup`, before
  its key advertisement leaves: PolicyError when this site already took part in a round with
  that id;
* ``contribute(round_id)`` when it has computed its masked input, before the input is returned:
  the other sites' shares rebuild this site's self-mask, so the masked input alone releases its
  update into a sum (the server needs no unmask answer from it); a host with a per-release
  budget (the gRPC site's DP rounds) records or refuses it here;
* ``claim(round_id, survivors)`` when it has computed its unmask response, before the response is
  returned: PolicyError when it already answered an unmasking of that round id for another
  survivor set (the same set again is allowed: the same answer reveals nothing new).

**Every host must provide one, per site**, whose record outlives the round object and, for a
deployed site, the process (written before the guarded message leaves). The gRPC site's guard is
durable (``state_dir``: the transport's replay and unmask records); :func:`~secure_fl.rounds.
local.run_local` (one program: server and sites alike) uses a fresh :class:`MemoryReleaseGuard`
per site unless given others. The guard does not know the update: a host must also refuse to
release the same update (the same model) under two round ids (the gRPC site's
``ContributionGuard``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from secure_fl.errors import PolicyError


@runtime_checkable
class ReleaseGuard(Protocol):
    """A site's record of its round ids and unmaskings (see the module docstring)."""

    def claim(self, round_id: int, survivors: frozenset[int] | None) -> None:
        """Record that this site is about to take part in round ``round_id`` (``survivors``
        None) or to answer its unmasking for ``survivors``, before the message leaves.
        Errors: PolicyError when this site already took part in a round with that id (None), or
        already answered an unmasking of that round id for another survivor set."""
        ...

    def contribute(self, round_id: int) -> None:
        """Record that this site is about to send its masked input of round ``round_id`` (a
        release of its update: see the module docstring), before the message leaves.
        Errors: PolicyError when the host refuses the release (e.g. a budget is spent)."""
        ...


class MemoryReleaseGuard:
    """A :class:`ReleaseGuard` kept in this process's memory (in process: simulations, tests).
    Not durable: a host whose site outlives its process needs a guard written to disk."""

    def __init__(self) -> None:
        self._joined: set[int] = set()
        self._contributed: set[int] = set()
        self._unmasked: dict[int, frozenset[int]] = {}

    @property
    def contributed(self) -> frozenset[int]:
        """The round ids whose masked input this site sent (released its update into)."""
        return frozenset(self._contributed)

    def contribute(self, round_id: int) -> None:
        """See :meth:`ReleaseGuard.contribute` (recorded in :attr:`contributed`; no budget
        here, so nothing is refused)."""
        self._contributed.add(round_id)

    def claim(self, round_id: int, survivors: frozenset[int] | None) -> None:
        """See :meth:`ReleaseGuard.claim`. Errors: PolicyError."""
        if survivors is None:
            if round_id in self._joined:
                raise PolicyError(
                    f"this site already took part in a round with id {round_id}; a second "
                    "round under the same id could reveal the difference of two sums"
                )
            self._joined.add(round_id)
            return
        chosen = frozenset(survivors)
        previous = self._unmasked.get(round_id)
        if previous is not None and previous != chosen:
            raise PolicyError(
                f"the server asks to unmask round {round_id} again with another survivor set; "
                "answering would reveal the difference of two sums"
            )
        self._unmasked[round_id] = chosen


__all__ = ["MemoryReleaseGuard", "ReleaseGuard"]
