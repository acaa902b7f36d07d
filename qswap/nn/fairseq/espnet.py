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

from qswap.io.serializable import INT, List, Obj, Tuple, serializable
from qswap.io.serializable import Tensor as TensorOf
from qswap.nn.attention import CORE_NONNEGATIVE, CORE_SITES, heads_padding, integer_product, merge_heads, split_heads
from qswap.nn.base import QuantConfig, QuantModule, derived_weight, quantizer
from qswap.nn.fairseq.attention import Projection, attention_core
from qswap.nn.linear import QLinear
from qswap.nn.registry import register
from qswap.nn.simulate import carries_grad, codes_of, grid_of, onto_grid, simulates, straight_through
from qswap.quant.fake_quantize import FakeQuantize, quantizes
from qswap.quant.integer import ConstantAddParams, add_constant

CODES = TensorOf("int8", "uint8", "int16", "int32")  # a table of codes, as a spec
PROJECTIONS = Tuple(*[Obj("IntegerLinear")] * 3)  # q, k, v
ROPE_POSITIONS = 2048  # frames of an integer rotary table: the integer softmax's longest row


def rel_shift(x: Tensor, zero_triu: bool = False) -> Tensor:
    """(B, H, T, 2T-1) -> (B, H, T, T): score of query i and key j at relative offset i-j (moves
    data only; works on integer tensors too)."""
    b, h, t, p = x.shape
    padded = torch.cat([x.new_zeros(b, h, t, 1), x], dim=-1)  # (B, H, T, 2T)
    x = padded.view(b, h, p + 1, t)[:, :, 1:].reshape(b, h, t, p)[..., : p // 2 + 1]
    if zero_triu:
        keep = torch.ones(x.size(2), x.size(3), dtype=torch.bool, device=x.device)
        x = x.masked_fill(~keep.tril(x.size(3) - x.size(2)), 0)
    return x


@register(ESPNETMultiHeadedAttention)
class QESPNETMultiHeadedAttention(QuantModule):
    """ESPnet multi-head attention (conformer ``attn_type="espnet"``, ``pos_enc_type="abs"``)."""

    sites = {"input": "activation", "key_in": "activation", "value_in": "activation", "weight": "weight",
             **CORE_SITES}
    nonnegative_sites = CORE_NONNEGATIVE
    takes_reader = True

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

    def _qkv(self, query: Tensor, key: Tensor, value: Tensor, q_out: Optional[torch.nn.Module] = None) -> tuple:
        """(T, B, C) inputs -> q (T, B, C), k and v (S, B, C) projections, each told the quantizer
        that reads it (``q_out``, default the core's q quantizer; the core's k and v quantizers)."""
        (xq, qq), (xk, kq), (xv, vq) = self._inputs(query, key, value)
        return (self.linear_q(xq, qq, q_out or self.core.q_quant), self.linear_k(xk, kq, self.core.k_quant),
                self.linear_v(xv, vq, self.core.v_quant))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                scores_bias: Optional[Tensor] = None, out_quant: Optional[torch.nn.Module] = None) -> Tensor:
        """q (T, B, C), k and v (S, B, C), key_padding_mask (B, S) -> output (T, B, C); ``out_quant``:
        the quantizer that reads the output (``simulate: integer``: the out projection's integer
        form writes onto its grid, as the core writes onto the out projection's input grid)."""
        q, k, v = (split_heads(t, self.h) for t in (q, k, v))  # (B*H, L, D)
        context, _ = self.core(q, k, v, self.d_k ** -0.5, None, key_padding_mask, self.h,
                               self.dropout.p, scores_bias=scores_bias,
                               out_quant=self.linear_out.input_quant,
                               dropping=self.dropout.training)  # ESPnet's own nn.Dropout  # (B*H, T, D)
        return self.linear_out(merge_heads(context, self.h), out_quant=out_quant)  # (T, B, C)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, out_quant: Optional[torch.nn.Module] = None,
                **kwargs) -> tuple[Tensor, None]:
        """query, key, value: (T, B, C); key_padding_mask: (B, T), True = padding; ``out_quant``: the
        quantizer that reads the output (``_attend``)."""
        q, k, v = self._qkv(query, key, value)
        return self._attend(q, k, v, key_padding_mask, out_quant=out_quant), None

    def _integer_projections(self, q_out) -> list:
        """q/k/v ``IntegerLinear`` from the input grid (self-attention) onto ``q_out`` / the core's k, v grids."""
        from qswap.quant.integer import Grid
        grid, core = Grid.of(self.input_quant), self.core
        return [p.to_integer(grid, out) for p, out in ((self.linear_q, q_out), (self.linear_k, Grid.of(core.k_quant)),
                                                        (self.linear_v, Grid.of(core.v_quant)))]

    def to_integer(self, out) -> torch.nn.Module:
        """The integer form of this (self-)attention writing codes of ``out``: the projections, the
        integer core (``QuantAttentionCore.to_integer`` with ``1/sqrt(d_k)``), the out projection;
        ``qswap.nn.fairseq.attention.IntegerFairseqAttention`` runs them (the same arithmetic)."""
        from qswap.errors import IntegerizeError
        from qswap.nn.fairseq.attention import IntegerFairseqAttention
        from qswap.quant.integer import Grid
        if type(self) is not QESPNETMultiHeadedAttention:
            raise IntegerizeError(f"{type(self).__name__} has no integer form yet")
        core = self.core.to_integer(self.d_k ** -0.5, Grid.of(self.linear_out.input_quant), head_dim=self.d_k)
        return IntegerFairseqAttention(self.h, self._integer_projections(Grid.of(self.core.q_quant)), core,
                                       self.linear_out.to_integer(out))


