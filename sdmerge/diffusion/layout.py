"""What a model family tells the shared machinery: where its blocks are and where merging goes.

A *layout* (one module per family in :mod:`sdmerge.diffusion.models`) describes a denoiser with
the records below, and nothing else: the merging itself (hooks, plans, generations, reuse) is
shared by every family (:mod:`sdmerge.diffusion.state`).

Every layout module defines ``SUPPORTED`` (text), ``find(model)`` (its denoiser in a model or
pipeline, else ``None``), ``why_unsupported(model)`` and ``layout(denoiser, config)``, which
returns a :class:`Layout` (or raises ``ValueError`` for options the model cannot follow).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn
from torch._dynamo.eval_frame import OptimizedModule

if TYPE_CHECKING:
    from ..core.plan import MergePlan
    from .call import CallState


def uncompiled(model):
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) wraps; any other object as it is."""
    while isinstance(model, OptimizedModule):
        model = model._orig_mod
    return model


def held(model, component: str, cls: type) -> nn.Module | None:
    """``model``, or its pipeline's ``component`` (``unet``, ``transformer``), as a ``cls`` (through
    ``torch.compile`` wrappers); ``None`` if neither is one."""
    for candidate in (model, getattr(model, component, None)):
        candidate = uncompiled(candidate)
        if isinstance(candidate, cls):
            return candidate
    return None


