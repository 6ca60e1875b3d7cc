"""When to prune and how much: one-shot, iterative (Han et al. 2015) and AGP (Zhu and Gupta 2017).

A schedule maps training progress, measured in optimizer steps, to a target sparsity. It is a pure
function of its arguments, so a resumed run computes the same targets as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("one_shot", "iterative", "agp")


@dataclass(frozen=True)
class PruningSchedule:
    """Target sparsity as a function of the step.

    Args:
        kind: ``"one_shot"``: ``final`` from the first step of ``start_epoch`` on.
            ``"iterative"``: prune at the start of every epoch from ``start_epoch`` to ``end_epoch``
            (inclusive), the target rising linearly to ``final``; the epochs between are retraining.
            ``"agp"``: s_t = s_f + (s_i - s_f) (1 - p)^3 with p the fraction of the steps between the
            start of ``start_epoch`` and the start of ``end_epoch``, updated every ``frequency`` steps.
        final: the sparsity reached at the end.
        start_epoch, end_epoch: the ramp's extent (``end_epoch`` is ignored by ``one_shot``).
        initial: s_i of AGP, the sparsity of its first update.
        frequency: steps between AGP updates.

    Example:
        >>> agp = PruningSchedule("agp", final=0.9, start_epoch=0, end_epoch=10, frequency=100)
        >>> [round(agp.target(step, steps_per_epoch=100), 4) for step in (0, 500, 1000, 5000)]
        [0.0, 0.7875, 0.9, 0.9]
    """

    kind: str
    final: float
    start_epoch: int = 0
    end_epoch: int = 0
    initial: float = 0.0
    frequency: int = 100

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule={self.kind!r} is not known; valid: {', '.join(map(repr, SCHEDULES))}")
        for name, value in (("sparsity", self.final), ("initial_sparsity", self.initial)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value} must be in [0, 1)")
        if self.initial > self.final:
            raise ValueError(f"initial_sparsity={self.initial} must not exceed sparsity={self.final}")
        if self.start_epoch < 0:
            raise ValueError(f"start_epoch={self.start_epoch} must be >= 0")
        if self.kind != "one_shot" and self.end_epoch < self.start_epoch:
            raise ValueError(f"end_epoch={self.end_epoch} must be >= start_epoch={self.start_epoch}")
        if self.kind == "agp" and self.end_epoch == self.start_epoch:
            raise ValueError(f"schedule='agp' needs end_epoch > start_epoch, got both {self.start_epoch}")
        if self.frequency < 1:
            raise ValueError(f"frequency={self.frequency} must be >= 1 step")

    def target(self, step: int, steps_per_epoch: int) -> float | None:
        """Target sparsity at global ``step``; None before the schedule starts."""
        start = self.start_epoch * steps_per_epoch
        if step < start:
            return None
        if self.kind == "one_shot":
            return self.final
        if self.kind == "iterative":
            rounds = self.end_epoch - self.start_epoch + 1
            done = min(rounds, step // steps_per_epoch - self.start_epoch + 1)
            return self.final * done / rounds
        end = self.end_epoch * steps_per_epoch
        if step >= end:
            # The final sparsity is due at end_epoch whatever the frequency: a frequency longer than the
            # ramp would otherwise leave the target at its start for the whole ramp.
            return self.final
        # AGP moves in steps of `frequency`: the target only changes at update steps.
        step = start + (step - start) // self.frequency * self.frequency
        progress = min(1.0, (step - start) / max(1, end - start))
        return self.final + (self.initial - self.final) * (1.0 - progress) ** 3
