"""The integer simulation of the fake-quant counterparts (issue 16, item 4).

Where the integer definition of an op (``qswap.quant.integer``) computes its insides differently
from float32 (softmax's exponent table and integer division, LayerNorm's integer mean, variance
and square root, GLU's gate table), the counterpart computes those insides as the integer form
does, on the codes of its quantized input, and returns the integer result's value: the integer
accumulator times its scale (LayerNorm, GLU), or the output codes dequantized (the attention's
softmax, whose output grid is the core's own).

The requantization too: where the caller knows the quantizer that reads an op's result (its
``out_quant``: a layer's linears, norms and attention, the attention's projections and both
matmuls, the subsampler's convs and GLUs), the op runs its integer form onto that reader's grid
(``onto_grid``: exact int32 accumulation, the fixed-point multiplier, ties toward +inf) and
returns those codes' values, which the reader keeps as they are. Rounding the float32 result by
``x * (1 / s)`` half to even instead flips exact ties, which scales in a simple ratio make common
on a trained model, and the layers amplify each flip (docs/integer.md). With both, the shipped
S2T transformer's fake-quant model computes the codes of its integer model bit for bit.

A recipe picks the arithmetic with its top-level key ``simulate``: ``integer`` (the default, and
what every shipped recipe and the README's and docs' fake-quant numbers use, docs/recipes.md
says which do not: the above; several times the float forward's cost, docs/integer.md) or
``float`` (the fast option: ``F.layer_norm``, ``F.softmax``, ``F.glu``, float32 matmuls and the
readers' float rounding, which a QDQ graph in onnxruntime also computes: qswap.export compares
with it). A counterpart simulates only where its integer form is defined (its input quantized
on a per-tensor grid, its weights symmetric); elsewhere it computes in float, as its integer
form would refuse to build. Grids per channel of the last axis (a per-channel residual stream:
the residual adds' operands, the LayerNorms' inputs) are simulated where the integer layers take
them: the residual adds (``add_onto``), the LayerNorm's input (put on one common grid, as the
integer LayerNorm does), a linear's requantization onto a per-channel reader, the S2T
transformer's and conformer's encoder entry and layer-to-layer streams and the decoder's entry (not
yet wav2vec 2.0's stream); such a grid's codes are read and written by its own quantizer
(``FakeQuantize.codes`` / ``values``, quantizer calls the honesty audit checks).

In training (autograd), the value is the simulated one and the gradient the float op's
(``straight_through``) where an op computes its integer insides, writes onto its reader's grid,
or adds a residual inside a layer (``add_onto``); onto a reader's grid, the gradient is that of
the float result as the reader rounds it, so a learned (LSQ) reader scale trains as under
``simulate: float``. A linear told several readers (``QLinear.onto_each``), the GroupNorm's and
folded BatchNorm's readers, an op whose reader reads it through an active dropout
(``qswap.nn.fairseq.layers.past``) and the encoders' entry and layer-to-layer streams compute in
float there, as their own readers round.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from qswap.errors import IntegerizeError, RecipeError
from qswap.quant.fake_quantize import quantizes
from qswap.quant.stamp import stamp, unchanged

SIMULATIONS = ("integer", "float")  # the first is the default


def grid_of(quant: nn.Module, frozen_only: bool = False):
    """The ``qswap.quant.integer.Grid`` of a calibrated per-tensor ``FakeQuantize`` (enabled, with
    a grid); None for anything else (an Identity: the site is float; a per-channel grid), and
    with ``frozen_only`` for a quantizer still calibrating (``reader_grid``). A learned (LSQ)
    scale in training is read as it is now: an optimizer writes it through ``.data``, which no
    stamp sees, so the kept grid could be the previous step's."""
    from qswap.quant.integer import rounds_to_nearest
    if not (quantizes(quant) and rounds_to_nearest(quant)):
        return None  # a float site, or a rounding with no integer form: the op computes in float
    if quant.spec.learnable and quant.training and torch.is_grad_enabled():
        # not frozen_grid(): it would stamp the grid that the optimizer then writes through .data,
        # and the next inference call would take that stale grid as current
        frozen, kept = bool(quant.frozen), None
    else:
        frozen, kept = quant.frozen_grid()  # a PassGrid of Python numbers kept while frozen: no read per call
    if frozen_only and not frozen:
        return None
    if kept is not None:  # frozen, per tensor: the Grid is kept beside it, made once per PassGrid
        hit = quant.__dict__.get("_simulated_grid")
        if hit is not None and hit[0] is kept:
            return hit[1]
        grid = _grid(kept.scale, kept.zero_point, quant.spec)
        quant.__dict__["_simulated_grid"] = (kept, grid)
        return grid
    if not (quant.initialized and quant.scale.numel() == 1 and quant.spec.granularity == "per_tensor"):
        return None
    return _grid(float(quant.scale.detach()), int(quant.zero_point), quant.spec)


