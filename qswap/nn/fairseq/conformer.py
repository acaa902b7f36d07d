"""fairseq's ConformerEncoderLayer (s2t_conformer, wav2vec 2.0 conformer): the two half-step
feed-forward residuals ``0.5 * ffn(x) + x``, the attention and convolution residuals, all on
quantized operands. The convolution module (pointwise conv, GLU, depthwise conv, BatchNorm,
Swish) and the feed-forward modules are containers: their children are converted by their own
rules (``QConv1d``, ``QGLU``, ``QBatchNorm1d``, ``QSiLU``, ``QLinear``, ``QLayerNorm``).
"""
from __future__ import annotations

from typing import Optional

import torch
from fairseq.modules.conformer_layer import ConformerEncoderLayer, ConformerWav2Vec2EncoderLayer

from qswap.nn.base import QuantConfig, QuantModule, quantizer
from qswap.nn.registry import register


@register(ConformerEncoderLayer)
class QConformerEncoderLayer(QuantModule):
    converts_children = True
    sites = dict.fromkeys(("ffn1_residual", "ffn1_out", "attn_residual", "attn_out", "conv_residual",
                           "conv_out", "ffn2_residual", "ffn2_out"), "activation")

    def __init__(self, module: ConformerEncoderLayer, config: QuantConfig):
        super().__init__()
        self.pos_enc_type = module.pos_enc_type
        for name in ("ffn1", "self_attn_layer_norm", "self_attn_dropout", "self_attn", "conv_module",
                     "ffn2", "final_layer_norm"):
            setattr(self, name, getattr(module, name))
        for site in self.sites:
            setattr(self, f"{site}_quant", quantizer(config, self.sites, site))

    @classmethod
    def from_float(cls, module: ConformerEncoderLayer, config: QuantConfig):
        return cls(module, config)

    def forward(self, x: torch.Tensor, encoder_padding_mask: Optional[torch.Tensor],
                position_emb: Optional[torch.Tensor] = None):
        """x: (T, B, C); encoder_padding_mask: (B, T); position_emb: (2T-1, 1, C) for rel_pos.
        Returns (T, B, C) and (None, the second feed-forward's output)."""
        x = self.ffn1_out_quant(self.ffn1(x)) * 0.5 + self.ffn1_residual_quant(x)
        residual = x
        x = self.self_attn_layer_norm(x)
        extra = {"pos_emb": position_emb} if self.pos_enc_type == "rel_pos" else {}
        x, attn = self.self_attn(query=x, key=x, value=x, key_padding_mask=encoder_padding_mask,
                                 need_weights=False, **extra)
        x = self.attn_out_quant(self.self_attn_dropout(x)) + self.attn_residual_quant(residual)
        residual = x
        x = self.conv_module(x.transpose(0, 1)).transpose(0, 1)  # (B, T, C) inside, (T, B, C) out
        x = self.conv_residual_quant(residual) + self.conv_out_quant(x)
        layer_result = self.ffn2(x)
        x = self.ffn2_out_quant(layer_result) * 0.5 + self.ffn2_residual_quant(x)
        return self.final_layer_norm(x), (attn, layer_result)


@register(ConformerWav2Vec2EncoderLayer)
class QConformerWav2Vec2EncoderLayer(QConformerEncoderLayer):
    """The wav2vec 2.0 conformer layer: the same block behind wav2vec 2.0's layer signature."""

    def forward(self, x, self_attn_mask=None, self_attn_padding_mask=None, need_weights=False,
                att_args=None, position_emb=None):
        return super().forward(x, self_attn_padding_mask, position_emb)
