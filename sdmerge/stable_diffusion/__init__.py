"""Token merging in a diffusers Stable Diffusion UNet: ``apply`` / ``remove``.

For every transformer block at the chosen resolutions, the self-attention ``attn1`` runs on
merged tokens (ToMe for SD, Bolya & Hoffman 2023, section 3; the other methods only change
the grouping and the merge weights):

    x                         the block input, [B, N, C]: the similarity metric (captured by a pre-hook)
    h = norm1(x)              what attn1's processor receives, [B, N, C]
    plan = grouping(x)        a core MergePlan, N -> M = N - floor(N (1 - r)) groups
    y = attn1(plan.merge(h))  queries, keys and values all see the M merged tokens, [B, M, C]
    out = plan.unmerge(y)     every token gets its group's output back, [B, N, C]

and the block adds its residual as usual. That is the default; the same plan may also merge
the cross-attention and the feed-forward (``merge_crossattn``, ``merge_mlp``), or only the keys
and values of ``attn1`` (``kv_only``), and a ``timestep_range`` limits the calls that merge
(``processors``, ``config``). The merging processor wraps the processor that was
there (custom ones included) and calls it on the merged tokens; ``remove`` puts the wrapped
processor objects back and removes every hook. A processor set on a merged layer after
``apply`` (attention slicing, fused QKV, ``set_default_attn_processor``, ``set_attn_processor``)
is wrapped in turn at the next UNet call, so merging stays in effect until ``remove``.

A ``torch.compile``d UNet (``OptimizedModule``) is patched through the module it wraps, so
``apply`` and ``remove`` work before or after compiling.

Which blocks: level ``l`` of the UNet is the resolution after ``l`` downsamplings (SD-1.5:
``down_blocks.l``, ``up_blocks.(3-l)``, the mid block at level 3). A block is merged when
``2 ** (l - l0) <= max_downsample``, where ``l0`` is the highest-resolution level that has
attention: on SD-1.x/2.x ``l0 = 0`` (the same blocks as ``tomesd``); on SDXL, whose top level
has no attention, the default merges level 1 (``down_blocks.1``, ``up_blocks.1``).

State: one :class:`~.state.MergeState` per patched UNet, at ``unet._sdmerge``.

Modules: ``config`` (the options), ``unet_layout`` (which blocks, at which level), ``state``
(what is installed, per UNet call), ``merged_block`` (per block: metric, grid, plan),
``processors`` (what wraps the merged branches: attention processors, feed-forward hooks), ``randomness`` (the split's random source),
``plan_reuse`` and ``prompt_importance``; ``patch`` holds :func:`apply` and :func:`remove`.
"""

from .config import OPTIONS, MergeConfig
from .merged_block import MergedBlock
from .patch import apply, merged_blocks, remove
from .processors import TokenMergingProcessor
from .unet_layout import (
    SUPPORTED,
    accepts,
    blocks_to_merge,
    enclosing_transformer,
    find_unet,
    transformer_blocks_by_level,
    why_unsupported,
)

__all__ = [
    "OPTIONS", "SUPPORTED", "MergeConfig", "MergedBlock", "TokenMergingProcessor", "accepts", "apply",
    "blocks_to_merge", "enclosing_transformer", "find_unet", "merged_blocks", "remove",
    "transformer_blocks_by_level", "why_unsupported",
]
