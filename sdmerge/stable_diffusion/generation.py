"""Where a generation starts (``cis``, ``crucial``, ``plan_every > 1``), decided without a host read.

A UNet call starts a new generation when its timestep is larger than the previous call's (the
diffusion goes backwards in time), or its ``sample``'s shape differs; the prompt attention mass
of the previous call is then forgotten. With a timestep tensor (what pipelines pass) the rule
is a ``[]`` bool tensor on the timestep's device, so a compiled UNet keeps it in its graph; the
first call and a new shape are known on the host (``True``), as is the rule for numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.plan import MergePlan


class GenerationBoundary:
    """Remembers the previous UNet call's timestep and sample shape."""

    def __init__(self):
        self._previous: tuple[float | Tensor, torch.Size] | None = None

    def start_call(self, timestep, shape: torch.Size) -> bool | Tensor:
        """Whether the call at ``timestep`` (a tensor, whose first element counts, or a number)
        with a sample of ``shape`` starts a generation: ``True`` at the first call or a new shape,
        else ``timestep > previous``: a bool for numbers, a ``[]`` bool tensor for tensors."""
        current = timestep.detach().flatten()[0] if isinstance(timestep, Tensor) else float(timestep)
        previous, self._previous = self._previous, (current, shape)
        if previous is None or shape != previous[1]:
            return True
        return current > previous[0]


def uniform_mass_at_start(mass: Tensor, starts: bool | Tensor) -> Tensor | None:
    """``crucial``'s prompt mass: ``None`` (uniform) where a generation starts, else ``mass``;
    with a tensor rule, ones where it starts (the same scores as ``None`` gives)."""
    if isinstance(starts, Tensor):
        return torch.where(starts, torch.ones_like(mass), mass)
    return None if starts else mass


class UnweightedAtStart(MergePlan):
    """``cis``'s plan under a tensor rule ``starts``: its weighted merge is the plain mean where
    ``starts`` holds (no prompt mass at the first call of a generation: tome), bit for bit, and
    the importance-weighted mean otherwise (both are computed; ``torch.where`` picks one)."""

    def __init__(self, plan: MergePlan, starts: Tensor):
        super().__init__(plan.labels, plan.num_groups, plan.sizes, drops=plan.drops)
        self.starts = starts

    def merge(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        merged = super().merge(x, weights)
        if weights is None:
            return merged
        return torch.where(self.starts, super().merge(x, None), merged)
