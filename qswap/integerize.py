"""``qswap.integerize``: a calibrated qswap model as integer forms (issue 16, work in progress).

What runs today: a converted fairseq S2T transformer (pre- or post-norm encoder, pre-norm
decoder; a batch, teacher-forced forward: ``QS2TTransformerModel.to_integer_model``), the S2T
conformer (abs or rel_pos positions; ``QS2TConformerModel.to_integer_model``), wav2vec 2.0 CTC
(``QWav2VecCtc.to_integer_model``: waveform in, logits for greedy CTC out), and an
``nn.Sequential`` chain of counterparts
with integer forms (``QLinear``, ``QConv1d``/``QConv2d``, ``QLayerNorm``, elementwise
activations, ``QGLU``, ``QSoftmax``; ``QEmbedding`` first), ending in a ``QLinear``. Each op writes codes directly onto the grid of the next op's input
quantizer (the grid the fake-quant model rounds onto there), so codes flow from op to op with
no float in between. There are two declared float steps, one at each end: quantizing the
input onto the first op's input grid, and scaling the last linear's int32 accumulator to float.

Every other model raises ``IntegerizeError`` naming each module that has no integer form yet
(and a whole model names the part it cannot integerize: rotary attention, a post-norm decoder...).

>>> imodel = qswap.integerize(qmodel)      # qmodel: converted and calibrated
>>> y = imodel(x)                          # float in, float out; integers in between
"""
from __future__ import annotations

import torch
from torch import nn

from qswap.errors import IntegerizeError, expect_module
from qswap.io.serializable import ANY, STR, List, Obj, Opt, serializable
from qswap.nn.base import QuantModule
from qswap.nn.embedding import QEmbedding
from qswap.nn.integer_steps import DequantizeStep, QuantizeStep
from qswap.nn.linear import QLinear
from qswap.nn.registry import find, is_passthrough
from qswap.quant.integer import Grid


@serializable(input_grid=Opt(Obj("Grid")), layers=List(ANY), names=List(STR), float_steps={
    "quantize_input": "float input onto the first op's input grid (input_grid; token ids pass)",
    "dequantize_output": "the last linear's int32 accumulator times its acc_scale"})