def _grid_tensors(quant) -> tuple:
    """A quantizer's grid tensors (scale, zero point) as sources of a kept form; none for a float site."""
    return (quant.scale, quant.zero_point) if isinstance(quant, FakeQuantize) else ()


@register(RelPositionMultiHeadedAttention)
class QRelPositionMultiHeadedAttention(QESPNETMultiHeadedAttention):
    """Rel-pos attention (conformer ``pos_enc_type="rel_pos"``)."""

    sites = {**QESPNETMultiHeadedAttention.sites, "q_proj": "activation", "q_pos": "activation",
             "pos": "activation", "pos_bias_u": "weight", "pos_bias_v": "weight"}

    def __init__(self, module: RelPositionMultiHeadedAttention, config: QuantConfig):
        super().__init__(module, config)
        self.simulate = config.simulate  # the constant adds and the position scores (``_bias_add``, ``_position_scores``)
        self.zero_triu = module.zero_triu
        self.linear_pos = QLinear(module.linear_pos.weight, module.linear_pos.bias, config)
        self.pos_bias_u, self.pos_bias_v = module.pos_bias_u, module.pos_bias_v  # (H, D)
        self.pos_bias_u_quant = quantizer(config, self.sites, "pos_bias_u")
        self.pos_bias_v_quant = quantizer(config, self.sites, "pos_bias_v")
        self.q_proj_quant = quantizer(config, self.sites, "q_proj")
        self.q_pos_quant = quantizer(config, self.sites, "q_pos")
        self.pos_quant = quantizer(config, self.sites, "pos")

    def rel_shift(self, x: Tensor) -> Tensor:
        return rel_shift(x, self.zero_triu)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, pos_emb: Tensor,
                key_padding_mask: Optional[Tensor] = None, out_quant: Optional[torch.nn.Module] = None,
                **kwargs) -> tuple[Tensor, None]:
        """query, key, value: (T, B, C); pos_emb: (2T-1, 1, C); key_padding_mask: (B, T); ``out_quant``:
        the quantizer that reads the output."""
        tgt_len, bsz, _ = query.shape
        q, k, v = self._qkv(query, key, value, q_out=self.q_proj_quant)
        q = self.q_proj_quant(q)  # (T, B, C)
        q_u = self._bias_add("_integer_bias_u", q, self.pos_bias_u, self.pos_bias_u_quant, self.core.q_quant)
        q_v = self.q_pos_quant(self._bias_add("_integer_bias_v", q, self.pos_bias_v, self.pos_bias_v_quant,
                                              self.q_pos_quant))  # (T, B, H, D)
        p = self.pos_quant(self.linear_pos(pos_emb, out_quant=self.pos_quant))  # (2T-1, 1, C)
        p = p.view(p.size(0), -1, self.h, self.d_k).permute(1, 2, 3, 0)  # (1, H, D, 2T-1)
        q_v = q_v.permute(1, 2, 0, 3)  # (B, H, T, D)
        bd = self._position_scores(q_v, p)  # (B, H, T, T)
        bd = bd.reshape(bsz * self.h, tgt_len, -1)  # (B*H, T, T)
        return self._attend(q_u.reshape(tgt_len, bsz, -1), k, v, key_padding_mask, scores_bias=bd,
                            out_quant=out_quant), None

    def _bias_add(self, slot: str, q: Tensor, bias: Tensor, bias_quant: torch.nn.Module,
                  out_quant: torch.nn.Module) -> Tensor:
        """``q + bias_quant(bias)`` (q: (T, B, C) ``q_proj`` values) as (T, B, H, D); with
        ``simulate: integer`` the integer form's ``add_constant`` onto ``out_quant``'s grid (the
        constant folded onto a grid 2^-16 of ``q_proj``'s, ``ConstantAddParams``), as values."""
        heads = (q.size(0), q.size(1), self.h, self.d_k)
        total = lambda: q.view(heads) + bias_quant(bias)  # noqa: E731
        # a bias the recipe leaves float is added as floats, which the audit reports: folded into
        # the integer form's constant it had been quantized onto a grid no recipe set
        grid_in = grid_of(self.q_proj_quant) if simulates(self) and quantizes(bias_quant) else None
        value = None if grid_in is None else onto_grid(
            self, slot, lambda out: ConstantAddParams.build(grid_in, bias_quant(bias), out), out_quant,
            lambda params, out: add_constant(codes_of(q, grid_in), params), self.q_proj_quant.scale,
            self.q_proj_quant.zero_point, bias, *_grid_tensors(bias_quant))
        if value is None:
            return total()
        value = value.view(heads)
        return straight_through(value, total(), out_quant) if carries_grad(out_quant, q, bias) else value

    def _position_scores(self, q_v: Tensor, p: Tensor) -> Tensor:
        """``rel_shift(q_v * d_k^-0.5 @ p)`` (q_v: (B, H, T, D) ``q_pos`` values, p: (1, H, D, 2T-1)
        ``pos`` values) -> (B, H, T, T); with ``simulate: integer`` the integer form's
        (``integer_product``): the int32 accumulator, rel-shifted, requantized onto ``scores_bias``."""
        product = lambda: self.rel_shift(torch.matmul(q_v * self.d_k ** -0.5, p))  # noqa: E731
        return integer_product(self, "_integer_bd", q_v, self.q_pos_quant, p, self.pos_quant, self.d_k ** -0.5,
                               self.core.scores_bias_quant, product, torch.matmul, after=self.rel_shift)

    def to_integer(self, out, pos_table: Optional[Tensor] = None) -> "IntegerRelPosAttention":
        """The integer form writing codes of ``out``, given the encoder's constant position table
        ``pos_table`` (1, 2L-1, C) (``RelPositionalEncoding.pe``): its codes on ``linear_pos``'s
        input grid are built once (constant folding) and sliced per length as fairseq slices the
        table. ``q + u`` and ``q + v``: ``add_constant`` (the quantized biases folded onto a grid
        2^-16 of ``q_proj``'s); ``bd``: int32 ``(q_v - z) (p - z)^T``, ``rel_shift`` (moves data),
        requantized onto ``scores_bias``'s grid; the core adds it to the requantized ``q_u k^T``
        (``rescaled_add`` onto ``softmax_in``'s grid)."""
        from qswap.errors import IntegerizeError
        from qswap.nn.attention import _span
        from qswap.quant.integer import AddParams, ConstantAddParams, Grid, Requant, add_input_bits, check_bound
        if pos_table is None or self.zero_triu:
            raise IntegerizeError("rel_pos attention integerizes with the encoder's position table and "
                                  "zero_triu=False only")
        core, q_proj, q_pos, pos = self.core, Grid.of(self.q_proj_quant), Grid.of(self.q_pos_quant), Grid.of(self.pos_quant)
        for name in ("pos_bias_u", "pos_bias_v"):
            if not quantizes(getattr(self, f"{name}_quant")):
                raise IntegerizeError(f"{name} is left float by the recipe (sites: {name}: null); integer execution "
                                      f"adds it as integer codes: give it a weight spec (e.g. the rule's int8)")
        with torch.no_grad():
            bias_u = ConstantAddParams.build(q_proj, self.pos_bias_u_quant(self.pos_bias_u), Grid.of(core.q_quant))
            bias_v = ConstantAddParams.build(q_proj, self.pos_bias_v_quant(self.pos_bias_v), q_pos)
            table = Grid.of(self.linear_pos.input_quant).quantize(pos_table[0])  # (2L-1, C) codes
        check_bound("rel-pos q_v @ p^T", self.d_k * _span(q_pos) * _span(pos))
        scores, bias = Grid.of(core.scores_quant), Grid.of(core.scores_bias_quant)
        base = core.to_integer(self.d_k ** -0.5, Grid.of(self.linear_out.input_quant), head_dim=self.d_k)
        q, k = Grid.of(core.q_quant), Grid.of(core.k_quant)
        integer_core = IntegerRelPosCore(
            base, Requant.from_scales(q.scale * self.d_k ** -0.5 * k.scale / scores.scale, scores.zero_point,
                                      scores.qmin, scores.qmax),
            AddParams.build(scores.scale, bias.scale, *_out_of(Grid.of(core.softmax_in_quant)),
                            input_bits=add_input_bits(scores, bias)),
            (scores.zero_point, bias.zero_point))
        bd = Requant.from_scales(q_pos.scale * self.d_k ** -0.5 * pos.scale / bias.scale, bias.zero_point, bias.qmin,
                                 bias.qmax)
        return IntegerRelPosAttention(self.h, self._integer_projections(q_proj), bias_u, bias_v, table,
                                      self.linear_pos.to_integer(pos), bd, (q_pos.zero_point, pos.zero_point),
                                      integer_core, self.linear_out.to_integer(out))


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
                key_padding_mask: Optional[Tensor] = None, out_quant: Optional[torch.nn.Module] = None,
                **kwargs) -> tuple[Tensor, None]:
        """query, key, value: (T, B, C); key_padding_mask: (B, T); ``out_quant``: the quantizer that
        reads the output."""
        tgt_len, bsz, _ = value.shape
        # (T', 1, 1, D) cached tables, T' >= ROPE_POSITIONS: the table grid is the integer form's
        cos, sin = self.rotary_emb(value, seq_len=max(tgt_len, ROPE_POSITIONS))
        half = sin.size(-1) // 2
        signed_sin = derived_weight(self, "_signed_sin", lambda: torch.cat(
            [-sin[..., :half], sin[..., half:]], dim=-1), sin)  # rotate_half's sign, folded
        cos, sin = self.cos_quant(cos), self.sin_quant(signed_sin)
        (xq, _), (xk, _), (xv, vq) = self._inputs(query, key, value)
        heads = (tgt_len, bsz, self.h, self.d_k)
        rq = self._rotate_onto(xq, cos, sin)  # simulate: integer: the integer rotation
        rk = rq if xk is xq or rq is None else self._rotate_onto(xk, cos, sin)
        if rq is None or rk is None:
            rq = self._rotate(xq.view(heads), cos[:tgt_len], sin[:tgt_len])  # (T, B, C)
            rk = rq if xk is xq else self._rotate(xk.view(heads), cos[:tgt_len], sin[:tgt_len])
        q = self.linear_q(rq, self.rope_out_quant, self.core.q_quant)
        k = self.linear_k(rk, self.rope_out_quant, self.core.k_quant)
        v = self.linear_v(xv, vq, self.core.v_quant)
        return self._attend(q, k, v, key_padding_mask, out_quant=out_quant), None

    def to_integer(self, out, max_positions: int = ROPE_POSITIONS) -> "IntegerRotaryAttention":
        """The integer form of this self-attention writing codes of ``out``, for up to
        ``max_positions`` frames. The cos and signed-sin tables (fairseq's formula, computed here
        for ``max_positions`` rows without touching the module's cache) are quantized once by
        ``rotary_table``'s quantizers; the fake-quant forward quantizes the same rows (it extends
        fairseq's cached table to ``max_positions`` rows), so both take the same grid. The rotation: ``(x - zp) * cos`` and
        ``swapped(x - zp) * sin`` in int32, requantized onto ``rope_cos`` / ``rope_sin``'s grids
        (per position when the table grid is per channel), a rescaled add onto ``rope_out``'s."""
        from qswap.quant.integer import Grid
        grid_in, rope_out = Grid.of(self.input_quant), Grid.of(self.rope_out_quant)
        rotation = self.rotation(rope_out, max_positions)
        core = self.core.to_integer(self.d_k ** -0.5, Grid.of(self.linear_out.input_quant), head_dim=self.d_k)
        projections = [self.linear_q.to_integer(rope_out, Grid.of(self.core.q_quant)),
                       self.linear_k.to_integer(rope_out, Grid.of(self.core.k_quant)),
                       self.linear_v.to_integer(grid_in, Grid.of(self.core.v_quant))]
        return IntegerRotaryAttention(self.h, projections, *rotation, core, self.linear_out.to_integer(out))

    def rotation(self, rope_out, max_positions: int = ROPE_POSITIONS, tables: tuple | None = None) -> tuple:
        """The integer rotation onto ``rope_out`` (a ``Grid``), for up to ``max_positions`` frames:
        (cos codes (L, D), signed-sin codes (L, D), the two products' requantizations onto
        ``rope_cos`` / ``rope_sin``, their rescaled add, the zero points (input, rope_cos,
        rope_sin)); ``rotate_codes`` runs it. ``tables``: ((cos codes, scale), (sin codes, scale))
        already read (the simulation's, from the quantized tables its forward computed); else
        fairseq's formula for ``max_positions`` rows, quantized by the table quantizers. The
        multipliers ``s_in s_table / s_part`` are formed in float64 (a float32 product would move
        them by about 4e-8, relative)."""
        from qswap.errors import IntegerizeError
        from qswap.quant.integer import AddParams, Grid, Requant, add_input_bits, weight_codes
        if self.rotary_ndims != self.d_k:
            raise IntegerizeError("rotary attention over part of the head (rotary_ndims < d_k) has no integer form yet")
        if tables is not None:
            (cos_codes, cos_scale), (sin_codes, sin_scale) = tables
        else:
            with torch.no_grad():
                t = torch.arange(max_positions).type_as(self.rotary_emb.inv_freq)
                freqs = torch.einsum("i,j->ij", t, self.rotary_emb.inv_freq)
                emb = torch.cat((freqs, freqs), dim=-1).view(max_positions, 1, 1, -1)  # (L, 1, 1, D)
                half = emb.size(-1) // 2
                sin = emb.sin()
                cos_codes, cos_scale = weight_codes(self.cos_quant, emb.cos())
                sin_codes, sin_scale = weight_codes(self.sin_quant,
                                                    torch.cat([-sin[..., :half], sin[..., half:]], dim=-1))
        grid_in = Grid.of(self.input_quant)
        rope_cos, rope_sin = Grid.of(self.rope_cos_quant), Grid.of(self.rope_sin_quant)
        rotate = [Requant.from_scales(torch.as_tensor(scale, dtype=torch.float64) * grid_in.scale / g.scale,
                                      g.zero_point, g.qmin, g.qmax)
                  for scale, g in ((cos_scale, rope_cos), (sin_scale, rope_sin))]
        add = AddParams.build(rope_cos.scale, rope_sin.scale, *_out_of(rope_out),
                              input_bits=add_input_bits(rope_cos, rope_sin))
        return (cos_codes.reshape(max_positions, -1), sin_codes.reshape(max_positions, -1), rotate, add,
                (grid_in.zero_point, rope_cos.zero_point, rope_sin.zero_point))

    def _rotate_onto(self, x: Tensor, cos: Tensor, sin: Tensor) -> Optional[Tensor]:
        """``_rotate``'s result as the integer model computes it (``simulate: integer`` at
        inference): x's (T, B, C) input codes times the codes of the quantized tables ``cos``,
        ``sin`` ((T', 1, 1, D), T' >= ROPE_POSITIONS: the integer form's rows and grid) in int32,
        requantized onto the ``rope_cos`` / ``rope_sin`` grids, added onto ``rope_out``'s
        (``rotate_codes``), as values of that grid; None where that is not simulated (the float
        rotation runs)."""
        from qswap.nn.simulate import codes_of, grid_of, onto_grid
        grid_in = grid_of(self.input_quant, frozen_only=True) if not torch.is_grad_enabled() else None
        tables = (self.cos_quant, self.sin_quant, self.rope_cos_quant, self.rope_sin_quant)
        if (grid_in is None or x.size(0) > ROPE_POSITIONS
                or not all(map(quantizes, tables))):
            return None  # a table or product site the recipe leaves float: the float rotation, which the audit reports
        sources = (self.input_quant.scale, self.input_quant.zero_point, cos, sin, self.cos_quant.scale,
                   self.sin_quant.scale, self.rope_cos_quant.scale, self.rope_cos_quant.zero_point,
                   self.rope_sin_quant.scale, self.rope_sin_quant.zero_point)
        tables = lambda: (_table_codes(cos, self.cos_quant), _table_codes(sin, self.sin_quant))  # noqa: E731
        value = onto_grid(self, "_integer_rotation", lambda grid_out: self.rotation(grid_out, tables=tables()),
                          self.rope_out_quant, lambda form, _: rotate_codes(codes_of(x, grid_in), self.h, *form),
                          *sources)
        return None if value is None else self.rope_out_quant(value)


