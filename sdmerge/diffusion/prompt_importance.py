"""Token importance in diffusion models: the analogue of ToMeCIS's class importance score.

ToMeCIS (Seol et al., eq. 7-8) scores token ``i`` by ``S_i = mean_h(A_cls,h,i * ||V_h,i||_2)``:
how much the class token attends to ``i``, times the size of what ``i`` contributes. A diffusion
model has no class token; what its image tokens answer to is the prompt, through
cross-attention (UNet, PixArt). For the image tokens of one transformer block we define

    p_i = mean_h  sum_{t >= 1}  softmax_t(q_i k_t^T / sqrt(d))[h]       (attn2, the cross-attention)
    S_i = p_i * ||v_i||_2,      v_i = attn1.to_v(norm1(x_i))             (attn1, the self-attention)

``p_i`` is the attention mass token ``i`` puts on the prompt tokens other than the first (start)
token, averaged over heads: ``1 - A[i, start]`` without a mask. The start token absorbs most of
the attention of tokens that do not depend on the prompt, so ``p`` is large for tokens that
do. ``||v_i||`` is the norm of the whole value vector of ``i`` in the self-attention whose
tokens are merged (attn1 and attn2 have different heads, so the norms are not per head).

``attn2`` runs after ``attn1`` in a block, so ``p`` of the current model call is not known when
``attn1`` merges: the integration uses ``p`` from the previous call of the same generation
(:mod:`sdmerge.diffusion.generation`), computed by a forward hook on ``attn2``
(:func:`cross_attention_mass`).
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention
from torch import Tensor

from ..core import importance_score


def prompt_attention_mass(
    attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor, attention_mask: Tensor | None = None
) -> Tensor:
    """``p_i``: the cross-attention mass on the prompt tokens after the first, averaged over heads.

    Args:
        attn: the cross-attention module (``attn2``).
        hidden_states: ``[B, N, C]`` image tokens, as ``attn2`` receives them (``norm2(x)``).
        encoder_hidden_states: ``[B, T, C_text]`` prompt embeddings; token 0 is the start token.
        attention_mask: the additive mask ``attn2`` receives, if any (``[B, 1, T]``).

    Returns ``[B, N]`` float32. The probabilities are those of diffusers' reference attention
    (``attn.get_attention_scores``: ``softmax(q k^T * attn.scale + mask)``).
    """
    batch_size, num_tokens, _ = hidden_states.shape
    if attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # [B*H, N, d]
    key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))  # [B*H, T, d]
    mask = attn.prepare_attention_mask(attention_mask, key.shape[1], batch_size)
    probabilities = attn.get_attention_scores(query, key, mask)  # [B*H, N, T]
    mass = probabilities[..., 1:].float().sum(dim=-1)
    return mass.view(batch_size, attn.heads, num_tokens).mean(dim=1)


def prompt_importance(self_attn: Attention, hidden_states: Tensor, mass: Tensor | None) -> Tensor:
    """``S_i = p_i * ||v_i||_2`` for the tokens ``hidden_states: [B, N, C]`` entering ``self_attn``.

    ``mass``: ``p``, ``[B, N]``; ``None`` means uniform ``p`` (``S_i = ||v_i||_2``).
    Returns ``[B, N]`` float32.
    """
    values = self_attn.to_v(hidden_states)  # [B, N, C]
    if mass is None:
        mass = torch.ones(values.shape[:2], device=values.device)
    return importance_score(mass.unsqueeze(1), values.unsqueeze(1))  # one "head": the whole vector


def cross_attention_mass(attn: Attention, args: tuple, kwargs: dict, output) -> Tensor:
    """``p`` ``[B, N]`` of one call of the cross-attention ``attn`` (``attn2``), from the call's
    arguments (a forward hook's view: ``hidden_states`` first, ``encoder_hidden_states`` and
    ``attention_mask`` by keyword, as ``BasicTransformerBlock`` calls it). With an IP-Adapter the
    prompt comes as ``(text, image embeddings)``: ``p`` is the mass on the text prompt."""
    hidden_states = args[0] if args else kwargs["hidden_states"]
    encoder_hidden_states = kwargs.get("encoder_hidden_states")
    if isinstance(encoder_hidden_states, (tuple, list)):  # IP-Adapter: (prompt, image prompt embeddings)
        encoder_hidden_states = encoder_hidden_states[0]
    if not isinstance(encoder_hidden_states, Tensor):
        raise TypeError(
            "the prompt attention mass needs the prompt embeddings as one tensor in the cross-attention's "
            f"encoder_hidden_states, got {type(encoder_hidden_states).__name__}"
        )
    with torch.no_grad():
        return prompt_attention_mass(attn, hidden_states, encoder_hidden_states, kwargs.get("attention_mask"))
