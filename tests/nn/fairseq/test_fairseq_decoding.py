"""Decoding a converted seq2seq model: incremental decoding reproduces teacher forcing, and
fairseq's own SequenceGenerator runs beam search on it.

What is asserted: with frozen quantizers every quantizer acts elementwise with a fixed grid, so
a step of incremental decoding computes what the teacher-forced pass computes for the same
prefix; only float32 summation order differs (measured max |diff| ~2e-6, against a logits grid
step of ~0.04). The tests require the same argmax at every step and |diff| < 1e-4.
"""
import pytest
import torch

pytest.importorskip("fairseq")

from fairseq.sequence_generator import SequenceGenerator  # noqa: E402
from fairseq_testkit import SEQ2SEQ, assert_scores_are_teacher_forced, build, convert_calibrated  # noqa: E402
from qswap.models import s2t_net_input  # noqa: E402

STEPS = 6


@pytest.fixture(scope="module", params=SEQ2SEQ)
def qmodel(request):
    model, _ = build(request.param)
    net_input = s2t_net_input(num_tokens=STEPS)
    return convert_calibrated(model, net_input), net_input


def test_incremental_decoding_matches_teacher_forcing(qmodel):
    q, net_input = qmodel
    prev = net_input["prev_output_tokens"]
    with torch.no_grad():
        encoder_out = q.encoder(net_input["src_tokens"], net_input["src_lengths"])
        forced = q.decoder(prev, encoder_out=encoder_out)[0]  # (B, T, V)
        state: dict = {}
        steps = [q.decoder(prev[:, : t + 1], encoder_out=encoder_out, incremental_state=state)[0]
                 for t in range(prev.size(1))]
    incremental = torch.cat(steps, dim=1)  # (B, T, V)
    assert torch.equal(incremental.argmax(-1), forced.argmax(-1))
    assert (incremental - forced).abs().max() < 1e-4


def test_sequence_generator_beam_search_on_converted_model(qmodel, beam=2):
    """fairseq's SequenceGenerator (incremental states, beam reorders) on the converted model:
    each hypothesis's per-token scores are the teacher-forced log-probs of its tokens."""
    q, net_input = qmodel
    dictionary = q.decoder.dictionary
    generator = SequenceGenerator([q], dictionary, beam_size=beam, max_len_a=0, max_len_b=4, min_len=1)
    sample = {"net_input": {k: net_input[k] for k in ("src_tokens", "src_lengths")}}
    with torch.no_grad():
        hypos = generator.generate([q], sample)
    assert [len(h) for h in hypos] == [beam] * net_input["src_tokens"].size(0)
    assert_scores_are_teacher_forced(q, net_input, hypos)


def test_decoder_counterpart_reorders_like_fairseq(qmodel, beam=3):
    """The S2T decoder counterpart visits the modules fairseq's reorder visits, in its order, and
    beam search gives the same hypotheses and scores as with fairseq's own module walk."""
    import copy

    from fairseq.models.speech_to_text.s2t_transformer import TransformerDecoderScriptable

    from qswap.nn.fairseq.decoder import QTransformerDecoderScriptable

    q, net_input = qmodel
    assert type(q.decoder) is QTransformerDecoderScriptable
    walked = [m for m in q.decoder.modules() if hasattr(m, "reorder_incremental_state")]
    assert q.decoder.reorderable_modules() == walked and walked
    plain = copy.deepcopy(q)
    plain.decoder.__class__ = TransformerDecoderScriptable  # fairseq's own reorder, same weights
    sample = {"net_input": {k: net_input[k] for k in ("src_tokens", "src_lengths")}}
    results = []
    for model in (q, plain):
        gen = SequenceGenerator([model], q.decoder.dictionary, beam_size=beam, max_len_a=0, max_len_b=5)
        with torch.no_grad():
            results.append(gen.generate([model], sample))
    for ours, theirs in zip(*results):
        assert [h["tokens"].tolist() for h in ours] == [h["tokens"].tolist() for h in theirs]
        assert all(torch.equal(a["positional_scores"], b["positional_scores"]) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("simulate", ["integer", "float"])
def test_a_recipe_that_leaves_the_output_projection_float_decodes(simulate):
    """A recipe rule ``skip`` on ``decoder.output_projection`` (keep the last layer float): the
    conversion had succeeded and every decoder forward then raised a raw AttributeError (the
    final norm's reader looked up as the projection's ``input_quant``). The decoder runs, its
    projection is fairseq's float Linear, and beam search decodes."""
    import qswap
    from qswap.recipe import with_simulate

    model, _ = build("s2t_transformer")
    recipe = qswap.load_recipe({"version": 1, "name": "skip_outproj", "defaults": {
        "weight": {"bits": 8}, "activation": {"bits": 8, "symmetric": False}},
        "rules": [{"match": {"path": "decoder.output_projection"}, "skip": True}]})
    net_input = s2t_net_input(num_tokens=STEPS)
    q = qswap.convert(model, with_simulate(recipe, simulate))
    qswap.calibrate(q, [net_input])
    assert type(q.decoder.output_projection) is torch.nn.Linear
    with torch.no_grad():
        logits = q(**net_input)[0]
    assert torch.isfinite(logits).all()
    generator = SequenceGenerator([q], q.decoder.dictionary, beam_size=2, max_len_a=0, max_len_b=4, min_len=1)
    with torch.no_grad():
        hypos = generator.generate([q], {"net_input": {k: net_input[k] for k in ("src_tokens", "src_lengths")}})
    assert [len(h) for h in hypos] == [2] * net_input["src_tokens"].size(0)
