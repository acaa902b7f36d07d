"""Offline transforms (qswap.transforms): exact in float on real fairseq models, declared in a
recipe, and the quantized model audits honest."""
import pytest
import torch

pytest.importorskip("fairseq")

import qswap  # noqa: E402
from qswap.errors import ConvertError, RecipeError  # noqa: E402
from qswap.models import build_s2t_transformer, s2t_net_input  # noqa: E402
from qswap.transforms import STRUCTURE_ONLY, apply_transforms, make_step  # noqa: E402
from qswap.transforms.hadamard import Hadamard, hadamard_matrix  # noqa: E402

DIMS = dict(encoder_embed_dim=64, decoder_embed_dim=64, encoder_ffn_embed_dim=192, decoder_ffn_embed_dim=192,
            encoder_attention_heads=4, decoder_attention_heads=4)  # head 16 (Sylvester), FFN 192 = 16 x 12 (Paley 11)
W4A4 = {"version": 1, "name": "w4a4_t",
        "defaults": {"weight": {"bits": 4, "granularity": "per_channel", "axis": 0, "observer": "mse"},
                     "activation": {"bits": 4, "symmetric": False, "observer": "mse"}},
        "rules": [{"match": {"class": ["LayerNorm", "Fp32LayerNorm"]},
                   "weight": {"bits": 8, "granularity": "per_tensor", "axis": None, "observer": "minmax"}},
                  {"match": {"class": "Hadamard"},
                   "weight": {"bits": 2, "granularity": "per_tensor", "axis": None, "observer": "minmax"}}]}


def _model(seed=0):
    return build_s2t_transformer(seed=seed, encoder_normalize_before=True, decoder_normalize_before=True, **DIMS)


def _outputs(model, net_input):
    with torch.no_grad():
        return model(**net_input)[0]


@pytest.mark.parametrize("n", [1, 2, 4, 12, 16, 44, 64, 176, 192, 704])
def test_hadamard_matrix_is_hadamard(n):
    h = hadamard_matrix(n)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_no_hadamard_matrix_is_a_convert_error():
    with pytest.raises(ConvertError, match="no Hadamard matrix of order 22"):
        hadamard_matrix(22)
    with pytest.raises(ConvertError, match="positive order, got 0"):
        hadamard_matrix(0)
    with pytest.raises(ConvertError, match="block 0 does not divide"):
        Hadamard(64, 0)


@pytest.mark.parametrize("steps", [
    [("hadamard", {})], [("hadamard", {"block": 192})], [("hadamard", {"ffn": False})],
    [("smoothquant", {"alpha": 0.5})], [("smoothquant", {"alpha": 0.8, "ffn": False})],
    [("smoothquant", {}), ("hadamard", {"block": 16})]])
