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

A T5 prompt (PixArt) has no start token; its special token is the end token ``</s>`` after the
words (padding is masked). There ``p_i`` is the mass on the prompt's words: every unmasked token
but the end token (:func:`prompt_attention_mass` with ``special="end"``).

A joint attention (SD3's MMDiT) has no cross-attention, but the prompt's tokens are queries of
the same attention as the image tokens: they attend to them, as ToMeCIS's class token does. For
image token ``i`` of one block (:func:`joint_attention_mass`):

    p_i = mean_h  mean_{t in text}  softmax_{j in image and text}(q_t k_j^T / sqrt(d))[h, t, i]

the attention the text tokens pay to ``i``, from the call's own projections (``T x (N + T)``
logits per head for ``T`` text tokens: no ``N x N`` matrix), so it is known before the attention
runs and the call's plan uses its own ``p``.

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


SPECIAL_TOKENS = ("start", "end")
"""Which prompt token :func:`prompt_attention_mass` leaves out: CLIP's start token (the first), or
T5's end token (the last unmasked one)."""


def prompt_attention_mass(
    attn: Attention,
    hidden_states: Tensor,
    encoder_hidden_states: Tensor,
    attention_mask: Tensor | None = None,
    special: str = "start",
) -> Tensor:
    """``p_i``: the cross-attention mass on the prompt tokens other than the special one, averaged
    over heads.

    Args:
        attn: the cross-attention module (``attn2``).
        hidden_states: ``[B, N, C]`` image tokens, as ``attn2`` receives them (``norm2(x)``).
        encoder_hidden_states: ``[B, T, C_text]`` prompt embeddings.
        attention_mask: the additive mask ``attn2`` receives, if any (``[B, 1, T]``, large
            negative on padding).
        special: ``"start"``: token 0 is left out (CLIP); ``"end"``: the last unmasked token is
            left out (T5's ``</s>``).

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
    if special == "start":
        mass = probabilities[..., 1:].float().sum(dim=-1)
    else:
        last = _last_unmasked(attention_mask, batch_size, key.shape[1], key.device)  # [B]
        index = last.repeat_interleave(attn.heads).view(-1, 1, 1).expand(-1, num_tokens, 1)
        mass = probabilities.float().sum(dim=-1) - probabilities.gather(-1, index).float().squeeze(-1)
    return mass.view(batch_size, attn.heads, num_tokens).mean(dim=1)


def _last_unmasked(attention_mask: Tensor | None, batch_size: int, tokens: int, device) -> Tensor:
    """``[B]`` index of each sample's last prompt token that the additive mask ``[B, 1, T]`` keeps
    (``> -1``: diffusers masks with -10000 or -inf); the last token without a mask."""
    if attention_mask is None:
        return torch.full((batch_size,), tokens - 1, device=device)
    kept = attention_mask.reshape(batch_size, -1)[:, -tokens:] > -1
    return kept.long().cumsum(dim=1).argmax(dim=1)  # where the count of kept tokens reaches its end


def joint_attention_mass(attn: Attention, image: Tensor, text: Tensor, call=None) -> Tensor:
    """``p`` ``[B, N]`` float32 of SD3's joint attention ``attn`` about to receive the image tokens
    ``image`` ``[B, N, C]`` and the prompt's tokens ``text`` ``[B, T, C]``: the attention the prompt's
    tokens pay to each image token, averaged over prompt tokens and heads (module docstring), with
    the attention's own projections and query/key normalisations (``call`` is not needed)."""
    heads = attn.heads

    def split(x: Tensor) -> Tensor:  # [B, S, H*d] -> [B, H, S, d]
        return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    query = split(attn.add_q_proj(text))
    key_image, key_text = split(attn.to_k(image)), split(attn.add_k_proj(text))
    if attn.norm_added_q is not None:
        query = attn.norm_added_q(query)
    if attn.norm_k is not None:
        key_image = attn.norm_k(key_image)
    if attn.norm_added_k is not None:
        key_text = attn.norm_added_k(key_text)
    return prompt_mass_on_image(query, key_image, key_text)


def prompt_mass_on_image(query: Tensor, key_image: Tensor, key_text: Tensor) -> Tensor:
    """``mean_h mean_t softmax_j(q_t k_j^T / sqrt(d))[h, t, i]`` for the image keys ``i``: ``query``
    ``[B, H, T, d]`` (the prompt's), ``key_image`` ``[B, H, N, d]``, ``key_text`` ``[B, H, T, d]``;
    ``[B, N]`` float32, with ``T x (N + T)`` logits per head."""
    logits = torch.cat([query @ key_image.transpose(-1, -2), query @ key_text.transpose(-1, -2)], dim=-1)
    probabilities = torch.softmax(logits.float() * query.shape[-1] ** -0.5, dim=-1)  # [B, H, T, N + T]
    return probabilities[..., : key_image.shape[2]].mean(dim=(1, 2))


def prompt_importance(self_attn: Attention, hidden_states: Tensor, mass: Tensor | None) -> Tensor:
    """``S_i = p_i * ||v_i||_2`` for the tokens ``hidden_states: [B, N, C]`` entering ``self_attn``.

    ``mass``: ``p``, ``[B, N]``; ``None`` means uniform ``p`` (``S_i = ||v_i||_2``).
    Returns ``[B, N]`` float32.
    """
    values = self_attn.to_v(hidden_states)  # [B, N, C]
    if mass is None:
        mass = torch.ones(values.shape[:2], device=values.device)
    return importance_score(mass.unsqueeze(1), values.unsqueeze(1))  # one "head": the whole vector


def cross_attention_mass(attn: Attention, args: tuple, kwargs: dict, output, special: str = "start") -> Tensor:
    """``p`` ``[B, N]`` of one call of the cross-attention ``attn`` (``attn2``), from the call's
    arguments (``hidden_states`` first, ``encoder_hidden_states`` and ``attention_mask`` by
    keyword, as ``BasicTransformerBlock`` calls it); ``special``: see :func:`prompt_attention_mass`.
    With an IP-Adapter the prompt comes as ``(text, image embeddings)``: ``p`` is the mass on the
    text prompt."""
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
        return prompt_attention_mass(attn, hidden_states, encoder_hidden_states, kwargs.get("attention_mask"), special)


def t5_cross_attention_mass(attn: Attention, args: tuple, kwargs: dict, output) -> Tensor:
    """:func:`cross_attention_mass` for a T5 prompt: the mass on every word but the end token."""
    return cross_attention_mass(attn, args, kwargs, output, special="end")
