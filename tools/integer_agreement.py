#!/usr/bin/env python3
"""Measure how far each integer form (issue 16) is from its fake-quant counterpart, in output
grid steps, and write the table into docs/integer.md between the ``<!-- agreement:begin -->``
and ``<!-- agreement:end -->`` markers. Small torch models, fixed seeds, CPU, one thread.

    python tools/integer_agreement.py            # rewrite the table
    python tools/integer_agreement.py --print    # print it only
    python tools/integer_agreement.py --simulate float     # print it with the float insides
    python tools/integer_agreement.py --shipped 10         # the shipped model, both insides, printed
    python tools/integer_agreement.py --decode             # its beam decode, both insides, printed
    python tools/integer_agreement.py --simulate float --decode --subsets test test_heldout \
        --recipes w8a8 w4a8 w4a8_edges8 searched          # one setting, recipes and test sets chosen
                                                          # (this one, all four, is the doc's table)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from qswap.nn.simulate import SIMULATIONS  # noqa: E402

DOC = REPO / "docs" / "integer.md"
ASSET = REPO / "qswap" / "assets" / "s2t_demo"
BEGIN, END = "<!-- agreement:begin -->", "<!-- agreement:end -->"
SIM_BEGIN, SIM_END = "<!-- simulate-decode:begin -->", "<!-- simulate-decode:end -->"  # --decode --simulate float
SHIPPED_BEGIN, SHIPPED_END = "<!-- shipped-agreement:begin -->", "<!-- shipped-agreement:end -->"  # --shipped N
SIMULATE = {"mode": SIMULATIONS[0]}  # the fake-quant model's insides (--simulate; the default: integer)
ALTERNATIVE = SIMULATIONS[1]  # the option the doc's simulate-decode table shows beside the default: float
SHIPPED_RECIPES = ("w8a8", "w4a8", "w4a8_edges8", "searched")  # searched: the model's searched.yaml


def _shipped_recipe(name: str) -> str:
    """A recipe name, or ``searched``: the shipped model's searched recipe file."""
    return str(ASSET / "searched.yaml") if name == "searched" else name


def _recipe(name: str, simulate: str | None = None):
    """The shipped recipe ``name`` with the ``simulate`` key ``simulate`` (None: this run's)."""
    from qswap.recipe import with_simulate
    return with_simulate(name, simulate or SIMULATE["mode"])


def _calibrated(model: nn.Module, batches: list, recipe: str) -> nn.Module:
    import qswap
    q = qswap.convert(model.eval(), _recipe(recipe))
    qswap.calibrate(q, batches)
    return q


def _chain(module: nn.Module, x: torch.Tensor, recipe: str, width: int, rounding: str = "single"):
    """(integer codes, fake-quant codes) of ``module`` writing onto a following Linear's input grid
    (``rounding``: of a linear's requantization)."""
    import dataclasses
    from qswap.quant.integer import Grid
    q = _calibrated(nn.Sequential(module, nn.Linear(width, 4)), [x, x.flip(0)], recipe)
    grid_out = Grid.of(q[1].input_quant)
    with torch.no_grad():
        reference = grid_out.quantize(q[1].input_quant(q[0](x)))
        first = x if x.dtype == torch.int64 else Grid.of(q[0].input_quant).quantize(x)
        form = q[0].to_integer(grid_out)
        if rounding != "single":
            form.requant = dataclasses.replace(form.requant, rounding=rounding)
        return form(first), reference


def _conv(conv: nn.Sequential, x: torch.Tensor, recipe: str):
    from qswap.quant.integer import Grid
    q = _calibrated(nn.Sequential(*conv, nn.Linear(12 * 15, 4)), [x, x.flip(0)], recipe)
    grid_out = Grid.of(q[2].input_quant)
    with torch.no_grad():
        reference = grid_out.quantize(q[2].input_quant(q[0](x)))
    return q[0].to_integer(grid_out)(Grid.of(q[0].input_quant).quantize(x)), reference


