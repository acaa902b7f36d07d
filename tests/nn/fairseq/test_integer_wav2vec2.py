"""Integer execution of wav2vec 2.0 CTC (issue 16): the feature extractor (convs, GroupNorm or
LayerNorm, GELU tables), the weight-normed positional conv, post- and pre-norm encoder layers and
the CTC projection on integers; the declared float steps are the waveform in and the logits
out. Each integer form against its fake-quant counterpart, then whole models: fairseq's own
``Wav2Vec2Config`` with small widths, and fairseq's registered base / base_100h / large+vox_100h
configurations (one encoder layer), decoded with greedy CTC."""
import math
import warnings

import pytest
import torch

pytest.importorskip("fairseq")

import qswap  # noqa: E402
from fairseq_testkit import convert_calibrated  # noqa: E402
from helpers import recipe_with  # noqa: E402
from qswap.errors import IntegerizeError  # noqa: E402
from qswap.honesty.integer import check_integer  # noqa: E402
from qswap.integration.decode import _ctc_greedy  # noqa: E402
from qswap.models import (build_wav2vec2_ctc, build_wav2vec2_ctc_registered, make_dictionary,  # noqa: E402
                          wav2vec2_net_input)
from qswap.quant.integer import Grid  # noqa: E402

EXTRACTORS = {"group_norm": {}, "layer_norm": {"extractor_mode": "layer_norm", "layer_norm_first": True,
                                               "conv_bias": True}}
RECIPES = ("w8a8", "w8a8_per_channel", "w4a8")


def small(mode: str, recipe: str, seed: int = 0, simulate: str = "float"):
    """A small wav2vec 2.0 CTC model converted by ``recipe`` with ``simulate`` (``float`` by default:
    the bounds of the tests below are the float insides'; ``simulate: integer``, the default,
    computes the integer model's codes: the tests at the end)."""
    model, net_input = build_wav2vec2_ctc(seed=seed, **EXTRACTORS[mode]), wav2vec2_net_input(seed=seed)
    return convert_calibrated(model, net_input, recipe_with(recipe, simulate)), net_input


def quantizer_inputs(qmodel, net_input, modules) -> dict:
    """{name: the fake-quant codes its ``input_quant`` rounds} of each named module."""
    seen, hooks = {}, []
    for name, module in modules:
        def keep(quant, args, out, name=name):
            seen.setdefault(name, Grid.of(quant).quantize(args[0]))
        hooks.append(module.input_quant.register_forward_hook(keep))
    with torch.no_grad():
        qmodel(**net_input)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("mode", sorted(EXTRACTORS))
@pytest.mark.parametrize("recipe", RECIPES)
def test_each_feature_extractor_op_gives_the_fake_quant_codes(mode, recipe):
    """Fed the fake-quant model's codes at its input, each op of the integer feature extractor
    writes the codes the fake-quant model rounds at the next op's input: GELU tables bit-exact
    (the same arithmetic); convs and norms within one step on near-ties (the fake-quant
    requantization rounds ``x * (1/s)`` in float32, the integer one the exact product; float32
    inside the fake-quant GroupNorm / LayerNorm; measured >= 99.99 % equal)."""
    qmodel, net_input = small(mode, recipe)
    w2v = qmodel.w2v_encoder.w2v_model
    ops = [(n, m) for n, m in w2v.feature_extractor.named_modules() if hasattr(m, "input_quant")]
    names = [n for n, _ in ops] + ["(features norm)"]
    seen = quantizer_inputs(qmodel, net_input, ops + [("(features norm)", w2v.layer_norm)])
    forms = [f for f in qswap.integerize(qmodel).w2v_model.features if hasattr(f, "forward")]
    i, x = 0, seen[names[0]]
    for form in forms:
        is_op = type(form).__name__ not in ("IntegerSamePad", "IntegerTransposeLast")
        x = form(x)
        if not is_op:
            continue
        i += 1
        reference = seen[names[i]]
        got = x if x.shape == reference.shape else x.transpose(1, 2)
        diff = (got.long() - reference.long()).abs()
        if type(form).__name__ == "IntegerLookup":
            assert int(diff.max()) == 0, names[i]
        else:
            assert int(diff.max()) <= 1 and float((diff == 0).double().mean()) > 0.999, names[i]
        x = reference if reference.shape == x.shape else reference.transpose(1, 2)  # the next op's true input
    assert i == len(names) - 1


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_weight_normed_positional_conv_is_bit_exact(recipe):
    """``g * v / ||v||`` quantized as the fake-quant conv quantizes it: the integer conv writes the
    codes its GELU's input quantizer rounds."""
    qmodel, net_input = small("group_norm", recipe)
    conv, gelu = qmodel.w2v_encoder.w2v_model.encoder.pos_conv[0], qmodel.w2v_encoder.w2v_model.encoder.pos_conv[2]
    assert conv.weight is None and conv.weight_v is not None  # weight-normed
    seen = quantizer_inputs(qmodel, net_input, [("conv", conv), ("gelu", gelu)])
    out = conv.to_integer(Grid.of(gelu.input_quant))(seen["conv"])
    out = out[..., :-1] if out.shape[-1] > seen["gelu"].shape[-1] else out  # SamePad
    assert torch.equal(out, seen["gelu"])


