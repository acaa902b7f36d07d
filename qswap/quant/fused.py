"""The one-pass fake-quantization kernel (``qswap/quant/_fused.c``) and when it may run.

A frozen per-tensor activation quantizer at inference rounds every tensor a model computes.
torch has no one-pass kernel for it that is fast (``torch.fake_quantize_per_tensor_affine`` is a
scalar loop on the CPU), so ``qswap.quant.primitives.fake_quantize_grid`` runs four vectorized
passes (multiply, round, clamp, scale). The C kernel does the same float32 operations in one pass
over the tensor, so it gives the same values bit for bit (``tests/quant/test_fused.py`` checks it
against the passes: ties, +-0, +-inf, NaN, the grids' ends, in place).

It runs only where nothing needs to see the arithmetic as torch ops: a dense float32 CPU tensor
(contiguous, or a permutation of one; not a subclass, a functorch-wrapped tensor or a negated view), no
autograd graph to record, no JIT trace and no ``TorchDispatchMode`` watching (one on the stack
with Python dispatch switched off, as the honesty audit runs qswap's own quantizers, watches
nothing). Everywhere else the four passes run. The audit's proof that a quantizer's output lies
on its grid reads the output once with the kernel's twin, ``grid_mismatches``, and calibration's
observers read each activation's extremes with ``min_max``, or take a whole calibration step
(extremes, running range and grid) in one call, ``observe``. A frozen per-channel activation
quantizer (one grid per feature of the last axis) rounds a contiguous tensor in one pass too,
``fake_quantize_channels_into``. Two quantizers in a
row (the FFN's activation input and, past a ReLU, fc2's input) can round in one pass,
``fake_quantize_twice_into``.

The kernel is built by ``pip install`` (``setup.py``, an optional extension): without a C compiler
the install goes on and ``AVAILABLE`` is False, which only costs speed.
"""
from __future__ import annotations

import torch

try:  # built by setup.py (optional extension)
    from qswap.quant import _fused as _built
except ImportError:  # no compiler at install: the four torch passes run instead
    _built = None
# each function on its own: a build from an older qswap (without the two-grid pass) keeps the others
_kernel, _twice, _mismatches, _min_max, _channels, _observe = (
    getattr(_built, name, None) for name in ("fake_quantize_f32", "fake_quantize_twice_f32", "grid_mismatches_f32",
                                             "min_max_f32", "fake_quantize_channels_f32", "observe_f32"))

AVAILABLE = _kernel is not None
CHANNELS = _channels is not None  # the per-channel pass (``fake_quantize_channels_into``)
TWICE = _twice is not None  # the two-grid pass (``fake_quantize_twice_into``)

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor  # noqa: SLF001  (vmap, grad transforms)
_dispatch_modes = torch._C._len_torch_dispatch_stack  # noqa: SLF001
_tracing = torch._C._get_tracing_state  # noqa: SLF001
_excluded = torch._C._dispatch_tls_is_dispatch_key_excluded  # noqa: SLF001
_PYTHON = torch._C.DispatchKey.Python


def applies(x: torch.Tensor) -> bool:
    """Whether the kernel may compute a fake quantization of ``x`` (module docstring)."""
    return (_kernel is not None and readable(x) and not (x.requires_grad and torch.is_grad_enabled()))


def readable(x: torch.Tensor) -> bool:
    """Whether a kernel may read ``x``'s values from its memory with nothing to miss the read: a
    dense float32 CPU tensor, not a subclass, a functorch-wrapped tensor, a negated view or a zero
    tensor (no memory), no
    JIT trace and no ``TorchDispatchMode`` watching (module docstring)."""
    return (type(x) is torch.Tensor and x.dtype == torch.float32 and x.is_cpu and x.layout == torch.strided
            and not x.is_neg() and not x._is_zerotensor() and dense(x) and (not _dispatch_modes() or _excluded(_PYTHON))
            and not _tracing() and not _is_wrapped(x))


def min_max(x: torch.Tensor) -> tuple[float, float, bool] | None:
    """(min, max, whether any value is +-inf or NaN) of a non-empty ``x`` in one pass of the kernel
    (the extremes are exact: ``torch.aminmax``'s values; with a non-finite value they mean
    nothing). None where the kernel cannot read ``x`` (not built, not ``readable``): the caller
    asks torch."""
    if _min_max is None or not readable(x):
        return None
    return _min_max(x.data_ptr(), x.numel())