# -- integer execution (issue 16, work in progress) ----------------------------------------------------

def _table_codes(values: Tensor, quant) -> tuple:
    """(codes (ROPE_POSITIONS, 1, 1, D) int32, scale () or (ROPE_POSITIONS,)) of a rotary table
    its quantizer put on its grid (values (T', 1, 1, D), T' >= ROPE_POSITIONS; a per-channel grid
    is per position, axis 0): exact, each value is a code times its scale."""
    scale = quant.scale.detach().reshape(-1)
    rows = values[:ROPE_POSITIONS].double()
    if scale.numel() > 1:
        scale = scale[:ROPE_POSITIONS]
        codes = torch.round(rows / scale.double().view(-1, 1, 1, 1))
    else:
        scale = scale.reshape(())
        codes = torch.round(rows / scale.double())
    return codes.to(torch.int32), scale


def rotate_codes(x: Tensor, heads: int, cos: Tensor, sin: Tensor, rotate: list, add, zero_points: tuple) -> Tensor:
    """The integer rotary rotation: x (T, B, C) input codes -> (T, B, C) rope_out codes. Per head,
    ``(x - z_in) * cos`` and ``swapped(x - z_in) * sin`` (the table codes, (L, D); int32 products:
    |x - z_in| < 2^8 times a table code < 2^8) requantized onto the ``rope_cos`` / ``rope_sin``
    grids by ``rotate`` (per position where the table grid is), then ``rescaled_add`` onto
    ``rope_out``'s. The integer model's and ``simulate: integer``'s rotation."""
    from dataclasses import replace

    from qswap.quant.integer import rescaled_add
    t, bsz, c = x.shape
    z_in, z_cos, z_sin = zero_points
    xh = (x.to(torch.int32) - z_in).view(t, bsz, heads, c // heads)  # (T, B, H, D)
    half = xh.size(-1) // 2
    swapped = torch.cat([xh[..., half:], xh[..., :half]], dim=-1)  # rotate_half without the sign
    parts = []
    for table, requant, operand in ((cos, rotate[0], xh), (sin, rotate[1], swapped)):
        if isinstance(requant.m0, Tensor) and requant.m0.numel() > 1:  # per position
            requant = replace(requant, m0=requant.m0[:t], shift=requant.shift[:t])
        parts.append(requant(operand * table[:t].to(torch.int32).view(t, 1, 1, -1), axis=0))
    return rescaled_add(parts[0], z_cos, parts[1], z_sin, add).flatten(2)


def _out_of(grid) -> tuple:
    """(scale, zero point, qmin, qmax) of a grid, as ``AddParams.build`` takes an output grid."""
    return grid.scale, grid.zero_point, grid.qmin, grid.qmax


@serializable(base=Obj("IntegerAttentionCore"), scores=Obj("Requant"), add=Obj("AddParams"),
              zero_points=Tuple(INT, INT))
class IntegerRelPosCore(torch.nn.Module):
    """The attention core with a relative-position score term, on codes: ``q_u k^T`` in int32
    requantized onto the ``scores`` grid, plus the ``scores_bias`` codes (``rescaled_add`` onto the
    softmax input grid), integer softmax, ``probs v`` in int32 requantized (as ``IntegerAttentionCore``)."""

    def __init__(self, base, scores, add, zero_points: tuple):
        super().__init__()
        self.base, self.scores, self.add, self.zero_points = base, scores, add, zero_points

    def forward(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, blocked: Optional[Tensor]) -> Tensor:
        """q: (B*H, T, D), k and v: (B*H, S, D) codes; bias: (B*H, T, S) scores_bias codes. Returns
        context codes (B*H, T, D)."""
        from qswap.quant.integer import check_bound, integer_softmax, rescaled_add
        base = self.base
        zq, zk, zv, zp = base.zero_points
        check_bound("attention q @ k^T", q.shape[-1] * base.qk_span)
        base.check_keys(k.shape[1])
        acc = torch.bmm(q.to(torch.int32) - zq, (k.to(torch.int32) - zk).transpose(1, 2))  # (B*H, T, S)
        scores = rescaled_add(self.scores(acc), self.zero_points[0], bias, self.zero_points[1], self.add)
        probs = integer_softmax(scores, base.softmax, blocked)  # (B*H, T, S)
        return base.context(torch.bmm(probs.to(torch.int32) - zp, v.to(torch.int32) - zv))


@serializable(num_heads=INT, projections=PROJECTIONS, bias_u=Obj("ConstantAddParams"),
              bias_v=Obj("ConstantAddParams"), table=CODES, pos_proj=Obj("IntegerLinear"), bd=Obj("Requant"),
              zero_points=Tuple(INT, INT), core=Obj("IntegerRelPosCore"), out_proj=Obj("IntegerLinear"))
class IntegerRelPosAttention(torch.nn.Module):
    """Rel-pos self-attention on codes (see ``QRelPositionMultiHeadedAttention.to_integer``)."""

    def __init__(self, num_heads: int, projections: list, bias_u, bias_v, table: Tensor, pos_proj, bd,
                 zero_points: tuple, core, out_proj):
        super().__init__()
        self.num_heads = self.h = num_heads
        self.q_proj, self.k_proj, self.v_proj = projections
        self.bias_u, self.bias_v, self.bd, self.zero_points = bias_u, bias_v, bd, zero_points
        self.pos_proj, self.core, self.out_proj = pos_proj, core, out_proj
        self.register_buffer("table", table)  # (2L-1, C) codes of the position table

    @property
    def projections(self) -> list:
        return [self.q_proj, self.k_proj, self.v_proj]

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """x: (T, B, C) input codes; key_padding_mask: (B, T). Returns (T, B, C) codes."""
        from qswap.errors import IntegerizeError
        from qswap.quant.integer import add_constant
        t, bsz, c = x.shape
        d, center = c // self.h, self.table.shape[0] // 2
        if t > center + 1:
            raise IntegerizeError(f"{t} frames exceed the integer rel-pos table ({center + 1}); rebuild it longer")
        p = self.pos_proj(self.table[center - t + 1: center + t])  # (2T-1, C) pos codes
        qp = self.q_proj(x)  # (T, B, C) q_proj codes
        q_u, q_v = add_constant(qp, self.bias_u), add_constant(qp, self.bias_v)
        z_qv, z_p = self.zero_points
        qv = (q_v.to(torch.int32) - z_qv).view(t, bsz, self.h, d).permute(1, 2, 0, 3)  # (B, H, T, D)
        pp = (p.to(torch.int32) - z_p).view(2 * t - 1, self.h, d).permute(1, 2, 0)  # (H, D, 2T-1)
        bd = self.bd(rel_shift(torch.matmul(qv, pp))).reshape(bsz * self.h, t, t)  # (B*H, T, T) codes
        k, v = (split_heads(proj(x), self.h) for proj in (self.k_proj, self.v_proj))  # (B*H, T, D)
        context = self.core(split_heads(q_u, self.h), k, v, bd, heads_padding(key_padding_mask, self.h))
        return self.out_proj(merge_heads(context, self.h))  # (T, B, C)


@serializable(num_heads=INT, projections=PROJECTIONS, cos=CODES, sin=CODES, rotate=List(Obj("Requant")),
              add=Obj("AddParams"), zero_points=Tuple(INT, INT, INT), core=Obj("IntegerAttentionCore"),
              out_proj=Obj("IntegerLinear"))
class IntegerRotaryAttention(torch.nn.Module):
    """Rotary self-attention on codes (see ``QRotaryPositionMultiHeadedAttention.to_integer``)."""

    def __init__(self, num_heads: int, projections: list, cos: Tensor, sin: Tensor, rotate: list, add,
                 zero_points: tuple, core, out_proj):
        super().__init__()
        self.num_heads, self.rotate, self.add, self.zero_points = num_heads, rotate, add, zero_points
        self.q_proj, self.k_proj, self.v_proj = projections
        self.core, self.out_proj = core, out_proj
        self.register_buffer("cos", cos)  # (L, D) codes
        self.register_buffer("sin", sin)  # (L, D) codes, rotate_half's sign folded in

    @property
    def projections(self) -> list:
        return [self.q_proj, self.k_proj, self.v_proj]

    def _rotated(self, x: Tensor) -> Tensor:
        """x: (T, B, C) input codes -> (T, B, C) rope_out codes."""
        return rotate_codes(x, self.num_heads, self.cos, self.sin, self.rotate, self.add, self.zero_points)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """x: (T, B, C) input codes; key_padding_mask: (B, T). Returns (T, B, C) codes."""
        from qswap.errors import IntegerizeError
        t, bsz, _ = x.shape
        if t > self.cos.shape[0]:
            raise IntegerizeError(f"{t} frames (after the subsampler) exceed the integer rotary table's "
                                  f"{self.cos.shape[0]} rows, which its grid was fixed for; split the audio into "
                                  f"shorter utterances, or run the fake-quant model (which rotates in float beyond "
                                  f"them)")
        r = self._rotated(x)
        q, k = split_heads(self.q_proj(r), self.num_heads), split_heads(self.k_proj(r), self.num_heads)
        v = split_heads(self.v_proj(x), self.num_heads)  # (B*H, T, D)
        context, _ = self.core(q, k, v, heads_padding(key_padding_mask, self.num_heads))
        return self.out_proj(merge_heads(context, self.num_heads))  # (T, B, C)
