"""SmoothQuant (Xiao et al. 2023, arXiv 2211.10438): move activation outliers into the weights by
a per-channel factor s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), folded offline and exact in float:

- a pre-norm LayerNorm and the linears that read it: gamma_j, beta_j <- gamma_j / s_j, beta_j / s_j;
  each linear's input column j <- W[:, j] * s_j (a norm without an affine weight is left, with a note);
- the FFN (``ffn``): fc1's output row j (and bias) <- / s_j, fc2's input column j <- * s_j; exact
  through ReLU, which is positively homogeneous (relu(x / s) = relu(x) / s for s > 0).

max|X_j| comes from the float model run over the calibration batches (both decoding paths for a
seq2seq model, as calibration runs them), over every position of each batch: padded frames
included, as activation calibration reads them (a channel that fires only on padding can set its
factor). A channel silent on that data (``SILENT``) keeps factor 1.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qswap.errors import ConvertError
from qswap.transforms import STRUCTURE_ONLY, NothingToTransform, transform
from qswap.transforms.layers import ffns, prenorm_blocks

_HOMOGENEOUS = {"relu"}


def channel_maxima(model: nn.Module, data: list, modules: list[nn.Module], outputs: list[bool]) -> list[torch.Tensor]:
    """max |x_j| of each module's output (``outputs[i]``) or input over every batch, per channel
    (last dimension). Observed by hooks removed before returning (a norm's output: fairseq's
    attention may read it through ``F.multi_head_attention_forward``, not its q_proj)."""
    from qswap.calibrate import run_observed

    maxima: list[torch.Tensor | None] = [None] * len(modules)

    def observe(i):
        def hook(module, args, out=None):
            t = (out if outputs[i] else args[0]).detach()
            x = t.abs().reshape(-1, t.shape[-1]).amax(0).double()
            maxima[i] = x if maxima[i] is None else torch.maximum(maxima[i], x)
        return hook

    run_observed(model, data, [m.register_forward_hook(observe(i)) if outputs[i] else m.register_forward_pre_hook(observe(i))
                               for i, m in enumerate(modules)], ConvertError, "smoothquant: ")
    if any(m is None for m in maxima):
        raise ConvertError("smoothquant: the calibration batches never reached some layers; "
                           "pass batches the model runs on")
    bad = sum(1 for m in maxima if not bool(torch.isfinite(m).all()))
    if bad:  # before any weight is touched: a NaN factor would be folded into every weight it scales
        raise ConvertError(f"smoothquant: the data passed to convert gave NaN or inf activations at {bad} of the "
                           f"{len(maxima)} observed layers; check the calibration batches' input features for NaN "
                           f"or inf values (the model is not changed)")
    return maxima


SILENT = 1e-5  # a channel whose largest observed |x| is at most this carries nothing to migrate


def factors(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha) over every linear reading channel j; 1 for a
    channel silent on the calibration data (max|X_j| <= SILENT: a ReLU unit that never fires),
    which has no outlier to move and whose formula factor (about SILENT^alpha) would multiply its
    weights by up to 1e5, widening a per-tensor weight grid for every other channel."""
    w_max = torch.stack([w.detach().abs().double().amax(0) for w in weights]).amax(0)
    s = act_max.clamp(min=SILENT) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)
    return torch.where(act_max <= SILENT, torch.ones_like(s), s.clamp(min=1e-5))


def _scale_inputs(linears: list[nn.Linear], s: torch.Tensor) -> None:
    for lin in linears:
        lin.weight.copy_((lin.weight.double() * s).to(lin.weight.dtype))


def _check(params) -> str | None:
    if not 0.0 <= params["alpha"] <= 1.0:
        return (f"alpha must be in [0, 1] (the share of each channel's range moved onto the weights), "
                f"got {params['alpha']}")
    return None


@transform("smoothquant", needs_data=True, check=_check)
def smoothquant(model: nn.Module, data: Any, *, alpha: float = 0.5, norms: bool = True,
                ffn: bool = True) -> list[str]:
    """Fold per-channel factors into pre-norm LayerNorms (``norms``) and fc1/fc2 (``ffn``)."""
    if not 0.0 <= alpha <= 1.0:
        raise ConvertError(f"smoothquant alpha must be in [0, 1], got {alpha}")
    if data is STRUCTURE_ONLY:
        return ["factors already folded into the stored weights"]
    blocks = list(prenorm_blocks(model)) if norms else []
    # a norm without a learned scale (elementwise_affine=False) has no gamma to take 1 / s
    plain = [b.path for b in blocks if getattr(b.norm, "weight", None) is None]
    blocks = [b for b in blocks if getattr(b.norm, "weight", None) is not None]
    # a factor s folded into fc1's rows passes a positively homogeneous activation, not a LayerNorm
    layers = [f for f in ffns(model) if f.activation in _HOMOGENEOUS and not f.norm_inside] if ffn else []
    if any(not isinstance(f.fc2, nn.Linear) for f in layers):
        raise ConvertError("smoothquant: fc2 is already rotated (hadamard ffn); list smoothquant "
                           "before hadamard in the recipe's transforms")
    # each norm's output and each fc2's input, observed in one pass
    if not blocks and not layers:  # before anything changes
        parts = (["norms: false"] if not norms else [f"no pre-norm block with a learned scale"
                                                     + (f" ({len(plain)} without one)" if plain else "")])
        parts.append("ffn: false" if not ffn else "no FFN with a positively homogeneous activation before fc2")
        raise NothingToTransform(", ".join(parts))
    observed = [b.norm for b in blocks] + [f.fc2 for f in layers]
    maxima = channel_maxima(model, data, observed, [True] * len(blocks) + [False] * len(layers)) if observed else []
    with torch.no_grad():
        for b, act in zip(blocks, maxima):
            s = factors(act, [lin.weight for lin in b.linears], alpha)
            b.norm.weight.copy_((b.norm.weight.double() / s).to(b.norm.weight.dtype))
            if getattr(b.norm, "bias", None) is not None:
                b.norm.bias.copy_((b.norm.bias.double() / s).to(b.norm.bias.dtype))
            _scale_inputs(b.linears, s)
        for f, act in zip(layers, maxima[len(blocks):]):
            fc2 = f.fc2
            s = factors(act, [fc2.weight], alpha)
            f.fc1.weight.copy_((f.fc1.weight.double() / s[:, None]).to(f.fc1.weight.dtype))
            if f.fc1.bias is not None:
                f.fc1.bias.copy_((f.fc1.bias.double() / s).to(f.fc1.bias.dtype))
            _scale_inputs([fc2], s)
    skipped = sum(1 for f in ffns(model) if f.activation not in _HOMOGENEOUS) if ffn else 0
    normed = sum(1 for f in ffns(model) if f.activation in _HOMOGENEOUS and f.norm_inside) if ffn else 0
    notes = [f"alpha {alpha}: {len(blocks)} norm(s) and {len(layers)} FFN(s) smoothed"]
    if plain:
        notes.append(f"{len(plain)} norm(s) skipped: no elementwise affine weight to fold a factor into "
                     f"({', '.join(plain[:4])}{', ...' if len(plain) > 4 else ''})")
    if skipped:
        notes.append(f"{skipped} FFN(s) skipped: their activation is not positively homogeneous")
    if normed:
        notes.append(f"{normed} FFN(s) skipped: a LayerNorm between the activation and fc2 (NormFormer's "
                     f"ffn_layernorm) does not pass a per-channel factor")
    return notes