def observe(x: torch.Tensor, rule: int, running: tuple | None, operand: float, bounds: tuple,
            grid_of=None) -> tuple | None:
    """One calibration step of a per-tensor min/max-family observer in one call of the kernel
    (``observe_f32``, ``_fused.c``): ``x``'s extremes combined with the ``running`` range (min, max;
    None: none yet) by ``rule`` (0: running mean, ``operand`` the float32 count of batches with this
    one; 1: extremes; 2: moving average, ``operand`` the momentum), and with ``grid_of`` (a
    ``QuantSpec``) the new range's grid as ``choose_qparams_scalar`` sets it (``bounds``: its
    ``MIN_SCALE`` and ``MAX_RANGE``). Returns (status, min,
    max[, scale, zero point, float32 1 / scale]): status 0, 1 for a non-finite value in ``x``, 2 for a
    non-finite combined range. None where the kernel cannot read ``x``: the caller computes it."""
    if _observe is None or not readable(x):
        return None
    lo, hi = running if running is not None else (0.0, 0.0)
    if grid_of is None:
        return _observe(x.data_ptr(), x.numel(), rule, running is not None, lo, hi, operand, False, 0, 1, True, True,
                        *bounds)
    return _observe(x.data_ptr(), x.numel(), rule, running is not None, lo, hi, operand, True, grid_of.qmin,
                    grid_of.qmax, grid_of.symmetric, grid_of.signed, *bounds)


def dense(x: torch.Tensor) -> bool:
    """Whether ``x``'s elements fill one block of memory from ``x.data_ptr()`` on, each once:
    contiguous, or a permutation of a contiguous tensor (an attention's head split is a transpose).
    ``torch.empty_like`` then lays its result out the same way, so one pass over both blocks pairs
    each element with its own."""
    if x.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(x.shape, x.stride()), key=lambda pair: pair[1]):
        if size != 1:
            if stride != expected:
                return False
            expected *= size
    return True


def grid_mismatches(y: torch.Tensor, inverse: float, lo: float, hi: float, scale: float) -> int | None:
    """How many values of ``y`` differ from their fake quantization (``clamp(round_half_even(y *
    inverse), lo, hi) * scale`` in float32, each number rounded to float32 first; a NaN always
    differs, -0.0 equals +0.0), read in one pass: 0 proves every value a grid point in range
    (whatever ``inverse`` is: the right-hand side is always one). None where the kernel cannot read ``y``
    (not built, not a dense float32 CPU tensor): the caller checks in torch."""
    if _mismatches is None or type(y) is not torch.Tensor or y.dtype != torch.float32 or not y.is_cpu \
            or y.layout != torch.strided or y.is_neg() or not dense(y):
        return None
    return _mismatches(y.data_ptr(), None, y.numel(), inverse, lo, hi, scale)


def fake_quantize_into(x: torch.Tensor, out: torch.Tensor, inverse: float, lo: int, hi: int, scale: float) -> torch.Tensor:
    """``out`` (float32 laid out as ``x``: ``torch.empty_like(x)``, or ``x`` itself) set to ``x`` fake-quantized:
    ``clamp(round_half_even(x * inverse), lo, hi) * scale`` in float32, ``inverse`` the float32
    1 / scale. For an ``x`` that ``applies`` accepts."""
    _kernel(x.data_ptr(), out.data_ptr(), x.numel(), inverse, float(lo), float(hi), scale)
    return out


def fake_quantize_twice_into(x: torch.Tensor, out: torch.Tensor, first: tuple, second: tuple) -> torch.Tensor:
    """``fake_quantize_into`` with grid ``first`` and then with grid ``second`` on its result (two
    quantizers in a row), in one pass: the same float32 operations, so the same bits. ``first``
    and ``second``: (inverse, lo, hi, scale) each. For an ``x`` that ``applies`` accepts."""
    _twice(x.data_ptr(), out.data_ptr(), x.numel(), first[0], float(first[1]), float(first[2]), first[3],
           second[0], float(second[1]), float(second[2]), second[3])
    return out


def fake_quantize_channels_into(x: torch.Tensor, out: torch.Tensor, grid) -> torch.Tensor:
    """``out`` (float32, contiguous, ``x``'s shape: ``torch.empty_like(x)``, or ``x`` itself) set to
    ``x`` fake-quantized per channel of its last axis on ``grid`` (a ``ChannelGrid``: four contiguous
    float32 arrays, one value per channel): ``fake_quantize_into`` with channel ``i % channels``'s
    grid for value ``i``. For a contiguous ``x`` that ``applies`` accepts, whose last axis has
    ``grid.channels`` values."""
    _channels(x.data_ptr(), out.data_ptr(), x.numel(), grid.channels, grid.inverse.data_ptr(), grid.lo.data_ptr(),
              grid.hi.data_ptr(), grid.scale.data_ptr())
    return out
