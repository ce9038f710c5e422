"""One merged transformer block: what it captures per UNet call, and how it gets its merge plan."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from torch import Tensor

from ..core import random_2d_split, tokens_to_remove
from ..core.plan import MergePlan
from .generation import UnweightedAtStart, uniform_mass_at_start
from .prompt_importance import prompt_importance
from .randomness import stream_key
from .unet_layout import enclosing_transformer

if TYPE_CHECKING:
    from .state import MergeState

logger = logging.getLogger(__name__)


class MergedBlock:
    """One merged transformer block: its metric and plan for the current call, and ``p`` from the last.

    ``metric``: the block input ``x`` ``[B, N, C]``, captured by a forward pre-hook and consumed
    by ``attn1``, whose processor computes the block's plan (:meth:`merge_plan`) whichever
    branches merge. ``current``: that plan and its merge weights, or ``None`` (nothing merged in
    this call), for the branches after ``attn1`` (``attn2``, ``ff``); reset by the pre-hook.
    ``cross_attention_mass``: ``p`` ``[B, N]`` written by ``attn2``; ``attn1`` runs
    before ``attn2`` in a block, so ``attn1`` reads the value of the previous UNet call.
    ``grid`` (bipartite and grid methods): ``(H, W)`` of the ``[B, C, H, W]`` hidden states the block's
    ``Transformer2DModel`` (``grid_source``, with its name) received last, recorded by a forward
    pre-hook: the block's ``N = H * W`` tokens in raster order.
    ``observer``: ``None``, or a function called with ``(block, plan)`` with the plan of every
    call, computed or reused (set by :func:`sdmerge.plan_recording.record_plans`).
    """

    def __init__(self, name: str, module: BasicTransformerBlock, state: MergeState):
        self.name = name
        self.module = module
        self.state = state
        self.metric: Tensor | None = None
        self.current: tuple[MergePlan, Tensor | None] | None = None
        self.cross_attention_mass: Tensor | None = None
        self.grid_source = enclosing_transformer(state.unet, name) if state.method.needs_grid else None
        self.grid: tuple[int, int] | None = None
        self.split_stream = stream_key(name)  # seed=: this block's own patterns
        self._unsplit_grids: set[tuple[int, int]] = set()  # grids too small for one window (logged)
        self.observer = None

    def capture_metric(self, module, args, kwargs) -> None:
        self.metric = args[0] if args else kwargs["hidden_states"]
        self.current = None

    def record_grid(self, module, args, kwargs) -> None:
        hidden_states = args[0] if args else kwargs["hidden_states"]
        self.grid = tuple(hidden_states.shape[-2:]) if hidden_states.dim() == 4 else None

    def store_mass(self, mass: Tensor) -> None:
        """Keep ``p``: ``[B, N]``, or ``[B, M]`` when ``attn2`` ran on merged tokens
        (``merge_crossattn``; every token then gets its group's ``p``)."""
        if self.current is not None and mass.shape[1] == self.current[0].num_groups:
            mass = self.current[0].unmerge(mass.unsqueeze(-1)).squeeze(-1)
        self.cross_attention_mass = mass

    def merge_plan(self, attn: Attention, hidden_states: Tensor) -> tuple[MergePlan, Tensor | None] | None:
        """The plan and merge weights for ``hidden_states: [B, N, C]`` (``norm1(x)``), also kept as
        :attr:`current`; ``None`` when the call is outside the timestep range, nothing is removed,
        or the token grid holds no window of the split."""
        self.current = self._merge_plan(attn, hidden_states)
        return self.current

    def _merge_plan(self, attn: Attention, hidden_states: Tensor) -> tuple[MergePlan, Tensor | None] | None:
        metric, self.metric = self.metric, None
        if metric is None or metric.shape[:2] != hidden_states.shape[:2]:
            raise RuntimeError(
                f"{self.name}.attn1 was called without its block's input, which sdmerge captures in a pre-hook "
                "on the block: call the transformer block (or the UNet), not its attention alone"
            )
        if not self.state.merging:
            return None
        num_tokens = hidden_states.shape[1]
        remove = tokens_to_remove(num_tokens, self.state.config.keep_rate)
        if remove == 0:
            return None
        if self.state.method.needs_grid:
            self._check_grid(num_tokens)
        if self.state.method.needs_split and not self._grid_holds_a_window():
            return None
        merge = self.state.plans.plan(
            self.name, hidden_states.shape[:2], lambda: self._new_plan(attn, metric, hidden_states, remove)
        )
        if self.observer is not None and merge is not None:
            self.observer(self, merge[0])
        return merge

    def _new_plan(self, attn: Attention, metric: Tensor, hidden_states: Tensor, remove: int):
        """Group ``metric: [B, N, C]`` so that ``remove`` tokens go; the plan and merge weights."""
        method = self.state.method
        split = self._split(hidden_states.device) if method.needs_split else None
        importance = self._importance(attn, hidden_states) if method.needs_importance else None
        window = self.state.config.window if method.grouping == "grid" else None
        plan = method.plan(metric, remove, importance=importance, split=split, grid=self.grid, window=window)
        if importance is not None and method.needs_split and isinstance(self.state.generation_start, Tensor):
            plan = UnweightedAtStart(plan, self.state.generation_start)  # cis: tome where a generation starts
        return plan, method.weights(None, importance)

    def _check_grid(self, num_tokens: int) -> None:
        """``RuntimeError`` unless the recorded token grid (:meth:`record_grid`) holds ``num_tokens``."""
        source = self.grid_source[0]
        if self.grid is None:
            raise RuntimeError(
                f"{self.name}: its token grid is unknown, because {source} received no [B, C, H, W] hidden states "
                f"before it: call the UNet or {source}, not the block alone"
            )
        height, width = self.grid
        if height * width != num_tokens:
            raise RuntimeError(f"{self.name} has {num_tokens} tokens, not the {height}x{width} grid {source} received")

    def _grid_holds_a_window(self) -> bool:
        """Whether this call's token grid holds one ``sy x sx`` window of the split. If not (a deep
        block at a small latent), the block runs unmerged for this call; logged once per grid."""
        height, width = self.grid
        config = self.state.config
        if height >= config.sy and width >= config.sx:
            return True
        if self.grid not in self._unsplit_grids:
            self._unsplit_grids.add(self.grid)
            logger.warning(
                "sdmerge: %s has a %dx%d token grid at this latent size, smaller than one window of %s's split "
                "(sy=%d, sx=%d): it runs unmerged (max_downsample=%d puts it among the merged blocks; a larger "
                "latent, smaller sx/sy or a smaller max_downsample avoid this).",
                self.name, height, width, config.method, config.sy, config.sx, config.max_downsample,
            )
        return False

    def _split(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The random 2D split of this block's token grid (recorded by :meth:`record_grid`)."""
        config, randomness = self.state.config, self.state.randomness
        cell = randomness.cells(self.split_stream, self.grid, config.sx, config.sy, device)
        generator = randomness.generator(device)
        return random_2d_split(*self.grid, config.sx, config.sy, generator=generator, device=device, cell=cell)

    def _importance(self, attn: Attention, hidden_states: Tensor) -> Tensor | None:
        """``p_i * ||v_i||`` (``sdmerge.prompt_importance``). Without ``p`` (first call of a
        generation): ``None`` for methods that only weight by importance (cis: uniform weights,
        i.e. tome), ``||v_i||`` (uniform ``p``) for the one that selects tokens by it (crucial)."""
        mass = self.cross_attention_mass
        if mass is None and self.state.method.needs_split:
            return None
        if mass is not None and not self.state.method.needs_split:
            mass = uniform_mass_at_start(mass, self.state.generation_start)
        with torch.no_grad():
            return prompt_importance(attn, hidden_states, mass)
