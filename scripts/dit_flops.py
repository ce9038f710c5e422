"""Counted FLOPs of SD3 (MMDiT), PixArt (DiT) and Flux blocks, unpatched and merged: what token merging
could save at most, the bound the measured speed-ups of ``bench_dit.py`` are compared with.

What is counted: the matrix products, 2 FLOPs per multiply-add (``[m, k] @ [k, n]``: ``2 m k n``),
of every layer whose cost grows with the number of tokens:

- projections (q, k, v, output; SD3's prompt projections ``add_q/k/v_proj`` and ``to_add_out``);
- attention: ``Q K^T`` and ``A V``, ``2 * 2 * queries * keys * C`` whatever the split of the width
  ``C`` into heads (``heads * head_dim = C``: the heads do not change the count);
- the feed-forward (``C -> mlp_ratio * C -> C``);
- outside the blocks (the same in every arm): the patch embedding (a ``p x p`` strided convolution,
  i.e. a ``p * p * in_channels -> C`` projection per token), the prompt's projection into the
  model (SD3 and Flux ``context_embedder``, PixArt ``caption_projection``) and the final ``proj_out``;
- Flux's single-stream blocks: q, k, v projections and the MLP's input projection (``C -> 4C``) on
  the prompt's and the image's tokens together, attention over both, one output projection
  ``5C -> C`` of the attention's and the MLP's outputs side by side.

Not counted: the per-sample modulation layers (adaLN, timestep and pooled-prompt embeddings:
``[B, C] @ [C, 6C]``, independent of the tokens, about 0.01 % of a block at 1024x1024),
elementwise work (norms, softmax, activations, gates, residual adds), and the merging work itself
(similarity, clustering, gathers): that is what separates a measured ratio from this bound.

Where merging puts fewer tokens (:func:`branch_tokens`), following sdmerge's hooks: the merged
self-attention (``merge_attn``) runs its q, k, v and output projections and its attention on the
``M = N - floor(N (1 - r))`` merged image tokens (the prompt's tokens are never merged; in SD3's
joint attention they are queries and keys beside the merged image tokens); ``kv_only`` keeps all
``N`` queries (q and output projections on ``N``) and takes keys and values from the ``M`` merged
tokens, merged before their projections (ToDo's pooling); ``merge_mlp`` runs the image
feed-forward on ``M``; ``merge_crossattn`` (PixArt) the cross-attention's queries and output
projection. SD3's prompt stream (its feed-forward ``ff_context``) is never merged, and its last
block (``context_pre_only``) has no prompt output projection and no prompt feed-forward. Flux's
double-stream blocks count as SD3's joint blocks (none of them ``context_pre_only``); in its
single-stream blocks the prompt's tokens are never merged, and the output projection runs on the
merged tokens when both the attention's queries and the MLP do (``merge_mlp`` without ``kv_only``).

As a command, the bounds of a model from its transformer's ``config.json`` (a local file)::

    python scripts/dit_flops.py PATH/transformer/config.json --family sd3 --text-tokens 333

Importable (``scripts/`` on ``sys.path``): :class:`ModelShape` (from a diffusers config),
:class:`BranchTokens`, :func:`branch_tokens`, :func:`block_flops`, :func:`step_flops`,
:func:`flop_bound`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from sdmerge.core import tokens_to_remove


def matmul(rows: int, inner: int, cols: int) -> int:
    """FLOPs of ``[rows, inner] @ [inner, cols]``."""
    return 2 * rows * inner * cols


def attention(queries: int, keys: int, width: int) -> int:
    """FLOPs of ``softmax(Q K^T) V`` for ``queries`` queries over ``keys`` keys of total width ``width``."""
    return matmul(queries, width, keys) + matmul(queries, keys, width)


@dataclass(frozen=True)
class BranchTokens:
    """How many image tokens each part of a block runs on (``N``, or ``M`` where merged).

    ``queries``: the self-attention's q and output projections and its queries; ``keys``: its k and
    v projections and its keys and values; ``cross``: the cross-attention's q and output
    projections and its queries (PixArt); ``mlp``: the feed-forward."""

    queries: int
    keys: int
    cross: int
    mlp: int

    @classmethod
    def unmerged(cls, tokens: int) -> BranchTokens:
        return cls(tokens, tokens, tokens, tokens)


def branch_tokens(tokens: int, keep_rate: float | None = None, options: dict | None = None) -> BranchTokens:
    """The tokens of each part of a merged block with ``N = tokens`` image tokens under
    ``sdmerge.apply(model, method, r=keep_rate, **options)`` (``keep_rate=None``: unpatched).
    Only the branch options matter (``merge_attn``, ``kv_only``, ``merge_crossattn``,
    ``merge_mlp``, with sdmerge's defaults); plan reuse and the method change no FLOPs here."""
    if keep_rate is None:
        return BranchTokens.unmerged(tokens)
    options = options or {}
    merged = tokens - tokens_to_remove(tokens, keep_rate)
    attn = options.get("merge_attn", True)
    kv_only = options.get("kv_only", False)
    return BranchTokens(
        queries=merged if attn and not kv_only else tokens,
        keys=merged if attn else tokens,
        cross=merged if options.get("merge_crossattn", False) else tokens,
        mlp=merged if options.get("merge_mlp", False) else tokens,
    )


@dataclass(frozen=True)
class ModelShape:
    """What the FLOPs of a diffusion transformer depend on.

    ``family``: ``"sd3"`` (joint blocks), ``"pixart"`` (self-attention, cross-attention,
    feed-forward) or ``"flux"`` (joint blocks, then single-stream blocks from index
    ``single_from``); ``width``: ``C``; ``text_tokens``: ``T``; ``text_width``: the width of the
    prompt embeddings the model takes (T5: 4096); ``patch``, ``in_channels``, ``out_channels``:
    the patch embedding and final projection."""

    family: str
    depth: int
    width: int
    text_tokens: int
    text_width: int
    patch: int
    in_channels: int
    out_channels: int
    mlp_ratio: int = 4  # diffusers' FeedForward(mult=4) in every model; Flux's single-stream mlp_ratio 4
    single_from: int | None = None  # Flux: the index of the first single-stream block

    @classmethod
    def from_config(cls, family: str, config: dict, text_tokens: int, depth: int | None = None) -> ModelShape:
        """The shape of ``SD3Transformer2DModel(**config)`` / ``PixArtTransformer2DModel(**config)``
        / ``FluxTransformer2DModel(**config)`` called with ``text_tokens`` prompt tokens; ``depth``:
        another number of blocks (not for Flux: its depth is its two stacks')."""
        text_width = config["caption_channels"] if family == "pixart" else config["joint_attention_dim"]
        single_from = config["num_layers"] if family == "flux" else None
        if family == "flux":
            if depth is not None:
                raise ValueError("a Flux shape's depth is num_layers + num_single_layers of its config")
            depth = config["num_layers"] + config["num_single_layers"]
        return cls(
            family,
            config["num_layers"] if depth is None else depth,
            config["num_attention_heads"] * config["attention_head_dim"],
            text_tokens,
            text_width,
            config["patch_size"],
            config["in_channels"],
            config.get("out_channels") or config["in_channels"],  # Flux: None, the input's channels
            single_from=single_from,
        )


def sd3_block(tokens: BranchTokens, text: int, width: int, mlp_ratio: int = 4, context_pre_only: bool = False) -> int:
    """One ``JointTransformerBlock``: image projections and feed-forward on ``tokens``, the
    prompt's on ``text`` tokens, one attention over image and prompt tokens together."""
    c, hidden = width, mlp_ratio * width
    image = (
        2 * matmul(tokens.queries, c, c)  # to_q, to_out
        + 2 * matmul(tokens.keys, c, c)  # to_k, to_v
        + matmul(tokens.mlp, c, hidden) + matmul(tokens.mlp, hidden, c)  # ff
    )
    prompt = 3 * matmul(text, c, c)  # add_q_proj, add_k_proj, add_v_proj
    if not context_pre_only:
        prompt += matmul(text, c, c) + matmul(text, c, hidden) + matmul(text, hidden, c)  # to_add_out, ff_context
    return image + prompt + attention(tokens.queries + text, tokens.keys + text, c)


def pixart_block(tokens: BranchTokens, text: int, width: int, mlp_ratio: int = 4) -> int:
    """One ``BasicTransformerBlock`` of PixArt: self-attention, cross-attention on the projected
    prompt (``text`` tokens of width ``C``), feed-forward."""
    c, hidden = width, mlp_ratio * width
    self_attention = 2 * matmul(tokens.queries, c, c) + 2 * matmul(tokens.keys, c, c)
    self_attention += attention(tokens.queries, tokens.keys, c)
    cross_attention = 2 * matmul(tokens.cross, c, c) + 2 * matmul(text, c, c)  # q, out; k, v of the prompt
    cross_attention += attention(tokens.cross, text, c)
    return self_attention + cross_attention + matmul(tokens.mlp, c, hidden) + matmul(tokens.mlp, hidden, c)


def flux_single_block(tokens: BranchTokens, text: int, width: int, mlp_ratio: int = 4) -> int:
    """One ``FluxSingleTransformerBlock``: the prompt's ``text`` tokens before the image's in one
    sequence; q, k, v and the MLP's input projection, attention, and ``proj_out`` (``C + 4C -> C``)
    on the merged tokens when both the queries and the MLP are merged."""
    c, hidden = width, mlp_ratio * width
    out = max(tokens.queries, tokens.mlp)
    projections = matmul(text + tokens.queries, c, c) + 2 * matmul(text + tokens.keys, c, c)  # to_q; to_k, to_v
    mlp = matmul(text + tokens.mlp, c, hidden)  # proj_mlp
    return projections + mlp + attention(text + tokens.queries, text + tokens.keys, c) + matmul(text + out, c + hidden, c)


def block_flops(shape: ModelShape, tokens: BranchTokens, index: int) -> int:
    """FLOPs of block ``index`` (0-based) of a model of ``shape`` with ``tokens`` per part."""
    if shape.family == "flux":
        if index >= shape.single_from:
            return flux_single_block(tokens, shape.text_tokens, shape.width, shape.mlp_ratio)
        return sd3_block(tokens, shape.text_tokens, shape.width, shape.mlp_ratio)
    if shape.family == "sd3":
        last = index == shape.depth - 1  # SD3's last joint block is context_pre_only
        return sd3_block(tokens, shape.text_tokens, shape.width, shape.mlp_ratio, context_pre_only=last)
    return pixart_block(tokens, shape.text_tokens, shape.width, shape.mlp_ratio)


def outside_blocks(shape: ModelShape, tokens: int) -> int:
    """FLOPs outside the blocks: patch embedding, the prompt's projection, final projection."""
    c, pixels = shape.width, shape.patch * shape.patch
    prompt = matmul(shape.text_tokens, shape.text_width, c)  # SD3 context_embedder; PixArt caption linear_1
    if shape.family == "pixart":
        prompt += matmul(shape.text_tokens, c, c)  # caption_projection.linear_2
    return matmul(tokens, pixels * shape.in_channels, c) + prompt + matmul(tokens, c, pixels * shape.out_channels)


def default_merged_blocks(depth: int) -> range:
    """sdmerge's default choice for a diffusion transformer: every block but the first and the last."""
    return range(1, depth - 1) if depth > 2 else range(depth)


def step_flops(shape: ModelShape, tokens: int, merged: BranchTokens, merged_blocks: Collection[int]) -> int:
    """FLOPs of one model call (per sample) on ``tokens`` image tokens, ``merged`` tokens per part
    in the blocks ``merged_blocks``, every other block unmerged."""
    unmerged = BranchTokens.unmerged(tokens)
    blocks = sum(block_flops(shape, merged if i in merged_blocks else unmerged, i) for i in range(shape.depth))
    return outside_blocks(shape, tokens) + blocks


def flop_bound(shape: ModelShape, tokens: int, keep_rate: float | None, options: dict | None = None,
               merged_blocks: Collection[int] | None = None) -> float:
    """Unpatched FLOPs over merged FLOPs of one call of ``shape`` (default blocks: all but the
    first and the last): the largest speed-up merging this way could give."""
    merged_blocks = default_merged_blocks(shape.depth) if merged_blocks is None else merged_blocks
    unpatched = step_flops(shape, tokens, BranchTokens.unmerged(tokens), ())
    return unpatched / step_flops(shape, tokens, branch_tokens(tokens, keep_rate, options), merged_blocks)


def block_bound(shape: ModelShape, tokens: int, keep_rate: float | None, options: dict | None = None) -> float:
    """The same for one merged block in the middle of the model (not SD3's last one; Flux: a
    double-stream block)."""
    merged = branch_tokens(tokens, keep_rate, options)
    return block_flops(shape, BranchTokens.unmerged(tokens), 0) / block_flops(shape, merged, 0)


SETTINGS = {  # label: (keep rate, options): the settings bench_dit measures
    "tome r=0.5": (0.5, {}),
    "tome r=0.5, merge_mlp": (0.5, {"merge_mlp": True}),
    "grid r=0.25, kv_only": (0.25, {"kv_only": True}),
}
VAE_FACTOR = 8  # latent pixels per image pixel side, in every model here


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="FLOP bounds of token merging (unpatched FLOPs over merged FLOPs) for a diffusion "
        "transformer given by its config.json: one merged block, and one call with the default blocks "
        "(all but the first and the last)."
    )
    parser.add_argument("config", type=Path, help="the transformer's config.json (a local file)")
    parser.add_argument("--family", choices=("sd3", "pixart", "flux"), required=True, help="its block layout")
    parser.add_argument("--text-tokens", type=int, required=True, help="prompt tokens per sample (SD3: 333, PixArt-Sigma: 300, Flux-dev: 512)")
    parser.add_argument("--sides", type=int, nargs="+", default=[1024, 512], help="image sides in pixels")
    args = parser.parse_args(argv)
    shape = ModelShape.from_config(args.family, json.loads(args.config.read_text()), args.text_tokens)
    for side in args.sides:
        tokens = (side // VAE_FACTOR // shape.patch) ** 2
        for label, (keep_rate, options) in SETTINGS.items():
            print(f"{side}x{side} ({tokens} image tokens)  {label:<22}  one block {block_bound(shape, tokens, keep_rate, options):.3f}x"
                  f"  one call {flop_bound(shape, tokens, keep_rate, options):.3f}x")


if __name__ == "__main__":
    main()
