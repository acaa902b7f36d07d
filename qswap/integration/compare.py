"""The comparison table the field reports (Brevitas's QuartzNet table): one row per recipe with
WER, delta WER vs float, the honesty verdict, weight memory (codes at their bit widths, with their
grids), and MACs and BOPs per second of audio. WER and delta WER carry paired bootstrap confidence intervals
(qswap.integration.bootstrap); a delta whose interval contains 0 is not significant. A library
function: it returns rows; the CLI renders them."""
from __future__ import annotations

import itertools
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

import qswap
from qswap.calibrate import activation_quantizers
from qswap.convert import copy_model
from qswap.errors import ConvertError, DataError, QswapWarning
from qswap.integration import data as fdata
from qswap.integration.bootstrap import (Bootstrap, bounds, delta_interval, interval_text, no_interval_note, significant,
                                         value_text, wer_interval)
from qswap.integration.cost import measure
from qswap.integration.decode import decode
from qswap.integration.metrics import error_counts, utterance_word_errors
from qswap.markdown import cell as md_cell


@dataclass
class Row:
    recipe: str
    wer: float
    cer: float
    delta_wer: float
    honest: bool
    float_ops: int  # the honesty audit's violations (float compute grouped by module, op, operand): the name of stored results
    weight_mb: float
    mmacs_per_s: float
    gbops_per_s: float
    decode_s: float
    utterances: int
    # per-utterance word errors and reference words (by utterance id): what the bootstrap resamples
    utterance_errors: list[int] = field(default_factory=list, repr=False)
    utterance_words: list[int] = field(default_factory=list, repr=False)
    wer_ci: tuple[float, float] | None = None
    delta_wer_ci: tuple[float, float] | None = None
    significant: bool | None = None  # None for the reference row itself, and without an interval
    integer: "IntegerResult | None" = None  # with compare(..., integer=True)


@dataclass
class IntegerResult:
    """The recipe's integer model (``qswap.integerize``) decoded like the fake-quant model:
    its WER, the paired difference integer - fake-quant with its interval, the integer audit's
    verdict; or why there is no integer model (``note``)."""
    wer: float | None = None
    delta_vs_fake: float | None = None
    delta_vs_fake_ci: tuple[float, float] | None = None
    integer_only: bool | None = None
    decode_s: float | None = None
    same_transcripts: int | None = None  # utterances whose integer transcript is the fake-quant one
    note: str | None = None
    utterance_errors: list[int] = field(default_factory=list, repr=False)


@dataclass
class Comparison:
    checkpoint: str
    subset: str
    rows: list[Row] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        note = {"note": self.note} if self.note else {}
        return {"checkpoint": self.checkpoint, "subset": self.subset, "settings": self.settings,
                "rows": [asdict(r) for r in self.rows], **note}

    @property
    def note(self) -> str | None:
        """Why the intervals are missing (too few utterances to resample); None when they are there."""
        return no_interval_note(self.rows[0].utterances, f"{self.subset} gave") if self.rows else None

    def markdown(self) -> str:
        head = ("| recipe | WER % [95 % CI] | ΔWER [95 % CI] | significant | CER % | honest (violations) | "
                "weights MB | MMACs/s | GBOPs/s |")
        if self.settings.get("integer"):
            head += " " + " | ".join(INTEGER_COLUMNS) + " |"
        lines = [head, "|" + "---|" * head.count(" |")]
        for r in self.rows:
            verdict = "yes" if r.honest else f"no ({r.float_ops})"
            line = (f"| {md_cell(r.recipe)} | {wer_cell(r)} | {delta_cell(r)} | {significance_cell(r)} | "
                    f"{r.cer:.2f} | {verdict} | {r.weight_mb:.2f} | {r.mmacs_per_s:.1f} | {r.gbops_per_s:.1f} |")
            if self.settings.get("integer"):
                line += " " + " | ".join(map(md_cell, integer_cells(r))) + " |"
            lines.append(line)
        return "\n".join(lines + ([f"\n{self.note}"] if self.note else [])) + "\n"


INTEGER_COLUMNS = ("integer WER %", "integer - fake [95 % CI]", "integer-only")