@dataclass(frozen=True)
class Argument:
    """Where a call passes one argument: by keyword ``name``, or positionally at ``position``."""

    name: str
    position: int | None = None

    def get(self, args: tuple, kwargs: dict):
        """The argument's value, ``None`` if it is not passed."""
        if self.name in kwargs:
            return kwargs[self.name]
        return args[self.position] if self.position is not None and len(args) > self.position else None

    def replace(self, args: tuple, kwargs: dict, value) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with this argument set to ``value`` (where it was passed)."""
        if self.name not in kwargs and self.position is not None and len(args) > self.position:
            return (*args[: self.position], value, *args[self.position + 1 :]), kwargs
        return args, {**kwargs, self.name: value}


@dataclass(frozen=True, eq=False)
class AttentionTokens:
    """What a layout's own attention call on merged tokens (:attr:`Branch.merged_attention`) gets.

    Attributes:
        queries: ``[B, Nq, C]`` the image tokens whose outputs are wanted: the merged ones, or
            every token (``kv_only``; :attr:`queries_merged` says which).
        keys: ``[B, Nk, C]`` the image tokens that give the keys and values: the merged ones.
        text: ``[B, T, C]`` the prompt's tokens as the attention received them, or ``None``.
        bias: ``[B, 1, 1, Nk]`` ``log(sizes)`` to add to the image keys' logits, or ``None``.
        plan, weights: the block's plan and merge weights (to merge what else the tokens carry,
            e.g. their positions).
        call: the model call.
    """

    queries: Tensor
    keys: Tensor
    text: Tensor | None
    bias: Tensor | None
    plan: MergePlan
    weights: Tensor | None
    queries_merged: bool
    call: CallState


MergedAttention = Callable[[nn.Module, tuple, dict, AttentionTokens], object]
"""``(attention, args, kwargs, tokens) -> output``: a layout's own call of a self-attention on merged
tokens, returning what the module returns for ``tokens.queries`` in place of its image tokens."""


@dataclass(eq=False)
class Branch:
    """A submodule of a block that can run on merged tokens: merge its input, unmerge its output.

    Attributes:
        tokens: the argument holding the image tokens ``[B, N, C]``; with ``text_first``, it holds
            the prompt's tokens and then the image tokens ``[B, T + N, C]`` (a single-stream block).
        output: where the image tokens are in its output (``None``: the output is them, after the
            prompt's with ``text_first``; ``i``: in ``output[i]`` of a tuple).
        text: the argument holding the prompt's tokens of a joint attention, or ``None``.
        merged_attention: a self-attention's own call on merged tokens (:data:`MergedAttention`),
            for what the module cannot do by itself: ``kv_only`` through a joint attention,
            proportional attention where its processor takes no mask, rotary positions of
            merged tokens.
        stock_merged: whether the module runs as it is on merged tokens (without a bias); if not,
            every merged call goes through ``merged_attention``.
    """

    name: str
    module: nn.Module
    tokens: Argument
    output: int | None = None
    text: Argument | None = None
    text_first: bool = False
    merged_attention: MergedAttention | None = None
    stock_merged: bool = True


PreviousCallMass = Callable[[nn.Module, tuple, dict, object], Tensor]
"""``(module, args, kwargs, output) -> p [B, N]``: the prompt attention mass of one call of a module
that runs after the self-attention (a cross-attention), see :mod:`sdmerge.diffusion.prompt_importance`."""

ThisCallMass = Callable[[nn.Module, Tensor, "Tensor | None", "CallState"], Tensor]
"""``(attention, image [B, N, C], text [B, T, C], call) -> p [B, N]``: the prompt attention mass of a
joint attention, from the tokens it is about to receive."""


@dataclass(frozen=True, eq=False)
class PromptMass:
    """Where a block's prompt attention mass ``p`` ``[B, N]`` comes from (``cis``, ``crucial``).

    ``this_call=False``: ``function`` (:data:`PreviousCallMass`) runs after each call of ``module``
    (a cross-attention that runs after the self-attention); the next call of the generation uses
    it. ``this_call=True``: ``function`` (:data:`ThisCallMass`) runs on the self-attention's own
    tokens before it, so the call's plan uses the call's own ``p`` (a joint attention sees the
    prompt itself)."""

    module: nn.Module
    function: PreviousCallMass | ThisCallMass
    this_call: bool = False


@dataclass(eq=False)
class Span:
    """A single-stream block's body (its attention and MLP read one normed sequence and share one
    output projection ``end``): the image tokens are merged at ``start``'s output (``[B, T + N, C]``,
    element ``start_output`` of a tuple), so that everything up to ``end`` runs on merged tokens,
    and unmerged at ``end``'s output, before the block's gate and residual. Used when both
    ``merge_attn`` and ``merge_mlp`` merge the body, and no diffusers hook (a cache) sits on the
    modules whose outputs would then be merged: otherwise ``end`` is merged as a branch of its own."""

    start: nn.Module
    start_output: int | None
    end: Branch


@dataclass(eq=False)
class BlockSite:
    """One mergeable transformer block.

    Attributes:
        name: its module name in the denoiser.
        module: the block.
        tokens: the block's argument holding its input image tokens ``[B, N, C]``: the
            similarity metric (ToMe for SD: the block input, before the norm).
        carrier: the name of the carrier that sees this block's token grid.
        attention: the self-attention branch; its input is what the plan is made from.
        crossattn: the branch ``merge_crossattn`` merges (UNet, PixArt: the cross-attention;
            SD3.5: the second self-attention ``attn2``), or ``None``.
        mlp: the feed-forward branch (``merge_mlp``).
        mass: where the prompt attention mass ``p`` of ``cis`` and ``crucial`` comes from, or
            ``None`` (those methods are then refused).
        span: a single-stream block's body (:class:`Span`), or ``None``.
    """

    name: str
    module: nn.Module
    tokens: Argument
    carrier: str
    attention: Branch
    crossattn: Branch | None = None
    mlp: Branch | None = None
    mass: PromptMass | None = None
    span: Span | None = None


@dataclass(eq=False)
class Carrier:
    """A module whose attention keyword arguments reach blocks: there the call is put in them.

    Attributes:
        name: its module name (``""``: the denoiser itself).
        module: the module.
        attention_kwargs: its argument that reaches the blocks (``cross_attention_kwargs``, ...).
        grid: ``(args, kwargs) -> (H, W)``: the token grid of its call (raster order).
        receivers: ``(name, block, argument)`` of every block that receives those keyword
            arguments (merged or not: each takes the call out again).
        positions: ``(args, kwargs) -> positions``: what a layout's own attention needs of the
            call to place merged tokens (Flux: the tokens' rotary ids), kept in the call; or ``None``.
    """

    name: str
    module: nn.Module
    attention_kwargs: Argument
    grid: Callable[[tuple, dict], tuple[int, int]]
    receivers: list[tuple[str, nn.Module, Argument]]
    positions: Callable[[tuple, dict], object] | None = None


@dataclass(eq=False)
class Layout:
    """A denoiser as the shared machinery sees it.

    Attributes:
        family: what it is, for messages (``"UNet"``, ``"SD3"``, ...).
        denoiser: the model whose forward is one model call.
        sample: its input whose shape starts a new generation when it changes.
        timestep: its timestep argument.
        sites: the merged blocks.
        carriers: the modules that carry each call to the blocks.
        timestep_scale: the factor from the timesteps the denoiser receives to the scheduler's
            (Flux receives them divided by 1000), for ``timestep_range``.
    """

    family: str
    denoiser: nn.Module
    sample: Argument
    timestep: Argument
    sites: list[BlockSite]
    carriers: list[Carrier]
    timestep_scale: float = 1.0