def greedy(model, net_input):
    with torch.no_grad():
        return _ctc_greedy(model, {"net_input": net_input}, make_dictionary())


def edit_distance(a: list, b: list) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def assert_agrees(qmodel, imodel, net_input, *, frames_equal: float, steps: int, token_rate: float) -> None:
    """Integer vs fake-quant on the valid frames: logits within ``steps`` grid steps, best labels
    equal on at least ``frames_equal`` of the frames and, where they differ, a near-tie of the
    fake-quant model (its score of the integer model's label is within twice the largest logit
    difference of its best); greedy CTC transcripts within ``token_rate`` edits per token."""
    with torch.no_grad():
        reference = qmodel(**net_input)
    out = imodel(**net_input)
    assert torch.equal(out["padding_mask"], reference["padding_mask"])
    valid = ~reference["padding_mask"].T  # (T, B)
    logits, ref = out["encoder_out"][valid], reference["encoder_out"][valid]  # (N, V)
    step = Grid.of(qmodel.logits_quant).scale
    diff = float((logits - ref).abs().max())
    assert diff <= steps * step + 1e-6
    best = logits.argmax(-1)
    assert float((best == ref.argmax(-1)).double().mean()) >= frames_equal
    assert bool((ref.gather(-1, best.unsqueeze(-1)).squeeze(-1) >= ref.amax(-1) - 2 * diff - 1e-6).all())
    edits = sum(edit_distance(a.tolist(), b.tolist()) for a, b in zip(greedy(qmodel, net_input),
                                                                      greedy(imodel, net_input)))
    assert edits <= token_rate * sum(len(a) for a in greedy(qmodel, net_input))


@pytest.mark.parametrize("mode", sorted(EXTRACTORS))
@pytest.mark.parametrize("recipe", RECIPES)
def test_the_small_ctc_model_runs_on_integers(mode, recipe):
    """The whole model (post-norm layers with the GroupNorm extractor, pre-norm with the LayerNorm
    one): only the declared float steps, and greedy CTC close to the fake-quant model's. The
    differences are near-tie flips in the norms, softmax and adds spread by the later layers
    (``tools/integer_archs.py`` on seeds 0-2: >= 99.2 % of frames equal, <= 4 logit steps, most
    transcripts equal, one or two labels apart in the others)."""
    qmodel, net_input = small(mode, recipe)
    imodel = qswap.integerize(qmodel)
    assert_agrees(qmodel, imodel, net_input, frames_equal=0.97, steps=4, token_rate=0.05)
    report = check_integer(imodel, net_input)
    assert report.ok, [str(r) for r in report.findings[:5]]
    assert {r.phase for r in report.declared} == {"quantize_input", "dequantize_output"}
    assert {"int8", "int32"} <= report.dtypes()


REGISTERED = {
    "base": lambda: build_wav2vec2_ctc_registered(encoder_layers=1),
    "base_100h": lambda: build_wav2vec2_ctc_registered(finetuning="base_100h", encoder_layers=1),
    "large_vox_100h": lambda: build_wav2vec2_ctc_registered("wav2vec2_large", finetuning="vox_100h",
                                                            encoder_layers=1),
}


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_fairseqs_registered_configs_run_on_integers(name):
    """fairseq's own widths (7 conv layers of 512 channels, GroupNorm over every frame or
    LayerNorm, 768 / 1024 wide layers, a 128-tap weight-normed positional conv): integer only
    between the declared steps. Random weights amplify near-tie flips through the seven convs
    (the fake-quant model amplifies its own one-step changes the same way): measured 90 % (base)
    and 95 % (large) of frames with equal labels, <= 9 logit steps, 1 label apart in greedy CTC."""
    qmodel = convert_calibrated(REGISTERED[name](), wav2vec2_net_input(samples=4000))
    net_input = wav2vec2_net_input(samples=4000)
    imodel = qswap.integerize(qmodel)
    assert_agrees(qmodel, imodel, net_input, frames_equal=0.85, steps=12, token_rate=0.2)
    report = check_integer(imodel, net_input)
    assert report.ok, [str(r) for r in report.findings[:5]]