def integer_cells(row: Row) -> tuple[str, str, str]:
    """The integer columns of a row: '-' (with the reason as the last cell) without an integer model."""
    i = row.integer
    if i is None or i.wer is None:
        return "-", "-", f"- ({i.note})" if i is not None and i.note else "-"
    return (f"{i.wer:.2f}", with_interval(i.delta_vs_fake, i.delta_vs_fake_ci, "+"),
            "yes" if i.integer_only else "no")


def interval_suffix(ci, sign: str = "") -> str:
    """`` [6.74, 13.17]`` (``sign="+"`` for differences); empty without an interval (the table's
    note says why)."""
    return interval_text(ci, sign, missing="")


def with_interval(value: float, ci, sign: str = "") -> str:
    """``9.77 [6.74, 13.17]``; the value alone without an interval."""
    return value_text(value, ci, sign, missing="")


def significance_text(significant: bool | None) -> str:
    """'yes'/'no' for a row compared with the reference; '-' for the reference itself."""
    return "-" if significant is None else ("yes" if significant else "no")


def wer_cell(row: Row) -> str:
    return with_interval(row.wer, row.wer_ci)


def delta_cell(row: Row) -> str:
    return with_interval(row.delta_wer, row.delta_wer_ci, "+")


def significance_cell(row: Row) -> str:
    return significance_text(row.significant)


def add_intervals(rows: list[Row], bootstrap: Bootstrap = Bootstrap()) -> None:
    """WER intervals for every row and paired ΔWER intervals against ``rows[0]`` (the float
    reference), in place. Every row must have been scored on the same utterances."""
    reference = rows[0]
    for row in rows:
        if row.utterance_words != reference.utterance_words:
            raise DataError(f"{row.recipe} and {reference.recipe} were not scored on the same utterances; "
                            f"a paired interval needs both decodes of one subset")
        row.delta_wer = row.wer - reference.wer
        row.wer_ci = bounds(wer_interval(row.utterance_errors, row.utterance_words, bootstrap))
        if row is reference:
            continue
        delta = delta_interval(row.utterance_errors, reference.utterance_errors, row.utterance_words, bootstrap)
        row.delta_wer_ci = bounds(delta)
        row.significant = significant(delta)
    for row in rows:
        if row.integer is not None and row.integer.wer is not None:
            row.integer.delta_vs_fake = row.integer.wer - row.wer
            row.integer.delta_vs_fake_ci = bounds(delta_interval(
                row.integer.utterance_errors, row.utterance_errors, row.utterance_words, bootstrap))


def evaluate_recipe(float_model, task, recipe, *, subset: str, calib_subset: str, calib_batches: int,
                    beam: int, max_sentences: int = 32, batches: int | None = None, integer: bool = False,
                    progress: Callable[[str, int, int], None] | None = None) -> tuple[Row, torch.nn.Module]:
    """Convert, calibrate, audit and decode one recipe; delta_wer is left 0 for the caller.
    ``integer``: also integerize it, audit the integer model and decode it (``Row.integer``).
    ``progress(stage, n, total)``: n more batches calibrated or utterances decoded, of total;
    ``batches``: decode only the subset's first ``batches`` batches (all when None)."""
    qmodel = prepare_recipe(float_model, task, recipe, calib_subset=calib_subset, calib_batches=calib_batches,
                            max_sentences=max_sentences, progress=_ticker(progress)("calibrate", calib_batches))
    row = score(qmodel, task, qmodel.qswap_recipe.name, subset=subset, beam=beam, max_sentences=max_sentences,
                batches=batches, integer=integer, progress=progress)
    return row, qmodel


def prepare_recipe(float_model, task, recipe, *, calib_subset: str, calib_batches: int, max_sentences: int = 32,
                   progress: Callable[[int], None] | None = None) -> torch.nn.Module:
    """``float_model`` converted with ``recipe`` (its transforms fed the calibration batches where
    they need statistics) and calibrated on ``calib_batches`` batches of ``calib_subset``: the model
    a row of the comparison scores. ``progress(n)``: n more batches calibrated."""
    data = fdata.transform_data(recipe, task, calib_subset, calib_batches, max_sentences=max_sentences)
    qmodel = qswap.convert(float_model, recipe, data=data)
    if activation_quantizers(qmodel):
        qswap.calibrate(qmodel, fdata.net_inputs(task, calib_subset, calib_batches, max_sentences=max_sentences),
                        progress=progress)
    return qmodel


