"""The one table of finding kinds: each kind's short label (tables, verdict lines) and the reason
a report gives for it. ``classify``, ``findings`` and ``report`` all read it from here."""
from __future__ import annotations

from typing import NamedTuple


class Kind(NamedTuple):
    label: str  # short, for tables and the verdict line
    reason: str  # the sentence a violation carries


FLOAT_OPERAND, RAW_PARAMETER, FLOAT_CONSTANT, OFF_GRID = (
    "float_operand", "raw_parameter", "float_constant", "off_grid")
FUSED, UNCLASSIFIED, NOT_EXECUTED = "fused_kernel", "unclassified_op", "not_executed"
UNSEEN_ORIGIN, DYNAMIC_RANGE, VALUES_DISAGREE = "unseen_origin", "dynamic_range", "values_disagree"
INEXACT_GEMM, UNTRUSTED_QUANTIZER = "inexact_gemm", "untrusted_quantizer"

KINDS: dict[str, Kind] = {
    FLOAT_OPERAND: Kind(
        "compute on a float operand",
        "compute on a float value: quantize this operand (or give the module that does this op "
        "a counterpart)"),
    RAW_PARAMETER: Kind(
        "a parameter/buffer consumed without its quantizer",
        "a parameter or buffer reached compute without passing its quantizer (bypass)"),
    FLOAT_CONSTANT: Kind(
        "a run-time float constant consumed without a quantizer",
        "a float constant reached compute without passing a quantizer"),
    OFF_GRID: Kind(
        "a quantizer's output is not on its grid",
        "a quantizer's output is not on its grid: its values are not integer codes in "
        "[qmin, qmax] times its scale"),
    FUSED: Kind(
        "a fused kernel with unquantized intermediates",
        "fused kernel: its internal steps (softmax, probs @ V, epilogues) run on unquantized "
        "intermediates; use a counterpart that performs the ops separately"),
    UNCLASSIFIED: Kind(
        "an op the audit has no rule for",
        "no rule for this op in qswap.honesty.ops; an op the audit does not know is never "
        "assumed to be honest"),
    NOT_EXECUTED: Kind(
        "a swapped module that never ran on the audited paths",
        "a swapped module never ran on the audited paths: the model computes its result some "
        "other way (bypass), or the audited paths do not reach it"),
    UNSEEN_ORIGIN: Kind(
        "a tensor whose making the audit did not see",
        "a float tensor entered the audited path without the audit seeing it made (a thread "
        "started before the audit, an extension or numpy computation, a global tensor, a hook "
        "outside dispatch): whatever computed it is unchecked"),
    INEXACT_GEMM: Kind(
        "a float GEMM on integer data not proven exact",
        "a float GEMM on integer data (codes) whose exactness is not proven: a partial sum may "
        "exceed the float type's exact integers (2^24 in float32, 2^53 in float64), or the "
        "kernel may round (reduced-precision float32 matmuls, Winograd/FFT convolutions); use "
        "float64, split the reduction, or an integer dtype"),
    UNTRUSTED_QUANTIZER: Kind(
        "a quantizer of a class the audit does not trust",
        "a quantizer whose class is not one of qswap's own (exactly FakeQuantize or BiasQuantize): "
        "the ops it runs are not audited, so float math on its input could hide there; use qswap's "
        "quantizer classes"),
    DYNAMIC_RANGE: Kind(
        "dynamic range, computed at run time",
        "an activation quantizer was still observing at inference: its range is computed from "
        "each input at run time (dynamic quantization), not a calibrated static grid; calibrate "
        "on every path, or declare dynamic activations in the recipe"),
    VALUES_DISAGREE: Kind(
        "the value-level check disagrees with the tags",
        "the value-level check (each float operand of a compute op on a uniform grid of at most "
        "2^bits levels per tensor or channel) disagrees with the provenance tags for this op"),
}
