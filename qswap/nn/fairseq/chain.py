"""Integer forms of a chain of ops (issue 16): each op writes codes onto the input grid of the
next op that has one, so codes flow from op to op with no float in between. Used for fairseq's
containers whose children run in order: wav2vec 2.0's feature extractor blocks and positional
conv, the conformer's feed-forward and convolution modules. The chain and its data moves are
declared (``qswap.io.serializable``), so an export writes and rebuilds them."""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from fairseq.modules import SamePad, TransposeLast
from torch import nn

from qswap.io.serializable import ANY, INT, List, Opt, serializable
from qswap.nn.base import QuantModule

MOVES_DATA = (SamePad, TransposeLast)  # applied to codes as they are (slicing, transposing)


def ops_of(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of the ops below ``module`` in order: counterparts and leaves, not their insides."""
    for name, child in module.named_children():
        if isinstance(child, QuantModule) or not list(child.children()):
            yield prefix + name, child
        else:
            yield from ops_of(child, f"{prefix}{name}.")


def run_chain(ops: nn.Module, x: torch.Tensor, out_quant: nn.Module | None) -> torch.Tensor | None:
    """``ops`` (a container that runs its ``ops_of`` in order: nested ``nn.Sequential`` /
    ``nn.ModuleList`` only) on ``x``, each op told the quantizer that reads its result, as
    ``integer_chain`` builds the integer forms: the ``input_quant`` of the next op that has one,
    the last ``out_quant`` (``qswap.nn.fairseq.layers.onto``: with ``simulate: integer`` each op
    writes onto that grid). None for another container (the caller runs it as it is)."""
    from qswap.nn.fairseq.layers import onto
    if not _sequential(ops):
        return None
    ops = list(ops_of(ops))
    for i, (_, m) in enumerate(ops):
        x = onto(m, x, next((n.input_quant for _, n in ops[i + 1:] if hasattr(n, "input_quant")), out_quant))
    return x


def _sequential(module: nn.Module) -> bool:
    """Whether every container below ``module`` (itself included) that ``ops_of`` descends into
    runs its children in order."""
    if isinstance(module, QuantModule) or not list(module.children()):
        return True
    return isinstance(module, (nn.Sequential, nn.ModuleList)) and all(_sequential(c) for c in module.children())


def integer_chain(ops: nn.Module | Iterable[tuple[str, nn.Module]], out) -> "IntegerChain":
    """The integer forms of ``ops`` (a container's ``ops_of``, or (name, module) pairs) in order:
    each op writes codes onto the input grid of the next op that has one (the last onto ``out``,
    a ``Grid``, or None for an int32 accumulator); dropout is skipped, ``SamePad`` /
    ``TransposeLast`` become ``IntegerSamePad`` / ``IntegerTransposeLast`` (the same data moves).
    Raises ``IntegerizeError`` naming an op without an integer form."""
    from qswap.errors import IntegerizeError
    from qswap.quant.integer import Grid
    ops = list(ops_of(ops) if isinstance(ops, nn.Module) else ops)
    ops = [(name, m) for name, m in ops if not isinstance(m, nn.Dropout)]
    forms = []
    for i, (name, m) in enumerate(ops):
        if isinstance(m, MOVES_DATA):
            forms.append(IntegerSamePad(m.remove) if isinstance(m, SamePad)
                         else IntegerTransposeLast(m.deconstruct_idx, m.tranpose_dim))
            continue
        if not callable(getattr(m, "to_integer", None)):
            raise IntegerizeError(f"{name} ({type(m).__name__}): no integer form yet")
        nxt = next((n for _, n in ops[i + 1:] if hasattr(n, "input_quant")), None)
        forms.append(m.to_integer(out if nxt is None else Grid.of(nxt.input_quant)))
    return IntegerChain(forms)


@serializable(ops=List(ANY))
class IntegerChain(nn.Sequential):
    """Integer forms run in order: an ``nn.Sequential`` (module paths ``0``, ``1``, ...) built from
    a list, so that it is declared by its ``ops``."""

    def __init__(self, ops: list):
        super().__init__(*ops)

    @property
    def ops(self) -> list:
        return list(self)


@serializable(remove=INT)
class IntegerSamePad(nn.Module):
    """fairseq's ``SamePad`` on codes: drops the last ``remove`` steps of (B, C, T)."""

    def __init__(self, remove: int):
        super().__init__()
        self.remove = remove

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return codes[:, :, : -self.remove] if self.remove > 0 else codes


@serializable(deconstruct_idx=Opt(INT), dim=INT)
class IntegerTransposeLast(nn.Module):
    """fairseq's ``TransposeLast`` on codes: (optionally item ``deconstruct_idx`` of a tuple, then)
    axis ``dim`` swapped with the last."""

    def __init__(self, deconstruct_idx: int | None, dim: int):
        super().__init__()
        self.deconstruct_idx, self.dim = deconstruct_idx, dim

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if self.deconstruct_idx is not None:
            codes = codes[self.deconstruct_idx]
        return codes.transpose(self.dim, -1)
