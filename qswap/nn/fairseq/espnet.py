"""The conformer's ESPnet attentions (abs, rel_pos, rope), every operand quantized.

ESPnet divides ``q @ k^T`` by ``sqrt(d_k)``; the core multiplies the quantized ``q`` by the same
constant first (a rescaled grid), which is the same product.

Relative positions (Transformer-XL terms, https://arxiv.org/abs/1901.02860 section 3.3):

    q_u = q_proj_quant(q) + pos_bias_u_quant(u)           -> core "q"  (content term, ac)
    q_v = q_proj_quant(q) + pos_bias_v_quant(v)
    bd  = rel_shift(q_pos_quant(q_v) * scaling @ pos_quant(linear_pos(pos_emb))^T)
    scores = scores_quant(ac) + scores_bias_quant(bd)      (inside the core)

Rotary: the rotation ``x * cos + rotate_half(x) * sin`` is applied to the quantized input with
quantized tables; ``rotate_half``'s sign flip is folded into the sin table (a constant), so
``rotate_half`` itself only moves data.
"""
from __future__ import annotations

from typing import Optional

import torch
from fairseq.modules.espnet_multihead_attention import (
    ESPNETMultiHeadedAttention,
    RelPositionMultiHeadedAttention,
    RotaryPositionMultiHeadedAttention,
)
from torch import Tensor

from qswap.nn.attention import CORE_SITES, merge_heads, split_heads
from qswap.nn.base import QuantConfig, QuantModule, derived_weight, quantizer
from qswap.nn.fairseq.attention import Projection, attention_core
from qswap.nn.linear import QLinear
from qswap.nn.registry import register


