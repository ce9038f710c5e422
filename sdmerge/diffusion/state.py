"""What :func:`sdmerge.diffusion.apply` installs on one denoiser: hooks, and nothing that holds a call.

The installed state is shared by every thread that calls the model and changes only at
``apply`` / ``remove``: the config, the method, the merged blocks, the split's randomness, and
two thread-local slots (each thread's current call, each thread's current generation). What one
call computes lives in that call's :class:`~sdmerge.diffusion.call.CallState`; what a generation
reuses lives in its :class:`~sdmerge.diffusion.generation.Generation`.

Hooks (:class:`~sdmerge.diffusion.forward_hooks.ForwardHook`, wrappers of the modules' ``forward``
that ``torch.compile`` sees; all removed by :meth:`MergeState.uninstall`; no submodule, processor
or weight is replaced):

- the denoiser: around its forward, the call (:meth:`MergeState.run_call`);
- each carrier: around its forward, the call is put in the attention keyword arguments it passes on;
- each receiving block: around its forward, the call is taken out again (and, for merged blocks,
  the block input is kept as the metric);
- each merged block's branches: :mod:`sdmerge.diffusion.branches`; and for ``cis`` / ``crucial``
  the prompt mass is recorded after the module that gives it.

The timestep is read on the host (a device synchronisation, and a graph break under
``torch.compile``) only to count the steps of ``plan_every > 1`` and for ``timestep_range``.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from torch import nn

from ..methods import Method, get_method
from . import pipeline_calls
from .branches import LaterBranch, MergedBodyReentry, SelfAttentionBranch, SpanEnd, SpanStart
from .call import CARRIED, CallState, CurrentCall
from .config import MergeConfig
from .forward_hooks import ForwardHook, OutsideHook
from .generation import Generation, Generations
from .layout import Argument, BlockSite, Carrier, Layout, PreviousCallMass
from .merged_block import MergedBlock
from .randomness import SplitRandomness

logger = logging.getLogger(__name__)


def _check_attention(name: str, attn: nn.Module, *, merges: bool, reads_probabilities: bool) -> None:
    """``ValueError`` if the attention ``attn`` cannot run on merged tokens (``merges``) or give
    the prompt attention mass (``reads_probabilities``)."""
    problems = []
    if getattr(attn, "group_norm", None) is not None or getattr(attn, "spatial_norm", None) is not None:
        problems.append("a group_norm / spatial_norm (statistics over all tokens)")
    if reads_probabilities:
        if not getattr(attn, "is_cross_attention", False):
            problems.append("it is not a cross-attention")
        if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
            problems.append("query/key normalisation, which the prompt attention mass does not model")
    if merges and getattr(attn, "residual_connection", False):
        problems.append("residual_connection=True (the residual would be added to merged tokens)")
    if problems:
        raise ValueError(f"cannot merge tokens at {name}: " + "; ".join(problems))


class MergeState:
    """Everything :func:`apply` installs on one denoiser (its :class:`~.layout.Layout`)."""

    def __init__(self, layout: Layout, config: MergeConfig):
        self.layout = layout
        self.config = config
        self.method: Method = get_method(config.method, "sd")
        self.randomness = SplitRandomness(config.use_rand, config.seed)
        self.generations = Generations(config)
        # without anything kept per generation, every call shares one generation that keeps nothing
        # (no thread-local state to read: one compiled graph from the first call on)
        self._stateless = None if self.keeps_generations else Generation(config, torch.Size(), marked=False)
        self.current = CurrentCall()
        self.blocks = [MergedBlock(site, self) for site in layout.sites]
        for site in layout.sites:
            self._check_site(site)
        if config.merge_crossattn and all(site.crossattn is None for site in layout.sites):
            raise ValueError(
                f"merge_crossattn: none of the merged blocks of this {layout.family} model has a cross-attention "
                "(or a second self-attention, as SD3.5's dual-attention blocks) to merge"
            )
        self._hooks: list[ForwardHook] = []

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(block.name for block in self.blocks)

    @property
    def tracks_generations(self) -> bool:
        """Whether the timestep rule matters: the prompt mass of the previous call, steps, or
        which calls of a generation merged (``timestep_range``)."""
        previous_mass = self.method.needs_importance and any(not site.mass.this_call for site in self.layout.sites)
        return previous_mass or self.config.plan_every > 1 or self.config.timestep_range is not None

    @property
    def keeps_generations(self) -> bool:
        """Whether anything is kept per generation: the prompt mass, reused plans, or which calls
        merged (``timestep_range``)."""
        return self.tracks_generations or self.config.share_plans

    @property
    def reads_timestep_on_host(self) -> bool:
        return self.config.plan_every > 1 or self.config.timestep_range is not None

    def _check_site(self, site: BlockSite) -> None:
        config = self.config
        _check_attention(site.attention.name, site.attention.module, merges=True, reads_probabilities=False)
        if config.merge_crossattn and site.crossattn is not None:
            _check_attention(site.crossattn.name, site.crossattn.module, merges=True, reads_probabilities=False)
        if config.merge_mlp and site.mlp is None:
            raise ValueError(f"merge_mlp: {site.name} has no feed-forward layer")
        if self.method.needs_importance:
            if site.mass is None:
                raise ValueError(
                    f"method {config.method!r} weighs tokens by their prompt attention mass, which {site.name} "
                    "cannot give (no cross-attention)"
                )
            if site.crossattn is not None and site.mass.module is site.crossattn.module:
                _check_attention(site.crossattn.name, site.mass.module, merges=False, reads_probabilities=True)

    # --- installing ---------------------------------------------------------------------------

    def _hook(self, module: nn.Module, around) -> None:
        self._hooks.append(ForwardHook(module, around))

    def install(self) -> None:
        # hooks are bound methods and partials of them (no closures), so that copy.deepcopy of the
        # model copies them with this state (see __setstate__)
        for carrier in self.layout.carriers:  # before the denoiser's own hook, which must be outermost
            self._hook(carrier.module, partial(self.carry, carrier))
        self._hook(self.layout.denoiser, self.run_call)
        merged = {block.name: block for block in self.blocks}
        for carrier in self.layout.carriers:
            for name, module, argument in carrier.receivers:
                self._hook(module, partial(self.receive, argument, merged.get(name)))
        for block in self.blocks:
            self._install_branches(block)
        pipeline_calls.watch(self.layout.denoiser, self.generations)

    def _install_branches(self, block: MergedBlock) -> None:
        site, config = block.site, self.config
        merged_body = site.span is not None and config.merge_attn and config.merge_mlp and not config.kv_only
        if merged_body:  # a single-stream block's body merged from its norm, which runs first
            self._hook(site.span.start, SpanStart(block, self.current).around)
        self._hook(site.attention.module, SelfAttentionBranch(block, config, self.current).around)
        if merged_body:
            self._hooks.append(OutsideHook(site.attention.module, MergedBodyReentry(block, self.current).after))
            self._hook(site.span.end.module, SpanEnd(block, self.current).around)
        if self.method.needs_importance and not site.mass.this_call:
            # inside a merging wrapper of the same module (installed next): p of the merged tokens
            self._hook(site.mass.module, partial(self.record_mass, block, site.mass.function))
        for branch, option in ((site.crossattn, "merge_crossattn"), (site.mlp, "merge_mlp")):
            if getattr(config, option) and branch is not None:
                self._hook(branch.module, LaterBranch(block, branch, option, self.current).around)

    def uninstall(self) -> None:
        for hook in reversed(self._hooks):  # the last wrapper of a module is outermost
            hook.remove()
        self._hooks.clear()
        pipeline_calls.unwatch(self.layout.denoiser)

    def __setstate__(self, state: dict) -> None:
        """A copy of the patched model (``copy.deepcopy``, pickling) has its own hooks and
        blocks, no call in flight, no generation yet, and is watched for pipeline calls."""
        self.__dict__.update(state)
        if self._hooks:
            pipeline_calls.watch(self.layout.denoiser, self.generations)

    # --- per call -----------------------------------------------------------------------------

    def run_call(self, module, forward, args: tuple, kwargs: dict):
        """Around the denoiser: this thread's :class:`CallState` for the call, for its duration
        (after it, the state lives on only where a checkpointed block's saved arguments hold it,
        until its backward pass)."""
        self.current.set(self._new_call(module, args, kwargs))
        try:
            return forward(*args, **kwargs)
        finally:
            self.current.set(None)

    def _new_call(self, module, args: tuple, kwargs: dict) -> CallState:
        layout, config = self.layout, self.config
        sample = layout.sample.get(args, kwargs)
        timestep = layout.timestep.get(args, kwargs)
        if self.reads_timestep_on_host:  # on the host: a graph break when compiled
            timestep = float(torch.as_tensor(timestep).flatten()[0]) * layout.timestep_scale
        if self._stateless is not None:
            generation, starts = self._stateless, False
        else:
            rule = timestep if self.tracks_generations else None
            generation, starts = self.generations.start_call(rule, sample.shape, module.training)
        merging = config.merges_at(timestep) if config.timestep_range is not None else True
        if config.timestep_range is not None:
            generation.calls.append((timestep, merging))
        if merging:
            generation.plans.start_call(timestep if generation.plans.counts_steps else None)
        split_key = self.randomness.call_key(timestep) if merging else None
        return CallState(generation, starts, merging, split_key)

    def carry(self, carrier: Carrier, module, forward, args: tuple, kwargs: dict):
        """Around a carrier: record its token grid in this thread's call, and put the call in the
        attention keyword arguments it passes to its blocks."""
        call = self.current.get()
        if call is not None:
            needs_grid = self.method.needs_grid or any(block.observer is not None for block in self.blocks)
            grid = carrier.grid(args, kwargs) if needs_grid else None
            if grid is not None:
                call.grids[carrier.name] = grid
            if carrier.positions is not None:
                call.positions = carrier.positions(args, kwargs)
            given = carrier.attention_kwargs.get(args, kwargs) or {}
            args, kwargs = carrier.attention_kwargs.replace(args, kwargs, {**given, CARRIED: call})
        return forward(*args, **kwargs)

    def receive(self, argument: Argument, block: MergedBlock | None, module, forward, args: tuple, kwargs: dict):
        """Around a receiving block: take the call out of its attention keyword arguments and make
        it this thread's current call; a merged block keeps its input tokens (the metric)."""
        given = argument.get(args, kwargs)
        if given and CARRIED in given:
            rest = dict(given)
            call: CallState = rest.pop(CARRIED)
            self.current.set(call)
            if block is not None:
                call.metrics[block.name] = metric = block.site.tokens.get(args, kwargs)
                call.counts[block.name] = metric.shape[1]
            args, kwargs = argument.replace(args, kwargs, rest)
        return forward(*args, **kwargs)

    def record_mass(self, block: MergedBlock, mass: PreviousCallMass, module, forward, args: tuple, kwargs: dict):
        """Around the module that gives the prompt mass (``cis``, ``crucial``): keep ``p`` of
        this call for the next."""
        output = forward(*args, **kwargs)
        call = self.current.get()
        if call is not None:
            block.store_mass(call, mass(module, args, kwargs, output))
        return output
