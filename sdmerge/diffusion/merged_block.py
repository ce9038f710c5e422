"""One merged transformer block: how it gets its merge plan in a model call."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..core import random_2d_split, tokens_to_remove
from .call import CallState, Merge
from .generation import UnweightedAtStart, uniform_mass_at_start
from .layout import BlockSite
from .prompt_importance import prompt_importance
from .randomness import stream_key

if TYPE_CHECKING:
    from .state import MergeState

logger = logging.getLogger(__name__)


class MergedBlock:
    """One merged transformer block (``site``) of a patched model.

    Per call (:class:`~sdmerge.diffusion.call.CallState`): the block's forward pre-hook stores its
    input tokens ``x`` ``[B, N, C]`` (the metric); its self-attention asks for the plan
    (:meth:`plan`) with the tokens it receives ``h`` ``[B, N, C]`` (``norm1(x)``), whichever
    branches merge, and the later branches use it. The plan is kept in the call, so a block re-run
    by gradient checkpointing finds it instead of making another.
    ``observer``: ``None``, or a function called with ``(block, plan, grid)`` for the plan of
    every call, made or reused (set by :func:`sdmerge.plan_recording.record_plans`).
    """

    def __init__(self, site: BlockSite, state: MergeState):
        self.site = site
        self.name = site.name
        self.module = site.module
        self.state = state
        self.split_stream = stream_key(site.name)  # seed=: this block's own patterns
        self._unsplit_grids: set[tuple[int, int]] = set()  # grids too small for one window (logged)
        self._ran_outside_a_call = False  # logged once
        self.observer = None

    def outside_a_call(self) -> None:
        """The block's self-attention ran outside a call of the patched model (the block or the
        attention called on its own): it runs unmerged; logged once."""
        if not self._ran_outside_a_call:
            self._ran_outside_a_call = True
            logger.warning(
                "sdmerge: %s ran outside a call of the patched model, so it ran unmerged: sdmerge merges tokens in "
                "calls of the whole model (UNet or transformer) or of its pipeline.", self.site.attention.name,
            )

    def plan(self, call: CallState, attn: nn.Module, image: Tensor, text: Tensor | None = None) -> Merge | None:
        """The plan and merge weights for the image tokens ``image: [B, N, C]`` entering the block's
        self-attention ``attn`` (``text``: the prompt's tokens entering it with them, in a joint
        attention); ``None`` when the call does not merge, nothing is removed, or the token grid
        holds no window of the split."""
        if self.name not in call.plans:
            call.plans[self.name] = self._plan(call, attn, image, text)
        return call.plans[self.name]

    def plan_without_attention(self, call: CallState) -> Merge | None:
        """The plan of a call in which the block's self-attention did not run (a diffusers cache
        replayed its output), for its later branches: made from the block's input as usual, except
        for methods weighting by the prompt's attention on this call's attention inputs (``cis``,
        ``crucial``), which have none: the block then merges nothing in this call."""
        if self.state.method.needs_importance:
            call.plans[self.name] = None
            call.metrics.pop(self.name, None)
            return None
        return self.plan(call, self.site.attention.module, call.metrics[self.name])

    def _plan(self, call: CallState, attn: nn.Module, image: Tensor, text: Tensor | None) -> Merge | None:
        metric = call.metrics.pop(self.name, None)
        if metric is None or metric.shape[:2] != image.shape[:2]:
            raise RuntimeError(
                f"{self.site.attention.name} was called without its block's input, which sdmerge takes when the block "
                "is called: call the block (or the whole model), not its attention alone"
            )
        if not call.merging:
            return None
        num_tokens = image.shape[1]
        remove = tokens_to_remove(num_tokens, self.state.config.keep_rate)
        if remove == 0:
            return None
        method = self.state.method
        grid = self._grid(call, num_tokens) if method.needs_grid else None
        if method.needs_split and not self._grid_holds_a_window(grid):
            return None
        merge = call.generation.plans.plan(
            self.name, image.shape[:2], lambda: self._new_plan(call, attn, image, text, metric, remove, grid)
        )
        if self.observer is not None:
            self.observer(self, merge[0], call.grids.get(self.site.carrier))
        return merge

    @torch.no_grad()  # a plan is a discrete choice: no gradient, and nothing saved for backward
    def _new_plan(self, call: CallState, attn: nn.Module, image: Tensor, text: Tensor | None, metric, remove: int, grid):
        """Group ``metric: [B, N, C]`` so that ``remove`` tokens go; the plan and merge weights."""
        method = self.state.method
        split = self._split(call, grid, metric.device) if method.needs_split else None
        importance = self._importance(call, attn, image, text) if method.needs_importance else None
        config = self.state.config
        window = config.window if method.grouping == "grid" else None
        plan = method.plan(
            metric, remove, importance=importance, split=split, grid=grid, window=window,
            partial_windows=config.partial_windows,
        )
        if importance is not None and method.needs_split and isinstance(call.starts_generation, Tensor):
            plan = UnweightedAtStart(plan, call.starts_generation)  # cis: tome where a generation starts
        return plan, method.weights(None, importance)

    def _grid(self, call: CallState, num_tokens: int) -> tuple[int, int]:
        """This call's token grid (raster order), as the block's carrier saw it; ``RuntimeError``
        unless it holds ``num_tokens``."""
        grid = call.grids.get(self.site.carrier)
        if grid is None:
            raise RuntimeError(
                f"{self.name}: its token grid is unknown, because {self.site.carrier or 'the model'} received no "
                "image-shaped input before it: call the whole model, not the block alone"
            )
        if grid[0] * grid[1] != num_tokens:
            raise RuntimeError(f"{self.name} has {num_tokens} tokens, not the {grid[0]}x{grid[1]} grid of its input")
        return grid

    def _grid_holds_a_window(self, grid: tuple[int, int]) -> bool:
        """Whether this call's token grid holds one ``sy x sx`` window of the split. If not (a deep
        block at a small latent), the block runs unmerged for this call; logged once per grid."""
        height, width = grid
        config = self.state.config
        if height >= config.sy and width >= config.sx:
            return True
        if grid not in self._unsplit_grids:
            self._unsplit_grids.add(grid)
            chosen_by = "" if config.max_downsample is None else f"max_downsample={config.max_downsample} puts it among "
            logger.warning(
                "sdmerge: %s has a %dx%d token grid at this latent size, smaller than one window of %s's split "
                "(sy=%d, sx=%d): it runs unmerged (%sthe merged blocks; a larger latent, smaller sx/sy or fewer merged "
                "blocks avoid this).",
                self.name, height, width, config.method, config.sy, config.sx, chosen_by,
            )
        return False

    def _split(self, call: CallState, grid: tuple[int, int], device: torch.device) -> tuple[Tensor, Tensor]:
        """The random 2D split of this call's token grid."""
        config, randomness = self.state.config, self.state.randomness
        cell = randomness.cells(call.split_key, self.split_stream, grid, config.sx, config.sy, device)
        generator = randomness.generator(device)
        return random_2d_split(*grid, config.sx, config.sy, generator=generator, device=device, cell=cell)

    def _importance(self, call: CallState, attn: nn.Module, image: Tensor, text: Tensor | None) -> Tensor | None:
        """``p_i * ||v_i||`` (:mod:`sdmerge.diffusion.prompt_importance`) for the self-attention's
        image tokens, ``p`` from this call's tokens (a joint attention) or from the generation's
        previous call. Without ``p`` (first call of a generation): ``None`` for methods that only
        weight by importance (cis: uniform weights, i.e. tome), ``||v_i||`` (uniform ``p``) for
        the one that selects tokens by it (crucial)."""
        if self.site.mass.this_call:
            return prompt_importance(attn, image, self.site.mass.function(attn, image, text, call))
        mass = call.generation.masses.get(self.name)
        if mass is None and self.state.method.needs_split:
            return None
        if mass is not None and not self.state.method.needs_split:
            mass = uniform_mass_at_start(mass, call.starts_generation)
        return prompt_importance(attn, image, mass)

    def store_mass(self, call: CallState, mass: Tensor) -> None:
        """Keep ``p`` of this call for the next: ``[B, N]``, or ``[B, M]`` when the branch that
        computed it ran on merged tokens (every token then gets its group's ``p``)."""
        merge = call.plans.get(self.name)
        if merge is not None and mass.shape[1] == merge[0].num_groups:
            mass = merge[0].unmerge(mass.unsqueeze(-1)).squeeze(-1)
        call.generation.masses[self.name] = mass
