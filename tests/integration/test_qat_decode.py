"""A QAT checkpoint (fairseq-train with the plugin, learned LSQ activation scales) decodes doing
exactly the work of a PTQ checkpoint of the same recipe (issue 19: docs/fairseq.md once showed
the QAT checkpoint decoding 10x slower). Not timed: the same aten ops, as many times, in a
fixed-length beam search; nothing observing, no autograd graph, weights fake-quantized once."""
from collections import Counter

import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator
from torch.utils._python_dispatch import TorchDispatchMode

import qswap
from fairseq_run import SMALL, TRAIN, run_tool
from qswap.calibrate import activation_quantizers
from qswap.integration.data import first_net_input, load_model_and_task
from qswap.quant.fake_quantize import FakeQuantize

RECIPE = "w4a4_edges8_lsq"
STEPS = 4


@pytest.fixture(scope="module")
def qat_and_ptq(float_checkpoint):
    root, data, float_ckpt = float_checkpoint
    run_tool("fairseq-train", data, "--user-dir", qswap.plugin_dir(), "--task", "speech_to_text_qswap",
             "--qswap-recipe", RECIPE, "--qswap-calib-batches", "1", *SMALL, *TRAIN, "--batch-size", "3",
             "--max-update", "4", "--finetune-from-model", float_ckpt, "--save-dir", root / "qat_lsq", cwd=root)
    from qswap.cli import main
    assert main(["convert", str(float_ckpt), "--recipe", RECIPE, "--data", str(data), "--calib-subset", "train",
                 "--calib-batches", "1", "-o", str(root / "ptq_lsq.pt")]) == 0
    qat, task = load_model_and_task(root / "qat_lsq" / "checkpoint_last.pt", data)
    ptq, _ = load_model_and_task(root / "ptq_lsq.pt", data)
    return qat, ptq, task


class OpCounter(TorchDispatchMode):
    """Counts every aten op and the outputs that would carry an autograd graph."""

    def __init__(self):
        super().__init__()
        self.ops, self.graph_outputs = Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.graph_outputs += sum(isinstance(o, torch.Tensor) and o.requires_grad for o in outs)
        return out


def _decode_ops(model, task) -> OpCounter:
    sample = {"net_input": {k: v for k, v in first_net_input(task, "test", count=2).items()
                            if k in ("src_tokens", "src_lengths")}}
    gen = SequenceGenerator([model], task.target_dictionary, beam_size=2, max_len_a=0, max_len_b=STEPS,
                            min_len=STEPS)
    gen.generate([model], sample)  # warm-up: weight caches filled once
    with OpCounter() as counter:
        gen.generate([model], sample)
    return counter


def test_the_qat_checkpoint_learned_its_scales(qat_and_ptq):
    qat, ptq, _ = qat_and_ptq
    learned = [q for q in activation_quantizers(qat) if isinstance(q.scale, torch.nn.Parameter)]
    assert learned and len(learned) == len(activation_quantizers(qat))
    ptq_scales = dict(ptq.named_buffers()) | dict(ptq.named_parameters())
    assert any(not torch.equal(p, ptq_scales[n]) for n, p in qat.named_parameters() if n.endswith("_quant.scale"))


def test_nothing_observes_while_the_qat_checkpoint_decodes(qat_and_ptq):
    qat, _, _ = qat_and_ptq
    seen = [q for q in activation_quantizers(qat) if q.initialized]
    assert seen and all(bool(q.frozen) for q in seen)


def test_qat_decoding_does_the_work_of_ptq_decoding(qat_and_ptq):
    qat, ptq, task = qat_and_ptq
    qat_ops, ptq_ops = _decode_ops(qat, task), _decode_ops(ptq, task)
    assert qat_ops.graph_outputs == 0 and ptq_ops.graph_outputs == 0
    assert qat_ops.ops == ptq_ops.ops  # the weights' fake-quantization: the next test


def test_weight_quantizers_keep_their_output_across_decoding_steps(qat_and_ptq):
    qat, _, task = qat_and_ptq
    weights = [m for m in qat.modules() if isinstance(m, FakeQuantize) and m.kind == "weight"]
    _decode_ops(qat, task)
    cached = [m._cached[0] for m in weights if m._cached is not None]
    _decode_ops(qat, task)
    assert cached and all(a is b for a, b in zip(cached, [m._cached[0] for m in weights if m._cached is not None]))
