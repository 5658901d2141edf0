"""Peers whose deliveries fail, said in the log once when they start and once when they end.

A retried delivery is recorded (its attempt, `last_error`) but was never logged until it gave
up for good, days later for a routine one: with a peer down or misconfigured, the on-call
engineer found nothing in the log (from review). One line when a peer's deliveries start
failing, with the first error; one when one succeeds again. Not one per attempt: a peer down
for hours would fill the log.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from app.delivery import outbox
from app.delivery.settle import Outcome
from app.oneline import one_line

log = logging.getLogger(__name__)
TRANSPORT = "transport: "  # the worker's word for an attempt that got no answer


class FailingPeers:
    """As this worker's own attempts find them (each worker of a node says it once)."""

    def __init__(self) -> None:
        self._failing: set[str] = set()

    def observe(self, outcomes: Iterable[tuple[str, Outcome]]) -> None:
        for peer, outcome in outcomes:
            if outcome.state == outbox.DELIVERED:
                if peer in self._failing:
                    self._failing.discard(peer)
                    log.info("deliveries to %s succeed again", peer)
            elif _peer_failing(outcome) and peer not in self._failing:
                self._failing.add(peer)
                log.warning(
                    "deliveries to %s are failing (%s); retried as planned, said once until "
                    "one succeeds: see `entraide deliveries list` and `entraide doctor`",
                    peer,
                    one_line(outcome.error or f"HTTP {outcome.http_status}"),
                )


def _peer_failing(outcome: Outcome) -> bool:
    """The peer out of reach or failing (no answer, a 5xx): not one envelope refused, a
    busy peer's 429 (a healthy peer answers them between successes: said as failing and
    succeeding again at every round, from review), nor this node's own trouble."""
    if outcome.http_status is None:
        return (outcome.error or "").startswith(TRANSPORT)
    return outcome.http_status >= 500
