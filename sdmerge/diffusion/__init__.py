"""Token merging in diffusers denoisers: ``apply`` / ``remove``, one machinery for every family.

For every merged transformer block, the self-attention runs on merged tokens (ToMe for SD,
Bolya & Hoffman 2023, section 3; the other methods only change the grouping and the merge
weights):

    x                         the block input, [B, N, C]: the similarity metric
    h = norm1(x)              what the self-attention receives, [B, N, C]
    plan = grouping(x)        a core MergePlan, N -> M = N - floor(N (1 - r)) groups
    y = attn(plan.merge(h))   queries, keys and values all see the M merged tokens, [B, M, C]
    out = plan.unmerge(y)     every token gets its group's output back, [B, N, C]

and the block adds its residual as usual. That is the default; the same plan may also merge the
cross-attention and the feed-forward (``merge_crossattn``, ``merge_mlp``), or only the keys and
values of the self-attention (``kv_only``), and a ``timestep_range`` limits the calls that merge.

The shared part (this package): ``config`` (the declared options), ``layout`` (what a family
describes), ``call`` (what one model call carries), ``generation`` and ``pipeline_calls`` (which
calls belong together), ``plan_reuse``, ``randomness`` (the split's random source),
``merged_block`` (a block's plan), ``branches`` (the hooks that merge and unmerge around a
branch), ``prompt_importance`` (cis / crucial), ``state`` (what is installed) and ``patch``
(:func:`apply`, :func:`remove`). Per family, only its layout: :mod:`sdmerge.diffusion.models`.

Serving and training: per-call state belongs to the call, so threads may share one patched
model; a pipeline call is one generation; a block re-run by gradient checkpointing reuses the
plan of its forward (:mod:`sdmerge.diffusion.call`, :mod:`sdmerge.diffusion.generation`).

Importing this package imports no diffusers: :mod:`.config` (the declared options) is read by
``help(sdmerge.apply)``; the names below load the integration (and diffusers) on first use.
"""

from importlib import import_module as _import_module

_EXPORTS = {
    "MergeConfig": "config",
    "MergedBlock": "merged_block",
    "LAYOUTS": "models",
    "SUPPORTED": "patch",
    "accepts": "patch",
    "apply": "patch",
    "find_denoiser": "patch",
    "merged_blocks": "patch",
    "new_generation": "patch",
    "remove": "patch",
    "why_unsupported": "patch",
}
"""Each public name and the submodule that defines it."""

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(_import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
