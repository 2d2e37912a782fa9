"""Who pulls from whom in a fan-out round (pure): the holders double every round.

A round pairs every holder with one host that still needs the file, so ``H`` holders
bring ``H`` more hosts: ``1 -> 2 -> 4 -> ...``, about ``log2(N)`` rounds for ``N`` hosts
after the controller's one push. Each receiver pulls byte ranges from up to
``per_receiver`` holders at once, chosen round-robin so that every holder serves about
one file's worth per round: no holder's uplink carries more than the controller's did.
"""

from __future__ import annotations

import math


def seed(needing: list[str], holders: list[str]) -> str | None:
    """The host the controller pushes to: the first that needs the file, when no host holds it."""
    return needing[0] if needing and not holders else None


def plan_round(needing: list[str], holders: list[str], per_receiver: int) -> dict[str, list[str]]:
    """receiver -> the holders it pulls from, for one round (inventory order in, inventory order out).

    At most ``len(holders)`` receivers; receiver ``i`` pulls from holders ``i, i+1, ...``
    (wrapping), so the first source of every receiver is a different holder.
    """
    if not holders or per_receiver < 1:
        return {}
    receivers = needing[: len(holders)]
    n = min(per_receiver, len(holders))
    return {r: [holders[(i + k) % len(holders)] for k in range(n)] for i, r in enumerate(receivers)}


def rounds_needed(hosts: int) -> int:
    """Rounds after the seed push until ``hosts`` hosts hold the file, starting from one holder."""
    return math.ceil(math.log2(hosts)) if hosts > 1 else 0