def test_a_blank_weight_is_refused():
    qmodel, _ = small("group_norm", "w8a8")
    qmodel.blank_weight = 1.0
    with pytest.raises(IntegerizeError, match="blank_weight"):
        qswap.integerize(qmodel)


def test_a_float_feature_norm_is_refused_by_name():
    """A recipe that leaves the GroupNorm's input float: the error names the op."""
    model, net_input = build_wav2vec2_ctc(), wav2vec2_net_input()
    recipe = {"version": 1, "name": "no_gn", "defaults": {"weight": {"bits": 8, "symmetric": True},
                                                          "activation": {"bits": 8}},
              "rules": [{"match": {"class": "Fp32GroupNorm"}, "skip": True}]}
    qmodel = convert_calibrated(model, net_input, recipe)
    with pytest.raises(IntegerizeError, match="GroupNorm"):
        qswap.integerize(qmodel)


# -- simulate: integer (the default): the fake-quant model computes the integer model's codes ---------

def assert_logits_codes_equal(qmodel, imodel, net_input) -> None:
    """The CTC logits of the fake-quant and the integer model on the same codes (valid frames)."""
    grid = Grid.of(qmodel.logits_quant)
    with torch.no_grad():
        reference = qmodel(**net_input)
    out = imodel(**net_input)
    assert torch.equal(out["padding_mask"], reference["padding_mask"])
    valid = ~reference["padding_mask"].T  # (T, B)
    assert torch.equal(grid.quantize(out["encoder_out"][valid]), grid.quantize(reference["encoder_out"][valid]))


@pytest.mark.parametrize("mode", sorted(EXTRACTORS))
@pytest.mark.parametrize("recipe", RECIPES)
def test_simulate_integer_gives_the_integer_models_codes(mode, recipe):
    """Under ``simulate: integer`` each op writes onto its reader's grid as the integer model does:
    the feature extractor's chain (``run_chain``: convs, GroupNorm or LayerNorm, GELU), the
    feature norm's accumulator onto the positional conv's and its residual's grids, the
    positional conv chain, every residual add and norm onto the next layer's readers. Post-norm
    (GroupNorm extractor) and pre-norm (LayerNorm extractor): the logits codes are the integer
    model's, bit for bit."""
    qmodel, net_input = small(mode, recipe, simulate="integer")
    assert_logits_codes_equal(qmodel, qswap.integerize(qmodel), net_input)


@pytest.mark.parametrize("seed, recipe", [(0, "w8a8"), (1, {"version": 1, "name": "w4a4_symmetric", "defaults": {
    "weight": {"bits": 4, "granularity": "per_channel", "axis": 0}, "activation": {"bits": 4, "symmetric": True}}})])
def test_the_ctc_projection_writes_onto_the_logits_grid_under_simulate_integer(seed, recipe):
    """fairseq's Wav2VecEncoder calls the projection with no reader: it is bound to logits_quant
    (``QWav2VecCtc.bind_readers``), so its int32 accumulator is requantized onto the logits grid
    as the integer model does, not the float projection rounded (codes that differed on near-ties:
    1 of 35,112 with w8a8, 11 with 4-bit symmetric grids, on these inputs)."""
    qmodel = qswap.convert(build_wav2vec2_ctc(seed=seed), recipe_with(recipe, "integer"))
    qswap.calibrate(qmodel, [wav2vec2_net_input(seed=seed, samples=8000)])
    assert qmodel.w2v_encoder.proj.bound_readers == [qmodel.logits_quant]
    assert_logits_codes_equal(qmodel, qswap.integerize(qmodel), wav2vec2_net_input(seed=100 + seed, samples=8000))