def _attention(recipe: str):
    from qswap.quant.integer import Grid
    x = torch.randn(12, 3, 32)
    causal = torch.ones(12, 12, dtype=torch.bool).triu(1)
    import qswap
    mha = qswap.convert(nn.MultiheadAttention(32, 4).eval(), _recipe(recipe))
    qswap.calibrate(mha, [x], forward=lambda m, b: m(b, b, b, attn_mask=causal))
    seen = {}
    hook = mha.core.register_forward_hook(lambda mod, args, out: seen.update(args=args, out=out))
    with torch.no_grad():
        mha(x, x, x, attn_mask=causal)
    hook.remove()
    qkv, scaling = seen["args"][:3], seen["args"][3]
    grid_out = Grid.of(mha.out_proj.input_quant)
    codes = [Grid.of(quant).quantize(t) for quant, t in zip((mha.core.q_quant, mha.core.k_quant, mha.core.v_quant), qkv)]
    context, probs = mha.core.to_integer(scaling, grid_out)(*codes, blocked=causal)
    with torch.no_grad():
        ref_context = grid_out.quantize(mha.out_proj.input_quant(seen["out"][0]))
    ref_probs = Grid.of(mha.core.softmax_out_quant).quantize(seen["out"][1])
    return (probs, ref_probs), (context, ref_context)


def _add():
    from qswap.quant.fake_quantize import FakeQuantize
    from qswap.quant.integer import AddParams, Grid, rescaled_add
    from qswap.quant.spec import QuantSpec
    a, b = torch.randn(20000) * 2, torch.randn(20000) * 0.3

    def frozen(t):
        fq = FakeQuantize(QuantSpec(bits=8, symmetric=False), kind="activation")
        fq(t)
        fq.freeze()
        return fq
    qa, qb = frozen(a), frozen(b)
    qo = frozen(qa(a) + qb(b))
    ga, gb, go = Grid.of(qa), Grid.of(qb), Grid.of(qo)
    params = AddParams.build(ga.scale, gb.scale, go.scale, go.zero_point, go.qmin, go.qmax)
    with torch.no_grad():
        reference = go.quantize(qo(qa(a) + qb(b)))
    return rescaled_add(ga.quantize(a), ga.zero_point, gb.quantize(b), gb.zero_point, params), reference


def _s2t_encoder(recipe: str):
    """The integer encoder of a small untrained fairseq s2t_transformer (2 layers, dim 64) against
    its fake-quant encoder, on valid frames, on the first decoder layer's key grid."""
    import warnings

    import qswap
    from qswap.models import build_s2t_transformer, s2t_net_input
    from qswap.quant.integer import Grid
    net_input = s2t_net_input()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = qswap.convert(build_s2t_transformer(seed=0), _recipe(recipe))
        qswap.calibrate(q, [net_input])
    grid = Grid.of(q.decoder.layers[0].encoder_attn.key_quant)
    encoder = q.encoder.to_integer(grid)
    src, lengths = net_input["src_tokens"], net_input["src_lengths"]
    codes, padding = encoder.forward_codes(encoder.quantize_input(src), lengths)
    with torch.no_grad():
        reference = grid.quantize(q.encoder(src, lengths)["encoder_out"][0])
    valid = ~padding.T
    return codes[valid], reference[valid]


def _s2t_model(recipe: str) -> tuple[str, float, float, int]:
    """(recipe, % of teacher-forced best tokens equal, largest |logit difference| in steps of the
    logits grid, positions) of the integer S2T transformer against the fake-quant one."""
    import warnings

    import qswap
    from qswap.models import build_s2t_transformer, s2t_net_input
    net_input = s2t_net_input()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = qswap.convert(build_s2t_transformer(seed=0), _recipe(recipe))
        qswap.calibrate(q, [net_input])
    with torch.no_grad():
        reference = q(**net_input)[0]
    logits = qswap.integerize(q)(**net_input)[0]
    equal = 100 * float((logits.argmax(-1) == reference.argmax(-1)).double().mean())
    steps = float((logits - reference).abs().max() / q.logits_quant.scale)
    return recipe, equal, steps, reference.shape[0] * reference.shape[1]


