"""Models built from fairseq's own registered architectures and shipped configs, with fairseq's
dimensions and defaults, unchanged except for one encoder / decoder layer (time): every shipped
recipe converts them; with identity quantizers they compute what fairseq computes; w8a8
calibrates, audits honest on the batch and incremental paths, and decodes (fairseq's
SequenceGenerator beam search for S2T, greedy CTC for wav2vec 2.0)."""
import types

import pytest
import torch

pytest.importorskip("fairseq")

import qswap  # noqa: E402
from fairseq_testkit import (  # noqa: E402
    NO_QUANT, assert_identity_counterparts_match, assert_scores_are_teacher_forced, convert_calibrated, logits)
from helpers import sqnr_db  # noqa: E402
from qswap.errors import ConvertError  # noqa: E402
from qswap.integration.decode import decode  # noqa: E402
from qswap.models import (  # noqa: E402
    build_s2t_registered,
    build_wav2vec2_ctc_registered,
    make_dictionary,
    s2t_net_input,
    wav2vec2_net_input,
)
from qswap.recipe.loader import shipped_recipe_names  # noqa: E402

ONE_LAYER = dict(encoder_layers=1, decoder_layers=1)
# fairseq's conformer examples pair rel_pos and rope with --attn-type espnet (its default
# attention cannot take them); "s2t_conformer" alone is the registered default (abs, fairseq MHA).
CONFIGS = {
    "s2t_transformer_s": lambda: build_s2t_registered("s2t_transformer_s", **ONE_LAYER),
    "s2t_transformer_m": lambda: build_s2t_registered("s2t_transformer_m", **ONE_LAYER),
    "s2t_conformer": lambda: build_s2t_registered("s2t_conformer", **ONE_LAYER),
    **{f"s2t_conformer_espnet_{pos}": (lambda pos=pos: build_s2t_registered(
        "s2t_conformer", attn_type="espnet", pos_enc_type=pos, **ONE_LAYER))
       for pos in ("abs", "rel_pos", "rope")},
    "wav2vec2_base": lambda: build_wav2vec2_ctc_registered(encoder_layers=1),  # Wav2Vec2Config()
    "wav2vec2_base_100h": lambda: build_wav2vec2_ctc_registered(finetuning="base_100h", encoder_layers=1),
    "wav2vec2_large_vox_100h": lambda: build_wav2vec2_ctc_registered(
        "wav2vec2_large", finetuning="vox_100h", encoder_layers=1),
}
# Measured with `pytest tests/nn/fairseq/test_fairseq_real_configs.py -k sqnr -s` (seed 0):
# S2T 31.6-33.5 dB, wav2vec 2.0 base 22.9 dB, large 24.3 dB; the bounds leave a 5 dB margin.
SQNR_BOUND_DB = {"s2t": 26.0, "wav2vec2": 17.0}


def _is_ctc(name: str) -> bool:
    return name.startswith("wav2vec2")


def _net_input(name: str) -> dict:
    return wav2vec2_net_input(samples=4000) if _is_ctc(name) else s2t_net_input(frames=40, num_tokens=4)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    """(name, float model, net_input, w8a8 model calibrated on net_input)."""
    model, net_input = CONFIGS[request.param](), _net_input(request.param)
    return request.param, model, net_input, convert_calibrated(model, net_input)


def test_the_configs_are_fairseqs_own():
    """What the builders hand fairseq: its registered defaults and its shipped large config."""
    s = build_s2t_registered("s2t_transformer_s", **ONE_LAYER)
    assert (s.encoder.transformer_layers[0].embed_dim, s.encoder.transformer_layers[0].fc1.out_features,
            s.encoder.subsample.conv_layers[0].out_channels) == (256, 2048, 1024)
    large = build_wav2vec2_ctc_registered("wav2vec2_large", finetuning="vox_100h", encoder_layers=1)
    cfg, w2v = large.w2v_encoder.w2v_model.cfg, large.w2v_encoder.w2v_model
    assert (cfg.extractor_mode, cfg.layer_norm_first, cfg.conv_bias, cfg.encoder_embed_dim) == (
        "layer_norm", True, True, 1024)
    assert len(w2v.feature_extractor.conv_layers) == 7 and large.cfg.mask_prob == 0.5