def _ragged(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    source = 0.1 * torch.randn(len(lengths), max(lengths), generator=g)
    padding_mask = torch.zeros(source.shape, dtype=torch.bool)
    for i, n in enumerate(lengths):
        source[i, n:], padding_mask[i, n:] = 0.0, True
    return {"source": source, "padding_mask": padding_mask}


@pytest.mark.parametrize("mode", sorted(EXTRACTORS))
def test_the_last_encoder_norm_writes_onto_the_ctc_projections_input_grid(mode):
    """The encoder's last norm (post-norm: the last layer's; pre-norm: the encoder's) had not been
    told its reader, the CTC projection's input quantizer: its accumulator's value was rounded half
    to even there where the integer model requantizes it (ties up): 3 of 114,624 codes differed on
    these inputs with 12-bit activations (near-ties are more frequent than at 8 bits)."""
    recipe = {"version": 1, "name": "w8a12", "defaults": {"weight": {"bits": 8}, "activation": {"bits": 12}}}
    qmodel = qswap.convert(build_wav2vec2_ctc(seed=1, **EXTRACTORS[mode]).eval(), recipe_with(recipe, "integer"))
    inputs = [_ragged([4000, 3000, 3555], seed) for seed in range(8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qswap.calibrate(qmodel, inputs[:2])
    encoder = qmodel.w2v_encoder.w2v_model.encoder
    assert encoder.output_readers == [qmodel.w2v_encoder.proj.input_quant]
    imodel = qswap.integerize(qmodel)
    for net_input in inputs[2:]:
        assert_logits_codes_equal(qmodel, imodel, net_input)


def test_fairseqs_base_config_under_simulate_integer_gives_the_integer_models_codes():
    """fairseq's registered base widths, with the feature projection (its int32 accumulator
    requantized onto both of the encoder's input grids: ``QLinear.onto_each``)."""
    net_input = wav2vec2_net_input(samples=4000)
    qmodel = convert_calibrated(REGISTERED["base"](), net_input, recipe_with("w8a8", "integer"))
    assert qmodel.w2v_encoder.w2v_model.post_extract_proj is not None
    assert_logits_codes_equal(qmodel, qswap.integerize(qmodel), net_input)


def _recipe(name: str, simulate: str, rules: list | None = None):
    """The shipped recipe ``name`` with ``simulate`` and extra ``rules`` in front of its own."""
    from qswap.recipe import load_recipe
    data = load_recipe(name).to_dict()
    return load_recipe(dict(data, simulate=simulate, rules=list(rules or []) + list(data.get("rules", []))))


def test_a_layer_whose_reader_stays_float_takes_its_own_input_under_simulate_integer():
    """A float norm in the middle layer (a skip rule): the first layer cannot write onto it, so
    the middle layer reads its plain input as its residual, not the residual the encoder's entry
    handed the first layer; the layers then agree with the float arithmetic up to grid steps."""
    net_input = wav2vec2_net_input(seed=0)
    skip = [{"match": {"path": "w2v_encoder.w2v_model.encoder.layers.1.self_attn_layer_norm"}, "skip": True}]
    outs, given = {}, []
    for simulate in ("integer", "float"):
        qmodel = convert_calibrated(build_wav2vec2_ctc(extractor_mode="layer_norm", layer_norm_first=True,
                                                       conv_bias=True, encoder_layers=3), net_input,
                                    _recipe("w8a8", simulate, skip))
        layers = qmodel.w2v_encoder.w2v_model.encoder.layers
        assert type(layers[1].self_attn_layer_norm) is torch.nn.LayerNorm
        hook = layers[1].register_forward_pre_hook(lambda m, args, kwargs: given.append(kwargs.get("residual")),
                                                   with_kwargs=True)
        with torch.no_grad():
            out = qmodel(**net_input)
        hook.remove()
        outs[simulate] = out["encoder_out"][~out["padding_mask"].T]  # valid frames
    assert given[0] is None  # simulate: integer: the middle layer's residual is its own input
    step = float(outs["float"].abs().max()) / 127
    assert float((outs["integer"] - outs["float"]).abs().max()) <= 8 * step


def test_calibration_observes_the_feature_norm_once_per_batch_under_either_arithmetic():
    """Without a feature projection the feature LayerNorm writes onto the encoder's two input
    grids itself (``onto_each``): one norm per batch, so its quantizers calibrate as under
    ``simulate: float`` (a moving average over two different batches)."""
    scales = {}
    for simulate in ("integer", "float"):
        qmodel = qswap.convert(build_wav2vec2_ctc(seed=0), _recipe("w8a8", simulate))
        qswap.calibrate(qmodel, [wav2vec2_net_input(seed=0), wav2vec2_net_input(seed=1)])
        norm = qmodel.w2v_encoder.w2v_model.layer_norm
        assert qmodel.w2v_encoder.w2v_model.post_extract_proj is None
        scales[simulate] = [float(q.scale) for q in (norm.input_quant, norm.weight_quant, norm.bias_quant)]
    assert scales["integer"] == scales["float"]


def test_a_training_step_leaves_no_stale_integer_form():
    """A training forward drops every kept integer form (the residual adds', the norms' several
    readers'...): the optimizer writes learned scales through ``.data``, which no stamp sees, so
    the next evaluation must rebuild them (it equals the same model with every form dropped)."""
    net_input = wav2vec2_net_input(seed=0)
    qmodel = convert_calibrated(build_wav2vec2_ctc(seed=0), net_input, _recipe("w4a8_lsq", "integer"))
    with torch.no_grad():
        qmodel(**net_input)  # builds the kept forms
    qmodel.train()
    qmodel(**net_input)["encoder_out"].sum().backward()
    with torch.no_grad():
        for name, p in qmodel.named_parameters():
            if name.endswith("scale"):
                p.data.mul_(1.03)  # as an optimizer step writes
    qmodel.eval()
    with torch.no_grad():
        after = qmodel(**net_input)["encoder_out"]
        for m in qmodel.modules():
            for slot in [k for k in vars(m) if k.startswith("_integer")]:
                del m.__dict__[slot]
        assert torch.equal(after, qmodel(**net_input)["encoder_out"])


@pytest.mark.parametrize("layer_norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_conformer_layers_thread_the_integer_stream_under_simulate_integer(layer_norm_first):
    """wav2vec 2.0 with conformer layers (``layer_type="conformer"``) integerized, but its fake-quant
    model handed each layer-to-layer hop on as a float value each reader rounded, where the integer
    model requantizes its int32 stream: with 12-bit activations the logits codes had differed on 9
    of 12 of these batches (by up to 2 steps)."""
    recipe = {"version": 1, "name": "w8a12", "defaults": {"weight": {"bits": 8}, "activation": {"bits": 12}}}
    model = build_wav2vec2_ctc(seed=1, layer_type="conformer", layer_norm_first=layer_norm_first).eval()
    qmodel = qswap.convert(model, recipe_with(recipe, "integer"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qswap.calibrate(qmodel, [_ragged([4000, 3000, 3555], seed) for seed in range(2)])
    imodel = qswap.integerize(qmodel)
    for seed in range(100, 106):
        assert_logits_codes_equal(qmodel, imodel, _ragged([4000, 3000, 3555, 3999], seed))


def test_a_batch_shorter_than_the_feature_extractors_receptive_field_is_a_data_error():
    """Every clip of a batch shorter than the extractor reads for one frame (25 ms for wav2vec 2.0
    base; a clip decoded on its own) had failed in its first convolution with torch's RuntimeError:
    in the float model (fp32's root counterpart), the fake-quant one and the integer one alike."""
    from qswap.errors import DataError
    from qswap.nn.fairseq.wav2vec2 import receptive_field

    qmodel = qswap.convert(build_wav2vec2_ctc(seed=1).eval(), "w8a8")
    strides = qmodel.w2v_encoder.w2v_model.conv_strides
    need = receptive_field(strides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qswap.calibrate(qmodel, [wav2vec2_net_input(samples=4000)])
    short = wav2vec2_net_input(batch=1, samples=need - 1)
    models = {"fp32": qswap.convert(build_wav2vec2_ctc(seed=1).eval(), "fp32"), "w8a8": qmodel,
              "integer": qswap.integerize(qmodel)}
    for name, model in models.items():
        with pytest.raises(DataError, match=f"audio of {need - 1} samples is shorter .* \\({need} samples"):
            with torch.no_grad():
                model(**short)
        with torch.no_grad():
            model(**wav2vec2_net_input(batch=1, samples=need))  # one frame: runs
    assert need == sum((k - 1) * math.prod(s for _, s in strides[:i]) for i, (k, _) in enumerate(strides)) + 1