def _grid(scale: float, zero_point: int, spec) -> "Grid | None":
    """The integer ``Grid`` of a per-tensor quantizer, or None (the op then runs in float, as for a
    reader's scale trained below 0) where its scale is not a finite number above 0: a learned scale
    loaded below 0 after ``eval()`` had raised out of the fake-quant forward."""
    from qswap.quant.integer import Grid

    if not (math.isfinite(scale) and scale > 0):
        return None
    return Grid(scale, zero_point, spec.qmin, spec.qmax)


def stream_grid_of(quant: nn.Module, frozen_only: bool = False):
    """``grid_of(quant)``, and for a quantizer per channel of the last axis (a residual-stream
    site, a LayerNorm's input: ``qswap.quant.integer.stream_grid``) its ``ChannelGrid``: for the
    ops whose integer forms take one (the
    residual add, the LayerNorm's input, a linear's output requantization, the stream's
    requantization onto a reader). None where ``grid_of`` gives None and the grid is not one
    per channel of the last axis. The ``ChannelGrid`` is read from the quantizer's buffers on each
    call, in the data path: the honesty audit sees its tensors made from them (a copy kept from
    an earlier call would be a tensor of unseen origin)."""
    grid = grid_of(quant, frozen_only)
    if grid is not None or not (quantizes(quant) and quant.initialized):
        return grid
    from qswap.quant.integer import rounds_to_nearest, stream_grid
    spec = quant.spec
    if spec.granularity != "per_channel" or spec.axis != -1 or quant.scale.numel() < 2 or not rounds_to_nearest(quant):
        return None
    if frozen_only and not bool(quant.frozen):
        return None
    return stream_grid(quant)


def channel_codes(quant: nn.Module, x: torch.Tensor, grid) -> torch.Tensor:
    """The int32 codes of ``x``, a value of ``quant``'s ``grid`` (``grid_of`` or
    ``stream_grid_of``): ``codes_of`` per tensor; per channel ``quant.codes(x)``, the quantizer's
    own reading, which the honesty audit sees as a quantizer call (its per-channel scales are
    tensors, not the numbers a per-tensor grid's arithmetic takes)."""
    from qswap.quant.integer import ChannelGrid
    return quant.codes(x) if isinstance(grid, ChannelGrid) else codes_of(x, grid)


def values_onto(quant: nn.Module, requant, acc: torch.Tensor, grid, axis: int = -1) -> torch.Tensor:
    """``requant(acc)``'s codes as values of ``quant``'s ``grid`` (``requant`` writes onto it):
    ``requantized_values`` per tensor; per channel the codes and then ``quant.values(codes)``, the
    quantizer's own dequantization (a quantizer call, as ``channel_codes``)."""
    from qswap.quant.integer import ChannelGrid, requantized_values
    if isinstance(grid, ChannelGrid):
        return quant.values(requant(acc.to(torch.int32) if acc.is_floating_point() else acc, axis))
    return requantized_values(requant, acc, grid.scale, axis)


def stream_to(scale: float | torch.Tensor, quant) -> "Requant":
    """The requantization of an int32 residual stream on grid ``scale`` (a float, or a (C,) tensor
    per channel of the last axis) onto ``quant``'s grid (or onto a ``Grid`` / ``ChannelGrid``;
    a quantizer per channel of the last axis gives per-channel multipliers and zero points)."""
    from qswap.quant.integer import ChannelGrid, Grid, Requant, stream_grid
    grid = quant if isinstance(quant, (Grid, ChannelGrid)) else stream_grid(quant)
    return Requant.from_scales(scale / grid.scale, grid.zero_point, grid.qmin, grid.qmax)


def requants_to(scale: float | torch.Tensor, grids) -> list | None:
    """``stream_to(scale, g)`` for each of ``grids`` (an int32 result on grid ``scale`` that several
    readers requantize), or None where one of them has no integer form (``form_or_none``)."""
    return form_or_none(lambda: [stream_to(scale, g) for g in grids])


def reader_grid(quant: nn.Module):
    """``grid_of(quant)`` for the quantizer that reads an op's result, where that op would write
    its codes onto the reader's grid (``onto_grid``): only once the reader is frozen. While it
    calibrates, the reader must observe the op's own result, not one already clamped onto the
    grid of its earlier batches (its range could then never grow). The op then computes without
    writing onto the reader's grid (its integer insides, where it has them, still run: the
    LayerNorm's and GLU's accumulators) and the reader observes and rounds the result."""
    return grid_of(quant, frozen_only=True)


