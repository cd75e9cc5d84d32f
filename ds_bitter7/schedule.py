"""When events happen and how far each goes."""

from __future__ import annotations

from typing import Optional

from .config import Bitter7Config, Shape


def sparsity_at(config: Bitter7Config, step: int) -> Optional[float]:
    """Target fraction for an event after optimizer step ``step``, or None if no event is due.

    Events fall on ``start_step``, every ``frequency`` steps after it, and on ``end_step``; the
    fraction is ``target * progress**3`` (cubic) or ``target * progress`` (linear), with
    ``progress = (step - start) / (end - start)`` (1 when start == end). Steps count from 1 (the
    first optimizer step): an event scheduled at step 0 (the defaults ``start_step = end_step = 0``)
    runs after step 1, when Adam's state first exists.
    """
    if step < 1:
        return None
    fraction = _scheduled(config, step)
    if step == 1:
        early = _scheduled(config, 0)
        if early is not None:
            fraction = max(early, fraction if fraction is not None else 0.0)
    return fraction


def _scheduled(config: Bitter7Config, step: int) -> Optional[float]:
    sched = config.schedule
    if step < sched.start_step or step > sched.end_step:
        return None
    if (step - sched.start_step) % sched.frequency != 0 and step != sched.end_step:
        return None
    span = sched.end_step - sched.start_step
    progress = 1.0 if span == 0 else (step - sched.start_step) / span
    power = 3 if sched.shape == Shape.cubic else 1
    return config.target_sparsity * progress ** power


def next_event_step(config: Bitter7Config, step: int) -> Optional[int]:
    """The first step after ``step`` with an event (``sparsity_at`` not None), or None."""
    sched = config.schedule
    if step < 1 and sched.start_step == 0:
        return 1  # the step-0 event runs after step 1
    nxt = max(step + 1, sched.start_step)
    if nxt > sched.end_step:
        return None
    k = -(-(nxt - sched.start_step) // sched.frequency)  # ceil
    return min(sched.start_step + k * sched.frequency, sched.end_step)


def sparsity_reached(config: Bitter7Config, step: int) -> float:
    """The fraction of the last event at or before ``step`` (0.0 when none has run by then)."""
    return next((f for f in (sparsity_at(config, s) for s in range(step, 0, -1)) if f is not None), 0.0)