def shipped(recipe: str, simulate: str, count: int, calib_batches: int = 8) -> tuple:
    """The shipped S2T model, teacher-forced on the first ``count`` test utterances: (integer
    encoder output codes, fake-quant ones) on the first decoder layer's key grid over valid
    frames, and (integer logits codes, fake-quant ones) over target positions, the fake-quant
    model under ``simulate`` (the recipe's key)."""
    import qswap
    from qswap.integration import data as fdata
    from qswap.quant.integer import Grid
    model, task = fdata.load_model_and_task(ASSET / "checkpoint.pt", ASSET)
    q = qswap.convert(model, _recipe(_shipped_recipe(recipe), simulate))
    qswap.calibrate(q, fdata.net_inputs(task, "train_calib", calib_batches, max_sentences=32))
    dataset = fdata.load_subset(task, "test")
    sample = dataset.collater([dataset[i] for i in range(min(count, len(dataset)))])
    net_input, target = sample["net_input"], sample["target"]
    grid = Grid.of(q.decoder.layers[0].encoder_attn.key_quant)
    encoder = q.encoder.to_integer(grid)
    src, lengths = net_input["src_tokens"], net_input["src_lengths"]
    codes, padding = encoder.forward_codes(encoder.quantize_input(src), lengths)
    logits_grid = Grid.of(q.logits_quant)
    with torch.no_grad():
        reference = grid.quantize(q.encoder(src, lengths)["encoder_out"][0])
        logits = logits_grid.quantize(q(**net_input)[0])
    integer_logits = logits_grid.quantize(qswap.integerize(q)(**net_input)[0])
    valid, tokens = ~padding.T, target != task.tgt_dict.pad()
    return (codes[valid], reference[valid]), (integer_logits[tokens], logits[tokens])


def decoded(recipe: str, simulate: str, subset: str = "test"):
    """The shipped model's ``qswap.integration.compare`` row (``recipe`` under ``simulate``) on the
    whole ``subset``, calibrated and decoded as tools/integer_doc.py does (``train_calib``, 4
    batches of 32; beam 5): fake-quant WER, integer WER, transcripts the same."""
    from qswap.integration import data as fdata
    from qswap.integration.compare import evaluate_recipe
    model, task = fdata.load_model_and_task(ASSET / "checkpoint.pt", ASSET)
    row, _ = evaluate_recipe(model, task, _recipe(_shipped_recipe(recipe), simulate), subset=subset,
                             calib_subset="train_calib", calib_batches=4, beam=5, integer=True)
    return row


def render_decoded(recipes=SHIPPED_RECIPES, subsets=("test",), simulations=("integer", "float")) -> str:
    """Rows of the shipped model's beam decode (100 utterances a set, beam 5) under the
    ``simulate`` settings ``simulations``: fake-quant and integer WER, their difference against
    the issue's 0.2 target, transcripts the same, decode seconds."""
    lines = ["| recipe | test set | simulate | fake-quant WER % | integer WER % | integer - fake | within 0.2 | "
             "same transcripts | decode s (fake, integer) |", "|---|---|---|---|---|---|---|---|---|"]
    for subset in subsets:
        for recipe in recipes:
            for simulate in simulations:
                row = decoded(recipe, simulate, subset)
                gap = row.integer.wer - row.wer
                lines.append(f"| {recipe} | {subset} | {simulate} | {row.wer:.2f} | {row.integer.wer:.2f} | "
                             f"{gap:+.2f} | {'yes' if abs(gap) <= 0.2 + 1e-9 else 'no'} | "
                             f"{row.integer.same_transcripts} of {row.utterances} | "
                             f"{row.decode_s:.0f}, {row.integer.decode_s:.0f} |")
    return "\n".join(lines)


