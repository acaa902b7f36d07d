"""Attention with every operand quantized, and the torch.nn.MultiheadAttention counterpart.

``QuantAttentionCore`` is the arithmetic between the projections, shared by every attention
counterpart (torch, fairseq, conformer): it never calls a fused kernel
(``F.scaled_dot_product_attention`` / ``F.multi_head_attention_forward``), so the softmax and
both matmuls run on quantized operands:

    q_quant(q) * scaling  @  k_quant(k)^T  -> softmax_in_quant -> mask -> softmax
    -> softmax_out_quant (unsigned)  @  v_quant(v)

Multiplying a quantized tensor by the constant ``scaling`` keeps it on a (rescaled) grid; integer
hardware folds that constant into the requantization multiplier. The softmax computes what the
integer form does (exponent table, integer row sum and division, onto the softmax_out grid:
``qswap.quant.integer.integer_softmax``) with the recipe's ``simulate: integer`` (the default,
``qswap.nn.simulate``); ``F.softmax`` with ``simulate: float``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qswap.errors import ConvertError
from qswap.io.serializable import INT, Obj, Tuple, serializable
from qswap.nn.base import QuantConfig, QuantModule, quantizer
from qswap.nn.linear import QLinear
from qswap.nn.registry import register
from qswap.nn.simulate import (add_onto, cached, carries_grad, centered_codes, codes_of, dequantized, form_or_none,
                                grid_of, onto_grid, reader_grid, simulates, straight_through)
from qswap.quant.bias import BiasQuantize
from qswap.quant.fake_quantize import FakeQuantize, consume
from qswap.quant.integer import INT32_MAX

CORE_SITES = dict.fromkeys(("q", "k", "v", "scores", "scores_bias", "attn_bias", "softmax_in", "softmax_out"),
                           "activation")
CORE_NONNEGATIVE = frozenset({"softmax_out"})  # never negative: an unsigned grid unless its site names a spec


def as_bool_mask(mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Split an attention mask into (bool mask of blocked positions, additive float bias).

    A float mask that holds only 0 and -inf (fairseq's future mask) is a bool mask in disguise.
    A float mask with other values too is an additive bias; its -inf positions, if any, are
    blocked (filled, as adding -inf to a finite score gives) and 0 in the bias: a quantizer of
    the bias never reads -inf.
    """
    if mask is None or mask.dtype == torch.bool:
        return mask, None
    blocked = torch.isneginf(mask)
    if bool(((mask == 0) | blocked).all()):
        return blocked, None
    if bool(blocked.any()):
        return blocked, mask.masked_fill(blocked, 0.0)
    return None, mask