def row_isqrt(n: torch.Tensor) -> torch.Tensor:
    """``floor(sqrt(n))`` of int64 values in [0, 2^62], exactly (Python's ``math.isqrt`` on each
    value): ``qswap.quant.integer.isqrt``'s result in two ops instead of its Newton loop, for the
    few values a LayerNorm takes (one per row)."""
    from qswap.quant.integer import ISQRT_MAX
    values = n.flatten().tolist()
    if values and (min(values) < 0 or max(values) > ISQRT_MAX):
        raise IntegerizeError(f"isqrt takes values in [0, 2^62], got [{min(values)}, {max(values)}]")
    with torch._C._DisableTorchDispatch():  # noqa: SLF001  (Python integer arithmetic: declared below)
        roots = torch.tensor([math.isqrt(v) for v in values], dtype=torch.int64, device=n.device).view(n.shape)
    _declare(roots, derived_from=(n,))
    return roots


def codes_of(xq: torch.Tensor, grid) -> torch.Tensor:
    """The int32 codes of ``xq``, a tensor its quantizer put on ``grid`` (``(code - zp) * scale``
    in float32): exact, the float32 error of the product is far below half a step."""
    return torch.round(xq.detach() * _inverse(grid.scale)).to(torch.int32) + grid.zero_point


def centered_codes(xq: torch.Tensor, grid) -> torch.Tensor:
    """``codes_of(xq, grid) - grid.zero_point`` as float32 integers (rounded, which the honesty
    audit marks integral): the operand of an exact float GEMM (``qswap.quant.integer.exact_gemm``,
    ``IntegerLinear.simulated``) standing for the integer model's int32 GEMM."""
    return torch.round(xq.detach() * _inverse(grid.scale))


@functools.lru_cache(maxsize=4096)
def _inverse(scale: float) -> float:
    """``1 / scale`` computed in float32, as the fake-quant rounding computes it (a constant)."""
    return _constant_fold(lambda: float(1.0 / torch.tensor(scale, dtype=torch.float32)))


def dequantized(codes: torch.Tensor, grid) -> torch.Tensor:
    """The float32 values of output ``codes`` of ``grid`` (the honesty audit reads them as an
    integer kernel's output, which the grid's own quantizer then takes)."""
    return (codes.to(torch.int32) - grid.zero_point).to(torch.float32) * grid.scale


