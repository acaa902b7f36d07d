"""fairseq's SequenceGenerator over the exported float graphs (qswap.export.runtime) in the beam
search shapes the shipped decode does not use: beam 1, a batch of one utterance, and forced
prefix tokens. Each gives fairseq's own tokens and scores on the float model."""
import itertools
from pathlib import Path

import pytest
import torch

import qswap

pytest.importorskip("fairseq")
pytest.importorskip("onnxruntime")

from fairseq.sequence_generator import SequenceGenerator  # noqa: E402

from qswap.export.package import NO_QUANT, export_model  # noqa: E402
from qswap.export.runtime import load_exported  # noqa: E402
from qswap.integration import data as fdata  # noqa: E402

ASSET = Path(qswap.__file__).parent / "assets" / "s2t_demo"


@pytest.fixture(scope="module")
def float_pair(tmp_path_factory):
    """The shipped model, its float export loaded in onnxruntime, and two padded test batches."""
    torch.set_num_threads(1)
    model, cfg, task = fdata.load_model_cfg_task(ASSET / "checkpoint.pt", ASSET)
    out = tmp_path_factory.mktemp("float")
    export_model(qswap.convert(model, NO_QUANT), out, task_cfg=cfg.task, audit=False, allow_float=True)
    ort = load_exported(out, task.target_dictionary).eval()
    batches = list(itertools.islice(fdata.batches(task, "test", max_sentences=3), 2))
    return model.eval(), ort, task.target_dictionary, batches


def _search(model, dictionary, sample, beam, prefix_tokens=None):
    generator = SequenceGenerator([model], dictionary, beam_size=beam, max_len_a=0, max_len_b=60)
    with torch.no_grad():
        hypos = generator.generate([model], sample, prefix_tokens=prefix_tokens)
    return [[(h["tokens"].tolist(), float(h["score"])) for h in sentence] for sentence in hypos]


def _assert_same(ours, fairseqs):
    """The same hypotheses, in the same order, with scores equal up to float32 summation order."""
    assert [[tokens for tokens, _ in s] for s in ours] == [[tokens for tokens, _ in s] for s in fairseqs]
    for s_ours, s_fairseq in zip(ours, fairseqs):
        for (_, a), (_, b) in zip(s_ours, s_fairseq):
            assert a == pytest.approx(b, abs=1e-3)


def _one(sample, i):
    n = int(sample["net_input"]["src_lengths"][i])
    return {"id": sample["id"][i:i + 1],
            "net_input": {"src_tokens": sample["net_input"]["src_tokens"][i:i + 1, :n],
                          "src_lengths": sample["net_input"]["src_lengths"][i:i + 1]}}


@pytest.mark.parametrize("beam", [1, 2])
def test_small_beams_give_fairseqs_hypotheses(float_pair, beam):
    model, ort, dictionary, batches = float_pair
    for sample in batches:
        _assert_same(_search(ort, dictionary, sample, beam), _search(model, dictionary, sample, beam))


@pytest.mark.parametrize("beam", [1, 5])
def test_a_batch_of_one_utterance_gives_fairseqs_hypotheses(float_pair, beam):
    model, ort, dictionary, batches = float_pair
    sample = _one(batches[0], 1)
    _assert_same(_search(ort, dictionary, sample, beam), _search(model, dictionary, sample, beam))


def test_forced_prefix_tokens_give_fairseqs_hypotheses(float_pair):
    """Prefix tokens (fairseq-generate's --prefix-size): the reference's first two tokens forced;
    the continuation is searched over the graphs."""
    model, ort, dictionary, batches = float_pair
    sample = batches[0]
    prefix = sample["target"][:, :2]
    assert (prefix != dictionary.pad()).all()
    ours = _search(ort, dictionary, sample, 3, prefix_tokens=prefix)
    _assert_same(ours, _search(model, dictionary, sample, 3, prefix_tokens=prefix))
    assert all(h[0][:2] == row.tolist() for s, row in zip(ours, prefix) for h in s)
