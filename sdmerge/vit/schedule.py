"""Token schedules for ViT classifiers: how many tokens every block removes.

Two published protocols, one way to ask for each (see ``docs/vit.md``):

* **stages** ("Which tokens to use?", Haurum et al. 2023, sections 3 and 3.1.2; ATC, Haurum et
  al. 2024, section 4.1): after the ``s``-th of a few chosen blocks, ``K_s = floor(P r^s)`` of
  the ``P`` free tokens that entered the first stage are kept (:func:`stage_keep_counts`).
  ``keep_rate_schedule(depth, r)`` uses the default stages, ``stages=(3, 6, 9)`` for a
  12-block model; ``keep_rate_schedule(depth, r, stages=...)`` takes explicit 0-based indices.
* **per-block counts** (ToMe, Bolya et al. 2022; ToMeCIS; ATC section 4.2, eq. 4-5): remove
  ``t`` tokens in every block (``"constant"``, ``t^l = t``), or ToMe's linearly decreasing
  ``t^l = floor(2t - 2tl / (L - 1))`` (``"linear"``).

"Free" tokens are the tokens that may be merged: all but the protected prefix (class and
distillation tokens). A schedule is a list of removals per block that depends on the token
count, so it is resolved for the count a forward call actually sees (:meth:`TokenSchedule.removals`)
and checked against what the method can remove in each block (:func:`removal_limit`).

A removal takes a token out of the kept set (merged into another, or pruned). EViT then adds
one fused token (:attr:`~sdmerge.methods.Method.fused_tokens`), as its code does: the fused
token comes in addition to the tokens the schedule keeps, in both protocols.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..core import alternating_split, check_keep_rate
from ..methods import Method

PER_BLOCK_SCHEDULES = ("constant", "linear")


DEFAULT_KEEP_RATE = 0.5
"""The stage keep rate when ``r`` is not given (``r=None``)."""


def default_stages(depth: int) -> tuple[int, ...]:
    """0-based indices of the reducing blocks: ``floor(k * depth / 4)`` for ``k = 1, 2, 3``.

    The three stages split the model into four sections of equal size ("Which tokens to use?",
    section 3): blocks 3, 6, 9 (the 4th, 7th and 10th) of a 12-block model, 6, 12, 18 of a
    24-block one. Defined for ``depth >= 4``; shallower models need explicit stages.
    """
    if depth < 4:
        raise ValueError(
            f"default stages need a model of at least 4 blocks, this one has {depth}; "
            f"pass stages=(...) with 0-based block indices in 0..{depth - 1}"
        )
    return tuple(k * depth // 4 for k in (1, 2, 3))


def stage_keep_counts(patches: int, keep_rate: float, num_stages: int) -> tuple[int, ...]:
    """``K_s = floor(P * r^s)`` for ``s = 1 .. num_stages``: the free tokens kept after each stage.

    ``P`` (``patches``) is the number of free tokens entering the first stage ("Which tokens to
    use?" section 3.1.2: Top-K keeps ``K_s = P r^s``; its code, EViT's and ATC's floor it).
    The floor is taken with a 1e-6 tolerance, so a product that is a whole number in real
    arithmetic is that number (``P=1000, r=0.3, s=3``: 27, where float gives 26.999999999999996).
    DeiT at 224 px (``P=196``), ``r=0.7``: 137, 96, 67.
    """
    keep_rate = check_keep_rate(keep_rate)
    return tuple(int(math.floor(patches * keep_rate**s + 1e-6)) for s in range(1, num_stages + 1))


@dataclass(frozen=True)
class TokenSchedule:
    """Removals per block of a ``depth``-block model.

    Exactly one of the two protocols:
    - ``keep_rate`` with ``stages``: the ``s``-th block in ``stages`` keeps
      ``K_s = floor(P * keep_rate^s)`` of the free tokens (:func:`stage_keep_counts`, ``P``: the
      free tokens entering the first stage) and removes the others;
    - ``per_block``: a fixed count for every block, independent of the token count.
    """

    depth: int
    keep_rate: float | None = None
    stages: tuple[int, ...] = ()
    per_block: tuple[int, ...] | None = None

    def removals(self, num_tokens: int, protected: int, method: Method | None = None) -> tuple[int, ...]:
        """Tokens removed in each block, ``[depth]``, for ``num_tokens`` input tokens (``protected``
        of them never merged), by ``method`` (``None``: a method that adds no token and has no split).

        Stages: EViT's fused token (:attr:`~sdmerge.methods.Method.fused_tokens`) is one more free
        token that later stages keep or remove like any other. ToMe's split (``tome``, ``cis``) has
        about half the free tokens as sources; at ``keep_rate >= 0.5`` ``floor(P r^s)`` asks at most
        one token more than that (an odd count, e.g. DeiT-S's third stage at ``r=0.5``: 49 -> 24),
        and the stage then removes what the split allows, as ToMe's code and the reference code
        clamp. Below 0.5 nothing is clamped (:func:`check_schedule` raises).
        """
        if self.per_block is not None:
            return self.per_block
        kept = dict(zip(self.stages, stage_keep_counts(num_tokens - protected, self.keep_rate, len(self.stages))))
        fused = 0 if method is None else method.fused_tokens
        clamp = method is not None and method.needs_split and self.keep_rate >= 0.5
        counts, tokens = [], num_tokens
        for block in range(self.depth):
            remove = tokens - protected - kept[block] if block in kept else 0
            if clamp:
                remove = min(remove, removal_limit(method, tokens, protected))
            counts.append(remove)
            tokens = tokens_after(tokens, remove, fused)
        return tuple(counts)

    def describe(self) -> str:
        if self.per_block is not None:
            return f"per-block removals {list(self.per_block)}"
        return f"keep rate {self.keep_rate} at blocks {list(self.stages)} (floor(P r^s) free tokens kept after stage s)"


def keep_rate_schedule(depth: int, keep_rate: float, stages=None) -> TokenSchedule:
    """The stage protocol: keep rate ``keep_rate`` at ``stages`` (0-based; default :func:`default_stages`)."""
    keep_rate = check_keep_rate(keep_rate)
    if stages is None:
        return TokenSchedule(depth, keep_rate, default_stages(depth))
    try:
        indices = tuple(stages)
    except TypeError:
        raise ValueError(f"stages={stages!r} is not a sequence of block indices") from None
    if not indices or any(isinstance(i, bool) or not isinstance(i, int) for i in indices):
        raise ValueError(f"stages={stages!r} must be a non-empty sequence of int block indices (0-based)")
    bad = [i for i in indices if not 0 <= i < depth]
    if bad:
        raise ValueError(f"stages {bad} are outside the model's blocks 0..{depth - 1} (0-based)")
    if len(set(indices)) != len(indices):
        raise ValueError(f"stages={stages!r} repeats a block; give each reducing block once")
    return TokenSchedule(depth, keep_rate, tuple(sorted(indices)))


def per_block_schedule(depth: int, tokens_per_block: int, schedule: str = "constant") -> TokenSchedule:
    """The per-block protocol: ``t^l = t`` (ATC eq. 4) or ``floor(2t - 2tl / (L - 1))`` (eq. 5)."""
    if isinstance(tokens_per_block, bool) or not isinstance(tokens_per_block, int) or tokens_per_block < 0:
        raise ValueError(f"tokens_per_block={tokens_per_block!r} must be an int >= 0")
    t = tokens_per_block
    if schedule == "constant":
        return TokenSchedule(depth, per_block=(t,) * depth)
    if schedule == "linear":
        if depth < 2:
            raise ValueError(f"the linear schedule needs at least 2 blocks, the model has {depth}")
        # floor(2t - 2tl/(L-1)) = floor(2t(L-1-l) / (L-1)), computed exactly in integers
        return TokenSchedule(depth, per_block=tuple(2 * t * (depth - 1 - l) // (depth - 1) for l in range(depth)))
    raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(PER_BLOCK_SCHEDULES)}")


def make_schedule(
    depth: int, r: float | None = None, *, stages=None, tokens_per_block=None, schedule=None
) -> TokenSchedule:
    """Resolve the user's options into one schedule; reject every ambiguous combination.

    - ``r`` alone (or nothing: ``r=None`` is :data:`DEFAULT_KEEP_RATE`): stages at :func:`default_stages`;
    - ``r`` and ``stages``: stages at the given 0-based blocks;
    - ``tokens_per_block`` (``schedule="constant"`` or ``"linear"``, default constant): per-block
      counts; ``r`` must then be left unset (``None``) and ``stages`` too.
    """
    if tokens_per_block is None:
        if schedule is not None:
            raise ValueError(
                f"schedule={schedule!r} applies to per-block counts only; pass tokens_per_block=... with it"
            )
        return keep_rate_schedule(depth, DEFAULT_KEEP_RATE if r is None else r, stages)
    if r is not None:
        raise ValueError(
            f"ambiguous request: r={r!r} (keep rate at stages) and tokens_per_block={tokens_per_block!r} "
            "(per-block counts) are two different protocols; give one of them"
        )
    if stages is not None:
        raise ValueError(
            f"ambiguous request: stages={stages!r} belongs to the keep-rate protocol and "
            f"tokens_per_block={tokens_per_block!r} removes tokens in every block; give one of them"
        )
    return per_block_schedule(depth, tokens_per_block, "constant" if schedule is None else schedule)


def tokens_after(tokens: int, remove: int, fused_tokens: int) -> int:
    """Tokens after a block that removes ``remove`` of ``tokens`` and then adds ``fused_tokens``
    (only when it removes something: a block that removes nothing does not reduce)."""
    return tokens - remove + (fused_tokens if remove else 0)


def removal_limit(method: Method, num_tokens: int, protected: int) -> int:
    """The most tokens ``method`` can remove from ``num_tokens`` tokens in one ViT block.

    - bipartite (``tome``, ``cis``): the source set of the alternating split, the even
      positions ``>= protected`` (ToMe clamps to ``(N - protected) // 2``; we raise instead,
      except for the one-token rounding of stages at ``r >= 0.5``, :meth:`TokenSchedule.removals`);
    - every other grouping: all free tokens but one (one group, or one kept token, remains;
      EViT keeps at least one token besides its fused token, as its code asserts).
    """
    if method.needs_split:
        return len(alternating_split(num_tokens, protected)[0])
    return max(num_tokens - protected - 1, 0)


def check_schedule(schedule: TokenSchedule, method: Method, num_tokens: int, protected: int) -> tuple[int, ...]:
    """The removals of ``schedule`` for ``num_tokens`` tokens, or a ``ValueError`` naming the first
    block where ``method`` cannot remove that many."""
    removals = schedule.removals(num_tokens, protected, method)
    tokens = num_tokens
    for block, remove in enumerate(removals):
        limit = removal_limit(method, tokens, protected)
        if remove > limit:
            raise ValueError(
                f"{schedule.describe()} asks method {method.name!r} to remove {remove} of {tokens} tokens in block "
                f"{block} (0-based; {protected} protected); it can remove at most {limit} there. "
                "Use a higher keep rate or fewer tokens per block"
            )
        tokens = tokens_after(tokens, remove, method.fused_tokens)
    return removals