def test_transformed_float_model_equals_the_original(steps):
    model, x = _model(), s2t_net_input(vocab=40, frames=48)
    before = _outputs(model, x)
    # make LayerNorm affine and fc biases non-trivial, so a wrong fold shows
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.2, 3.0)
                m.bias.normal_(0, 0.5)
    before = _outputs(model, x)
    apply_transforms(model, [make_step(n, p) for n, p in steps], data=[x])
    after = _outputs(model, x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("steps", [[("smoothquant", {"alpha": 0.5})], [("hadamard", {"block": 16})]])
def test_a_normformer_ffn_keeps_the_float_function(steps):
    """NormFormer (``scale_fc``): fairseq's ffn_layernorm sits between the activation and fc2, which
    a per-channel factor does not pass: smoothquant leaves those FFNs and says so."""
    model, x = build_s2t_transformer(seed=0, encoder_normalize_before=True, decoder_normalize_before=True,
                                     scale_fc=True, **DIMS), s2t_net_input(vocab=40, frames=48)
    assert model.decoder.layers[0].ffn_layernorm is not None
    before = _outputs(model, x)
    notes = apply_transforms(model, [make_step(n, p) for n, p in steps], data=[x])
    torch.testing.assert_close(_outputs(model, x), before, atol=1e-5, rtol=1e-5)
    if steps[0][0] == "smoothquant":
        assert any("LayerNorm between the activation and fc2" in n for n in notes)


def test_smoothquant_flattens_the_norm_output_channels():
    model, x = _model(), s2t_net_input(vocab=40, frames=48)
    layer = model.encoder.transformer_layers[0]
    with torch.no_grad():
        layer.final_layer_norm.weight[:4] = 40.0  # four outlier channels feeding fc1

    def spread():
        out = {}
        h = layer.final_layer_norm.register_forward_hook(lambda m, a, o: out.setdefault("y", o))
        _outputs(model, x)
        h.remove()
        amax = out["y"].abs().reshape(-1, out["y"].shape[-1]).amax(0)
        return float(amax.max() / amax.median())

    ratio_before = spread()
    apply_transforms(model, [make_step("smoothquant", {"alpha": 0.5})], data=[x])
    assert spread() < ratio_before / 3


def test_smoothquant_leaves_a_channel_that_never_fires_alone():
    """A ReLU unit silent on the calibration data has no outlier to move: its factor is 1 (fc1's row
    and fc2's column unchanged) instead of about 1e-5^alpha, which multiplied fc1's row by up to
    1e5 and widened a per-tensor weight grid for every other channel; the float function holds."""
    model, x = _model(), s2t_net_input(vocab=40, frames=48)
    layer = model.encoder.transformer_layers[0]
    with torch.no_grad():
        layer.fc1.bias[:8] = -1e3  # 8 units that never fire on this data
    fc1, fc2 = layer.fc1.weight.detach().clone(), layer.fc2.weight.detach().clone()
    before = _outputs(model, x)
    apply_transforms(model, [make_step("smoothquant", {"alpha": 0.5, "norms": False})], data=[x])  # the FFN fold
    assert torch.equal(layer.fc1.weight[:8], fc1[:8]) and torch.equal(layer.fc2.weight[:, :8], fc2[:, :8])
    assert layer.fc1.weight.abs().max() < 10 * fc1.abs().max()  # the other rows move by the usual factors
    torch.testing.assert_close(_outputs(model, x), before, rtol=1e-4, atol=1e-4)


def test_smoothquant_needs_data_and_says_how():
    with pytest.raises(ConvertError, match="data=batches"):
        qswap.convert(_model(), {**W4A4, "transforms": [{"smoothquant": {"alpha": 0.5}}]})


def test_smoothquant_after_hadamard_is_refused():
    x = s2t_net_input(vocab=40)
    with pytest.raises(ConvertError, match="before hadamard"):
        apply_transforms(_model(), [make_step("hadamard", {}), make_step("smoothquant", {})], data=[x])


@pytest.mark.parametrize("transforms", [[{"hadamard": {"block": 64}}], [{"smoothquant": {"alpha": 0.5}}],
                                        [{"smoothquant": {"alpha": 0.5}}, {"hadamard": {"block": 64}}]])
def test_quantized_transformed_model_audits_honest(transforms):
    model, x = _model(), s2t_net_input(vocab=40, frames=48)
    qmodel = qswap.convert(model, {**W4A4, "transforms": transforms}, data=[x])
    qswap.calibrate(qmodel, [x])
    report = qswap.audit(qmodel, x)
    assert report.honest, report.violations[:3]
    assert any(n.startswith("transform ") for n in qmodel.qswap_report.notes)
    # the caller's float model keeps its weights and structure
    assert isinstance(model.encoder.transformer_layers[0].fc2, torch.nn.Linear)


def test_online_hadamard_is_a_visible_quantized_op():
    qmodel = qswap.convert(_model(), {**W4A4, "transforms": [{"hadamard": {"block": 64}}]})
    rotate = qmodel.encoder.transformer_layers[0].fc2.rotate
    assert type(rotate).__name__ == "QHadamard"
    assert rotate.input_quant.spec.bits == 4 and rotate.matrix_quant.spec.bits == 2
    codes = rotate.matrix_quant(rotate.matrix) / rotate.matrix_quant.scale
    assert set(codes.unique().tolist()) == {-1.0, 1.0}  # additions and subtractions of input codes


def test_stored_state_reloads_onto_the_structure_only_transform():
    model, x = _model(), s2t_net_input(vocab=40, frames=48)
    recipe = {**W4A4, "transforms": [{"smoothquant": {}}, {"hadamard": {"block": 64}}]}
    qmodel = qswap.convert(model, recipe, data=[x])
    qswap.calibrate(qmodel, [x])
    again = qswap.convert(_model(seed=1), recipe, data=STRUCTURE_ONLY)
    again.load_state_dict(qmodel.state_dict())
    torch.testing.assert_close(_outputs(again.eval(), x), _outputs(qmodel.eval(), x))


@pytest.mark.parametrize("bad, message", [
    ([{"rotate": {}}], "unknown transform 'rotate'; registered: hadamard, smoothquant"),
    ([{"smoothquant": {"beta": 1}}], "unknown parameter 'beta'"),
    ([{"smoothquant": {"alpha": "high"}}], "alpha must be float"),
    ([{"hadamard": {"block": 6.5}}], "block must be int"),
    ([{"hadamard": {"block": 0}}], "block must be a positive number of channels"),
    ([{"hadamard": {"block": -64}}], "block must be a positive number of channels"),
    ([{"hadamard": {}, "smoothquant": {}}], "one key"),
    ({"hadamard": {}}, "must be a list")])
def test_bad_transforms_are_recipe_errors(bad, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(")):
        qswap.load_recipe({**W4A4, "transforms": bad})


def test_transforms_round_trip_through_to_dict():
    recipe = qswap.load_recipe({**W4A4, "transforms": [{"smoothquant": {"alpha": 0.6}}, {"hadamard": None}]})
    assert [(s.name, dict(s.params)) for s in recipe.transforms] == [("smoothquant", {"alpha": 0.6}), ("hadamard", {})]
    assert qswap.load_recipe(recipe.to_dict()).transforms == recipe.transforms


def test_a_step_filled_has_every_declared_parameter_at_its_default_unless_given():
    bare, written = (qswap.load_recipe({**W4A4, "transforms": t}).transforms[0]
                     for t in ([{"smoothquant": None}], [{"smoothquant": {"alpha": 0.5}}]))
    assert bare.params == {} and bare.filled() == written.filled() == {"alpha": 0.5, "norms": True, "ffn": True}
    changed = qswap.load_recipe({**W4A4, "transforms": [{"smoothquant": {"alpha": 0.6}}]}).transforms[0]
    assert changed.filled() == {"alpha": 0.6, "norms": True, "ffn": True}


def test_a_hadamard_block_that_does_not_divide_an_ffn_names_the_layer_and_a_block_that_does():
    """The ConvertError had named neither the transform nor a block to use."""
    model = _model()
    width = next(m for n, m in model.named_modules() if n.endswith("fc2")).in_features
    block = next(b for b in (128, 20, 40) if width % b)  # orders with a matrix (others: a RecipeError at load)
    recipe = qswap.load_recipe({**W4A4, "transforms": [{"hadamard": {"block": block}}]})
    with pytest.raises(ConvertError, match=rf"transform hadamard: block {block} does not divide the FFN width {width} of "
                                           rf"encoder\.transformer_layers\.0\.fc2; .*\(block: {min(width & -width, 64)}, a power of two"):
        qswap.convert(model, recipe, data=STRUCTURE_ONLY)


def test_hadamard_module_rotation_matches_its_forward():
    h = Hadamard(48, 16)
    x = torch.randn(3, 48)
    torch.testing.assert_close(h(x).double(), x.double() @ h.rotation().T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qk", [True, False])
def test_hadamard_heads_rotate_the_bias_kv_fairseq_appends(qk):
    """add_bias_kv: fairseq appends bias_k / bias_v to the projected k and v; they are rotated with them."""
    from fairseq.modules import MultiheadAttention

    model, x = _model(), s2t_net_input(vocab=40, frames=48)
    torch.manual_seed(3)
    attn = MultiheadAttention(64, 4, self_attention=True, add_bias_kv=True)
    torch.nn.init.normal_(attn.bias_k)
    torch.nn.init.normal_(attn.bias_v)
    model.encoder.transformer_layers[0].self_attn = attn
    before = _outputs(model, x)
    apply_transforms(model, [make_step("hadamard", {"block": 16, "qk": qk})])
    torch.testing.assert_close(_outputs(model, x), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change", ["norm_without_affine", "norm_without_bias", "fc1_without_bias"])
def test_smoothquant_keeps_the_float_function_without_affine_norms_or_biases(change):
    """A norm without a learned scale has nothing to fold a factor into: left, with a note; a missing
    bias (the norm's or fc1's) has nothing to divide."""
    model, x = _model(), s2t_net_input(vocab=40, frames=48)
    layer = model.encoder.transformer_layers[0]
    if change == "norm_without_affine":
        layer.self_attn_layer_norm = torch.nn.LayerNorm(64, elementwise_affine=False)
    elif change == "norm_without_bias":
        layer.final_layer_norm = torch.nn.LayerNorm(64, bias=False)
        torch.nn.init.uniform_(layer.final_layer_norm.weight, 0.2, 3.0)
    else:
        fc1 = torch.nn.Linear(64, 192, bias=False)
        with torch.no_grad():
            fc1.weight.copy_(layer.fc1.weight)
        layer.fc1 = fc1
    before = _outputs(model, x)
    notes = apply_transforms(model, [make_step("smoothquant", {})], data=[x])
    torch.testing.assert_close(_outputs(model, x), before, atol=1e-5, rtol=1e-5)
    skipped = [n for n in notes if "norm(s) skipped" in n]
    assert skipped == ([f"transform smoothquant(): 1 norm(s) skipped: no elementwise affine weight to fold a "
                        f"factor into (encoder.transformer_layers.0.self_attn_layer_norm)"]
                       if change == "norm_without_affine" else [])


def _ctc_logits(model, net_input):
    """wav2vec 2.0 CTC logits on the frames that are not padding (padded frames' features are
    near-constant vectors a LayerNorm blows up; every output masks them)."""
    with torch.no_grad():
        out = model(**net_input)
    logits, padding = out["encoder_out"], out["padding_mask"]  # (T, B, V), (B, T)
    return logits if padding is None else logits[~padding.T]


@pytest.mark.parametrize("layer_norm_first", [True, False])
def test_smoothquant_folds_wav2vec2s_pre_norm_layers_and_keeps_the_float_function(layer_norm_first):
    """wav2vec 2.0's TransformerSentenceEncoderLayer says it is pre-norm by ``layer_norm_first``
    (the large / XLS-R configs), not fairseq's ``normalize_before``: its self_attn_layer_norm
    feeds only q/k/v and its final_layer_norm only fc1, so both take a factor. Post-norm
    (the base config), the norms feed the residual stream too and are left."""
    from qswap.models import build_wav2vec2_ctc, wav2vec2_net_input

    model, x = build_wav2vec2_ctc(layer_norm_first=layer_norm_first, activation_fn="relu"), wav2vec2_net_input()
    layers = model.w2v_encoder.w2v_model.encoder.layers
    with torch.no_grad():  # non-trivial affines, so a wrong fold shows
        for m in layers.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.2, 3.0)
                m.bias.normal_(0, 0.5)
    norms = {name: m.weight.detach().clone() for name, m in layers.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    before = _ctc_logits(model, x)
    notes = apply_transforms(model, [make_step("smoothquant", {"alpha": 0.5})], data=[x])
    torch.testing.assert_close(_ctc_logits(model, x), before, atol=1e-5, rtol=1e-5)
    folded = sorted(n for n, w in norms.items() if not torch.equal(layers.get_submodule(n).weight, w))
    prenorm = sorted(f"{i}.{n}" for i in range(len(layers)) for n in ("self_attn_layer_norm", "final_layer_norm"))
    assert folded == (prenorm if layer_norm_first else [])
    assert notes[0] == (f"transform smoothquant(alpha=0.5): alpha 0.5: {len(folded)} norm(s) and "
                        f"{len(layers)} FFN(s) smoothed")


def test_smoothquant_on_a_pre_norm_wav2vec2_audits_honest():
    from qswap.models import build_wav2vec2_ctc, wav2vec2_net_input

    x = wav2vec2_net_input()
    model = build_wav2vec2_ctc(layer_norm_first=True, extractor_mode="layer_norm", activation_fn="relu")
    qmodel = qswap.convert(model, {**W4A4, "transforms": [{"smoothquant": {"alpha": 0.5}}]}, data=[x])
    assert qmodel.qswap_report.notes[0].endswith("4 norm(s) and 2 FFN(s) smoothed")
    qswap.calibrate(qmodel, [x])
    report = qswap.audit(qmodel, x)
    assert report.honest, report.violations[:3]


@pytest.mark.parametrize("steps, why", [
    ([{"hadamard": {}}], "no attention with per-head projections to rotate, no FFN with a Linear fc2"),
    ([{"smoothquant": {}}], "no pre-norm block with a learned scale, no FFN with a positively homogeneous"),
])
def test_a_transform_that_finds_nothing_warns_and_strict_refuses(steps, why):
    """A transform on a model without the blocks it folds into had passed in silence (strict too): the
    convert report's only trace a note of '0 attention(s)'. A QswapWarning now, a ConvertError with
    strict; the model converts without it and the caller's is untouched."""
    import warnings

    from qswap.errors import QswapWarning

    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    before = {k: v.clone() for k, v in seq.state_dict().items()}
    recipe = {"version": 1, "name": "t", "defaults": {"weight": {"bits": 8}, "activation": {"bits": 8}},
              "transforms": steps}
    data = [torch.randn(2, 8)]
    with pytest.warns(QswapWarning, match=f"changes nothing in this model: {why}"):
        q = qswap.convert(seq, recipe, data=data)
    assert any("(not applied)" in n for n in q.qswap_report.notes)
    with pytest.raises(ConvertError, match=f"changes nothing in this model: {why}.*strict"):
        qswap.convert(seq, recipe, data=data, strict=True)
    assert all(torch.equal(v, seq.state_dict()[k]) for k, v in before.items())
    with warnings.catch_warnings():  # every part switched off on a model that has them: the same
        warnings.simplefilter("error", QswapWarning)
        with pytest.raises(QswapWarning, match="heads: false, ffn: false"):
            qswap.convert(_model(), {**recipe, "transforms": [{"hadamard": {"heads": False, "ffn": False}}]})


@pytest.mark.parametrize("steps, message", [
    ([{"hadamard": {"block": 11}}], "block 11 has no Hadamard matrix here .orders 2.k and 2.k .p . 1., p a prime"),
    ([{"hadamard": {"block": 4}}, {"hadamard": {"block": 4}}], "transform hadamard is listed twice"),
])
def test_an_impossible_block_and_a_repeated_transform_are_recipe_errors(steps, message):
    """Block 11 had loaded, to fail at convert naming neither the transform nor the key; a second
    hadamard had undone the first (the weights back within 1e-8 of float) while the report said both
    were folded."""
    with pytest.raises(RecipeError, match=message):
        qswap.load_recipe({"version": 1, "defaults": {"weight": {"bits": 8}}, "transforms": steps})
    qswap.load_recipe({"version": 1, "defaults": {"weight": {"bits": 8}},
                       "transforms": [{"hadamard": {"block": 11, "ffn": False}}]})  # the block is the FFN's


def test_a_head_size_without_a_matrix_names_the_heads_not_the_block():
    """head_dim 28 (no Hadamard matrix): the error had said 'choose a block size that divides the
    width', where the fix is heads: false."""
    model = build_s2t_transformer(encoder_embed_dim=112, decoder_embed_dim=112, encoder_attention_heads=4,
                                  decoder_attention_heads=4, encoder_ffn_embed_dim=128, decoder_ffn_embed_dim=128)
    recipe = {"version": 1, "defaults": {"weight": {"bits": 8}}, "transforms": [{"hadamard": {"block": 64}}]}
    with pytest.raises(ConvertError, match=r"per-head rotation of encoder\..* head size 28, .*heads: false"):
        qswap.convert(model, recipe)


def test_hadamard_on_a_float64_model_runs_in_its_dtype():
    """convert accepts float64 models; the inserted rotation's matrix was float32, and the first
    forward raised torch's dtype RuntimeError."""
    dims = dict(encoder_embed_dim=64, decoder_embed_dim=64, encoder_ffn_embed_dim=192, decoder_ffn_embed_dim=192,
                encoder_attention_heads=4, decoder_attention_heads=4)
    model = build_s2t_transformer(seed=0, **dims).double().eval()
    x = s2t_net_input(vocab=40, frames=48)
    x["src_tokens"] = x["src_tokens"].double()
    recipe = {"version": 1, "name": "fp32_h", "defaults": {"weight": None, "activation": None},
              "transforms": [{"hadamard": {"block": 16}}]}
    q = qswap.convert(model, recipe)
    assert {m.matrix.dtype for m in q.modules() if type(m).__name__ in ("Hadamard", "QHadamard")} == {torch.float64}
    with torch.no_grad():  # (a counterpart's float32 insides keep it from float64's precision)
        torch.testing.assert_close(q(**x)[0], model(**x)[0], atol=1e-6, rtol=0)


def test_a_hadamard_block_wider_than_any_layer_is_refused_at_once():
    """A block of about 1e16 channels had spent seconds (minutes at 1e20) in the prime tests."""
    import time
    start = time.perf_counter()
    with pytest.raises(RecipeError, match="more channels than any layer has"):
        qswap.load_recipe({"version": 1, "name": "h", "transforms": [{"hadamard": {"block": 10000004400000260}}]})
    assert time.perf_counter() - start < 2