def measure() -> list[tuple[str, str, torch.Tensor, torch.Tensor]]:
    """(op, recipe, integer codes, fake-quant codes) per row."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rows = []
    x48, x64 = torch.randn(16, 10, 48), torch.randn(16, 10, 64) * 3 + 1
    for recipe in ("w8a8", "w8a8_per_channel", "w4a8"):
        rows.append(("QLinear 48->32", recipe, *_chain(nn.Linear(48, 32), x48, recipe, 32)))
    for recipe in ("w8a8", "w4a8"):
        rows.append(("QLinear 48->32, gemmlowp double rounding", recipe,
                     *_chain(nn.Linear(48, 32), x48, recipe, 32, rounding="double")))
    ln = nn.LayerNorm(64)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_(0, 0.2)
    for recipe in ("w8a8", "w8a8_per_channel"):
        rows.append(("QLayerNorm 64", recipe, *_chain(ln, x64, recipe, 64)))
    x16 = torch.randn(16, 10, 16) * 2
    for act in (nn.ReLU(), nn.GELU(), nn.SiLU(), nn.Sigmoid(), nn.Tanh()):
        rows.append((f"{type(act).__name__} (table)", "w8a8", *_chain(act, x16, "w8a8", 16)))
    rows.append(("GLU (2^-15 gate)", "w8a8", *_chain(nn.GLU(), torch.randn(16, 10, 32) * 2, "w8a8", 16)))
    conv = nn.Sequential(nn.Conv1d(8, 12, 3, stride=2, padding=1), nn.Flatten())
    for recipe in ("w8a8", "w4a8"):
        rows.append(("QConv1d k3 s2", recipe, *_conv(conv, torch.randn(4, 8, 30), recipe)))
    rows.append(("Softmax over 30", "w8a8", *_chain(nn.Softmax(dim=-1), torch.randn(16, 10, 30) * 3, "w8a8", 30)))
    tokens = torch.randint(0, 200, (16, 10))
    for recipe in ("w8a8", "w8a8_per_channel"):
        rows.append(("QEmbedding 200x16", recipe, *_chain(nn.Embedding(200, 16), tokens, recipe, 16)))
    probs, context = _attention("w8a8")
    rows.append(("attention probs (12 keys, causal)", "w8a8", *probs))
    rows.append(("attention context", "w8a8", *context))
    rows.append(("rescaled add", "int8 affine", *_add()))
    for recipe in ("w8a8", "w8a8_per_channel"):
        rows.append(("fairseq s2t_transformer encoder (2 layers, untrained)", recipe, *_s2t_encoder(recipe)))
    per_group = {"version": 1, "name": "w4a8_per_group", "defaults": {  # last: the rows above keep their draws
        "weight": {"bits": 4, "granularity": "per_group", "axis": -1, "group_size": 16},
        "activation": {"bits": 8, "symmetric": False}}}
    rows.append(("QLinear 48->32, 4-bit weights per group of 16", "w4a8_per_group",
                 *_chain(nn.Linear(48, 32), x48, per_group, 32)))
    from qswap.transforms.hadamard import Hadamard
    hadamard = {"version": 1, "name": "w8a8_hadamard", "defaults": {  # the strategies' rule for its matrix
        "weight": {"bits": 8}, "activation": {"bits": 8, "symmetric": False}},
        "rules": [{"match": {"class": "Hadamard"}, "weight": {"bits": 2, "granularity": "per_tensor", "axis": None}}]}
    rows.append(("Hadamard 64, blocks of 16 (+-1 codes), after a ReLU", "w8a8_hadamard",
                 *_chain(Hadamard(64, 16), torch.relu(x64), hadamard, 64)))
    return rows


def render_shipped(count: int, recipes=SHIPPED_RECIPES, simulations=("integer", "float")) -> str:
    """Rows of the shipped model's teacher-forced agreement under the ``simulate`` settings."""
    lines = ["| recipe | simulate | output | codes | largest difference (steps) | equal codes % |",
             "|---|---|---|---|---|---|"]
    for recipe in recipes:
        for simulate in simulations:
            for what, (integer, reference) in zip(("encoder output", "logits"), shipped(recipe, simulate, count)):
                diff = (integer.to(torch.int64) - reference.to(torch.int64)).abs()
                lines.append(f"| {recipe} | {simulate} | {what} | {diff.numel()} | {int(diff.max())} | "
                             f"{100 * float((diff == 0).double().mean()):.2f} |")
    return "\n".join(lines)


def op_lines(rows) -> list[str]:
    """The per-op table: (op, recipe, integer codes, fake-quant codes) rows in output grid steps."""
    lines = ["| op | recipe | outputs | largest difference (steps) | equal codes % |", "|---|---|---|---|---|"]
    for op, recipe, integer, reference in rows:
        diff = (integer.to(torch.int64) - reference.to(torch.int64)).abs()
        lines.append(f"| {op} | {recipe} | {diff.numel()} | {int(diff.max())} | "
                     f"{100 * float((diff == 0).double().mean()):.2f} |")
    return lines


