"""The op classification table: every aten op the honesty audit knows, as data.

An op is looked up by its overload-packet name (``aten.addmm.default`` -> ``addmm``); an in-place
variant (``add_``) has the rule of its out-of-place op. An op that involves a floating-point
tensor and has no row here, or any op outside the ``aten`` namespace (a custom op), is a
finding ("unclassified"), never assumed fine.

=================  ===========================================================================
class              what the audit does with it
=================  ===========================================================================
compute            arithmetic on values: every float operand must be quantized (on its grid)
grid_preserving    compute that maps quantized values to values of the same grid (relu,
                   max-pool, max): quantized in, quantized out
movement           moves or copies values (view, cat, gather, pad, masked_fill...): the output
                   carries its inputs' quantized status
fused              a fused kernel with unquantized intermediates inside (SDPA, native MHA,
                   matmul+activation epilogues): always a finding
predicate          float in, bool/int out (comparisons, argmax): no finding of its own; the
                   result of an unquantized operand carries its float tag (tracker._predicate)
factory            makes a constant tensor (zeros, arange, randn, fill_): a constant, honest
                   only once it passes a quantizer before data-path compute
meta               reads a scalar or metadata (``.item()``, sizes): ignored
=================  ===========================================================================

``family`` groups compute ops for reports and for ``float_ok`` keys (``family:softmax``,
``family:norm``...);
``matmul`` and ``conv`` outputs are accumulators (their consumer must quantize them).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

COMPUTE, GRID, MOVEMENT, FUSED = "compute", "grid_preserving", "movement", "fused"
PREDICATE, FACTORY, META = "predicate", "factory", "meta"
CLASSES = (COMPUTE, GRID, MOVEMENT, FUSED, PREDICATE, FACTORY, META)
ACCUMULATING = ("matmul", "conv")  # families whose outputs are int32-style accumulators


class OpRule(NamedTuple):
    cls: str
    family: str


def _rows(cls: str, family: str, names: str) -> dict[str, OpRule]:
    return {name: OpRule(cls, family) for name in names.split()}


OPS: dict[str, OpRule] = {
    # -- compute -----------------------------------------------------------------------------
    **_rows(COMPUTE, "matmul", """mm bmm addmm addmv mv addbmm baddbmm matmul linear dot vdot
        einsum tensordot outer ger inner kron chain_matmul _int_mm bilinear _trilinear
        _weight_int8pack_mm"""),
    **_rows(COMPUTE, "conv", """convolution _convolution conv1d conv2d conv3d conv_tbc
        conv_transpose1d conv_transpose2d conv_transpose3d _convolution_mode mkldnn_convolution
        _slow_conv2d_forward slow_conv_dilated2d slow_conv_dilated3d slow_conv3d_forward
        thnn_conv2d _nnpack_spatial_convolution _conv_depthwise2d slow_conv_transpose2d
        slow_conv_transpose3d cudnn_convolution miopen_convolution"""),
    **_rows(COMPUTE, "add", "add sub rsub addcmul addcdiv lerp index_add scatter_add"),
    **_rows(COMPUTE, "mul", "mul multiply square"),
    **_rows(COMPUTE, "div", "div true_divide floor_divide remainder fmod reciprocal"),
    **_rows(COMPUTE, "elementwise", """neg negative abs sign sgn copysign hypot clamp clip
        clamp_min clamp_max round floor ceil trunc frac xlogy hardtanh threshold nan_to_num"""),
    **_rows(COMPUTE, "nonlinear", """exp exp2 expm1 log log2 log10 log1p sqrt rsqrt pow
        float_power tanh sigmoid gelu silu glu elu selu celu mish softplus softshrink
        hardshrink hardswish hardsigmoid leaky_relu rrelu prelu _prelu_kernel log_sigmoid
        log_sigmoid_forward logit sin cos tan asin acos atan atan2 sinh cosh asinh acosh atanh
        erf erfc erfinv relu6 sinc"""),
    **_rows(COMPUTE, "softmax", "_softmax softmax _safe_softmax _masked_softmax logsumexp"),
    **_rows(COMPUTE, "log_softmax", "_log_softmax log_softmax"),
    **_rows(COMPUTE, "norm", """native_layer_norm layer_norm native_group_norm group_norm
        native_batch_norm _native_batch_norm_legit _native_batch_norm_legit_no_training
        batch_norm _batch_norm_impl_index instance_norm rms_norm _fused_rms_norm norm
        linalg_vector_norm frobenius_norm renorm _weight_norm _weight_norm_interface
        cudnn_batch_norm miopen_batch_norm _batch_norm_with_update _batch_norm_no_update
        local_response_norm"""),
    **_rows(COMPUTE, "reduction", """sum mean var std var_mean std_mean prod cumsum cumprod
        nansum nanmean logcumsumexp scatter_reduce index_reduce avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d
        adaptive_avg_pool2d adaptive_avg_pool3d _adaptive_avg_pool2d _adaptive_avg_pool3d
        embedding_bag _embedding_bag _embedding_bag_forward_only col2im
        upsample_linear1d upsample_bilinear2d upsample_bicubic2d upsample_trilinear3d
        _upsample_bilinear2d_aa grid_sampler_2d"""),
    **_rows(COMPUTE, "random", "native_dropout dropout feature_dropout alpha_dropout"),
    # -- grid-preserving: quantized in, quantized out ------------------------------------------
    **_rows(GRID, "max", """relu max min amax amin aminmax maximum minimum fmax fmin cummax
        cummin max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices
        max_pool3d_with_indices adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d
        sort msort topk kthvalue median nanmedian mode"""),
    # -- movement ----------------------------------------------------------------------------
    **_rows(MOVEMENT, "view", """view _unsafe_view reshape _reshape_alias as_strided transpose
        t permute contiguous expand expand_as squeeze unsqueeze flatten unflatten movedim
        moveaxis swapaxes swapdims diagonal alias detach view_as narrow unfold
        view_as_real view_as_complex _reshape_copy view_copy transpose_copy t_copy
        permute_copy expand_copy squeeze_copy unsqueeze_copy as_strided_copy alias_copy
        detach_copy diagonal_copy narrow_copy unfold_copy slice_copy select_copy split_copy
        split_with_sizes_copy unbind_copy _unsafe_index _unsafe_view_copy"""),
    **_rows(MOVEMENT, "copy", "clone copy copy_ _to_copy to _copy_from _copy_from_and_resize lift"),
    **_rows(MOVEMENT, "select", """slice select index_select index gather take take_along_dim
        masked_select split split_with_sizes chunk unbind tensor_split embedding diag_embed
        diag triu tril flip roll rot90 repeat tile repeat_interleave pixel_shuffle
        pixel_unshuffle channel_shuffle im2col upsample_nearest1d upsample_nearest2d
        upsample_nearest3d _upsample_nearest_exact1d _upsample_nearest_exact2d"""),
    **_rows(MOVEMENT, "join", "cat concat concatenate stack hstack vstack dstack _cat"),
    **_rows(MOVEMENT, "pad", """pad constant_pad_nd reflection_pad1d reflection_pad2d
        reflection_pad3d replication_pad1d replication_pad2d replication_pad3d _pad_circular
        _pad_enum"""),
    **_rows(MOVEMENT, "scatter", """masked_fill where index_put _index_put_impl index_copy
        index_fill scatter slice_scatter select_scatter diagonal_scatter masked_scatter
        fill_diagonal put"""),
    # -- fused kernels: unquantized intermediates inside ------------------------------------------
    **_rows(FUSED, "attention", """_scaled_dot_product_flash_attention_for_cpu
        _scaled_dot_product_flash_attention _scaled_dot_product_efficient_attention
        _scaled_dot_product_cudnn_attention _scaled_dot_product_fused_attention_overrideable
        _flash_attention_forward _efficient_attention_forward scaled_dot_product_attention
        _scaled_dot_product_attention_math _scaled_dot_product_attention_math_for_mps
        _native_multi_head_attention _transform_bias_rescale_qkv _transformer_encoder_layer_fwd
        _triton_multi_head_attention _triton_scaled_dot_attention"""),
    **_rows(FUSED, "fused", """_addmm_activation lstm gru rnn_tanh rnn_relu lstm_cell gru_cell
        rnn_tanh_cell rnn_relu_cell _thnn_fused_lstm_cell _thnn_fused_gru_cell mkldnn_rnn_layer
        _cudnn_rnn miopen_rnn"""),
    # -- ignored: bool/int outputs, metadata ---------------------------------------------------
    **_rows(PREDICATE, "predicate", """eq ne lt le gt ge greater less greater_equal less_equal
        not_equal isnan isinf isneginf isposinf isfinite isreal signbit logical_and logical_or
        logical_not logical_xor any all argmax argmin argsort nonzero nonzero_static equal
        allclose isclose is_nonzero bucketize searchsorted histc count_nonzero _fused_sdp_choice
        _chunk_grad_outputs_efficient_attention"""),
    **_rows(META, "meta", """_local_scalar_dense item is_same_size sym_size sym_stride
        sym_numel sym_storage_offset _assert_async _assert_tensor_metadata
        _functional_assert_async sym_constrain_range _assert_scalar record_stream
        _has_compatible_shallow_copy_type is_coalesced _nested_tensor_from_mask_left_aligned
        resize _resize_output set _version"""),
    # -- factories: constants ------------------------------------------------------------------
    **_rows(FACTORY, "factory", """empty empty_like empty_strided new_empty new_empty_strided
        zeros zeros_like new_zeros ones ones_like new_ones full full_like new_full fill zero
        arange linspace logspace eye scalar_tensor lift_fresh lift_fresh_copy tensor
        rand rand_like randn randn_like randint randint_like randperm normal bernoulli uniform
        exponential geometric cauchy log_normal random multinomial poisson binomial"""),
}

FAMILIES = frozenset(rule.family for rule in OPS.values())  # what ``family:NAME`` keys may name

_ADD, _MUL, _MEAN, _EXTREME = (OpRule(COMPUTE, "add"), OpRule(COMPUTE, "mul"),
                               OpRule(COMPUTE, "reduction"), OpRule(GRID, "max"))
# Ops whose meaning depends on an argument: op -> (argument name, {argument value: rule}). An
# accumulating index_put adds, a scatter with ``reduce`` computes; a value not listed keeps the
# row of ``OPS``. ``include_self`` needs no row of its own: with amax/amin it adds ``self``'s
# values to the comparison, and the grid rule (``GRID_RULES``) already asks that every input
# share one grid.
ARGUMENT_RULES: dict[str, tuple[str, dict]] = {
    "index_put": ("accumulate", {True: _ADD}),
    "_index_put_impl": ("accumulate", {True: _ADD}),
    "put": ("accumulate", {True: _ADD}),
    "scatter": ("reduce", {"add": _ADD, "multiply": _MUL}),
    "scatter_reduce": ("reduce", {"sum": _ADD, "prod": _MUL, "mean": _MEAN, "amax": _EXTREME,
                                  "amin": _EXTREME}),
    "index_reduce": ("reduce", {"prod": _MUL, "mean": _MEAN, "amax": _EXTREME, "amin": _EXTREME}),
}
# Factories that may read the values (not only the shape) of a tensor argument (``value_arguments``):
# an overload given such a tensor computes its output from data (a Bernoulli mask drawn from
# probabilities, ``linspace`` between two tensors, ``normal(mean, 0, out=)``), so it is compute, of
# this family. ``fill`` / ``zero`` are not: what they write is read by the tracker (``_factory``).
RANDOM_FACTORIES = frozenset("""rand rand_like randn randn_like randint randint_like randperm normal
    bernoulli uniform exponential geometric cauchy log_normal random multinomial poisson binomial""".split())
_SHAPE_ONLY_FACTORIES = frozenset({"fill", "zero"})
# Factories whose ``self`` holds the values they draw from (probabilities, rates), by overload (None:
# every one); elsewhere a factory's ``self`` gives only a shape (``bernoulli(self, p=0.5)``)
_SELF_READ: dict[str, frozenset | None] = {"bernoulli": frozenset({"default", "out"}), "multinomial": None,
                                           "poisson": None}


@functools.lru_cache(maxsize=None)
def value_arguments(func) -> tuple[str, ...]:
    """The schema arguments of a factory op whose values its output is made from: every Tensor
    argument but the ones it writes (``out``, an in-place op's ``self``) and a ``self`` that gives
    only a shape (``rand_like``, ``new_zeros``, ``bernoulli(self, p=0.5)``; ``_SELF_READ`` lists the
    overloads that draw from ``self``'s values). Read from the op's schema, so that every overload
    (``normal.Tensor_float_out``, ``linspace.Tensor_Tensor``) is covered."""
    name = op_name(func)
    if name in _SHAPE_ONLY_FACTORIES or name in LIFTS:
        return ()
    overloads = _SELF_READ.get(name, frozenset())
    self_read = name in _SELF_READ and (overloads is None or func._overloadname in overloads)
    read = []
    for a in func._schema.arguments:
        if "Tensor" not in str(a.type):
            continue
        if (a.alias_info is not None and a.alias_info.is_write) or a.name == "out" or (a.name == "self" and not self_read):
            continue
        read.append(a.name)
    return tuple(read)

# How a quantized input's grid reaches an op's output (issue 20, item 2). An op not listed:
# a movement op or a grid-preserving compute op keeps the grid only if all its quantized inputs
# share one ("common"); any other compute op leaves its output off every grid.
#
# ==========  ==================================================================================
# rule        the output is on a grid when
# ==========  ==================================================================================
# common      all quantized data inputs are on one grid (the same quantizer, or equal per-tensor
#             scale, zero point and range): ``maximum``, ``minimum``, ``where``, ``cat`` of two
#             different grids keep none
# fill        ``common``, and every value it writes (a scalar or 0-d tensor) is on that grid:
#             zero, a code of the grid, or +-inf (a masked entry, which an integer kernel marks
#             apart); ``masked_fill`` with 0.5 off a grid of step 1 keeps none
# bounds      its one quantized input's grid, if the clamp bounds are on it (a clamp to grid
#             points); otherwise none
# mask        (``mul``) its one quantized input's grid, if the other operand is proven 0/1 (a
#             bool mask cast to float) or zero; a Python-number factor rescales the grid
# ==========  ==================================================================================
COMMON, FILL, BOUNDS, MASK = "common", "fill", "bounds", "mask"
GRID_RULES: dict[str, str] = {
    **{name: FILL for name in """masked_fill index_fill fill_diagonal where constant_pad_nd
       index_put _index_put_impl put scatter""".split()},
    **{name: BOUNDS for name in "clamp clip clamp_min clamp_max hardtanh".split()},
    "mul": MASK,
}


def grid_rule(name: str, rule: OpRule) -> str | None:
    """The row of ``GRID_RULES`` for an op, or the default of its class (None: no grid). A fill row
    is the op's as data movement: where its arguments make it compute (``index_put`` / ``put`` with
    ``accumulate=True``, ``scatter`` with ``reduce=``: ``ARGUMENT_RULES``) its sums and products
    keep no grid (they had kept the input's, 8-bit data that reached code 212)."""
    hit = GRID_RULES.get(name)
    if hit is not None:
        return None if hit == FILL and rule.cls == COMPUTE else hit
    return COMMON if rule.cls in (MOVEMENT, GRID) else None


def schema_arg(func, name: str):
    """The schema argument ``name`` of an op (None: no such argument)."""
    return next((a for a in func._schema.arguments if a.name == name), None)


def argument(func, args, kwargs, name: str, default=None):
    """The value an op got for schema argument ``name`` (positional or keyword)."""
    if name in kwargs:
        return kwargs[name]
    for i, a in enumerate(func._schema.arguments):
        if a.name == name:
            return args[i] if i < len(args) and not a.kwarg_only else default
    return default


def refines(func, name: str, rule: OpRule | None) -> bool:
    """Whether an op's arguments may change its rule (``refine`` reads them at each call)."""
    return name in ARGUMENT_RULES or (rule is not None and rule.cls == FACTORY and bool(value_arguments(func)))


def refine(func, name: str, rule: OpRule, args, kwargs) -> OpRule:
    """The rule of this call of an op, read from its arguments (``ARGUMENT_RULES``,
    ``value_arguments``)."""
    hit = ARGUMENT_RULES.get(name)
    if hit is not None:
        value = argument(func, args, kwargs, hit[0])
        return hit[1].get(value, rule) if isinstance(value, (bool, str)) else rule
    if rule.cls == FACTORY:
        for arg in value_arguments(func):
            if isinstance(argument(func, args, kwargs, arg), torch.Tensor):
                return OpRule(COMPUTE, "random" if name in RANDOM_FACTORIES else "factory")
    return rule


# Views that address their input's storage rather than the input itself (a size, strides and a
# storage offset): their output keeps the input's tag only where it reads elements of the input
# (``tracker._within_footprint``); elsewhere it reads storage the input's tag says nothing about.
STORAGE_VIEWS = frozenset({"as_strided", "as_strided_copy"})

# Ops whose every output value is an integer (``round`` without ``decimals``): their output on
# codes is codes again (the ``integral`` mark of ``qswap.honesty.tags``).
ROUNDINGS = frozenset({"round", "floor", "ceil", "trunc"})

# GEMM-family ops the integer-GEMM rule covers (``qswap.honesty.gemm``): op -> (the two
# multiplied arguments, the added argument or None), by schema name. Each output sums at most
# ``fan_in`` products of the two (the last axis of the first; a convolution's weight[0].numel())
# plus one term of the added one; ``alpha``/``beta`` other than 1 and transposed convolutions
# are not covered.
INTEGER_GEMMS: dict[str, tuple[str, str, str | None]] = {
    "mm": ("self", "mat2", None), "bmm": ("self", "mat2", None), "addmm": ("mat1", "mat2", "self"),
    "baddbmm": ("batch1", "batch2", "self"), "linear": ("input", "weight", "bias"),
    "convolution": ("input", "weight", "bias"), "_convolution": ("input", "weight", "bias"),
    "conv1d": ("input", "weight", "bias"), "conv2d": ("input", "weight", "bias"),
}


# Factories that wrap a tensor made outside dispatch (``torch.tensor(data)``,
# ``torch.from_numpy``): whatever computed the data is unseen, so the output is an unseen origin;
# a 0-d one is a Python number (``x[mask] = 0``), a constant whose value the audit reads.
LIFTS = frozenset({"lift_fresh", "lift_fresh_copy"})
# Factories whose output is all zeros: zero lies on every grid (code zero_point).
ZERO_FACTORIES = frozenset({"zeros", "zeros_like", "new_zeros", "zero"})
# Factories that fill with a value given as their last positional argument.
FILL_FACTORIES = frozenset({"full", "full_like", "new_full", "fill", "scalar_tensor"})


def op_name(func) -> str:
    """The table key of an OpOverload: ``aten.add_.Tensor`` -> ``add``."""
    name = func.overloadpacket.__name__
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]
    return name


def lookup(func) -> OpRule | None:
    """The rule of an aten op; None for an op of any other namespace (custom ops)."""
    return OPS.get(op_name(func)) if func.namespace == "aten" else None


def is_inplace(func) -> bool:
    name = func.overloadpacket.__name__
    return name.endswith("_") and not name.endswith("__")


def aliases(op: str) -> set[str]:
    """Names a ``float_ok`` key may use for an op: ``_softmax`` -> {_softmax, softmax,
    aten._softmax}. Its family is not one of them: a family is keyed ``family:NAME``
    (``family``)."""
    base = op.removeprefix("aten.").split(".")[0]
    return {op, base, base.lstrip("_"), f"aten.{base}"}


def family(op: str) -> str | None:
    """The family of an aten op (``aten.addmm`` -> ``matmul``), which a ``float_ok`` key names as
    ``family:matmul``; None for an op with no row (a custom op)."""
    if not op.startswith("aten."):
        return None
    rule = OPS.get(op.removeprefix("aten.").split(".")[0])
    return None if rule is None else rule.family


def class_counts() -> dict[str, int]:
    """How many ops each class has (the docs quote these numbers)."""
    counts = {c: 0 for c in CLASSES}
    for rule in OPS.values():
        counts[rule.cls] += 1
    return counts