def test_every_shipped_recipe_converts(case):
    name, model, net_input, _ = case
    for recipe in shipped_recipe_names():  # data: the activation statistics a transform recipe needs
        report = qswap.convert(model, recipe, data=[net_input]).qswap_report
        if recipe != "fp32":  # the float reference skips every module on purpose
            left = report.by_action("float") + report.by_action("skipped")
            assert left == [], (name, recipe, [(e.path, e.reason) for e in left])


def test_identity_quantizers_compute_what_fairseq_computes(case):
    _, model, net_input, _ = case
    assert_identity_counterparts_match(model, net_input)


def test_w8a8_audits_honest_on_every_path(case):
    name, _, net_input, qmodel = case
    report = qswap.audit(qmodel, net_input)
    assert report.honest, [(v.module, v.op, v.operand) for v in report.violations]
    paths = [getattr(p, "name", p) for p in report.paths]
    if not _is_ctc(name):
        assert any(p.startswith("incremental decoding") for p in paths), paths


def test_w8a8_sqnr_against_float(case):
    name, model, net_input, qmodel = case
    db = sqnr_db(logits(model, net_input), logits(qmodel, net_input))
    print(f"{name}: logits SQNR {db:.1f} dB")
    assert db > SQNR_BOUND_DB["wav2vec2" if _is_ctc(name) else "s2t"]


def test_w8a8_decodes(case):
    """qswap's decode (fairseq's SequenceGenerator, beam 2; greedy CTC): one hypothesis per
    utterance; the identity-quantized counterparts decode what the float model decodes; for S2T
    each beam hypothesis of w8a8 scores its tokens as a teacher-forced pass does (to one grid
    step of the quantized logits)."""
    name, model, net_input, qmodel = case
    dictionary = make_dictionary() if _is_ctc(name) else qmodel.decoder.dictionary  # the builders' default
    batch = next(iter(net_input.values())).size(0)
    sample = {"id": torch.arange(batch), "net_input": net_input,
              "target": torch.full((batch, 2), dictionary.eos())}
    task = types.SimpleNamespace(target_dictionary=dictionary)
    hyps = {label: [(u.id, u.hyp) for u in decode(task, m, [sample], beam=2, max_len_b=4).utterances]
            for label, m in (("float", model), ("identity", qswap.convert(model, NO_QUANT)), ("w8a8", qmodel))}
    assert [i for i, _ in hyps["w8a8"]] == list(range(batch))
    assert hyps["identity"] == hyps["float"]
    if _is_ctc(name):
        return
    from fairseq.sequence_generator import SequenceGenerator

    generator = SequenceGenerator([qmodel], dictionary, beam_size=2, max_len_a=0, max_len_b=4)
    with torch.no_grad():
        hypos = generator.generate([qmodel], {"net_input": {k: net_input[k] for k in ("src_tokens", "src_lengths")}})
    # Beam rows sum in another order than the teacher-forced batch; at these widths a value now
    # and then lands on the other side of a rounding boundary: one logit moves by one grid step
    # (measured: s2t_conformer, 4.5e-4 = one step of 0.022 times that token's probability).
    assert_scores_are_teacher_forced(qmodel, net_input, hypos, atol=float(qmodel.logits_quant.scale))


def test_an_unsafe_conv_feature_layers_is_refused_at_convert():
    """A checkpoint's config is data: convert evaluates ``conv_feature_layers`` safely."""
    model = build_wav2vec2_ctc_registered(encoder_layers=1)
    model.w2v_encoder.w2v_model.cfg.conv_feature_layers = "[(512, 10, 5)] + __import__('os').getcwd()"
    with pytest.raises(ConvertError, match="conv_feature_layers"):
        qswap.convert(model, "w8a8")