@register(ESPNETMultiHeadedAttention)
class QESPNETMultiHeadedAttention(QuantModule):
    """ESPnet multi-head attention (conformer ``attn_type="espnet"``, ``pos_enc_type="abs"``)."""

    sites = {"input": "activation", "key_in": "activation", "value_in": "activation", "weight": "weight",
             **CORE_SITES}

    def __init__(self, module: ESPNETMultiHeadedAttention, config: QuantConfig):
        super().__init__()
        self.d_k, self.h = module.d_k, module.h
        self.input_quant = quantizer(config, self.sites, "input")
        self.key_quant = quantizer(config, self.sites, "key_in")
        self.value_quant = quantizer(config, self.sites, "value_in")
        self.linear_q, self.linear_k = Projection(module.linear_q, config), Projection(module.linear_k, config)
        self.linear_v = Projection(module.linear_v, config)
        self.linear_out = QLinear(module.linear_out.weight, module.linear_out.bias, config)
        self.dropout = module.dropout
        self.core = attention_core(config, score_bias=isinstance(module, RelPositionMultiHeadedAttention),
                                   additive_mask=False)  # ESPnet attention takes no attn_mask

    @classmethod
    def from_float(cls, module: ESPNETMultiHeadedAttention, config: QuantConfig):
        return cls(module, config)

    def _inputs(self, query: Tensor, key: Tensor, value: Tensor) -> tuple:
        """Quantize each distinct input once: ((xq, quantizer), (xk, quantizer), (xv, quantizer))."""
        q_in = (self.input_quant(query), self.input_quant)
        k_in = q_in if key is query else (self.key_quant(key), self.key_quant)
        v_in = q_in if value is query else k_in if value is key else (self.value_quant(value), self.value_quant)
        return q_in, k_in, v_in

    def _qkv(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(T, B, C) inputs -> q (T, B, C), k and v (S, B, C) projections."""
        (xq, qq), (xk, kq), (xv, vq) = self._inputs(query, key, value)
        return self.linear_q(xq, qq), self.linear_k(xk, kq), self.linear_v(xv, vq)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                scores_bias: Optional[Tensor] = None) -> Tensor:
        """q (T, B, C), k and v (S, B, C), key_padding_mask (B, S) -> output (T, B, C)."""
        bsz = q.size(1)
        q, k, v = (split_heads(t, self.h) for t in (q, k, v))  # (B*H, L, D)
        context, _ = self.core(q, k, v, self.d_k ** -0.5, None, key_padding_mask, self.h,
                               self.dropout.p, scores_bias=scores_bias)  # (B*H, T, D)
        return self.linear_out(merge_heads(context, bsz))  # (T, B, C)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, **kwargs) -> tuple[Tensor, None]:
        """query, key, value: (T, B, C); key_padding_mask: (B, T), True = padding."""
        q, k, v = self._qkv(query, key, value)
        return self._attend(q, k, v, key_padding_mask), None


@register(RelPositionMultiHeadedAttention)
class QRelPositionMultiHeadedAttention(QESPNETMultiHeadedAttention):
    """Rel-pos attention (conformer ``pos_enc_type="rel_pos"``)."""

    sites = {**QESPNETMultiHeadedAttention.sites, "q_proj": "activation", "q_pos": "activation",
             "pos": "activation", "pos_bias_u": "weight", "pos_bias_v": "weight"}

    def __init__(self, module: RelPositionMultiHeadedAttention, config: QuantConfig):
        super().__init__(module, config)
        self.zero_triu = module.zero_triu
        self.linear_pos = QLinear(module.linear_pos.weight, module.linear_pos.bias, config)
        self.pos_bias_u, self.pos_bias_v = module.pos_bias_u, module.pos_bias_v  # (H, D)
        self.pos_bias_u_quant = quantizer(config, self.sites, "pos_bias_u")
        self.pos_bias_v_quant = quantizer(config, self.sites, "pos_bias_v")
        self.q_proj_quant = quantizer(config, self.sites, "q_proj")
        self.q_pos_quant = quantizer(config, self.sites, "q_pos")
        self.pos_quant = quantizer(config, self.sites, "pos")

    def rel_shift(self, x: Tensor) -> Tensor:
        """(B, H, T, 2T-1) -> (B, H, T, T): score of query i and key j at relative offset i-j."""
        b, h, t, p = x.shape
        padded = torch.cat([x.new_zeros(b, h, t, 1), x], dim=-1)  # (B, H, T, 2T)
        x = padded.view(b, h, p + 1, t)[:, :, 1:].reshape(b, h, t, p)[..., : p // 2 + 1]
        if self.zero_triu:
            keep = torch.ones(x.size(2), x.size(3), dtype=torch.bool, device=x.device)
            x = x.masked_fill(~keep.tril(x.size(3) - x.size(2)), 0.0)
        return x

    def forward(self, query: Tensor, key: Tensor, value: Tensor, pos_emb: Tensor,
                key_padding_mask: Optional[Tensor] = None, **kwargs) -> tuple[Tensor, None]:
        """query, key, value: (T, B, C); pos_emb: (2T-1, 1, C); key_padding_mask: (B, T)."""
        tgt_len, bsz, _ = query.shape
        q, k, v = self._qkv(query, key, value)
        q = self.q_proj_quant(q).view(tgt_len, bsz, self.h, self.d_k)  # (T, B, H, D)
        q_u = q + self.pos_bias_u_quant(self.pos_bias_u)  # (T, B, H, D)
        q_v = self.q_pos_quant(q + self.pos_bias_v_quant(self.pos_bias_v))
        p = self.pos_quant(self.linear_pos(pos_emb))  # (2T-1, 1, C)
        p = p.view(p.size(0), -1, self.h, self.d_k).permute(1, 2, 3, 0)  # (1, H, D, 2T-1)
        q_v = q_v.permute(1, 2, 0, 3) * self.d_k ** -0.5  # (B, H, T, D)
        bd = self.rel_shift(torch.matmul(q_v, p))  # (B, H, T, T)
        bd = bd.reshape(bsz * self.h, tgt_len, -1)  # (B*H, T, T)
        return self._attend(q_u.reshape(tgt_len, bsz, -1), k, v, key_padding_mask, scores_bias=bd), None


@register(RotaryPositionMultiHeadedAttention)
class QRotaryPositionMultiHeadedAttention(QESPNETMultiHeadedAttention):
    """Rotary attention (conformer ``pos_enc_type="rope"``): fairseq rotates the query and key
    inputs (before their projections); self-attention only, as in fairseq."""

    sites = {**QESPNETMultiHeadedAttention.sites, "rotary_table": "weight", "rope_cos": "activation",
             "rope_sin": "activation", "rope_out": "activation"}

    def __init__(self, module: RotaryPositionMultiHeadedAttention, config: QuantConfig):
        super().__init__(module, config)
        self.rotary_ndims = module.rotary_ndims
        self.rotary_emb = module.rotary_emb  # keeps its inv_freq buffer (and state_dict key)
        self.cos_quant = quantizer(config, self.sites, "rotary_table")
        self.sin_quant = quantizer(config, self.sites, "rotary_table")
        self.rope_cos_quant = quantizer(config, self.sites, "rope_cos")
        self.rope_sin_quant = quantizer(config, self.sites, "rope_sin")
        self.rope_out_quant = quantizer(config, self.sites, "rope_out")

    def _rotate(self, x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
        """x (T, B, H, D) quantized -> x * cos + rotate_half(x) * sin, quantized (T, B, C)."""
        half = x.size(-1) // 2
        swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)  # rotate_half without the sign
        rotated = self.rope_cos_quant(x * cos) + self.rope_sin_quant(swapped * signed_sin)
        return self.rope_out_quant(rotated.flatten(2))

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, **kwargs) -> tuple[Tensor, None]:
        """query, key, value: (T, B, C); key_padding_mask: (B, T)."""
        tgt_len, bsz, _ = value.shape
        cos, sin = self.rotary_emb(value, seq_len=tgt_len)  # (T', 1, 1, D) cached tables, T' >= T
        half = sin.size(-1) // 2
        signed_sin = derived_weight(self, "_signed_sin", lambda: torch.cat(
            [-sin[..., :half], sin[..., half:]], dim=-1), sin)  # rotate_half's sign, folded
        cos = self.cos_quant(cos)[:tgt_len]  # (T, 1, 1, D)
        sin = self.sin_quant(signed_sin)[:tgt_len]
        (xq, _), (xk, _), (xv, vq) = self._inputs(query, key, value)
        heads = (tgt_len, bsz, self.h, self.d_k)
        rq = self._rotate(xq.view(heads), cos, sin)  # (T, B, C)
        rk = rq if xk is xq else self._rotate(xk.view(heads), cos, sin)
        q = self.linear_q(rq, self.rope_out_quant)
        k = self.linear_k(rk, self.rope_out_quant)
        v = self.linear_v(xv, vq)
        return self._attend(q, k, v, key_padding_mask), None
