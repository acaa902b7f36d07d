"""How much each activation site's quantizer changes what it quantizes: the signal-to-
quantization-noise ratio (dB) of a calibrated model's activation quantizers over some batches,
by site name (``input``, ``softmax_out``, ``attn_residual``...), summed over the modules that have
the site. What a per-site observer choice compares (``tools/strategies.py``)."""
from __future__ import annotations

import math
from typing import Any, Iterable

from torch import nn

from qswap.calibrate import activation_quantizers, run_observed
from qswap.nn.simulate import simulating


def site_names(qmodel: nn.Module) -> dict[int, str]:
    """id(quantizer) -> the site its owner declares it for (``QuantModule.sites``): the child
    ``{site}_quant`` (``key_in`` -> ``key_quant``: an ``_in`` suffix dropped), or each quantizer of
    that child when it is a list (the subsampler's per-layer ``glu_quant``)."""
    out: dict[int, str] = {}
    for owner in qmodel.modules():
        for site in getattr(type(owner), "sites", {}) or {}:
            for attr in (f"{site}_quant", f"{site.removesuffix('_in')}_quant"):
                child = owner._modules.get(attr)
                if child is not None:
                    for q in (child if isinstance(child, nn.ModuleList) else [child]):
                        out.setdefault(id(q), site)
                    break
    return out


def site_sqnr(qmodel: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
    """SQNR in dB per site name: 10 log10(sum x^2 / sum (q(x) - x)^2) over every module's
    quantizer of that site and every batch (run as ``calibrate`` runs them). The quantizers are
    observed by hooks removed before returning; the model is run in eval mode without grad, with
    ``simulate: float`` (``qswap.nn.simulate.simulating``): under ``simulate: integer`` an op
    writes its result onto its reader's grid itself, so the reader would see no rounding to
    measure (the same rounding of the same kind of value, done inside the op)."""
    sites = site_names(qmodel)
    quantizers = [q for q in activation_quantizers(qmodel) if id(q) in sites]
    power: dict[str, list[float]] = {}

    def hook(site):
        def observe(module, args, out):
            x = args[0].detach().double()
            acc = power.setdefault(site, [0.0, 0.0])
            acc[0] += float((x * x).sum())
            acc[1] += float(((out.detach().double() - x) ** 2).sum())
        return observe

    with simulating(qmodel, "float"):
        run_observed(qmodel, batches, [q.register_forward_hook(hook(sites[id(q)])) for q in quantizers])
    return {site: (math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise))
            for site, (signal, noise) in sorted(power.items())}