def render(rows, models) -> str:
    lines = [BEGIN, "<!-- generated by tools/integer_agreement.py; do not edit by hand -->", "", *op_lines(rows)]
    lines += ["", "The whole small S2T transformer (2+2 layers, dim 64, untrained), teacher-forced:", "",
              "| recipe | target positions | best token equal % | largest logit difference (logits grid steps) |",
              "|---|---|---|---|"]
    lines += [f"| {r} | {n} | {equal:.2f} | {steps:.1f} |" for r, equal, steps, n in models]
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("--simulate", choices=("float", "integer"), default=None,
                        help="the fake-quant model's arithmetic (the recipe key); the op table in the doc shows "
                             f"the default, {SIMULATIONS[0]}; --shipped and --decode run both unless it is given")
    parser.add_argument("--recipes", nargs="+", default=list(SHIPPED_RECIPES),
                        help="--shipped / --decode: recipe names (searched: the shipped model's searched.yaml)")
    parser.add_argument("--subsets", nargs="+", default=["test"], help="--decode: the shipped test sets")
    parser.add_argument("--shipped", type=int, metavar="N", default=0,
                        help="the shipped model's agreement on N test utterances instead: written into the doc "
                             "(its shipped-agreement markers) with the default recipes and both settings, else printed")
    parser.add_argument("--decode", action="store_true",
                        help="print the shipped model's beam-5 decode of the test set under both settings instead")
    args = parser.parse_args(argv)
    _setup()
    SIMULATE["mode"] = args.simulate or SIMULATIONS[0]
    if args.shipped or args.decode:
        simulations = (args.simulate,) if args.simulate else ("integer", "float")
        if args.shipped:
            table = render_shipped(args.shipped, args.recipes, simulations)
            if args.simulate or args.recipes != list(SHIPPED_RECIPES):
                print(table)  # not the doc's table: printed only
                return 0
            header = [SHIPPED_BEGIN, f"<!-- generated by tools/integer_agreement.py --shipped {args.shipped}; "
                      "do not edit by hand -->", ""]
            return write_between("\n".join([*header, table, SHIPPED_END]), SHIPPED_BEGIN, SHIPPED_END,
                                 print_only=args.print)
        table = render_decoded(args.recipes, args.subsets, simulations)
        if simulations != (ALTERNATIVE,):
            print(table)
            return 0
        # the doc's table: every shipped recipe on both test sets with the other arithmetic (float)
        header = [SIM_BEGIN, f"<!-- generated by tools/integer_agreement.py --simulate {ALTERNATIVE} --decode "
                  "--subsets test test_heldout; do not edit by hand -->", ""]
        return write_between("\n".join([*header, table, SIM_END]), SIM_BEGIN, SIM_END, print_only=args.print)
    table = render(measure(), [_s2t_model(r) for r in ("w8a8", "w8a8_per_channel", "w4a8")])
    return write_between(table, BEGIN, END, print_only=args.print or SIMULATE["mode"] != SIMULATIONS[0])


def tool_parser(doc: str) -> argparse.ArgumentParser:
    """The command line every table tool shares: ``--print``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print the table, write nothing")
    return parser


def _setup() -> None:
    sys.path[:0] = [str(REPO), str(REPO / "tools")]
    torch.set_num_threads(1)


def run_tool(doc: str, table, begin: str, end: str, argv: list[str] | None) -> int:
    """The command line of a table tool: ``table()`` printed (``--print``) or written between the
    markers of docs/integer.md."""
    args = tool_parser(doc).parse_args(argv)
    _setup()
    return write_between(table(), begin, end, print_only=args.print)


def write_between(table: str, begin: str, end: str, *, print_only: bool = False) -> int:
    """Print ``table``, or write it into docs/integer.md in place of the block from ``begin`` to
    ``end`` (which ``table`` starts and ends with). Returns the exit status."""
    if print_only:
        print(table)
        return 0
    doc = DOC.read_text(encoding="utf-8")
    if begin not in doc or end not in doc:
        print(f"{DOC}: markers {begin} / {end} not found", file=sys.stderr)
        return 1
    head, rest = doc.split(begin, 1)
    from qswap.io import atomic_write_text
    atomic_write_text(DOC, head + table + rest.split(end, 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
