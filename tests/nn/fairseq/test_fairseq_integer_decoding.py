"""Incremental decoding of the integer S2T transformer inside fairseq's own SequenceGenerator
(issue 16): the decoder's caches hold integer codes, and one step computes exactly what the
teacher-forced batch forward computes for the same prefix. Integer arithmetic has no summation
order, so the codes are asserted equal (bit-exact), not close: every integer op on a row (int32
matmuls, the softmax over the unblocked keys, LayerNorm) gives the same codes whether the later
positions are absent (a step) or blocked (the causal mask)."""
import pytest
import torch

pytest.importorskip("fairseq")

import qswap  # noqa: E402
from fairseq.sequence_generator import SequenceGenerator  # noqa: E402
from fairseq_testkit import assert_scores_are_teacher_forced, build, convert_calibrated  # noqa: E402
from qswap.models import s2t_net_input  # noqa: E402

STEPS = 6


@pytest.fixture(scope="module", params=["w8a8", "w4a8"])
def integer_model(request):
    model, _ = build("s2t_transformer")
    net_input = s2t_net_input(num_tokens=STEPS)
    qmodel = convert_calibrated(model, net_input, request.param)
    return qmodel, qswap.integerize(qmodel), net_input


def teacher_forced_codes(imodel, net_input, prev):
    memory, padding = imodel.encoder.forward_codes(imodel.encoder.quantize_input(net_input["src_tokens"]),
                                                   net_input["src_lengths"])
    return imodel.decoder.forward_codes(prev, memory, padding), (memory, padding)


def test_incremental_steps_give_the_teacher_forced_codes_bit_exactly(integer_model):
    _, imodel, net_input = integer_model
    prev = net_input["prev_output_tokens"]
    forced, (memory, padding) = teacher_forced_codes(imodel, net_input, prev)  # (B, T, V) codes
    state: dict = {}
    for t in range(prev.size(1)):
        step = imodel.decoder.forward_codes(prev[:, : t + 1], memory, padding, incremental_state=state)
        assert step.dtype == forced.dtype and step.shape == forced[:, t:t + 1].shape
        assert torch.equal(step, forced[:, t:t + 1]), f"step {t}"
    caches = [v for v in state.values() if "prev_key" in v]
    assert len(caches) == 2 * len(imodel.decoder.layers)  # self- and encoder-decoder attention per layer
    assert all(c["prev_key"].dtype in (torch.int8, torch.uint8) for c in caches)


def test_beam_reorder_selects_cached_codes(integer_model):
    """Two steps, a reorder that swaps and duplicates rows, then the rest: each step equals the
    teacher-forced codes of the reordered prefixes (encoder output reordered as the generator
    does with ``reorder_encoder_out``)."""
    _, imodel, net_input = integer_model
    prev = net_input["prev_output_tokens"]
    bsz = prev.size(0)
    order = torch.tensor([bsz - 1] + list(range(bsz - 1)), dtype=torch.long)
    order[0] = order[1]  # a beam copied twice, another dropped
    encoder_out = imodel.encoder(net_input["src_tokens"], net_input["src_lengths"])
    state: dict = {}
    with torch.no_grad():
        for t in range(2):
            imodel.decoder(prev[:, : t + 1], encoder_out=encoder_out, incremental_state=state)
        imodel.decoder.reorder_incremental_state_scripting(state, order)
        encoder_out = imodel.encoder.reorder_encoder_out(encoder_out, order)
        reordered = prev.index_select(0, order)
        forced = imodel.decoder(reordered, encoder_out=encoder_out)[0]
        for t in range(2, prev.size(1)):
            step = imodel.decoder(reordered[:, : t + 1], encoder_out=encoder_out, incremental_state=state)[0]
            assert torch.equal(step, forced[:, t:t + 1]), f"step {t}"


def test_sequence_generator_beam_5_on_the_integer_model(integer_model):
    qmodel, imodel, net_input = integer_model
    dictionary = qmodel.decoder.dictionary
    assert imodel.max_decoder_positions() == qmodel.decoder.max_positions()
    generator = SequenceGenerator([imodel], dictionary, beam_size=5, max_len_a=0, max_len_b=5, min_len=1)
    sample = {"net_input": {k: net_input[k] for k in ("src_tokens", "src_lengths")}}
    with torch.no_grad():
        hypos = generator.generate([imodel], sample)
    assert [len(h) for h in hypos] == [5] * net_input["src_tokens"].size(0)
    # the logits are the same codes as in a teacher-forced batch forward (bit-exact); the float
    # log-softmax runs on rows of the same values (float32 rounding of one row)
    assert_scores_are_teacher_forced(imodel, net_input, hypos, atol=1e-6)


def test_the_integer_model_is_a_fairseq_encoder_decoder_model(integer_model):
    from fairseq.models import FairseqEncoderDecoderModel, FairseqIncrementalDecoder
    _, imodel, net_input = integer_model
    assert isinstance(imodel, FairseqEncoderDecoderModel)
    assert isinstance(imodel.decoder, FairseqIncrementalDecoder)
    with torch.no_grad():
        logits, extra = imodel(**net_input)
        lprobs = imodel.get_normalized_probs((logits, extra), log_probs=True)
    assert logits.dtype == torch.float32 and extra is None
    torch.testing.assert_close(lprobs.exp().sum(-1), torch.ones(lprobs.shape[:2]))


@pytest.fixture(scope="module")
def shipped_integer():
    """The shipped model, w8a8 calibrated on 16 train_calib utterances, and its integer form;
    a batch of its first 4 test utterances."""
    from pathlib import Path

    from qswap.integration import data as fdata
    asset = Path(qswap.__file__).parent / "assets" / "s2t_demo"
    model, task = fdata.load_model_and_task(asset / "checkpoint.pt", asset)
    qmodel = qswap.convert(model, "w8a8")
    qswap.calibrate(qmodel, fdata.net_inputs(task, "train_calib", 2, max_sentences=8))
    dataset = fdata.load_subset(task, "test")
    sample = dataset.collater([dataset[i] for i in range(4)])
    return qmodel, qswap.integerize(qmodel), sample


def test_shipped_model_beam_5_integer_decoding(shipped_integer):
    """fairseq's SequenceGenerator (beam 5, as ``qswap eval`` decodes) on the shipped model's
    integer form: each hypothesis's scores are its teacher-forced integer log-probs, and the
    best hypotheses are those of the fake-quant model on at least 3 of the 4 utterances (the
    two differ by near-tie flips: docs/integer.md)."""
    qmodel, imodel, sample = shipped_integer
    net_input = sample["net_input"]
    dictionary = qmodel.decoder.dictionary
    hypos = {}
    for name, model in (("integer", imodel), ("fake", qmodel)):
        generator = SequenceGenerator([model], dictionary, beam_size=5, max_len_a=0, max_len_b=200)
        with torch.no_grad():
            hypos[name] = generator.generate([model], {"net_input": net_input})
    assert_scores_are_teacher_forced(imodel, net_input, hypos["integer"], atol=1e-5)
    same = sum(torch.equal(a[0]["tokens"], b[0]["tokens"]) for a, b in zip(hypos["integer"], hypos["fake"]))
    assert same >= 3
