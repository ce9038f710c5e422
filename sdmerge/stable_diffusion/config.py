"""What :func:`sdmerge.stable_diffusion.apply` installs: :class:`MergeConfig`, checked on construction."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

from ..core import check_keep_rate, window_for_keep_rate
from ..methods import METHODS, get_method

_SPLIT_OPTIONS = ("sx", "sy", "use_rand", "seed")
_BIPARTITE_METHODS = tuple(m.name for m in METHODS.values() if "sd" in m.models and m.needs_split)


@dataclass(frozen=True)
class MergeConfig:
    """What :func:`apply` installs; checked on construction.

    Attributes:
        method: a Stable Diffusion method of ``sdmerge.methods`` (tome, atc_*, cis, crucial, grid).
        keep_rate: ``r``, the fraction of tokens kept in a merged self-attention, ``0 < r <= 1``
            (``grid``: ``1/n``, one token per window of ``n``, see :attr:`window`).
        max_downsample: merge the blocks whose downsampling factor, relative to the
            highest-resolution level with attention, is at most this.
        sx, sy: window of the random 2D split (one destination per ``sy x sx`` window).
        use_rand: random destination in each window (``False``: the top-left one).
        seed: the split's destinations are a hash of ``(seed, timestep, block, window)``,
            computed with tensor ops (``sdmerge.stable_diffusion.randomness``).
        plan_every: compute new merge plans at every ``plan_every``-th step of a generation
            and reuse them in between (``sdmerge.plan_reuse``); 1: every call (the papers).
        share_plans: one plan per resolution level per UNet call, computed by the level's
            first merged block and used by all of them; False: one per block (the papers).
        merge_attn, merge_crossattn, merge_mlp: which branches of a merged block run on the
            merged tokens (tomesd's options): the self-attention ``attn1``, the cross-attention
            ``attn2``, the feed-forward ``ff``; each is unmerged after its branch. At least one.
        kv_only: the self-attention keeps all ``N`` queries and takes its keys and values from
            the merged tokens, with proportional attention (ToDo); nothing is unmerged there.
            Needs ``merge_attn``.
        timestep_range: ``(low, high)``: merge only in UNet calls whose timestep ``t`` has
            ``low <= t <= high`` (the scheduler's timesteps, 999 = pure noise for SD); others run
            unmerged. ``None``: every call.
    ``sx``, ``sy``, ``use_rand`` and ``seed`` belong to the bipartite methods (tome, cis).
    """

    method: str = "tome"
    keep_rate: float = 0.5
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    seed: int | None = None
    plan_every: int = 1
    share_plans: bool = False
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    kv_only: bool = False
    timestep_range: tuple[float, float] | None = None

    @property
    def window(self) -> tuple[int, int]:
        """``(sy, sx)`` of the grid grouping: ``sy * sx = 1 / r`` (``sdmerge.core.window_for_keep_rate``)."""
        return window_for_keep_rate(self.keep_rate)

    @property
    def branches(self) -> tuple[str, ...]:
        """The merged branches of a block, of ``attn1``, ``attn2``, ``ff``."""
        chosen = (self.merge_attn, self.merge_crossattn, self.merge_mlp)
        return tuple(name for name, merged in zip(("attn1", "attn2", "ff"), chosen) if merged)

    def merges_at(self, timestep: float) -> bool:
        """Whether a UNet call at ``timestep`` merges (:attr:`timestep_range`)."""
        return self.timestep_range is None or self.timestep_range[0] <= timestep <= self.timestep_range[1]

    def __post_init__(self):
        method = get_method(self.method, "sd")
        object.__setattr__(self, "keep_rate", check_keep_rate(self.keep_rate))
        check_int("max_downsample", self.max_downsample, minimum=1)
        if self.max_downsample & (self.max_downsample - 1):
            raise ValueError(
                f"max_downsample={self.max_downsample} is not a power of two; allowed: 1, 2, 4, 8, ... "
                "(the downsampling factor of a UNet level)"
            )
        check_int("sx", self.sx, minimum=1)
        check_int("sy", self.sy, minimum=1)
        if not isinstance(self.use_rand, bool):
            raise TypeError(f"use_rand must be True or False, got {self.use_rand!r}")
        if self.seed is not None:
            check_int("seed", self.seed)
        if self.seed is not None and not self.use_rand:
            raise ValueError(f"seed={self.seed} has no effect with use_rand=False (the split is not random)")
        check_int("plan_every", self.plan_every, minimum=1)
        if not isinstance(self.share_plans, bool):
            raise TypeError(f"share_plans must be True or False, got {self.share_plans!r}")
        for name in ("merge_attn", "merge_crossattn", "merge_mlp", "kv_only"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not self.branches:
            raise ValueError(
                "merge_attn, merge_crossattn and merge_mlp are all False: nothing would be merged; "
                "set at least one (merge_attn=True is the default)"
            )
        if self.kv_only and not self.merge_attn:
            raise ValueError("kv_only=True merges the keys and values of the self-attention: it needs merge_attn=True")
        if self.timestep_range is not None:
            object.__setattr__(self, "timestep_range", check_timestep_range(self.timestep_range))
        if method.grouping == "grid":
            window_for_keep_rate(self.keep_rate)  # raises for a keep rate that is not 1/n
        if method.needs_split:
            # One destination per full window: the sources are at least N (1 - 1/(sx sy)), and
            # exactly that on grids the windows tile, so this bound is reachable on every grid.
            minimum = 1.0 / (self.sx * self.sy)
            if self.keep_rate < minimum:
                raise ValueError(
                    f"method {self.method!r} with a {self.sx}x{self.sy} stride keeps at least 1/{self.sx * self.sy} "
                    f"= {minimum:.4g} of the tokens (one destination per window); got r={self.keep_rate!r}"
                )
            return
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if f.name in _SPLIT_OPTIONS and getattr(self, f.name) != f.default
        ]
        if changed:
            raise ValueError(
                f"option {', '.join(changed)} does not apply to method {self.method!r}: {', '.join(_SPLIT_OPTIONS)} "
                f"set the source/destination split of the bipartite methods ({', '.join(_BIPARTITE_METHODS)})"
            )


OPTIONS = tuple(f.name for f in fields(MergeConfig) if f.name not in ("method", "keep_rate"))
"""The keyword options :func:`apply` accepts."""


def check_timestep_range(timestep_range) -> tuple[float, float]:
    """``(low, high)`` as floats, or ``ValueError``/``TypeError``: two real numbers (not bools),
    ``0 <= low <= high`` (``high`` may be ``math.inf``)."""
    if isinstance(timestep_range, (str, bytes)) or not hasattr(timestep_range, "__len__") or len(timestep_range) != 2:
        raise TypeError(f"timestep_range must be a pair (low, high) of timesteps, got {timestep_range!r}")
    for value in timestep_range:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
            raise TypeError(f"timestep_range={timestep_range!r}: {value!r} is not a timestep (a real number)")
    low, high = (float(value) for value in timestep_range)
    if not 0 <= low <= high:
        raise ValueError(
            f"timestep_range={timestep_range!r} is empty or negative; allowed: 0 <= low <= high (timesteps count "
            "down from the scheduler's num_train_timesteps - 1 to 0; e.g. (300, 1000) merges the first ~70% of "
            "the denoising steps and leaves the last ones, where details form, unmerged)"
        )
    return low, high


def check_int(name: str, value, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} is not allowed; {name} must be >= {minimum}")