class QuantAttentionCore(nn.Module):
    sites = CORE_SITES
    nonnegative_sites = CORE_NONNEGATIVE

    def __init__(self, config: QuantConfig):
        super().__init__()
        self.simulate = config.simulate
        self.q_quant = quantizer(config, self.sites, "q")
        self.k_quant = quantizer(config, self.sites, "k")
        self.v_quant = quantizer(config, self.sites, "v")
        self.scores_quant = quantizer(config, self.sites, "scores")  # only used before a score add
        self.scores_bias_quant = quantizer(config, self.sites, "scores_bias")
        self.attn_bias_quant = quantizer(config, self.sites, "attn_bias")
        self.softmax_in_quant = quantizer(config, self.sites, "softmax_in")
        self.softmax_out_quant = quantizer(config, self.sites, "softmax_out", nonnegative="softmax_out" in self.nonnegative_sites)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                attn_mask: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                num_heads: int = 1, dropout_p: float = 0.0,
                scores_bias: torch.Tensor | None = None, kv_repeat: int = 1,
                kv_quantized: bool = False, out_quant: nn.Module | None = None,
                dropping: bool | None = None, blocked_fill: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (B*H, T, D), k and v: (B*H, S, D); attn_mask: (T, S) or (B*H, T, S);
        key_padding_mask: (B, S) bool, True = padding; scores_bias: (B*H, T, S) extra score term
        (relative positions), added to the already scaled q @ k^T scores. With ``kv_repeat`` > 1
        (beam search) k and v are (B/kv_repeat*H, S, D), one per sentence, shared by its beams.
        ``kv_quantized``: k and v already come from ``k_quant`` / ``v_quant`` (a decoding cache).
        ``out_quant``: the quantizer that reads the context (the out projection's input); with
        ``simulate: integer`` both matmuls then accumulate codes in int32 and requantize as the
        integer core does (onto ``softmax_in`` and onto ``out_quant``'s grid). ``dropping``: whether
        ``dropout_p`` applies, as the float attention decides it (the flag of the dropout module it
        runs, fairseq's and ESPnet's); None: this core's own training flag (torch's attention).
        ``blocked_fill``: what a row that ``attn_mask`` and ``key_padding_mask`` block everywhere
        gets, where the plain -inf fill would give NaN. None or -inf: zero probabilities, what the
        integer softmax defines for such a row (its zero point: ``integer_softmax``), in both
        ``simulate`` modes (torch's attention gives 0 or NaN depending on its path, fairseq's NaN);
        an ONNX trace keeps the plain fill (``blocked_rows``). A finite value is the score the
        float model adds where ``attn_mask`` blocks (fairseq's encoder layer: -1e8): the row is
        then uniform over the keys the padding leaves open, as fairseq's softmax of its scores
        plus -1e8 is (float32 rounds them onto multiples of 8 next to -1e8: the same value
        wherever they lie within about 4 of each other; rows of wider scores fairseq makes near
        uniform). Selected from the scores (masked fills), with no add of the fill value: nothing
        new for a quantizer or the integer form to read. Other rows are masked as without it.
        Returns the context (B*H, T, D) and the attention probabilities (B*H, T, S)."""
        qq = self.q_quant(q)
        k = quantize_shared(self.k_quant, k, kv_repeat, num_heads, kv_quantized)  # (B*H, S, D)

        def float_scores():
            return torch.bmm(qq * scaling, k.transpose(1, 2))  # (B*H, T, S)
        blocked, additive = as_bool_mask(attn_mask)
        if scores_bias is None and additive is None:
            scores = self._integer_matmul("scores", qq, self.q_quant, k, self.k_quant, scaling,
                                          self.softmax_in_quant, float_scores)
        elif additive is None:  # the integer rel-pos core: q @ k^T requantized onto the scores grid
            scores = self._integer_matmul("scores_only", qq, self.q_quant, k, self.k_quant, scaling,
                                          self.scores_quant, float_scores)
        else:
            scores = float_scores()
        if scores_bias is not None or additive is not None:  # an add: both operands quantized
            scores = self.scores_quant(scores)
            if scores_bias is not None:
                scores = self._score_add(scores, self.scores_bias_quant(scores_bias), additive is None)
            if additive is not None:
                scores = scores + self.attn_bias_quant(additive)
        product = scores
        scores = consume(self.softmax_in_quant, scores)  # a new tensor: the product or the sums
        # rounded in place (consume's fast path: unwatched inference) and not read again unmasked
        # (the float softmax): the masks are filled in place too, with no copy of the scores
        fill = Tensor.masked_fill_ if (scores is product and isinstance(self.softmax_in_quant, FakeQuantize)
                                       and self.softmax_in_quant.enabled and not simulates(self)) else Tensor.masked_fill
        zero_rows = blocked_fill is None or blocked_fill == float("-inf")
        full_rows = (blocked_rows(blocked, key_padding_mask, num_heads)  # rows the masks block everywhere
                     if zero_rows or blocked is not None else None)
        masked = scores
        if blocked is not None:
            masked = fill(masked, blocked if blocked.dim() == 3 else blocked.unsqueeze(0), float("-inf"))
        if key_padding_mask is not None:
            masked = fill_padding(fill, masked, key_padding_mask, num_heads)
        probs = self._integer_softmax(scores, masked, full_rows) if simulates(self) else None
        if probs is None:
            probs = F.softmax(masked, dim=-1)  # (B*H, T, S)
        if full_rows is not None:
            rows = (probs.new_zeros(()) if zero_rows else
                    self._blocked_rows(scores, blocked, key_padding_mask, num_heads))
            probs = torch.where(full_rows, rows, probs)
        probs = consume(self.softmax_out_quant, probs)  # the softmax's new tensor
        dropped = dropout_p > 0.0 and (self.training if dropping is None else dropping)
        if dropped:
            probs = F.dropout(probs, p=dropout_p)
        v = quantize_shared(self.v_quant, v, kv_repeat, num_heads, kv_quantized)  # (B*H, S, D)
        if out_quant is None or dropped:  # dropout's 1/(1-p) takes probs off their grid: no integer form
            context = torch.bmm(probs, v)  # (B*H, T, D)
        else:
            context = self._integer_matmul("context", probs, self.softmax_out_quant, v.transpose(1, 2), self.v_quant,
                                           1.0, out_quant, lambda: torch.bmm(probs, v))
        return context, probs

    @staticmethod
    def _blocked_rows(scores: Tensor, blocked: Tensor, key_padding_mask: Tensor | None, num_heads: int) -> Tensor:
        """The probabilities of rows blocked everywhere where the float model fills blocked scores
        with a finite value: uniform over the keys the padding leaves open (every blocked score
        set to 0, each padded key to -inf; a row of padding only: NaN, as in the float model)."""
        filled = scores.masked_fill(blocked if blocked.dim() == 3 else blocked.unsqueeze(0), 0.0)
        if key_padding_mask is not None:
            filled = fill_padding(Tensor.masked_fill, filled, key_padding_mask, num_heads)
        return F.softmax(filled, dim=-1)

    def _score_add(self, scores: torch.Tensor, bias: torch.Tensor, integer: bool) -> torch.Tensor:
        """``scores + bias`` (values of the ``scores`` and ``scores_bias`` grids); with ``simulate:
        integer`` and ``integer`` (no additive mask follows) the integer rel-pos core's
        ``rescaled_add`` onto ``softmax_in``'s grid (``add_onto``), as values."""
        if integer and simulates(self):
            values = add_onto(self, "_integer_score_add", scores, self.scores_quant, bias, self.scores_bias_quant,
                              (self.softmax_in_quant,))
            if values is not None:
                return values[0]
        return scores + bias

    def _integer_matmul(self, name: str, a: torch.Tensor, a_quant: nn.Module, b: torch.Tensor, b_quant: nn.Module,
                        factor: float, out_quant: nn.Module, product) -> torch.Tensor:
        """``product()`` (= ``factor * a @ b^T`` in float) as the integer core computes it with
        ``simulate: integer`` (``integer_product``, kept in ``_integer_<name>``)."""
        return integer_product(self, f"_integer_{name}", a, a_quant, b.transpose(1, 2), b_quant, factor, out_quant,
                               product, torch.bmm)

    def _integer_softmax(self, scores: torch.Tensor, masked: torch.Tensor,
                         zero_rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """The integer softmax of the ``softmax_in`` codes of ``scores`` (positions where ``masked``
        is -inf blocked) onto the ``softmax_out`` grid, as values, with the gradient of the float
        softmax of ``masked``, whose rows ``zero_rows`` (``blocked_rows``: every key blocked, NaN
        in the float softmax; the caller selects what such a row gets afterwards) are zero there:
        a learned reader scale gets no NaN gradient from them. None where either grid is not per
        tensor (no integer form)."""
        from qswap.quant.integer import SoftmaxParams, integer_softmax
        grid_in, grid_out = grid_of(self.softmax_in_quant), reader_grid(self.softmax_out_quant)
        if grid_in is None or grid_out is None:
            return None
        params = cached(self, "_integer_softmax_params", lambda: form_or_none(SoftmaxParams.build, grid_in, grid_out),
                        self.softmax_in_quant.scale, self.softmax_in_quant.zero_point, self.softmax_out_quant.scale,
                        self.softmax_out_quant.zero_point)  # each zero point: calibration writes scales through .data
        if params is None:
            return None
        with torch.no_grad():
            codes = integer_softmax(codes_of(scores, grid_in), params, torch.isneginf(masked))
            value = dequantized(codes, grid_out)
        reader = self.softmax_out_quant
        if not carries_grad(reader, masked):
            return value
        float_probs = F.softmax(masked, dim=-1)
        if zero_rows is not None:
            float_probs = torch.where(zero_rows, float_probs.new_zeros(()), float_probs)
        return straight_through(value, float_probs, reader)

    def to_integer(self, scaling: float, out: "Grid", head_dim: int | None = None) -> "IntegerAttentionCore":
        """The integer form writing context codes of ``out`` (the out projection's input grid):
        ``q @ k^T`` in int32 requantized by ``s_q * scaling * s_k / s_softmax_in``, integer
        softmax onto the softmax_out grid, ``probs @ v`` in int32 requantized by
        ``s_p * s_v / s_out``. Bool masks only (score biases and additive masks: not yet)."""
        from qswap.quant.integer import Grid, Requant, SoftmaxParams
        q, k, v = Grid.of(self.q_quant), Grid.of(self.k_quant), Grid.of(self.v_quant)
        s_in, s_out = Grid.of(self.softmax_in_quant), Grid.of(self.softmax_out_quant)
        scores = Requant.from_scales(q.scale * scaling * k.scale / s_in.scale, s_in.zero_point, s_in.qmin, s_in.qmax)
        context = Requant.from_scales(s_out.scale * v.scale / out.scale, out.zero_point, out.qmin, out.qmax)
        core = IntegerAttentionCore((q.zero_point, k.zero_point, v.zero_point, s_out.zero_point), scores,
                                    SoftmaxParams.build(s_in, s_out), context, _span(q) * _span(k), _span(s_out) * _span(v))
        if head_dim is not None:  # q @ k^T sums over the head's D features: known now (probs @ v: per call)
            from qswap.quant.integer import check_bound
            check_bound(f"attention q @ k^T over {head_dim} features (q and k codes spanning {core.qk_span} per "
                        f"product; fewer bits at the q or k sites fit)", head_dim * core.qk_span)
        return core


def repeat_kv(t: torch.Tensor, repeat: int, num_heads: int) -> torch.Tensor:
    """(B'*H, S, D) -> (B'*repeat*H, S, D): each sentence's rows repeated for its beams."""
    bh, length, dim = t.shape
    t = t.view(bh // num_heads, 1, num_heads, length, dim)  # (B', 1, H, S, D)
    return t.expand(-1, repeat, -1, -1, -1).reshape(-1, length, dim)


def maps_elementwise(quant: nn.Module) -> bool:
    """Whether ``quant`` maps each value on its own, so quantizing parts of a tensor (or one copy
    of repeated rows) gives the values of quantizing the whole: a frozen per-tensor quantizer,
    or none. (An observing one sees what it is given, a passing one too (``passthrough``); a
    percentile observer weighs copies.)"""
    return not (isinstance(quant, FakeQuantize) and (quant.enabled or quant.passthrough)) or (
        quant.spec.granularity == "per_tensor" and bool(quant.frozen))


def quantize_shared(quant: nn.Module, t: torch.Tensor, repeat: int, num_heads: int,
                    quantized: bool = False) -> torch.Tensor:
    """``quant(repeat_kv(t))`` (``repeat_kv(t)`` when ``t`` is ``quant``'s output already),
    computed as ``repeat_kv(quant(t))`` when that gives the same values."""
    if not quantized and (repeat == 1 or not maps_elementwise(quant)):
        return quant(repeat_kv(t, repeat, num_heads) if repeat > 1 else t)
    t = t if quantized else quant(t)
    return repeat_kv(t, repeat, num_heads) if repeat > 1 else t


def heads_padding(key_padding_mask: torch.Tensor | None, num_heads: int) -> torch.Tensor | None:
    """(B, S) padding (True or nonzero: padded) -> (B*H, 1, S) bool, row b*H + h sentence b's (the
    rows ``split_heads`` makes); None for None. Tiled and flattened, not the scores viewed as
    (B, H, T, S): an ONNX trace of that computes the scores' shapes on every call."""
    if key_padding_mask is None:
        return None
    return key_padding_mask.to(torch.bool).unsqueeze(1).repeat(1, num_heads, 1).flatten(0, 1).unsqueeze(1)


def blocked_rows(blocked: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                 num_heads: int) -> torch.Tensor | None:
    """The rows of the scores (B*H, T, S) that ``blocked`` (a bool attn_mask, (T, S) or (B*H, T,
    S)) and ``key_padding_mask`` (B, S) block at every key, as a bool mask that broadcasts over
    them ((B*H, 1, 1), (T, 1) or (B*H, T, 1)); None where no row is (read eagerly: one reduction
    of the masks, (B, S) for padding alone) or under an ONNX trace (no data-dependent branch)."""
    if (blocked is None and key_padding_mask is None) or torch.jit.is_tracing():
        return None
    if blocked is None:
        empty = key_padding_mask.to(torch.bool).all(dim=-1)  # (B,): a sentence with every key padded
        return empty.repeat_interleave(num_heads).view(-1, 1, 1) if bool(empty.any()) else None
    covered = blocked if key_padding_mask is None else blocked | heads_padding(key_padding_mask, num_heads)
    full = covered.all(dim=-1, keepdim=True)  # (T, 1) or (B*H, T, 1)
    return full if bool(full.any()) else None


def padding_bias(key_padding_mask: torch.Tensor, num_heads: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, S) padding -> (B*H, 1, S) of ``dtype``: -inf at each padded key, 0 elsewhere
    (``heads_padding``'s rows). Added to finite scores it gives ``masked_fill``'s values: each
    score kept (x + 0 = x; -0.0 becomes +0.0, which a softmax reads alike) or set to -inf."""
    bias = torch.where(heads_padding(key_padding_mask, num_heads), float("-inf"), 0.0)
    return bias if bias.dtype == dtype else bias.to(dtype)


def fill_padding(fill, scores: torch.Tensor, key_padding_mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``fill(scores, heads_padding(key_padding_mask, num_heads), -inf)`` (``fill``:
    ``masked_fill`` or ``masked_fill_``): scores (B*H, T, S) with each sentence's padded key
    positions at -inf. Eager, on contiguous scores, the scores are viewed as (B, H, T, S) and the
    (B, 1, 1, S) mask broadcast over heads and rows, as fairseq does: the same values, with no
    tiled copy of the mask per call (a decoding step's encoder-decoder attention masks on every
    step). Traced for ONNX the scores get the mask's additive form instead (``padding_bias``):
    ``Add`` of 0 or -inf, the same values as the fill on the finite scores a grid holds, which
    onnxruntime's CPU kernels run several times faster than a broadcast ``Where`` (its ``Where``
    is one thread; ``qswap.export.onnx_audit`` counts that ``Add`` as the selection it is)."""
    bh, length, src = scores.shape
    batch = key_padding_mask.shape[0]
    if torch.jit.is_tracing():
        return scores + padding_bias(key_padding_mask, num_heads, scores.dtype)
    if not scores.is_contiguous() or batch * num_heads != bh:
        return fill(scores, heads_padding(key_padding_mask, num_heads), float("-inf"))
    mask = key_padding_mask.to(torch.bool).view(batch, 1, 1, src)
    return fill(scores.view(batch, num_heads, length, src), mask, float("-inf")).view(bh, length, src)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(L, B, E) -> (B*H, L, D). Traced for ONNX, B*H is left to the reshape (-1) and D is a Python
    int: the trace then sizes the reshape by L alone, a dimension of the same tensor at the same
    place, and onnxruntime's reshape fusion makes the shape a constant (0, -1, D), with no shape
    arithmetic left to run per call. Eager, every size is explicit (an empty sequence reshapes,
    and a head count that does not divide E fails here)."""
    length, batch, embed = x.shape
    if torch.jit.is_tracing():
        return x.reshape(length, -1, int(embed) // num_heads).transpose(0, 1)
    return x.reshape(length, batch * num_heads, embed // num_heads).transpose(0, 1)


def merge_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B*H, L, D) -> (L, B, E), E = H * D (traced: B left to the reshape, as ``split_heads``)."""
    bh, length, dim = x.shape
    x = x.transpose(0, 1)
    if torch.jit.is_tracing():
        return x.reshape(length, -1, num_heads * int(dim))
    return x.reshape(length, bh // num_heads, num_heads * dim)


@register(nn.MultiheadAttention)
class QMultiheadAttention(QuantModule):
    """torch.nn.MultiheadAttention with quantized inputs, projections, core and output."""

    sites = {"input": "activation", "key_in": "activation", "value_in": "activation",
             "in_proj_weight": "weight", "weight": "weight", **CORE_SITES}  # weight: out_proj's
    nonnegative_sites = CORE_NONNEGATIVE
    param_quantizers = {"in_proj_bias": "bias_quant", "bias_k": "core.k_quant", "bias_v": "core.v_quant"}

    def __init__(self, module: nn.MultiheadAttention, config: QuantConfig):
        super().__init__()
        if not module._qkv_same_embed_dim:
            raise ConvertError("nn.MultiheadAttention with kdim/vdim != embed_dim is not supported "
                               "yet; register a counterpart for it with qswap.register")
        self.embed_dim, self.num_heads = module.embed_dim, module.num_heads
        self.head_dim = module.head_dim
        self.batch_first, self.dropout = module.batch_first, module.dropout
        self.add_zero_attn = module.add_zero_attn
        self.in_proj_weight, self.in_proj_bias = module.in_proj_weight, module.in_proj_bias
        self.bias_k, self.bias_v = module.bias_k, module.bias_v
        self.input_quant = quantizer(config, self.sites, "input")
        self.key_quant = quantizer(config, self.sites, "key_in")
        self.value_quant = quantizer(config, self.sites, "value_in")
        self.in_proj_weight_quant = quantizer(config, self.sites, "in_proj_weight")
        self.bias_quant = BiasQuantize()
        self.core = QuantAttentionCore(config)
        self.out_proj = QLinear(module.out_proj.weight, module.out_proj.bias, config)

    @classmethod
    def from_float(cls, module: nn.MultiheadAttention, config: QuantConfig) -> "QMultiheadAttention":
        return cls(module, config)

    def _project(self, x: torch.Tensor, x_quant: nn.Module, w: torch.Tensor, part: int) -> torch.Tensor:
        rows = slice(part * self.embed_dim, (part + 1) * self.embed_dim)
        bias = None if self.in_proj_bias is None else self.in_proj_bias[rows]
        return F.linear(x, w[rows], self.bias_quant(bias, x_quant, self.in_proj_weight_quant, rows))

    def _float_padding(self, key_padding_mask: Tensor, attn_mask: Tensor | None, bsz: int,
                       tgt_len: int) -> tuple[Tensor | None, Tensor | None]:
        """A float ``key_padding_mask`` (B, S) as torch applies it, added to the scores: one of 0
        and -inf only stays a padding mask (bool); any other is joined to ``attn_mask`` (bool: -inf
        where True, as torch makes it; or additive) as the additive mask (B*H, T, S) the core adds
        through ``attn_bias_quant`` (its -inf positions filled, not quantized: ``as_bool_mask``).
        Returns the (key_padding_mask, attn_mask) for the core."""
        padding, bias = as_bool_mask(key_padding_mask)
        if bias is None:
            return padding, attn_mask
        src = key_padding_mask.shape[1]
        additive = key_padding_mask.view(bsz, 1, 1, src).expand(bsz, self.num_heads, tgt_len, src)
        additive = additive.reshape(bsz * self.num_heads, tgt_len, src)  # (B*H, T, S)
        if attn_mask is None:
            return None, additive
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=additive.dtype,
                                    device=attn_mask.device).masked_fill_(attn_mask, float("-inf"))
        return None, attn_mask + additive

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        key_is_query, value_is_query, value_is_key = key is query, value is query, value is key
        if self.batch_first:  # after the identity tests: transposing makes three new tensors
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))  # (L, B, E)
        tgt_len, bsz, _ = query.shape
        xq = self.input_quant(query)
        xk, k_quant = (xq, self.input_quant) if key_is_query else (self.key_quant(key), self.key_quant)
        xv, v_quant = ((xq, self.input_quant) if value_is_query else
                       (xk, k_quant) if value_is_key else (self.value_quant(value), self.value_quant))
        w = self.in_proj_weight_quant(self.in_proj_weight)  # (3E, E)
        q = self._project(xq, self.input_quant, w, 0)  # (T, B, E)
        k = self._project(xk, k_quant, w, 1)  # (S, B, E)
        v = self._project(xv, v_quant, w, 2)  # (S, B, E)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])  # (S+1, B, E)
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q, k, v = (split_heads(t, self.num_heads) for t in (q, k, v))  # (B*H, L, D)
        if self.add_zero_attn:
            zeros = k.new_zeros(k.shape[0], 1, k.shape[2])
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        if is_causal and attn_mask is None:
            s = k.shape[1]
            attn_mask = torch.ones(tgt_len, s, dtype=torch.bool, device=q.device).triu(1)
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            key_padding_mask, attn_mask = self._float_padding(key_padding_mask, attn_mask, bsz, tgt_len)
        context, probs = self.core(q, k, v, self.head_dim ** -0.5, attn_mask, key_padding_mask,
                                   self.num_heads, self.dropout)
        out = self.out_proj(merge_heads(context, self.num_heads))  # (T, B, E)
        if self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        probs = probs.view(bsz, self.num_heads, tgt_len, -1)  # (B, H, T, S)
        return out, probs.mean(dim=1) if average_attn_weights else probs


# -- integer execution (issue 16, work in progress) ----------------------------------------------------

def integer_product(owner: nn.Module, slot: str, a: torch.Tensor, a_quant: nn.Module, b: torch.Tensor,
                    b_quant: nn.Module, factor: float, out_quant: nn.Module, product, matmul,
                    after=None) -> torch.Tensor:
    """``product()`` (= ``after(factor * matmul(a, b))`` in float, computed only where it is
    returned or its gradient is needed) as the integer ops compute it with ``simulate: integer``:
    the int32 accumulator ``matmul(a - za, b - zb)`` over ``a``'s last axis (an exact float GEMM,
    ``qswap.quant.integer.exact_gemm``), ``after`` applied to it (a data movement: the rel-pos
    ``rel_shift``), requantized by ``s_a factor s_b / s_out`` onto ``out_quant``'s grid
    (``onto_grid``, the form kept in ``owner.<slot>``), as values, with the float product's
    gradient. ``product()`` itself where ``owner`` does not simulate integers, a grid is missing,
    or an int32 accumulator could overflow (wide codes, a long reduction: the integer ops refuse
    it, ``check_bound``)."""
    if not simulates(owner):  # onto_grid's own answer, before reading two grids per call
        return product()
    from qswap.quant.integer import Requant, exact_gemm, requantized_values
    grid_a, grid_b = grid_of(a_quant), grid_of(b_quant)
    if grid_a is None or grid_b is None or a.shape[-1] * grid_a.span * grid_b.span > INT32_MAX:
        return product()

    def build(out):
        return Requant.from_scales(grid_a.scale * factor * grid_b.scale / out.scale, out.zero_point, out.qmin,
                                   out.qmax)

    def run(requant, out):
        acc = exact_gemm(matmul, centered_codes(a, grid_a), centered_codes(b, grid_b), a.shape[-1],
                         spans=(grid_a.span, grid_b.span))  # int32, exact
        return requantized_values(requant, acc if after is None else after(acc), out.scale)
    value = onto_grid(owner, slot, build, out_quant, run, a_quant.scale, a_quant.zero_point, b_quant.scale,
                      b_quant.zero_point)  # factor: a constant of the owner (the attention's scaling)
    if value is None:
        return product()
    return straight_through(value, product(), out_quant) if carries_grad(out_quant, a, b) else value


def _span(grid) -> int:
    """The largest |code - zero_point| of a grid."""
    return max(grid.qmax - grid.zero_point, grid.zero_point - grid.qmin)


@serializable(zero_points=Tuple(INT, INT, INT, INT), scores=Obj("Requant"), softmax=Obj("SoftmaxParams"),
              context=Obj("Requant"), qk_span=INT, pv_span=INT)
class IntegerAttentionCore(nn.Module):
    """The attention core on codes. ``q @ k^T`` accumulates D products of at most
    ``max|q - zq| * max|k - zk|`` in int32, ``probs @ v`` S of at most ``max|p - zp| * max|v - zv|``
    (65025 for 8-bit: D and S below 33025 stay under 2^31; checked per call)."""

    def __init__(self, zero_points: tuple, scores, softmax, context, qk_span: int, pv_span: int):
        super().__init__()
        self.zero_points, self.scores, self.softmax, self.context = zero_points, scores, softmax, context
        self.qk_span, self.pv_span = qk_span, pv_span

    def check_keys(self, keys: int) -> None:
        """IntegerizeError where ``probs @ v`` over ``keys`` keys could leave its int32 accumulator:
        the reduction runs over the keys, so the grids bound the length, which the message names."""
        from qswap.errors import IntegerizeError
        if keys * self.pv_span > INT32_MAX:
            raise IntegerizeError(f"attention probs @ v over {keys} keys can reach {keys * self.pv_span} in its int32 "
                                  f"accumulator; at these grids (softmax_out and v codes spanning {self.pv_span} per "
                                  f"product) the integer model takes at most {INT32_MAX // self.pv_span} keys: "
                                  f"shorter inputs, fewer bits at the softmax_out or v sites, or the fake-quant model "
                                  f"(which computes this product in float)")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                blocked: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (B*H, T, D), k and v: (B*H, S, D) codes; blocked: bool, broadcasting to (B*H, T, S).
        Returns context codes (B*H, T, D) and probability codes (B*H, T, S)."""
        from qswap.quant.integer import check_bound, integer_softmax
        zq, zk, zv, zp = self.zero_points
        check_bound("attention q @ k^T", q.shape[-1] * self.qk_span)
        self.check_keys(k.shape[1])
        acc = torch.bmm(q.to(torch.int32) - zq, (k.to(torch.int32) - zk).transpose(1, 2))  # (B*H, T, S)
        probs = integer_softmax(self.scores(acc), self.softmax, blocked)  # (B*H, T, S)
        context = torch.bmm(probs.to(torch.int32) - zp, v.to(torch.int32) - zv)  # (B*H, T, D)
        return self.context(context), probs
