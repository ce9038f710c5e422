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
"""

from .config import MergeConfig
from .merged_block import MergedBlock
from .models import LAYOUTS
from .patch import accepts, apply, find_denoiser, merged_blocks, new_generation, remove, why_unsupported

SUPPORTED = "; ".join(family.SUPPORTED for family in LAYOUTS)
"""What :func:`apply` accepts."""

__all__ = [
    "SUPPORTED", "MergeConfig", "MergedBlock", "accepts", "apply", "find_denoiser", "merged_blocks", "new_generation",
    "remove", "why_unsupported",
]
