"""Merge plan reuse in diffusion models: ``share_plans`` and ``plan_every`` (off by default).

A *plan* here is what one merged block computes before its self-attention: the core
:class:`~sdmerge.core.plan.MergePlan` and its merge weights. Computing it (bipartite matching,
exact agglomerative clustering, importance) is the work merging adds to a UNet call; reuse
computes it less often, at the price of merging tokens with a plan made from older tokens
(an earlier denoising step, or an earlier block of the same token grid).

- ``share_plans``: the key of a plan is the token grid instead of the block, so the first
  merged block of a grid that runs in a model call computes it (from its own input) and the
  other merged blocks of that grid reuse it in the same call (a UNet level, the up path
  included; every block of a diffusion transformer). The blocks of a grid are those whose
  tokens have the same count ``N`` in the call (every downsampling lowers the count of a grid
  of more than one token).
- ``plan_every=k``: *steps* are counted from the start of a generation, one per distinct
  timestep (the model calls at one timestep, e.g. the two halves of classifier-free guidance
  run separately, are *slots* of one step). Steps ``0, k, 2k, ...`` are *plan steps*: every call
  computes new plans. At the steps in between, the call in slot ``j`` reuses the plan that slot
  ``j`` of the latest plan step computed (the latest plan of the key if that step had fewer
  slots). A plan is only reused for tokens of its shape ``(B, N)``; otherwise a new one is
  computed (and reused from then on).

One :class:`PlanReuse` serves one generation (:class:`sdmerge.diffusion.generation.Generation`):
a new generation starts with a new one, whose first step is a plan step. The integration tells it
where each merged model call stands (:meth:`PlanReuse.start_call`) and asks it for every merged
block's plan (:meth:`PlanReuse.plan`). Nothing here reads tensors: no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Plan = TypeVar("Plan")


@dataclass
class _Cached(Generic[Plan]):
    plan: Plan
    shape: tuple[int, int]  # (B, N) of the tokens it was computed for
    call: int  # the UNet call that computed it


@dataclass
class _Entry(Generic[Plan]):
    step: int  # the step it was started at: a plan step, or the first step that asked for the key
    by_slot: dict[int, _Cached[Plan]] = field(default_factory=dict)
    latest: _Cached[Plan] | None = None


class PlanReuse(Generic[Plan]):
    """Decides, for one generation, which plans are computed and which are reused.

    Args:
        plan_every: ``k >= 1``; plans are computed at every ``k``-th step of a generation.
        share_plans: one plan per level (token count) per UNet call, instead of per block.
    With ``plan_every=1`` and ``share_plans=False`` every request computes a new plan and
    nothing is kept.
    """

    def __init__(self, plan_every: int = 1, share_plans: bool = False):
        self.plan_every = plan_every
        self.share_plans = share_plans
        self._entries: dict[Hashable, _Entry[Plan]] = {}
        self._call = 0  # merged model calls so far
        self._step = -1  # the current step: the first call is step 0
        self._slot = 0
        self._timestep: float | None = None

    @property
    def enabled(self) -> bool:
        return self.plan_every > 1 or self.share_plans

    @property
    def counts_steps(self) -> bool:
        """Whether :meth:`start_call` needs the timestep (only to count steps for ``plan_every > 1``)."""
        return self.plan_every > 1

    @property
    def is_plan_step(self) -> bool:
        """Whether the current UNet call computes new plans (at most one per key with ``share_plans``)."""
        return self._step % self.plan_every == 0

    def start_call(self, timestep: float | None = None) -> None:
        """Begin a merged model call. ``timestep`` (needed when :attr:`counts_steps`): a call at
        the previous call's timestep is the next slot of the same step. Without reuse nothing is
        counted (so a compiled model has no call counter to guard on)."""
        if not self.enabled:
            return
        self._call += 1
        if not self.counts_steps:
            self._step, self._slot = self._step + 1, 0
            return
        if timestep is None:
            raise ValueError("plan_every > 1 counts steps by timestep: start_call needs the call's timestep")
        if timestep == self._timestep:
            self._slot += 1
        else:
            self._step, self._slot = self._step + 1, 0
        self._timestep = timestep

    def plan(self, block: Hashable, shape: tuple[int, int], compute: Callable[[], Plan]) -> Plan:
        """The plan of ``block`` for tokens of ``shape`` ``(B, N)``: reused when the rules allow
        it, else ``compute()``, kept for reuse."""
        if not self.enabled:
            return compute()
        shape = tuple(shape)
        key = ("level", shape[1]) if self.share_plans else ("block", block)
        entry = self._entries.get(key)
        cached = self._reusable(entry, shape)
        if cached is not None:
            return cached.plan
        plan = compute()
        if entry is None or (self.is_plan_step and entry.step != self._step):
            entry = self._entries[key] = _Entry(self._step)
        entry.by_slot[self._slot] = entry.latest = _Cached(plan, shape, self._call)
        return plan

    def _reusable(self, entry: _Entry[Plan] | None, shape: tuple[int, int]) -> _Cached[Plan] | None:
        if entry is None:
            return None
        if self.is_plan_step:  # only what this call computed for the key (share_plans)
            cached = entry.by_slot.get(self._slot) if entry.step == self._step else None
            if cached is None or cached.call != self._call or not self.share_plans:
                return None
        else:
            cached = entry.by_slot.get(self._slot, entry.latest)
        return cached if cached is not None and cached.shape == shape else None
