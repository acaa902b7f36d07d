"""Per-site sensitivity: which quantizers hurt the model, measured rather than guessed.

A *site* is one FakeQuantize of a converted, calibrated model (a weight, a linear input, a
softmax input, a residual-add operand...). For each site two probes run:

* ``alone``: only this site quantized, every other site float;
* ``all_but``: every site quantized except this one (kept float).

``metric="sqnr"`` (cheap) measures the SQNR of the model's output logits against the float
model on the given batches; ``wer`` additionally runs ``evaluate(model) -> WER`` for the top
sites (decoding is the expensive part). Sites rank by how much the model gains when that site
alone is kept float. The report is data; ``qswap.cli`` renders it, ``plot`` draws it.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from qswap.calibrate import check_batches
from qswap.convert import copy_model
from qswap.errors import CalibrationError, OutputError, expect_module
from qswap.quant.fake_quantize import FakeQuantize
from qswap.quant.switch import enabled_only

_LAYER = re.compile(r"^(.*?layers\.\d+)")


@dataclass
class SiteResult:
    site: str  # dotted path of the quantizer
    kind: str  # weight | activation
    bits: int
    group: str  # layer the site belongs to ("encoder.transformer_layers.3"), for plots
    alone_sqnr: float  # dB, only this site quantized
    all_but_sqnr: float  # dB, every site but this one quantized
    gain_db: float  # all_but_sqnr - full_sqnr: what keeping this site float buys
    delta_wer: float | None = None  # WER(all quantized) - WER(all but this site), when measured


@dataclass
class SensitivityReport:
    recipe: str
    metric: str
    full_sqnr: float
    sites: list[SiteResult] = field(default_factory=list)
    full_wer: float | None = None
    float_wer: float | None = None

    def ranked(self) -> list[SiteResult]:
        key = (lambda s: -(s.delta_wer if s.delta_wer is not None else -1e9)) if self.metric == "wer" \
            else (lambda s: -s.gain_db)
        return sorted(self.sites, key=lambda s: (key(s), -s.gain_db))

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "metric": self.metric, "full_sqnr": self.full_sqnr,
                "full_wer": self.full_wer, "float_wer": self.float_wer,
                "sites": [asdict(s) for s in self.ranked()]}


def model_output(model: nn.Module, net_input: Any) -> torch.Tensor:
    """The logits a fairseq speech model produces for a batch (seq2seq or CTC): the batch kinds
    ``qswap.calibrate`` takes, a net_input dict (``model(**batch)``), a tuple or list of arguments
    (``model(*batch)``) or one tensor (``model(batch)``); CalibrationError for anything else."""
    return output_positions(model, net_input)[0]


def output_positions(model: nn.Module, net_input: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(``model_output``, a boolean tensor that broadcasts to it and is True at the positions
    scored, or None: all of them). A CTC model's frames its ``padding_mask`` marks are left out:
    what it computes there is never decoded, and scored it had ranked sites by noise on padding
    (on a wav2vec 2.0 batch, most of the output noise of a LayerNorm's input). A seq2seq decoder's
    padding steps are still scored: leaving them out changes the shipped model's searched recipe,
    which docs/sensitivity.md and the pages after it in ``make docs`` evaluate (to do with them)."""
    if isinstance(net_input, dict):
        out = model(**net_input)
    elif isinstance(net_input, (tuple, list)):
        out = model(*net_input)
    elif isinstance(net_input, torch.Tensor):
        out = model(net_input)
    else:
        raise CalibrationError(f"a batch is a net_input dict, a tuple of arguments or a tensor, got "
                               f"{type(net_input).__name__}")
    real = None
    if isinstance(out, tuple):
        out = out[0]
    if isinstance(out, dict):
        padding = out.get("padding_mask", out.get("encoder_padding_mask"))
        padding = padding[0] if isinstance(padding, list) and padding else padding
        out = out["encoder_out"]
        out = out[0] if isinstance(out, list) else out
        if isinstance(padding, torch.Tensor) and padding.dim() == 2 and padding.t().shape == out.shape[:2]:
            real = ~padding.t().unsqueeze(-1)  # (T, B, 1) against CTC's (T, B, V)
    return out.float(), real