def value_of(acc: torch.Tensor, scale, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``acc * scale`` of an integer accumulator on the grid ``scale`` (a float, or a tensor
    broadcasting over ``acc``'s last axis), formed in float64 and rounded once to ``dtype``."""
    scale = scale.to(acc.device) if isinstance(scale, torch.Tensor) else scale
    return (acc.to(torch.float64) * scale).to(dtype)


def straight_through(value: torch.Tensor, differentiable: torch.Tensor, reader: nn.Module | None = None) -> torch.Tensor:
    """``value`` forward, the gradient of ``differentiable`` (the float op on the same quantized
    operands); ``value`` itself when there is no gradient to carry. ``reader``: the quantizer whose
    grid ``value`` was written onto (an op's integer form requantizing onto its consumer's grid):
    the gradient is then that of ``reader(differentiable)``, the float result as the reader rounds
    it, which is what reaches a learned (LSQ) reader scale under ``simulate: float``. The reader's
    own call on ``value`` gives its scale none: ``value`` is on its grid, where the rounding error
    whose derivative LSQ trains on is zero."""
    if reader is not None and torch.is_grad_enabled() and (differentiable.requires_grad or learns(reader)):
        differentiable = reader(differentiable)
    if not differentiable.requires_grad:
        return value
    return differentiable + (value - differentiable).detach()


def learns(quant: nn.Module) -> bool:
    """Whether ``quant`` has a parameter being trained (a learned scale)."""
    return any(p.requires_grad for p in quant.parameters(recurse=False))


def carries_grad(reader: nn.Module | None, *inputs: torch.Tensor) -> bool:
    """Whether a simulated op of ``inputs`` (its only differentiable operands) needs its float
    result for the gradient (``straight_through``): autograd is on and an input requires grad, or
    ``reader`` learns its scale. Grad mode alone is not enough: a model whose parameters are
    frozen, run without ``torch.no_grad()``, keeps the simulated value alone."""
    return torch.is_grad_enabled() and (any(t.requires_grad for t in inputs)
                                        or (reader is not None and learns(reader)))


def _constant_fold(build):
    """``build()`` (integer tables and multipliers from scales and weights only: constant folding,
    done once before execution) outside any torch dispatch mode: the honesty audit watches the
    data path, which then reads the tables as integer constants."""
    with torch.no_grad(), torch._C._DisableTorchDispatch():  # noqa: SLF001
        value = build()
    _declare(value, source=build)
    return value


def _declare(value, source=None, derived_from: tuple = ()):
    """Tell the honesty audit, if one is running (its dispatch mode's ``declare_integers``), where
    the integer tensors in ``value`` come from, which qswap made outside its view: a constant
    folded by ``source`` (``_constant_fold``), or exact integer arithmetic on ``derived_from``
    (``row_isqrt``). It reports any other integer tensor it never saw made where that enters
    float data."""
    declare = getattr(_get_current_dispatch_mode(), "declare_integers", None)
    if declare is not None:
        declare(value, source, derived_from)


def cached(owner: nn.Module, slot: str, build, *sources: torch.Tensor):
    """``build()``, kept in ``owner.<slot>`` with a stamp of ``sources`` (the grids' scales and
    the weights it was built from) and rebuilt when one of them changes (``qswap.quant.stamp``).
    Not kept under autograd (a training step may write the sources through ``.data``)."""
    if torch.is_grad_enabled():
        owner.__dict__.pop(slot, None)
        return _constant_fold(build)
    kept = owner.__dict__.get(slot)
    if kept is not None and unchanged(kept[1], *sources):
        _declare(kept[0], source=build)  # it may have been built before the audit began
        return kept[0]
    value = _constant_fold(build)
    owner.__dict__[slot] = (value, stamp(*sources))
    return value


def cached_entry(owner: nn.Module, build, *sources: torch.Tensor):
    """``cached(owner, "_integer_entry", build, *sources)`` for a model's entry stream, whose
    ``build`` returns (``owner.embed_scale`` as it read it, the form): ``embed_scale`` is a plain
    attribute, which no stamp sees change, so the form is rebuilt when it differs."""
    embed_scale, built = cached(owner, "_integer_entry", build, *sources)
    if embed_scale != owner.embed_scale:
        owner.__dict__.pop("_integer_entry")
        embed_scale, built = cached(owner, "_integer_entry", build, *sources)
    return built


def forget(owner: nn.Module, *slots: str) -> bool:
    """Whether autograd is on; if so, drop ``owner``'s kept forms ``slots`` (``cached``): a
    training step may write their sources through ``.data``, which no stamp sees, so a form kept
    across it could be stale. For the paths that skip their integer form under autograd, and so
    never reach ``cached`` there."""
    if not torch.is_grad_enabled():
        return False
    for slot in slots:
        owner.__dict__.pop(slot, None)
    return True


def drop_kept_forms(owner: nn.Module) -> None:
    """Drop every integer form ``owner`` keeps (``cached``): its ``_integer*`` attributes."""
    for slot in [slot for slot in vars(owner) if slot.startswith("_integer")]:
        del owner.__dict__[slot]


def forget_all(owner: nn.Module) -> bool:
    """``forget`` of every form ``owner`` keeps (``drop_kept_forms``), for a module whose training
    call may take a path that reaches none of them (a reader still calibrating, ``simulate:
    float``): the forms kept before it must not outlive the step's writes through ``.data``,
    whichever path the step took. ``QuantModule.train`` drops them too, on entering training mode."""
    if not torch.is_grad_enabled():
        return False
    drop_kept_forms(owner)
    return True


def form_or_none(to_integer, *args):
    """``to_integer(*args)``, a module's integer form, or None where it has none (e.g. a
    convolution's per-group weights): its simulation then computes in float, as without
    ``simulate: integer``."""
    try:
        return to_integer(*args)
    except IntegerizeError:
        return None


def onto_grid(owner: nn.Module, slot: str, build, out_quant: nn.Module, run, *sources: torch.Tensor,
              channels: bool = False):
    """An op's integer form writing codes onto ``out_quant``'s grid (its consumer's), as values of
    that grid, which ``out_quant`` then keeps as they are: ``build(grid_out)`` makes the form
    (kept in ``owner.<slot>`` while the output grid and ``sources`` are unchanged) and
    ``run(form, grid_out)`` runs it on the op's input codes and returns the output codes, or their
    values as a float tensor (``qswap.quant.integer.requantized_values``, which skips forming the
    codes) (``build`` may return None or raise ``IntegerizeError``, e.g. for a learned scale trained
    below 0: no integer form, the op in float). So the simulation requantizes the exact integer accumulator with the form's fixed-point
    multiplier and rounding, instead of rounding the float32 result by ``x * (1 / s)``. None where
    ``owner`` does not simulate integers or ``out_quant`` has no per-tensor grid (``channels``: nor
    one per channel of the last axis, ``stream_grid_of``, for a form whose requantization writes
    per channel of that axis: a linear's)."""
    if not simulates(owner):
        return None
    grid_out = stream_grid_of(out_quant, frozen_only=True) if channels else reader_grid(out_quant)
    if grid_out is None:
        return None
    # a form the scales do not admit (a learned scale trained below 0): None, the op in float
    form = cached(owner, slot, lambda: form_or_none(build, grid_out), out_quant.scale, out_quant.zero_point, *sources)
    if form is None:
        return None
    with torch.no_grad():
        out = run(form, grid_out)
        if out.is_floating_point():
            return out
        return dequantized(out, grid_out) if isinstance(grid_out.scale, float) else out_quant.values(out)


def add_onto(owner: nn.Module, slot: str, a: torch.Tensor, quant_a: nn.Module, b: torch.Tensor,
             quant_b: nn.Module, readers, weight_a: float = 1.0) -> list | None:
    """``weight_a * a + b`` (``a``, ``b``: values of ``quant_a``'s and ``quant_b``'s grids) as each of
    ``readers`` (quantizers) reads it, computed as the integer layer's residual add does: the
    operands' codes rescaled into an int32 stream (``rescaled_sum``; ``weight_a`` folded into its
    multiplier, e.g. the conformer's half-step 0.5), requantized onto each reader's grid in fixed
    point; the form kept in ``owner.<slot>``. None where that is not simulated: ``owner`` without
    ``simulate: integer``, no readers, or a grid that is not per tensor (a reader still
    calibrating: ``reader_grid``); the caller then adds in float and each reader rounds.
    Per channel of the last axis (operands and readers: ``stream_grid_of``), the same arithmetic
    in each channel, as the integer layer's per-channel stream. In training (autograd) each value
    carries the gradient of the float sum as its reader rounds it (``straight_through``), so the
    forward is the integer layer's and learned scales train as under ``simulate: float``."""
    if not (readers and simulates(owner)):
        return None
    from qswap.quant.integer import AddParams, add_input_bits, rescaled_sum
    quants = (quant_a, quant_b, *readers)
    grids = [None if q is None else stream_grid_of(q, frozen_only=i >= 2) for i, q in enumerate(quants)]
    if None in grids:
        return None

    def build():  # None where the scales have no integer form (e.g. a learned scale trained below 0)
        def make():
            add = AddParams.build(weight_a * grids[0].scale, grids[1].scale, input_bits=add_input_bits(*grids[:2]))
            return add, [stream_to(add.sum_scale, g) for g in grids[2:]]
        return form_or_none(make)
    built = cached(owner, slot, build, *(q.scale for q in quants), *(q.zero_point for q in quants))
    if built is None:
        return None
    add, requants = built
    with torch.no_grad():
        stream = rescaled_sum(channel_codes(quant_a, a, grids[0]), grids[0].zero_point,
                              channel_codes(quant_b, b, grids[1]), grids[1].zero_point, add)  # int32 on add.sum_scale
        values = [values_onto(q, requant, stream, g) for q, requant, g in zip(readers, requants, grids[2:])]
    if not torch.is_grad_enabled():
        return values
    total = a * weight_a + b if weight_a != 1.0 else a + b
    return [straight_through(v, total, q) for v, q in zip(values, readers)]


# -- integer execution (issue 16, work in progress) ----------------------------------------------------


def simulates(owner: nn.Module) -> bool:
    """Whether ``owner`` (a counterpart built from a recipe) computes the integer insides."""
    return getattr(owner, "simulate", SIMULATIONS[0]) == "integer"


@contextlib.contextmanager
def simulating(model: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Run ``model``'s counterparts with the ``simulate`` arithmetic ``mode`` inside the block
    (each one's own setting restored after it), e.g. to compare with a float-kernel runtime:

    >>> with simulating(qmodel, "float"):
    ...     reference = qmodel(x)
    """
    if mode not in SIMULATIONS:
        raise RecipeError(f"must be one of {', '.join(SIMULATIONS)}, got {mode!r}", key="simulate")
    owners = [m for m in model.modules() if hasattr(m, "simulate")]
    saved = [m.simulate for m in owners]
    try:
        for m in owners:
            m.simulate = mode
        yield model
    finally:
        for m, old in zip(owners, saved):
            m.simulate = old
