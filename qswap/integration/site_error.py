"""How much each activation site's quantizer changes what it quantizes: the signal-to-
quantization-noise ratio (dB) of a calibrated model's activation quantizers over some batches,
by site name (``input``, ``softmax_out``, ``attn_residual``...), summed over the modules that have
the site. What a per-site observer choice compares (``tools/strategies.py``)."""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from qswap.calibrate import _default_forward, activation_quantizers


def site_name(path: str) -> str:
    """``encoder.layers.0.self_attn.core.softmax_out_quant`` -> ``softmax_out``; a quantizer
    kept in a list (``subsample.glu_quant.1``) -> the list's site (``glu``)."""
    parts = path.split(".")
    while len(parts) > 1 and parts[-1].isdigit():
        parts.pop()
    return parts[-1].removesuffix("_quant")


def site_sqnr(qmodel: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
    """SQNR in dB per site name: 10 log10(sum x^2 / sum (q(x) - x)^2) over every module's
    quantizer of that site and every batch (run as ``calibrate`` runs them). The quantizers are
    observed by hooks removed before returning; the model is run in eval mode without grad."""
    wanted = {id(q) for q in activation_quantizers(qmodel)}
    names = {path: q for path, q in qmodel.named_modules() if id(q) in wanted}
    power: dict[str, list[float]] = {}

    def hook(site):
        def observe(module, args, out):
            x = args[0].detach().double()
            acc = power.setdefault(site, [0.0, 0.0])
            acc[0] += float((x * x).sum())
            acc[1] += float(((out.detach().double() - x) ** 2).sum())
        return observe

    handles = [q.register_forward_hook(hook(site_name(path))) for path, q in names.items()]
    was_training = qmodel.training
    qmodel.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                _default_forward(qmodel, batch)
    finally:
        for h in handles:
            h.remove()
        qmodel.train(was_training)
    return {site: (math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise))
            for site, (signal, noise) in sorted(power.items())}