def output_sqnr(reference: list[torch.Tensor], model: nn.Module, batches: list) -> float:
    """SQNR (dB) of the model's outputs against reference outputs, pooled over batches, at the
    positions a decode reads (``output_positions``: padding left out).

    Elements where the reference itself is NaN/inf are left out. Where the reference is finite
    but the model's output is not, the quantized model broke: the SQNR is ``-inf`` (never
    better than any finite score). An all-zero reference matched exactly is ``+inf`` (no noise).
    The CLI writes an infinite SQNR as ``null`` in its JSON."""
    signal = noise = 0.0
    with torch.no_grad():
        for ref, batch in zip(reference, batches):
            got, real = output_positions(model, batch)
            finite = torch.isfinite(ref)
            if real is not None and real.dim() == ref.dim():
                finite = finite & real.expand_as(ref)
            if not bool(torch.isfinite(got[finite]).all()):
                return float("-inf")
            signal += float(ref[finite].double().pow(2).sum())
            noise += float((ref[finite].double() - got[finite].double()).pow(2).sum())
    if signal == 0.0 and noise == 0.0:  # a zero reference, matched exactly: no noise (0 / 0 had been -inf, "broke")
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(signal / max(noise, 1e-30))).item()


def quantizer_sites(model: nn.Module) -> dict[str, FakeQuantize]:
    """Every distinct quantizer by its first path (a tied weight's quantizer appears once)."""
    seen: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantize) and id(module) not in seen:
            seen[id(module)] = name
    lookup = dict(model.named_modules())
    return {name: lookup[name] for name in seen.values()}


def _gain(all_but: float, full: float) -> float:
    """dB gained by keeping one site float; 0 where both are the same infinity (no noise at
    all, or the model broken either way), +inf where that site alone breaks the output."""
    return 0.0 if all_but == full else all_but - full


def sensitivity(model: nn.Module, recipe: Any, batches: Iterable[dict], *, metric: str = "sqnr",
                evaluate: Callable[[nn.Module], float] | None = None, top_k: int = 10,
                calib_batches: Iterable[dict] | None = None,
                progress: Callable[[int, int], None] | None = None) -> SensitivityReport:
    """Measure every site of ``model`` converted with ``recipe``.

    ``batches``: net_inputs the outputs are compared on (and calibrated on, unless
    ``calib_batches`` is given). ``metric="wer"`` needs ``evaluate`` and measures delta WER for
    the ``top_k`` sites by SQNR gain (each is a full decode).

    >>> report = qswap.sensitivity(float_model, "w4a8", dev_batches)
    >>> report.ranked()[0].site
    """
    import qswap

    expect_module(model, "sensitivity()", CalibrationError)
    check_batches(batches, "sensitivity")
    if metric not in ("sqnr", "wer"):
        raise CalibrationError(f"metric must be 'sqnr' or 'wer', got {metric!r}")
    if metric == "wer" and evaluate is None:
        raise CalibrationError("metric='wer' needs an evaluate(model) -> WER function (the CLI "
                               "decodes a dev subset)")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:  # -2 had measured all but the last 2
        raise CalibrationError(f"top_k is how many sites metric='wer' decodes, a whole number 1 or more, got {top_k!r}")
    batches = list(batches)
    if not batches:
        raise CalibrationError("sensitivity needs at least one batch to compare outputs on")
    float_model = copy_model(model).eval()
    with torch.no_grad():
        reference = [model_output(float_model, b) for b in batches]
    calib = list(calib_batches) if calib_batches is not None else batches
    qmodel = qswap.convert(model, recipe, data=calib).eval()  # data: the statistics transforms fold (smoothquant)
    if not any(isinstance(m, FakeQuantize) for m in qmodel.modules()):
        raise CalibrationError(f"recipe {qmodel.qswap_recipe.name} quantizes nothing in this model: sensitivity "
                               f"probes the sites a recipe quantizes; pick one that quantizes something (w4a8, "
                               f"w8a8, ...)")
    qswap.calibrate(qmodel, calib)
    sites = quantizer_sites(qmodel)
    full = output_sqnr(reference, qmodel, batches)
    report = SensitivityReport(qmodel.qswap_recipe.name, metric, full)
    everything = list(sites.values())
    for i, (name, q) in enumerate(sites.items()):
        with enabled_only(everything, keep=[s for s in everything if s is not q]):
            all_but = output_sqnr(reference, qmodel, batches)
        with enabled_only(everything, keep=[q]):
            alone = output_sqnr(reference, qmodel, batches)
        match = _LAYER.match(name)
        report.sites.append(SiteResult(name, q.kind, q.spec.bits, match.group(1) if match else name.split(".")[0],
                                       alone, all_but, _gain(all_but, full)))
        if progress is not None:
            progress(i + 1, len(sites))
    if metric == "wer":
        def wer(model: nn.Module) -> float:
            return checked_wer(evaluate, model, CalibrationError)

        report.full_wer = wer(qmodel)
        report.float_wer = wer(float_model)
        for site in sorted(report.sites, key=lambda s: -s.gain_db)[:top_k]:
            with enabled_only([sites[site.site]]):
                site.delta_wer = report.full_wer - wer(qmodel)
    return report