COST_UTTERANCES = 32  # the utterances a row's MMAC/s and GBOP/s are counted on


def calibration_settings(task, calib_subset: str, calib_batches: int, max_sentences: int = 32) -> dict:
    """The calibration a row runs, for a result's settings: ``calib_batches`` as asked,
    ``calib_batches_used``, fewer (with a QswapWarning) when ``calib_subset`` batched at
    ``max_sentences`` makes fewer, and ``max_sentences``."""
    used = batches_used(task, calib_subset, calib_batches, "--calib-batches", "calibration", max_sentences)
    return {"calib_subset": calib_subset, "calib_batches": calib_batches, "calib_batches_used": used,
            "max_sentences": max_sentences}


def batches_used(task, subset: str, asked: int, option: str, use: str, max_sentences: int = 32) -> int:
    """How many of the ``asked`` batches of ``subset`` (batched at ``max_sentences``) exist: fewer
    with a QswapWarning naming ``option`` and what ``use`` then runs on."""
    return said_used(subset, asked, fdata.batch_count(task, subset, max_sentences=max_sentences), option, use,
                     max_sentences, stacklevel=4)


def said_used(subset: str, asked: int, available: int, option: str, use: str, max_sentences: int = 32,
              stacklevel: int = 3) -> int:
    """``batches_used`` for a caller that has read the batches (``available``: how many
    ``subset`` made, at most ``asked``): the count used, with its QswapWarning where fewer."""
    used = min(asked, available)
    if used < asked:
        warnings.warn(QswapWarning(
            f"{option} {asked}: {subset} makes {available} batch(es) of up to {max_sentences} "
            f"utterances, so {use} uses {used}; pass {option} {used} to say so, or a smaller "
            f"--max-sentences for more, smaller batches"), stacklevel=stacklevel)
    return used


def row_cost(qmodel, task, subset: str, count: int = COST_UTTERANCES) -> tuple[float, float]:
    """A row's (MMAC/s, GBOP/s): one forward of each of the subset's first ``count`` utterances,
    alone (``fdata.single_utterances``), counted by ``qswap.integration.cost.measure``; their MACs
    (BOPs) summed over the seconds of their audio. No padded frame is counted, so the rate does not
    depend on --max-sentences (a padded batch's forward computes frames no audio fills)."""
    macs = bops = seconds = 0.0
    for sample in fdata.single_utterances(task, subset, count):
        cost = measure(qmodel, lambda m: m(**sample["net_input"]), fdata.audio_seconds(sample))
        macs, bops, seconds = macs + cost.macs, bops + cost.bops, seconds + cost.audio_seconds
    return macs / max(seconds, 1e-9) / 1e6, bops / max(seconds, 1e-9) / 1e9


def _ticker(progress):
    return (lambda stage, total: (lambda n: progress(stage, n, total))) if progress else (lambda *_: None)


def score(qmodel, task, name: str, *, subset: str, beam: int, max_sentences: int = 32, batches: int | None = None,
          integer: bool = False, progress: Callable[[str, int, int], None] | None = None) -> Row:
    """Audit and decode a converted (and calibrated) model: its Row, delta_wer left 0.
    ``integer``: also integerize, audit and decode the integer model (``Row.integer``)."""
    tick = _ticker(progress)
    audit_input = fdata.first_net_input(task, subset)
    report = qswap.audit(qmodel, audit_input)
    samples = list(itertools.islice(fdata.batches(task, subset, max_sentences=max_sentences), batches))
    result = decode(task, qmodel, samples, beam=beam, progress=tick("decode", sum(len(s["id"]) for s in samples)))
    refs, hyps = [u.ref for u in result.utterances], [u.hyp for u in result.utterances]
    counts = error_counts(refs, hyps)
    per_errors, per_words = utterance_word_errors(refs, hyps)
    mmacs, gbops = row_cost(qmodel, task, subset)
    weight_bytes = qmodel.qswap_report.quantized_bytes
    row = Row(name, counts.wer, counts.cer, 0.0, report.honest, len(report.violations), weight_bytes / 1e6,
              mmacs, gbops, result.seconds, counts.utterances, per_errors, per_words)
    if integer:
        row.integer = evaluate_integer(qmodel, task, samples, audit_input, hyps, beam=beam,
                                       progress=tick("integer decode", len(refs)))
    return row