class IntegerModel(nn.Module):
    """Integer forms run in sequence. ``quantize_input`` and ``dequantize_output`` are the declared
    float steps; ``forward_codes`` is integer arithmetic only (``qswap.honesty.integer`` checks it).

    >>> codes = imodel.quantize_input(x); acc = imodel.forward_codes(codes)
    """

    def __init__(self, input_grid: Grid | None, layers: list[nn.Module], names: list[str]):
        super().__init__()
        self.input_grid, self.names = input_grid, names
        self.layers = nn.ModuleList(layers)
        self.input = None if input_grid is None else QuantizeStep(input_grid)
        self.output = DequantizeStep(acc_scale=getattr(layers[-1], "acc_scale", None))  # a linear's, last

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Declared float step: float features onto the first op's input grid (token ids pass)."""
        return x if self.input is None else self.input(x)

    def forward_codes(self, codes: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            codes = layer(codes)
        return codes  # int32 accumulator of the last linear

    def dequantize_output(self, acc: torch.Tensor) -> torch.Tensor:
        """Declared float step: the last accumulator times its scale."""
        return self.output(acc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantize_output(self.forward_codes(self.quantize_input(x)))


def _skipped(module: nn.Module) -> bool:
    return is_passthrough(module) and not isinstance(module, QuantModule)


def _left_float(qmodel: nn.Module) -> list[str]:
    """'path (Class)' of every module below the root that has a counterpart in the registry but
    was left in its float class where the walker converts modules (the fp32 recipe leaves them
    all; a skip rule leaves some): its nearest counterpart above it converts its children (a
    layer, the model), or there is none. A counterpart that is swapped as a unit holds float
    modules of its own (an activation's op, attention's projections), which are not listed; nor
    are the children of a listed module."""
    found: dict[str, str] = {}  # path -> its class's name
    owners: dict[str, nn.Module] = {}  # path -> the nearest counterpart at or above it
    for name, m in qmodel.named_modules():
        parent = owners.get(name.rpartition(".")[0]) if name else None
        owners[name] = m if isinstance(m, QuantModule) else parent
        if (name and find(m) is not None and (parent is None or parent.converts_children)
                and not any(name.startswith(f"{path}.") for path in found)):
            found[name] = type(m).__name__
    return [f"{path} ({cls})" for path, cls in found.items()]


def _recipe_name(qmodel: nn.Module) -> str:
    recipe = getattr(qmodel, "qswap_recipe", None)
    return getattr(recipe, "name", "(unknown)")


def _unsupported(qmodel: nn.Module) -> list[str]:
    """'path (Class)' of every counterpart below the root without an integer form, not counting
    those inside a module that has one (its integer form covers them)."""
    covered: list[str] = []
    found = []
    for name, m in qmodel.named_modules():
        if not name or any(name.startswith(c + ".") for c in covered):
            continue
        if callable(getattr(m, "to_integer", None)):
            covered.append(name)
        elif isinstance(m, QuantModule):
            found.append(f"{name} ({type(m).__name__})")
    return found


def integerize(qmodel: nn.Module) -> nn.Module:
    """The integer form of a converted, calibrated ``qmodel`` (which is left untouched).

    Raises ``IntegerizeError`` naming the modules it cannot integerize (a module without an
    integer form, an uncalibrated or float operand, a chain that does not end in a linear): every
    one of a chain, every module a recipe left float; in a whole model's form (S2T, wav2vec 2.0)
    the first whose form fails, with its path."""
    from qswap.calibrate import activation_quantizers

    expect_module(qmodel, "integerize()", IntegerizeError)
    problems: list[str] = []
    if callable(getattr(qmodel, "to_integer_model", None)):
        left = _left_float(qmodel)
        if left:  # a recipe that leaves modules float (fp32, a skip rule): their integer form is missing
            raise IntegerizeError(_message([f"{p}: left float by recipe {_recipe_name(qmodel)}; integer execution "
                                            f"needs it converted and quantized (use a recipe that quantizes "
                                            f"its weights and activations, e.g. w8a8)" for p in left]))
        if not activation_quantizers(qmodel):
            # a weight-only recipe: every activation site float, where the first one met had been named alone
            raise IntegerizeError(_message([f"(root) ({type(qmodel).__name__}): recipe {_recipe_name(qmodel)} "
                                            f"quantizes no activation (every activation site left float); integer "
                                            f"execution needs every operand quantized: use a recipe that quantizes "
                                            f"weights and activations (e.g. w8a8)"]))
        try:
            return qmodel.to_integer_model()  # a whole model with its own integer form (S2T, wav2vec 2.0 CTC)
        except IntegerizeError as exc:
            where = raising_module(qmodel, exc)
            if where is None:
                raise
            raise IntegerizeError(_message([f"{where}: {exc}"])) from exc
    if not isinstance(qmodel, nn.Sequential):
        problems.append(f"(root) ({type(qmodel).__name__}): no whole-model integer form yet; integerized so far: "
                        f"nn.Sequential chains of counterparts, the S2T transformer and conformer, wav2vec 2.0 "
                        f"CTC (issue 16)")
        problems += [f"{p}: no integer form yet" for p in _unsupported(qmodel)]
        raise IntegerizeError(_message(problems))
    chain = [(name, m) for name, m in qmodel.named_children() if not _skipped(m)]
    if not chain:
        raise IntegerizeError(_message(["(root): an empty chain"]))
    last_name, last = chain[-1]
    if isinstance(last, QuantModule) and not isinstance(last, QLinear):  # a float module is reported below
        problems.append(f"{last_name} ({type(last).__name__}): the chain must end in a Linear "
                        f"(its int32 accumulator is the declared float output)")
    layers = []
    for i, (name, m) in enumerate(chain):
        if not isinstance(m, QuantModule) and find(m) is not None:  # had read "no integer form yet"
            problems.append(f"{name} ({type(m).__name__}): left float (not converted, or left so by the "
                            f"recipe); integer execution needs it converted and quantized: qswap.convert it "
                            f"with a recipe that quantizes weights and activations (e.g. w8a8)")
            continue
        if not (isinstance(m, QuantModule) and callable(getattr(m, "to_integer", None))):
            problems.append(f"{name} ({type(m).__name__}): no integer form yet")
            continue
        if isinstance(m, QEmbedding) and i > 0:
            problems.append(f"{name} (QEmbedding): an Embedding is integerized only as the first module")
            continue
        nxt = chain[i + 1][1] if i + 1 < len(chain) else None
        if (nxt is None and not isinstance(m, QLinear)) or (
                nxt is not None and not isinstance(getattr(nxt, "input_quant", None), nn.Module)):
            continue  # reported above, or the next module is reported itself
        try:
            layers.append(m.to_integer(None if nxt is None else Grid.of(nxt.input_quant)))
        except IntegerizeError as exc:
            problems.append(f"{name} ({type(m).__name__}): {exc}")
    if problems:
        raise IntegerizeError(_message(problems))
    first = chain[0][1]
    input_grid = None if isinstance(first, QEmbedding) else Grid.of(first.input_quant)
    return IntegerModel(input_grid, layers, [name for name, _ in chain])


def raising_module(model: nn.Module, exc: BaseException) -> str | None:
    """``path (Type)`` of the module of ``model`` that the innermost frame of ``exc``'s traceback
    that holds any of ``model``'s modules (its ``self``, an argument, a local) was working on, the
    deepest of them where it holds several; None where no frame holds one. An error raised deep
    in the integer arithmetic (``qswap.quant.integer``) then names the counterpart or the
    quantizer it was asked about. For the message only; nothing depends on it."""
    names = {id(m): name for name, m in model.named_modules()}
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        held = [v for v in frame.f_locals.values() if isinstance(v, nn.Module) and id(v) in names]
        if held:
            found = max(held, key=lambda m: len(names[id(m)]))
            return f"{names[id(found)] or '(root)'} ({type(found).__name__})"
    return None


def _message(problems: list[str]) -> str:
    return "cannot integerize the model:\n  " + "\n  ".join(problems)

