"""fairseq's MultiheadAttention, every path on quantized operands.

fairseq's fast path hands the raw projection weights to ``F.multi_head_attention_forward``
(on torch 2.x a fused ``_scaled_dot_product_flash_attention_for_cpu`` with a float softmax).
The counterpart never takes it: the q/k/v projections share one input quantizer per distinct
input, and ``QuantAttentionCore`` does scores, masks, softmax and the context matmul.
Incremental decoding keeps fairseq's cache layout (``prev_key`` / ``prev_value`` as
(B, H, S, D) projections), so beam search's ``reorder_incremental_state`` and ``set_beam_size``
are fairseq's own. With frozen per-tensor k/v quantizers the cache holds the projections already
quantized (each step quantizes only its new rows: the same values as quantizing the whole cache
at every step; the key ``QUANTIZED_CACHE`` marks such a cache); otherwise float projections,
quantized by the core at every step as in a batch forward.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.incremental_decoding_utils import FairseqIncrementalState
from fairseq.modules.multihead_attention import MultiheadAttention
from torch import Tensor, nn

from qswap.errors import ConvertError, IntegerizeError
from qswap.io.serializable import INT, Obj, serializable
from qswap.io.serializable import Tuple as TupleOf
from qswap.nn.attention import (CORE_NONNEGATIVE, CORE_SITES, QuantAttentionCore, heads_padding, maps_elementwise, merge_heads,
                                 split_heads)
from qswap.nn.base import QuantConfig, QuantModule, own, quantizer
from qswap.nn.linear import QLinear, op_onto
from qswap.nn.registry import register
from qswap.nn.simulate import simulates
from qswap.quant.bias import BiasQuantize, quantized_pair

IncrementalState = Optional[Dict[str, Dict[str, Optional[Tensor]]]]
QUANTIZED_CACHE = "qswap_quantized_kv"  # a None entry: beam reordering skips it


def attention_core(config: QuantConfig, *, score_bias: bool, additive_mask: bool) -> QuantAttentionCore:
    """A QuantAttentionCore without the quantizers of score terms this attention never adds
    (they would never run; calibration would report them as unseen): ``score_bias`` for a
    relative-position term, ``additive_mask`` for float attention masks."""
    core = QuantAttentionCore(config)
    if not score_bias:
        core.scores_bias_quant = nn.Identity()
    if not additive_mask:
        core.attn_bias_quant = nn.Identity()
    if not (score_bias or additive_mask):
        core.scores_quant = nn.Identity()
    return core


class Projection(nn.Module):
    """One input projection of an attention counterpart: the float Linear's ``weight`` and
    ``bias`` (same names, same parameter objects), applied to an input its owner has already
    quantized. Several projections share one input quantizer (q/k/v of self-attention), so the
    bias is put on the grid of the quantizer that produced the input.
    """

    sites = {"weight": "weight"}

    def __init__(self, linear: nn.Linear, config: QuantConfig):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.weight_quant = quantizer(config, self.sites, "weight")
        self.bias_quant = BiasQuantize()
        self.simulate = config.simulate

    def forward(self, x: Tensor, x_quant: nn.Module, out_quant: Optional[nn.Module] = None) -> Tensor:
        """x: (..., in) already quantized by ``x_quant`` -> (..., out). With ``simulate: integer``
        and ``out_quant`` (the core's q/k/v quantizer that reads the result): the integer form's
        codes on its grid as values (``qswap.nn.linear.op_onto``), with the float gradient."""
        def op():
            weight, bias, weight_quant, bias_quant = own(self, "weight", "bias", "weight_quant", "bias_quant")
            return F.linear(x, *quantized_pair(weight, bias, x_quant, weight_quant, bias_quant))
        if out_quant is None or not simulates(self):  # op_onto's answer without integer insides
            return op()
        return op_onto(self, x, x_quant, out_quant, op, self.to_integer)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}"

    def to_integer(self, grid_in, out, derived: bool = False):
        """``IntegerLinear`` of this projection: input codes on ``grid_in`` (its owner's input
        quantizer), output codes on ``out`` (the core's q/k/v grid). ``derived``: this forward has
        just derived the weight's grid (``integer_linear``)."""
        from qswap.nn.linear import integer_linear
        return integer_linear(self.weight_quant, self.weight, self.bias, grid_in, out, derived=derived)


@register(MultiheadAttention)
class QFairseqMultiheadAttention(QuantModule, FairseqIncrementalState):
    """Counterpart of ``fairseq.modules.MultiheadAttention`` (self, encoder-decoder and generic
    attention; incremental state; key padding and attention masks; add_bias_kv; add_zero_attn).

    >>> attn = QFairseqMultiheadAttention.from_float(layer.self_attn, config)
    """

    sites = {"input": "activation", "key_in": "activation", "value_in": "activation", "weight": "weight",
             **CORE_SITES}
    nonnegative_sites = CORE_NONNEGATIVE
    takes_reader = True  # forward(..., out_quant=): the out projection writes onto its reader's grid
    param_quantizers = {"bias_k": "core.k_quant", "bias_v": "core.v_quant"}  # appended to k and v

    # fairseq's own incremental-state and beam plumbing: they only read the attributes kept below
    _get_input_buffer = MultiheadAttention._get_input_buffer
    _set_input_buffer = MultiheadAttention._set_input_buffer
    _pad_masks = MultiheadAttention._pad_masks
    _append_zero_attn = MultiheadAttention._append_zero_attn
    reorder_incremental_state = MultiheadAttention.reorder_incremental_state
    set_beam_size = MultiheadAttention.set_beam_size
    upgrade_state_dict_named = MultiheadAttention.upgrade_state_dict_named

    def __init__(self, module: MultiheadAttention, config: QuantConfig):
        super().__init__()
        self.init_incremental_state()
        self.embed_dim, self.kdim, self.vdim = module.embed_dim, module.kdim, module.vdim
        self.num_heads, self.head_dim, self.scaling = module.num_heads, module.head_dim, module.scaling
        self.self_attention = module.self_attention
        self.encoder_decoder_attention = module.encoder_decoder_attention
        self.add_zero_attn, self.beam_size = module.add_zero_attn, module.beam_size
        self.bias_k, self.bias_v = module.bias_k, module.bias_v
        self.dropout_module = module.dropout_module
        self.input_quant = quantizer(config, self.sites, "input")  # the query (and self-attention's k, v)
        if not self.self_attention:  # the encoder output (encoder-decoder), or a distinct key
            self.key_quant = quantizer(config, self.sites, "key_in")
        if not (self.self_attention or self.encoder_decoder_attention):  # a distinct value
            self.value_quant = quantizer(config, self.sites, "value_in")
        self.q_proj, self.k_proj = Projection(module.q_proj, config), Projection(module.k_proj, config)
        self.v_proj = Projection(module.v_proj, config)
        self.core = attention_core(config, score_bias=False, additive_mask=True)
        self.out_proj = QLinear(module.out_proj.weight, module.out_proj.bias, config)

    @classmethod
    def from_float(cls, module: MultiheadAttention, config: QuantConfig) -> "QFairseqMultiheadAttention":
        if module.use_xformers:
            raise ConvertError("fairseq MultiheadAttention with xformers_att_config is not supported; "
                               "build the model without xformers")
        if module.onnx_trace or module.skip_embed_dim_check:
            raise ConvertError("fairseq MultiheadAttention prepared for ONNX export or head pruning "
                               "is not supported")
        return cls(module, config)

    def _project_qkv(self, query: Tensor, key: Optional[Tensor], value: Optional[Tensor],
                     key_padding_mask: Optional[Tensor]):
        """query (T, B, E), key/value (S, B', E') -> q (T, B, E), k and v (S, B', E) or None."""
        xq = self.input_quant(query)
        core = self.core
        q = self.q_proj(xq, self.input_quant, core.q_quant)
        if self.self_attention:
            key = value = query
        elif self.encoder_decoder_attention:
            if key is None:  # cached encoder projections
                return q, None, None, key_padding_mask
            if self.beam_size > 1 and query.size(1) == key.size(1):
                # one encoder output per sentence, not per beam: (S, B, E) -> (S, B/beam, E)
                key = key.view(key.size(0), -1, self.beam_size, key.size(2))[:, :, 0, :]
                if key_padding_mask is not None:
                    key_padding_mask = key_padding_mask.view(-1, self.beam_size, key_padding_mask.size(1))[:, 0, :]
            value = key
        xk, k_quant = (xq, self.input_quant) if key is query else (self.key_quant(key), self.key_quant)
        if value is query:
            xv, v_quant = xq, self.input_quant
        elif value is key:
            xv, v_quant = xk, k_quant
        else:
            xv, v_quant = self.value_quant(value), self.value_quant
        return q, self.k_proj(xk, k_quant, core.k_quant), self.v_proj(xv, v_quant, core.v_quant), key_padding_mask

    def _quantized_cache(self, saved: Dict[str, Optional[Tensor]]) -> bool:
        """Whether this decoding cache holds quantized k/v; a new cache does when that gives the
        same values (frozen per-tensor k/v quantizers, no zero attention appended after it)."""
        if "prev_key" in saved:  # a cache restored from outside carries no mark: float
            return QUANTIZED_CACHE in saved
        if self.add_zero_attn or not (maps_elementwise(self.core.k_quant)
                                      and maps_elementwise(self.core.v_quant)):
            return False
        saved[QUANTIZED_CACHE] = None
        return True

    def _with_cache(self, k, v, key_padding_mask, saved, incremental_state, static_kv):
        """Prepend the cached keys/values (fairseq's layout), store the result back.
        k, v: (B'*H, S, D) or None; returns k, v (B'*H, S_total, D), the mask and B'."""
        kv_bsz = k.size(0) // self.num_heads if k is not None else None
        if "prev_key" in saved:
            prev_key, prev_value = saved["prev_key"], saved["prev_value"]  # (B', H, S, D)
            kv_bsz = prev_key.size(0)
            prev_key = prev_key.view(kv_bsz * self.num_heads, -1, self.head_dim)
            prev_value = prev_value.view(kv_bsz * self.num_heads, -1, self.head_dim)
            k = prev_key if static_kv else torch.cat([prev_key, k], dim=1)
            v = prev_value if static_kv else torch.cat([prev_value, v], dim=1)
        key_padding_mask = MultiheadAttention._append_prev_key_padding_mask(
            key_padding_mask=key_padding_mask, prev_key_padding_mask=saved.get("prev_key_padding_mask"),
            batch_size=kv_bsz, src_len=k.size(1), static_kv=static_kv)
        saved["prev_key"] = k.view(kv_bsz, self.num_heads, -1, self.head_dim)
        saved["prev_value"] = v.view(kv_bsz, self.num_heads, -1, self.head_dim)
        saved["prev_key_padding_mask"] = key_padding_mask
        self._set_input_buffer(incremental_state, saved)
        return k, v, key_padding_mask, kv_bsz

    def forward(self, query: Tensor, key: Optional[Tensor], value: Optional[Tensor],
                key_padding_mask: Optional[Tensor] = None, incremental_state: IncrementalState = None,
                need_weights: bool = True, static_kv: bool = False, attn_mask: Optional[Tensor] = None,
                before_softmax: bool = False, need_head_weights: bool = False,
                out_quant: Optional[nn.Module] = None,
                blocked_fill: Optional[float] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """query: (T, B, E); key, value: (S, B, E); key_padding_mask: (B, S), True/1 = padding;
        attn_mask: (T, S) bool or additive; ``out_quant``: the quantizer that reads the output (with
        ``simulate: integer`` the out projection writes onto its grid: ``QLinear.forward``);
        ``blocked_fill``: the finite value fairseq's encoder layer fills a bool attn_mask's blocked
        positions with (-1e8; ``QuantAttentionCore.forward``: a row blocked everywhere).
        Returns (T, B, E) and the attention weights
        ((B, T, S) averaged over heads, (H, B, T, S) with need_head_weights, or None)."""
        if before_softmax:
            raise NotImplementedError("before_softmax returns raw float scores; the quantized "
                                      "attention does not expose them")
        need_weights = need_weights or need_head_weights
        tgt_len, bsz, _ = query.shape
        saved = self._get_input_buffer(incremental_state) if incremental_state is not None else None
        if saved is not None and "prev_key" in saved and static_kv:
            key = value = None  # encoder-decoder attention: its keys and values are cached
        q, k, v, key_padding_mask = self._project_qkv(query, key, value, key_padding_mask)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.repeat(1, k.size(1), 1)])  # (S+1, B', E)
            v = torch.cat([v, self.bias_v.repeat(1, v.size(1), 1)])
            key_padding_mask, attn_mask = self._pad_masks(key_padding_mask, attn_mask)
        q = split_heads(q, self.num_heads)  # (B*H, T, D)
        k = None if k is None else split_heads(k, self.num_heads)  # (B'*H, S, D)
        v = None if v is None else split_heads(v, self.num_heads)
        quantized_cache = saved is not None and self._quantized_cache(saved)
        if quantized_cache and k is not None:
            k, v = self.core.k_quant(k), self.core.v_quant(v)  # only the new rows
        kv_bsz = bsz if k is None else k.size(0) // self.num_heads
        if saved is not None:
            k, v, key_padding_mask, kv_bsz = self._with_cache(k, v, key_padding_mask, saved,
                                                              incremental_state, static_kv)
        if key_padding_mask is not None and key_padding_mask.dim() == 0:
            key_padding_mask = None
        if self.add_zero_attn:
            k, v, key_padding_mask, attn_mask = self._append_zero_attn(
                k=k, v=v, key_padding_mask=key_padding_mask, attn_mask=attn_mask)
        beam = bsz // kv_bsz  # beamable enc-dec attention: each sentence's k/v serve its beams
        if beam > 1 and key_padding_mask is not None:
            key_padding_mask = key_padding_mask.repeat_interleave(beam, dim=0)  # (B, S)
        # fairseq drops attention probabilities on its torch path (no decoding state) by the
        # attention's own flag, on its own path by its dropout module's
        drop = self.dropout_module
        dropping = ((self.training if incremental_state is None and not static_kv else drop.training)
                    or getattr(drop, "apply_during_inference", False))
        context, probs = self.core(q, k, v, self.scaling, attn_mask, key_padding_mask, self.num_heads,
                                   drop.p, kv_repeat=beam, kv_quantized=quantized_cache,
                                   out_quant=self.out_proj.input_quant,
                                   dropping=dropping, blocked_fill=blocked_fill)  # (B*H, T, D), (B*H, T, S)
        merged = merge_heads(context, self.num_heads)
        out = self.out_proj(merged, out_quant=out_quant)  # (T, B, E)
        if not need_weights:
            return out, None
        weights = probs.view(bsz, self.num_heads, tgt_len, -1).transpose(1, 0)  # (H, B, T, S)
        return out, weights if need_head_weights else weights.mean(dim=0)

    def extra_repr(self) -> str:
        kind = ("self" if self.self_attention else "encoder-decoder"
                if self.encoder_decoder_attention else "generic")
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, {kind}"

    def to_integer(self, out, *, key_is_query: bool = False) -> "IntegerFairseqAttention":
        """The integer form of a self- or encoder-decoder attention writing codes of ``out`` (the
        layer's attention-output grid): q/k/v projections onto the core's grids (k and v from
        the ``key_in`` grid for encoder-decoder attention), ``QuantAttentionCore.to_integer``, the
        out projection. Batch forward with bool masks; no incremental state, bias_kv or zero
        attention yet (issue 16). ``key_is_query``: a generic attention its caller always runs with
        key = value = query (the conformer's), integerized as self-attention."""
        from qswap.errors import IntegerizeError
        from qswap.quant.integer import Grid
        if not (self.self_attention or self.encoder_decoder_attention or key_is_query) or self.bias_k is not None \
                or self.add_zero_attn:
            raise IntegerizeError("only plain self- and encoder-decoder attention have integer forms so far "
                                  "(issue 16)")
        grid_q, core = Grid.of(self.input_quant), self.core
        grid_kv = grid_q if self.self_attention or key_is_query else Grid.of(self.key_quant)
        projections = [p.to_integer(grid, Grid.of(quant)) for p, grid, quant in
                       ((self.q_proj, grid_q, core.q_quant), (self.k_proj, grid_kv, core.k_quant),
                        (self.v_proj, grid_kv, core.v_quant))]
        integer_core = core.to_integer(self.scaling, Grid.of(self.out_proj.input_quant), head_dim=self.head_dim)
        return IntegerFairseqAttention(self.num_heads, projections, integer_core, self.out_proj.to_integer(out))


# -- integer execution (issue 16, work in progress) ----------------------------------------------------

@serializable(num_heads=INT, projections=TupleOf(*[Obj("IntegerLinear")] * 3), core=Obj("IntegerAttentionCore"),
              out_proj=Obj("IntegerLinear"))
class IntegerFairseqAttention(FairseqIncrementalState, nn.Module):
    """Attention on codes: projections, integer core, out projection (all int32 inside).
    Incremental decoding keeps the projected keys and values as codes in fairseq's
    ``incremental_state`` (``prev_key`` / ``prev_value``: (B, H, S, D) codes of the core's k/v
    grids); ``reorder_incremental_state`` selects their beams (an int64 index on the batch axis)."""

    def __init__(self, num_heads: int, projections: list, core: nn.Module, out_proj: nn.Module):
        super().__init__()
        width = projections[0].weight.shape[0]
        if not (num_heads >= 1 and width % num_heads == 0):  # made by hand, or read from an edited file
            raise IntegerizeError(f"an attention's head count divides its width {width}, got {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj = projections
        self.core, self.out_proj = core, out_proj

    @property
    def projections(self) -> tuple:
        return self.q_proj, self.k_proj, self.v_proj

    def _keys_values(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """memory (S, B, E) codes -> k, v (B, H, S, D) codes."""
        length, bsz = memory.shape[:2]
        k, v = (split_heads(p(memory), self.num_heads) for p in (self.k_proj, self.v_proj))  # (B*H, S, D)
        return k.reshape(bsz, self.num_heads, length, -1), v.reshape(bsz, self.num_heads, length, -1)

    def _cached(self, x: Tensor, memory: Optional[Tensor], incremental_state) -> tuple[Tensor, Tensor]:
        """Keys and values (B, H, S, D) with the cache: self-attention appends the new rows' codes,
        encoder-decoder attention projects ``memory`` once and reuses it."""
        saved = self.get_incremental_state(incremental_state, "attn_state")
        if memory is None:  # self-attention: append this step's keys and values
            k, v = self._keys_values(x)
            if saved is not None:
                k, v = torch.cat([saved["prev_key"], k], dim=2), torch.cat([saved["prev_value"], v], dim=2)
        elif saved is not None:  # encoder-decoder attention: the encoder's keys and values, cached
            return saved["prev_key"], saved["prev_value"]
        else:
            k, v = self._keys_values(memory)
        self.set_incremental_state(incremental_state, "attn_state", {"prev_key": k, "prev_value": v})
        return k, v

    def reorder_incremental_state(self, incremental_state, new_order: Tensor) -> None:
        """Select the cached codes' beams: ``new_order`` (B',) int64 on the batch axis."""
        saved = self.get_incremental_state(incremental_state, "attn_state")
        if saved is not None:
            self.set_incremental_state(incremental_state, "attn_state",
                                       {name: t.index_select(0, new_order) for name, t in saved.items()})

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, memory: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None, incremental_state=None) -> Tensor:
        """x: (T, B, E) query codes; memory: (S, B, E) key/value codes (None: self-attention,
        S = T); key_padding_mask: (B, S) bool, True = padding; attn_mask: (T, S) bool, True =
        blocked; incremental_state: fairseq's decoding cache (x is then this step's row, T = 1,
        and self-attention attends to every cached row). Returns (T, B, E) codes on the output grid."""
        bsz = x.shape[1]
        q = split_heads(self.q_proj(x), self.num_heads)  # (B*H, T, D)
        if incremental_state is None:
            k, v = self._keys_values(x if memory is None else memory)  # (B, H, S, D)
        else:
            k, v = self._cached(x, memory, incremental_state)
        length = k.shape[2]
        k, v = (t.reshape(bsz * self.num_heads, length, -1) for t in (k, v))  # (B*H, S, D)
        blocked = None if attn_mask is None else attn_mask.unsqueeze(0)  # (1, T, S)
        if key_padding_mask is not None:
            pad = heads_padding(key_padding_mask, self.num_heads)  # (B*H, 1, S)
            blocked = pad if blocked is None else blocked | pad  # (B*H, T or 1, S)
        context, _ = self.core(q, k, v, blocked)  # (B*H, T, D)
        return self.out_proj(merge_heads(context, self.num_heads))  # (T, B, E)