def checked_wer(evaluate: Callable[[nn.Module], float], model: nn.Module, error: type) -> float:
    """``evaluate(model)`` as a float; ``error`` unless it is a finite real number (a NaN had made
    every comparison false: search moved no unit and said nothing, sensitivity ranked NaN
    differences; None had been a raw TypeError)."""
    import math
    import numbers

    value = evaluate(model)
    number = None
    if isinstance(value, torch.Tensor):  # a one-element real tensor (not bool, not complex)
        if value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
            number = float(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):  # Python and numpy reals
        number = float(value)
    if number is None or not math.isfinite(number):
        raise error(f"evaluate(model) must return a finite WER (a number), got {value!r} "
                    f"({type(value).__name__}); check the evaluation function")
    return number


PLOT_FORMATS = ("png", "svg")  # what ``plot`` writes, named by the path's extension


def plot_format(path: str) -> str:
    """The format ``plot`` writes ``path`` in, from its extension; an OutputError for any other
    (x.pdf had been written as a PNG named .pdf)."""
    import os

    suffix = os.path.splitext(str(path))[1].lstrip(".").lower()
    if suffix not in PLOT_FORMATS:
        given = f"a .{suffix} file" if suffix else "a path with no extension"
        raise OutputError(f"--plot {path}: the chart is written as {' or '.join(f'.{f}' for f in PLOT_FORMATS)}, "
                          f"not {given}; give the path one of those extensions")
    return suffix


def plot(report: SensitivityReport, path: str, top: int = 40) -> None:
    """A horizontal bar chart of the SQNR gain per site, colored by layer, written atomically.

    Draws on its own ``Figure`` with the Agg canvas: no pyplot, the process's matplotlib backend
    (a notebook's) is left alone. A gain that is not finite (an SQNR of -inf: a site whose
    quantization breaks the model) is drawn at the edge of the axis and labelled."""
    import math

    fmt = plot_format(path)  # before anything is drawn
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from qswap.io.atomic import atomic_open

    def order(s: SiteResult) -> float:  # nan (-inf minus -inf) last
        return -s.gain_db if not math.isnan(s.gain_db) else math.inf

    ranked = sorted(report.sites, key=order)[:top]
    finite = [s.gain_db for s in ranked if math.isfinite(s.gain_db)]
    lo, hi = min(finite + [0.0]), max(finite + [1.0])
    edge = 0.15 * (hi - lo)  # an infinite gain: a hatched bar past every finite one
    widths = [s.gain_db if math.isfinite(s.gain_db) else hi + edge if s.gain_db > 0
              else lo - edge if s.gain_db < 0 else 0.0 for s in ranked]
    groups = sorted({s.group for s in ranked})
    cmap = colormaps["tab20"]
    colors = {g: cmap(i % 20) for i, g in enumerate(groups)}
    fig = Figure(figsize=(10, max(3, 0.28 * len(ranked) + 1.5)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = [s.site.replace("transformer_layers", "L").replace("_quant", "") for s in ranked]
    bars = ax.barh(range(len(ranked)), widths, color=[colors[s.group] for s in ranked])
    for i, s in enumerate(ranked):
        if not math.isfinite(s.gain_db):
            bars[i].set_hatch("//")
            text = " n/a (broken either way) " if math.isnan(s.gain_db) else f" {s.gain_db:+.0f} dB "
            ax.text(widths[i], i, text, va="center", fontsize=6, ha="left" if widths[i] >= 0 else "right")
    ax.set_yticks(range(len(ranked)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("output SQNR gain (dB) when this site alone stays float")
    ax.set_title(f"qswap sensitivity, recipe {report.recipe} (all sites quantized: {report.full_sqnr:.1f} dB)")
    handles = [Rectangle((0, 0), 1, 1, color=colors[g]) for g in groups]
    ax.legend(handles, groups, fontsize=6, loc="lower right")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=fmt, dpi=110)
