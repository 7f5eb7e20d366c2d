"""Successive halving on a population trained in lock-step: rungs, brackets and who goes on.

A trial's budget is `steps` training steps. Rung k lies at `min_steps · η^k`
steps (below `steps`). At a rung, the members of a bracket that reached it
are ranked by the objective (a member whose row is not ok, or whose value is
not finite, ranks last) and the best ⌊n/η⌋ go on (at least one); the others
stop there and their rows leave the stacked population. The members left
after a bracket's last rung train to `steps`.

This is ASHA's rule (Li et al. 2020) decided synchronously: every member of
a population trains the same steps between evaluations, so every member of a
bracket reaches a rung in the same round and the ranking is the full one, not
the partial one an asynchronous scheduler sees. With `brackets` B > 1 it is
HyperBand (Li et al. 2018): bracket b's first rung lies at `min_steps · η^b`,
and the members are dealt out over the brackets as HyperBand sizes them
(n_b ∝ η^{s_b} / (s_b + 1), s_b the bracket's number of rungs) by largest
remainder, at least one each. Nothing here draws at random.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from pydantic import Field

from ..settings import Int, Section


class HalvingConfig(Section):
    """Successive halving at rungs; HyperBand with brackets > 1."""

    reduction_factor: Int = Field(4, ge=2, le=1000, description="η: the best 1/η of a bracket go on at each rung")
    min_steps: Optional[Int] = Field(None, ge=1, description="the first rung (grace period); default: interval")
    brackets: Int = Field(1, ge=1, le=32, description="HyperBand brackets; bracket b's first rung is min_steps·η^b")


@dataclass(frozen=True)
class Decision:
    """What a rung decided for a member: it goes on, or stops (and why)."""

    member: int
    rung: int
    goes_on: bool
    reason: Optional[str] = None


class Rungs:
    """The rungs and brackets of `size` members with budget `steps`, evaluated every `interval` steps."""

    def __init__(self, config: HalvingConfig, steps: int, interval: int, size: int, fewer_brackets: bool = False):
        """`fewer_brackets`: a wave smaller than the brackets (the last of a search's waves) takes one bracket
        per member rather than being refused."""
        eta = config.reduction_factor
        first = config.min_steps if config.min_steps is not None else interval
        if first % interval:
            raise ValueError(f"halving.min_steps ({first}) must be a multiple of interval ({interval}): a rung "
                             f"needs an evaluation at its step")
        if first >= steps:
            raise ValueError(f"halving.min_steps ({first}) must be below steps ({steps}): no rung would stop a trial")
        self.eta = eta
        #: the step of rung k, for every rung below the budget
        self.steps: List[int] = []
        at = first
        while at < steps:
            self.steps.append(at)
            at *= eta
        if config.brackets > len(self.steps) + 1:
            raise ValueError(f"halving.brackets: {config.brackets} brackets need {config.brackets - 1} rungs below "
                             f"steps ({steps}); min_steps {first} and reduction_factor {eta} give "
                             f"{len(self.steps)}")
        self.brackets = min(config.brackets, size) if fewer_brackets else config.brackets
        if size < self.brackets:
            raise ValueError(f"halving.brackets: {self.brackets} brackets need at least as many members, "
                             f"the population has {size}")
        counts = self._counts(size)
        #: bracket of each member slot (contiguous: bracket 0 first)
        self.bracket: List[int] = [b for b, n in enumerate(counts) for _ in range(n)]

    def _counts(self, size: int) -> List[int]:
        rungs = [len(self.steps) - b for b in range(self.brackets)]  # bracket b skips the first b rungs
        weights = [self.eta ** s / (s + 1) for s in rungs]
        total = sum(weights)
        exact = [size * w / total for w in weights]
        counts = [max(1, int(math.floor(x))) for x in exact]
        order = sorted(range(self.brackets), key=lambda b: (-(exact[b] - math.floor(exact[b])), b))
        i = 0
        while sum(counts) < size:
            counts[order[i % self.brackets]] += 1
            i += 1
        while sum(counts) > size:  # the floor of one raised to 1 took a member from another
            b = max(range(self.brackets), key=lambda j: (counts[j], -j))
            counts[b] -= 1
        return counts

    def rung_at(self, bracket: int, step: int) -> Optional[int]:
        """The rung index k decided at `step` for members of `bracket`, or None."""
        for k, at in enumerate(self.steps):
            if at == step and k >= bracket:
                return k
        return None

    def decide(self, bracket: int, rung: int, scores: Dict[int, float], mode: str) -> List[Decision]:
        """Rank the members of `bracket` at `rung` by `scores` ({member: value}; NaN or ±inf ranks last; ties
        by member) and keep the best ⌊n/η⌋, at least one."""
        sign = -1.0 if mode == "max" else 1.0

        def badness(member: int) -> Tuple[float, int]:
            value = scores[member]
            return (math.inf if value is None or not math.isfinite(value) else sign * value, member)

        ranked = sorted(scores, key=badness)
        n = len(ranked)
        keep = max(1, n // self.eta)
        out = []
        going = "only the best goes on" if keep == 1 else f"the best {keep} go on"
        for place, member in enumerate(ranked):
            if place < keep:
                out.append(Decision(member, rung, True))
            else:
                out.append(Decision(member, rung, False, (
                    f"rung {rung} ({self.steps[rung]} steps): {_ordinal(place + 1)} of {n} in bracket {bracket}; "
                    f"{going}")))
        return out

    def rows(self, interval: int, steps: int) -> int:
        """Rows one wave of every slot gives: each member's evaluations until it stops or ends."""
        total = 0
        for b in range(self.brackets):
            n = self.bracket.count(b)
            for at in range(interval, steps + 1, interval):
                total += n
                k = self.rung_at(b, at)
                if k is not None:
                    n = max(1, n // self.eta)
        return total


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