def evaluate_integer(qmodel, task, samples: list[dict], audit_input: dict, fake_hyps: list[str], *, beam: int,
                     progress: Callable[[int], None] | None = None) -> IntegerResult:
    """Integerize ``qmodel``, audit the integer model on ``audit_input`` (a net_input),
    decode ``samples`` with it (the same beam search) and count the transcripts equal to
    ``fake_hyps`` (the fake-quant model's, by utterance id); the interval is added by ``add_intervals``.
    A model without an integer form (float, weight-only, an architecture not done yet) gives a
    result with only ``note``: each module its ``IntegerizeError`` names; so does an integer model
    that refuses an utterance while decoding (more keys than a 16-bit softmax's grid sums exactly,
    a rotary table's rows), and the other recipes' rows stay."""
    from qswap.errors import IntegerizeError
    from qswap.honesty.integer import audit_integer
    try:
        imodel = qswap.integerize(qmodel)
    except IntegerizeError as exc:
        return IntegerResult(note=f"no integer form: {_problems(exc)}")
    report = audit_integer(imodel, audit_input)
    try:
        result = decode(task, imodel, samples, beam=beam, progress=progress)
    except IntegerizeError as exc:
        return IntegerResult(integer_only=report.integer_only, note=f"the integer model refuses an utterance: "
                                                                    f"{_problems(exc)}")
    refs, hyps = [u.ref for u in result.utterances], [u.hyp for u in result.utterances]
    errors, _ = utterance_word_errors(refs, hyps)
    counts = error_counts(refs, hyps)
    return IntegerResult(wer=counts.wer, integer_only=report.integer_only, decode_s=result.seconds,
                         same_transcripts=sum(a == b for a, b in zip(hyps, fake_hyps)), utterance_errors=errors)


