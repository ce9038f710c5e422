"""What :func:`sdmerge.diffusion.apply` installs: :class:`MergeConfig`, declared once, checked on construction.

Every option of the diffusion family is a field declared with :func:`sdmerge.options.option`
(default, check, one line of meaning); validation, the unknown-option error and the option list of
``help(sdmerge.apply)`` are built from these declarations. Rules that tie several options together
are in :meth:`MergeConfig.__post_init__`; rules that depend on the model (a UNet or a diffusion
transformer) are checked by its layout (:mod:`sdmerge.diffusion.models`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core import check_keep_rate, window_for_keep_rate
from ..core.grid import PARTIAL_WINDOWS
from ..methods import METHODS, get_method
from ..options import (
    BLOCK_INDICES, BOOLEAN, Check, check_fields, check_names, choice, integer, option, optional, real_pair,
)

FAMILY = "diffusion models (UNet, SD3, PixArt, Flux)"
"""How errors name this family of options."""

APPLY_ARGUMENTS = ("method", "keep_rate")
"""The fields ``apply`` takes as its own arguments (``method``, ``r``), not as options."""

_SPLIT_OPTIONS = ("sx", "sy", "use_rand", "seed")
_BIPARTITE_METHODS = tuple(m.name for m in METHODS.values() if "sd" in m.models and m.needs_split)


def _method(name: str, value):
    return get_method(value, "sd").name


def _keep_rate(name: str, value):
    return check_keep_rate(value)


def _power_of_two(name: str, value):
    value = integer(1)(name, value)
    if value & (value - 1):
        raise ValueError(
            f"{name}={value} is not a power of two; allowed: 1, 2, 4, 8, ... (the downsampling factor of a UNet level)"
        )
    return value


def _timestep_range(name: str, value) -> tuple[float, float]:
    low, high = real_pair(name, value, "a timestep (a real number)")
    if not 0 <= low <= high:
        raise ValueError(
            f"{name}={value!r} is empty or negative; allowed: 0 <= low <= high, in the scheduler's timestep units "
            "(they count down from num_train_timesteps - 1, 999 for SD, to 0; e.g. (300, 1000) merges the first "
            "~70% of the denoising steps and leaves the last ones, where details form, unmerged)"
        )
    return low, high


def _distinct_blocks(name: str, value):
    """:data:`~sdmerge.options.BLOCK_INDICES`, distinct and ``>= 0``, kept as a sorted tuple."""
    indices = BLOCK_INDICES(name, value)
    if any(i < 0 for i in indices) or len(set(indices)) != len(indices):
        raise ValueError(f"{name}={value!r}: block indices must be distinct and >= 0 (0 is the first block)")
    return tuple(sorted(indices))


METHOD = Check("str", _method)
KEEP_RATE = Check("real number, 0 < r <= 1", _keep_rate)
POWER_OF_TWO = Check("int, a power of two", _power_of_two)
TIMESTEP_RANGE = Check("(low, high) timesteps", _timestep_range)
DISTINCT_BLOCKS = Check(BLOCK_INDICES.kind, _distinct_blocks)


@dataclass(frozen=True)
class MergeConfig:
    """What :func:`sdmerge.diffusion.apply` installs; every field is checked on construction."""

    method: str = option("tome", METHOD, "tome, atc_single, atc_complete, atc_average, cis, crucial or grid")
    keep_rate: float = option(0.5, KEEP_RATE, "r, the fraction of tokens kept (grid: 1/n, one token per window of n)")
    max_downsample: int | None = option(
        None, optional(POWER_OF_TWO), "merge the blocks whose resolution is at most this many times below the "
        "highest level with attention; None: 1 (tomesd's default)", models="UNet only",
    )
    blocks: tuple[int, ...] | None = option(
        None, optional(DISTINCT_BLOCKS), "indices of the merged transformer blocks (0-based); None: the model's "
        "default", models="diffusion transformers only",
    )
    sx: int = option(2, integer(1), "width of the windows of the random 2D split (one destination per window)")
    sy: int = option(2, integer(1), "height of the windows of the random 2D split")
    use_rand: bool = option(True, BOOLEAN, "a random destination in each window (False: the top-left token)")
    seed: int | None = option(
        None, optional(integer()), "destinations drawn from a hash of (seed, timestep, block, window): identical "
        "calls merge identically; None: one generator forked from torch's RNG at apply",
    )
    plan_every: int = option(1, integer(1), "compute new merge plans at every k-th step of a generation, reuse them between")
    share_plans: bool = option(False, BOOLEAN, "one plan per token grid per model call, shared by the blocks of that grid")
    merge_attn: bool = option(True, BOOLEAN, "the self-attention runs on merged tokens (unmerged after it)")
    merge_crossattn: bool = option(
        False, BOOLEAN, "the cross-attention (UNet, PixArt) or second self-attention (SD3.5 attn2) runs on merged tokens"
    )
    merge_mlp: bool = option(False, BOOLEAN, "the feed-forward runs on merged tokens (unmerged after it)")
    kv_only: bool = option(
        False, BOOLEAN, "the self-attention keeps every query and takes merged keys and values, with proportional "
        "attention (ToDo)",
    )
    prop_attn: bool = option(
        False, BOOLEAN, "merged tokens count as the tokens they stand for in the attention (log(size) on their "
        "logits, ToMe's proportional attention: a group of identical tokens gives the unmerged output); kv_only "
        "always does; False: each merged token counts once, as tomesd",
    )
    partial_windows: str = option(
        "keep", choice(*PARTIAL_WINDOWS), "grid: windows cut by the grid's right or bottom edge stay as smaller "
        "groups ('keep'), or their tokens give no keys and values ('drop', ToDo's average pooling; needs kv_only)",
    )
    timestep_range: tuple[float, float] | None = option(
        None, optional(TIMESTEP_RANGE), "merge only in model calls whose timestep t has low <= t <= high, in the "
        "scheduler's timestep units (999 = pure noise for SD); None: every call",
    )

    @property
    def window(self) -> tuple[int, int]:
        """``(sy, sx)`` of the grid grouping: ``sy * sx = 1 / r`` (``sdmerge.core.window_for_keep_rate``)."""
        return window_for_keep_rate(self.keep_rate)

    @property
    def branches(self) -> tuple[str, ...]:
        """The merged branches of a block, of ``attn``, ``crossattn``, ``mlp``."""
        chosen = (self.merge_attn, self.merge_crossattn, self.merge_mlp)
        return tuple(name for name, merged in zip(("attn", "crossattn", "mlp"), chosen) if merged)

    def merges_at(self, timestep: float) -> bool:
        """Whether a model call at ``timestep`` merges (:attr:`timestep_range`)."""
        return self.timestep_range is None or self.timestep_range[0] <= timestep <= self.timestep_range[1]

    def __post_init__(self):
        check_fields(self)
        method = get_method(self.method, "sd")
        if self.seed is not None and not self.use_rand:
            raise ValueError(f"seed={self.seed} has no effect with use_rand=False (the split is not random)")
        if not self.branches:
            raise ValueError(
                "merge_attn, merge_crossattn and merge_mlp are all False: nothing would be merged; "
                "set at least one (merge_attn=True is the default)"
            )
        if self.kv_only and not self.merge_attn:
            raise ValueError("kv_only=True merges the keys and values of the self-attention: it needs merge_attn=True")
        if method.grouping == "grid":
            window_for_keep_rate(self.keep_rate)  # raises for a keep rate that is not 1/n
        if self.partial_windows == "drop" and (method.grouping != "grid" or not self.kv_only or self.merge_crossattn
                                               or self.merge_mlp):
            raise ValueError(
                "partial_windows='drop' leaves the tokens of cut windows out of the keys and values, so they have no "
                "merged output: it needs method='grid' with kv_only=True, and no merge_crossattn or merge_mlp"
            )
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
        changed = [f"{name}={getattr(self, name)!r}" for name in _SPLIT_OPTIONS if getattr(self, name) != _DEFAULTS[name]]
        if changed:
            raise ValueError(
                f"option {', '.join(changed)} does not apply to method {self.method!r}: {', '.join(_SPLIT_OPTIONS)} "
                f"set the source/destination split of the bipartite methods ({', '.join(_BIPARTITE_METHODS)})"
            )

    @classmethod
    def from_options(cls, method: str, keep_rate, options: dict) -> "MergeConfig":
        """The config of ``sdmerge.apply(model, method, r, **options)``: ``TypeError`` for an unknown
        option (listing the accepted ones), else the checks of the declarations."""
        check_names(cls, options, FAMILY, skip=APPLY_ARGUMENTS)
        return cls(method, keep_rate, **options)


_DEFAULTS = {name: MergeConfig.__dataclass_fields__[name].default for name in _SPLIT_OPTIONS}
