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
from fairseq_testkit import SEQ2SEQ, build, convert_calibrated  # noqa: E402
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


def _teacher_forced_log_probs(q, net_input, tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """log p(tokens[b, t] | tokens[b, :t]) (B, L), in one batch forward; tokens: (B, L)."""
    prev = torch.cat([torch.full_like(tokens[:, :1], eos), tokens[:, :-1]], dim=1)
    with torch.no_grad():
        out = q(src_tokens=net_input["src_tokens"], src_lengths=net_input["src_lengths"],
                prev_output_tokens=prev)
        lprobs = q.get_normalized_probs(out, log_probs=True)  # (B, L, V)
    return lprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


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
    for k in range(beam):  # the k-th hypothesis of every sentence, teacher-forced as one batch
        tokens = [h[k]["tokens"] for h in hypos]
        padded = torch.full((len(tokens), max(len(t) for t in tokens)), dictionary.pad())
        for b, t in enumerate(tokens):
            padded[b, : len(t)] = t
        expected = _teacher_forced_log_probs(q, net_input, padded, dictionary.eos())
        for b, h in enumerate(hypos):
            n = len(tokens[b])
            torch.testing.assert_close(h[k]["positional_scores"], expected[b, :n], rtol=0, atol=1e-4)


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