def _problems(exc: Exception) -> str:
    """An IntegerizeError's problems on one line: its lines after the header
    (``cannot integerize the model:``), joined; a one-line error as it is."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines[1:] if len(lines) > 1 and lines[0].endswith(":") else lines)


def compare(checkpoint: str, data: str, recipes: list[str], *, subset: str = "test",
            calib_subset: str = "train", calib_batches: int = 8, beam: int = 5,
            max_sentences: int = 32, trust_checkpoint: bool = False, bootstrap: Bootstrap = Bootstrap(),
            integer: bool = False, quantized: dict[str, str] | None = None,
            progress: Callable[[str, str, int, int], None] | None = None) -> Comparison:
    """One row per recipe; the float model (recipe fp32) is always evaluated first as the reference.
    ``integer``: each quantized row also gets its integer model's WER, the paired difference
    integer - fake-quant and the integer audit's verdict (``Row.integer``).
    ``quantized``: row name -> a quantized checkpoint (``qswap convert``'s, or a QAT run's): rows
    after the recipes', each loaded as it is (its own recipe and grids, no calibration), audited
    and decoded as the others.
    ``progress(recipe, stage, n, total)`` as in ``evaluate_recipe``. Every recipe is loaded before
    anything is decoded: a name misspelled late in the list is a RecipeError now, not minutes later."""
    from qswap.errors import DataError, RecipeError
    twice = sorted({r for r in recipes if recipes.count(r) > 1})
    if twice:
        raise RecipeError(f"{', '.join(twice)} given more than once in the recipes to compare; name each once")
    converted = [r for r in recipes if r != "fp32"]  # the rows that convert and calibrate the float model
    if integer and not converted and not quantized:  # it had been ignored
        raise DataError("integer comparison (--integer) integerizes the quantized rows, and the recipe fp32 alone "
                        "gives none: add a quantized recipe (--recipes fp32 w8a8) or a --quantized NAME=QCKPT row, "
                        "or drop --integer")
    rows = row_names(["fp32", *[r for r in recipes if r != "fp32"]])
    for name, path in (quantized or {}).items():  # two rows of one name: which is which?
        if name in rows:
            whose = "the float model's" if name == "fp32" else f"recipe {rows[name]}'s"
            raise DataError(f"--quantized {name}={path}: {name!r} is already {whose} row name; give this "
                            f"checkpoint's row another name (--quantized {name}_2={path})")
    model, task = fdata.load_model_and_task(checkpoint, data, trust_checkpoint=trust_checkpoint)
    stored = getattr(getattr(model, "qswap_recipe", None), "name", None)
    if stored is not None:  # every row converts the checkpoint: it must be the float one
        raise ConvertError(f"{checkpoint} is a quantized checkpoint (recipe {stored}); compare converts the float "
                           f"checkpoint with each recipe: pass the float one, and this one as a row of its own "
                           f"(--quantized {stored}_qckpt={checkpoint})")
    loaded = {name: _quantized_checkpoint(name, path, data, trust_checkpoint) for name, path in (quantized or {}).items()}
    names = ["fp32", *converted]
    # without a recipe to convert nothing is calibrated (quantized rows keep their own grids): no
    # calibration to record, and no warning about a calibration subset that is not read
    calibration = calibration_settings(task, calib_subset, calib_batches, max_sentences) if converted \
        else {"calib_subset": None, "calib_batches": 0, "calib_batches_used": 0, "max_sentences": max_sentences}
    table = Comparison(str(checkpoint), subset, settings={
        **calibration, "beam": beam, "bootstrap": bootstrap.to_dict(), "integer": integer})
    for recipe in names:
        cb = (lambda stage, n, total, r=recipe: progress(r, stage, n, total)) if progress else None
        row, _ = evaluate_recipe(copy_model(model), task, recipe, subset=subset, calib_subset=calib_subset,
                                 calib_batches=calib_batches, beam=beam, max_sentences=max_sentences,
                                 integer=integer and recipe != "fp32", progress=cb)
        table.rows.append(row)
    for name, qmodel in loaded.items():
        cb = (lambda stage, n, total, r=name: progress(r, stage, n, total)) if progress else None
        table.rows.append(score(qmodel, task, name, subset=subset, beam=beam, max_sentences=max_sentences,
                                integer=integer, progress=cb))
    add_intervals(table.rows, bootstrap)
    return table


def row_names(recipes: list[str]) -> dict[str, str]:
    """{row name: recipe as given}: each recipe's ``name``, which labels its row. Two recipes of
    one name (a copy of a recipe file, or a file named like a shipped recipe or fp32) are a
    RecipeError naming both: their rows could not be told apart."""
    from qswap.errors import RecipeError

    rows: dict[str, str] = {}
    for recipe in recipes:
        name = qswap.load_recipe(recipe).name
        if name in rows:
            raise RecipeError(f"recipes {rows[name]} and {recipe} are both named {name!r}, and a row is labelled by "
                              f"its recipe's name; give one of them another 'name:'")
        rows[name] = recipe
    return rows


def _quantized_checkpoint(name: str, path: str, data: str, trust_checkpoint: bool):
    """The model of ``--quantized NAME=QCKPT``, loaded before any row is decoded: a checkpoint that
    is not a quantized one (``qswap convert``'s, a QAT run's) is a DataError then, not after the
    recipes' rows."""
    from qswap.errors import DataError
    from qswap.integration import data as fdata

    qmodel, _ = fdata.load_model_and_task(path, data, trust_checkpoint=trust_checkpoint)
    if getattr(qmodel, "qswap_recipe", None) is None or getattr(qmodel, "qswap_report", None) is None:
        raise DataError(f"--quantized {name}={path}: a float checkpoint (no qswap recipe inside); pass one that "
                        f"'qswap convert CKPT --recipe R -o QCKPT' or a QAT run wrote, or add the float model's "
                        f"recipe to --recipes")
    return qmodel
