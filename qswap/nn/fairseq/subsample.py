"""S2T's ``Conv1dSubsampler``: (Conv1d stride 2 -> GLU) x n. The convs are converted by their
own rule; the counterpart quantizes each GLU's input (GLU is one kernel on a quantized input,
as ``QGLU`` treats it, with its integer gate: ``glu_value``) and computes the output lengths in integer arithmetic."""
from __future__ import annotations

import torch
from fairseq.models.speech_to_text.modules.convolution import Conv1dSubsampler
from torch import nn

from qswap.io.serializable import INT, List, Obj, serializable
from qswap.nn.activation import glu_value
from qswap.nn.base import QuantConfig, QuantModule, quantizer
from qswap.nn.linear import QConv1d
from qswap.nn.registry import register
from qswap.quant.fake_quantize import FakeQuantize


@register(Conv1dSubsampler)
class QConv1dSubsampler(QuantModule):
    """``glu_quant[i]`` quantizes the input of the i-th GLU (site ``glu``)."""

    converts_children = True
    sites = {"glu": "activation"}

    def __init__(self, module: Conv1dSubsampler, config: QuantConfig):
        super().__init__()
        self.simulate = config.simulate
        self.n_layers, self.conv_layers = module.n_layers, module.conv_layers
        self.glu_quant = nn.ModuleList(quantizer(config, self.sites, "glu") for _ in range(self.n_layers))

    @classmethod
    def from_float(cls, module: Conv1dSubsampler, config: QuantConfig) -> "QConv1dSubsampler":
        return cls(module, config)

    def quantizers(self) -> dict[str, FakeQuantize]:
        return {f"glu.{i}": q for i, q in enumerate(self.glu_quant) if isinstance(q, FakeQuantize)}

    def get_out_seq_lens_tensor(self, in_seq_lens_tensor: torch.Tensor) -> torch.Tensor:
        return subsampled_lengths(in_seq_lens_tensor, self.n_layers)

    def forward(self, src_tokens: torch.Tensor, src_lengths: torch.Tensor, out_quant: nn.Module | None = None):
        """src_tokens: (B, T, C*D) features -> ((T', B, C_out), lengths (B,)). ``out_quant``: the
        quantizer that reads the output (the encoder's embed quantizer): with ``simulate:
        integer`` each GLU then writes its integer form's codes on its reader's grid."""
        x = src_tokens.transpose(1, 2).contiguous()  # (B, C*D, T)
        readers = [conv.input_quant for conv in self.conv_layers[1:]] + [out_quant]
        for i, (conv, glu_quant, reader) in enumerate(zip(self.conv_layers, self.glu_quant, readers)):
            reader = reader if isinstance(reader, FakeQuantize) else None
            x = conv(x, out_quant=glu_quant) if isinstance(conv, QConv1d) else conv(x)
            last = i + 1 == self.n_layers  # its reader, the embed quantizer, reads (T', B, C): channels are dim 1
            x = glu_value(self, f"_integer_glu{i}", glu_quant(x), glu_quant, 1, reader,
                          reader_axis=1 if last else None)  # (B, C_i, T_i)
        x = x.transpose(1, 2).transpose(0, 1).contiguous()  # (T', B, C_out)
        return x, self.get_out_seq_lens_tensor(src_lengths)

    def to_integer(self, out) -> "IntegerConv1dSubsampler":
        """The integer form writing codes of ``out`` (the encoder's embed grid: a ``Grid``, or a
        ``ChannelGrid`` per output channel): each conv onto its GLU's input grid, each GLU
        (``integer_glu``) onto the next conv's input grid."""
        from qswap.quant.integer import GluParams, Grid
        grids = [Grid.of(q) for q in self.glu_quant]
        nexts = [Grid.of(conv.input_quant) for conv in self.conv_layers[1:]] + [out]
        convs = [conv.to_integer(grid) for conv, grid in zip(self.conv_layers, grids)]
        return IntegerConv1dSubsampler(convs, [GluParams.build(g, n) for g, n in zip(grids, nexts)],
                                       Grid.of(self.conv_layers[0].input_quant), self.n_layers)


# -- integer execution (issue 16, work in progress) ----------------------------------------------------

@serializable(convs=List(Obj("IntegerConv")), glus=List(Obj("GluParams")), input_grid=Obj("Grid"), n_layers=INT)
class IntegerConv1dSubsampler(nn.Module):
    """(Conv1d stride 2 -> GLU) x n on codes; ``input_grid``: the first conv's input grid."""

    def __init__(self, convs: list, glus: list, input_grid, n_layers: int):
        super().__init__()
        if not n_layers == len(convs) == len(glus):  # a read-back file edited so had failed in torch
            from qswap.errors import IntegerizeError
            raise IntegerizeError(f"a subsampler of {n_layers} layers needs as many convolutions and GLUs, got "
                                  f"{len(convs)} and {len(glus)}")
        for i, (conv, glu) in enumerate(zip(convs, glus)):
            requant = conv.requant
            if requant is not None and not glu.covers(requant.qmin, requant.qmax):
                from qswap.errors import IntegerizeError
                raise IntegerizeError(f"convolution {i} writes codes {requant.qmin}..{requant.qmax}, which its GLU's "
                                      f"gate table (from {glu.qmin}, {glu.gate.numel()} codes) does not cover")
        self.convs, self.glus = nn.ModuleList(convs), glus
        self.input_grid, self.n_layers = input_grid, n_layers

    def forward(self, codes: torch.Tensor, src_lengths: torch.Tensor):
        """codes: (B, T, C*D) on ``input_grid`` -> ((T', B, C_out) codes, lengths (B,))."""
        from qswap.quant.integer import integer_glu
        x = codes.transpose(1, 2)  # (B, C*D, T)
        for conv, glu in zip(self.convs, self.glus):
            x = integer_glu(conv(x), glu, dim=1)  # (B, C_i, T_i)
        return x.permute(2, 0, 1).contiguous(), subsampled_lengths(src_lengths, self.n_layers)  # (T', B, C_out)


def subsampled_lengths(lengths: torch.Tensor, n_layers: int) -> torch.Tensor:
    """floor((L - 1) / 2 + 1) per layer, as fairseq computes it in float, in integers."""
    out = lengths.clone()
    for _ in range(n_layers):
        out = torch.div(out - 1, 2, rounding_mode="floor") + 1
    return out
