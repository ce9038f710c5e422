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

from torch import Tensor, nn


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


KeysAndValues = Callable[[nn.Module, tuple, dict, Tensor, "Tensor | None"], object]
"""``(attention, args, kwargs, merged [B, M, C], bias [B, 1, 1, M] or None) -> output``: a self-attention
call whose queries are all ``N`` tokens and whose image keys and values are the ``M`` merged ones,
with the proportional-attention bias ``log(sizes)`` on their logits (``kv_only``)."""


@dataclass(eq=False)
class Branch:
    """A submodule of a block that can run on merged tokens: merge its input, unmerge its output.

    ``tokens``: the argument holding the image tokens ``[B, N, C]``; ``output``: where the image
    tokens are in its output (``None``: the output is them; ``i``: ``output[i]`` of a tuple).
    ``keys_values``: for a self-attention whose module cannot take merged keys and values as
    ``encoder_hidden_states`` (a joint attention), the layout's own ``kv_only`` call."""

    name: str
    module: nn.Module
    tokens: Argument
    output: int | None = None
    keys_values: KeysAndValues | None = None


MassFunction = Callable[[nn.Module, tuple, dict, object], Tensor]
"""``(module, args, kwargs, output) -> p [B, N]``: the prompt attention mass of one call of a
block's module, see :mod:`sdmerge.diffusion.prompt_importance`."""


@dataclass(frozen=True, eq=False)
class PromptMass:
    """Where a block's prompt attention mass ``p`` ``[B, N]`` comes from (``cis``, ``crucial``).

    ``this_call=False``: ``function`` runs after each call of ``module`` (a cross-attention that
    runs after the self-attention); the next call of the generation uses it. ``this_call=True``:
    ``function`` runs on the self-attention's own arguments before it (``output`` is ``None``), so
    the call's plan uses the call's own ``p`` (a joint attention sees the prompt itself)."""

    module: nn.Module
    function: MassFunction
    this_call: bool = False


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
    """

    name: str
    module: nn.Module
    tokens: Argument
    carrier: str
    attention: Branch
    crossattn: Branch | None = None
    mlp: Branch | None = None
    mass: PromptMass | None = None


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
    """

    name: str
    module: nn.Module
    attention_kwargs: Argument
    grid: Callable[[tuple, dict], tuple[int, int]]
    receivers: list[tuple[str, nn.Module, Argument]]


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
    """

    family: str
    denoiser: nn.Module
    sample: Argument
    timestep: Argument
    sites: list[BlockSite]
    carriers: list[Carrier]
