"""The S2T decoder counterpart: fairseq's decoder, with a beam reorder that does not walk the
module tree at every decoding step.

fairseq's ``reorder_incremental_state_scripting`` runs at every beam-search step and visits
every submodule with ``hasattr(module, "reorder_incremental_state")``. A converted decoder has
about six times the modules of the float one (each quantizer and its observer is a module; 788
against 127 in the shipped model's decoder), and ``hasattr`` on an ``nn.Module`` that lacks the
attribute goes through ``Module.__getattr__``'s error path: measured at a quarter of the
quantized model's extra decoding time. The counterpart visits the same modules in the same
order, found once (by their class, which is where fairseq defines the method) on its first
reorder. The decoder's own arithmetic is done by its converted children; it adds none.
"""
from __future__ import annotations

from fairseq.models.speech_to_text.s2t_transformer import TransformerDecoderScriptable
from torch import nn

from qswap.nn.base import QuantConfig, QuantModule
from qswap.nn.registry import register


@register(TransformerDecoderScriptable)
class QTransformerDecoderScriptable(QuantModule, TransformerDecoderScriptable):
    """fairseq's S2T ``TransformerDecoderScriptable`` (its forward, its children) with a cached
    list of the modules a beam reorder visits."""

    converts_children = True

    @classmethod
    def from_float(cls, module: TransformerDecoderScriptable, config: QuantConfig):
        """The same decoder object's state under this class: every attribute fairseq's
        constructor set, with the module, parameter and buffer tables copied (not shared)."""
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        new._modules, new._parameters, new._buffers = (
            dict(module._modules), dict(module._parameters), dict(module._buffers))
        new._qswap_reorderable = None
        return new

    def reorderable_modules(self) -> list[nn.Module]:
        """The modules fairseq's reorder visits (``self.modules()`` order), found on first use."""
        if self._qswap_reorderable is None:
            self._qswap_reorderable = [m for m in self.modules()
                                       if getattr(type(m), "reorder_incremental_state", None) is not None]
        return self._qswap_reorderable

    def reorder_incremental_state_scripting(self, incremental_state, new_order):
        for module in self.reorderable_modules():
            result = module.reorder_incremental_state(incremental_state, new_order)
            if result is not None:
                incremental_state = result
