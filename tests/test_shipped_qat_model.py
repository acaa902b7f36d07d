"""The shipped QAT checkpoints (qswap/assets/s2t_demo/qat_w4a4_edges8.pt, qat_w4a4_edges8_embed.pt,
qat_w4a4_edgew8_embed.pt and qat_w4a8.pt, written
by tools/qat_train.py ship): small, each loads as the quantized model it was trained as (learned
LSQ activation scales, every grid frozen), audits honest and decodes the shipped test utterances."""
from pathlib import Path

import pytest
import torch

import qswap
from qswap.calibrate import activation_quantizers
from qswap.integration.data import first_net_input, load_model_and_task
from qswap.io.safe_load import load_checkpoint

ASSET = Path(__file__).resolve().parents[1] / "qswap" / "assets" / "s2t_demo"
SHIPPED = {"qat_w4a4_edges8.pt": "w4a4_edges8_stream_smoothquant_lsq",
           "qat_w4a4_edges8_embed.pt": "w4a4_edges8_stream_embed_smoothquant_lsq", "qat_w4a8.pt": "w4a8_lsq",
           "qat_w4a4_edgew8_embed.pt": "w4a4_edgew8_stream_embed_smoothquant_lsq"}


@pytest.fixture(scope="module", params=sorted(SHIPPED))
def loaded(request):
    model, task = load_model_and_task(ASSET / request.param, ASSET)
    return model, task, SHIPPED[request.param]


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_the_file_is_small_and_stores_float16_weights(name):
    assert (ASSET / name).stat().st_size < 10 * 2**20
    state = load_checkpoint(ASSET / name)["model"]
    assert state["encoder.transformer_layers.0.fc1.weight"].dtype == torch.float16
    scales = [v for k, v in state.items() if k.endswith("_quant.scale")]
    assert scales and all(v.dtype == torch.float32 for v in scales)


def test_it_loads_quantized_with_learned_frozen_scales(loaded):
    model, _, recipe = loaded
    assert model.qswap_recipe.name == recipe
    quantizers = activation_quantizers(model)
    assert quantizers and all(isinstance(q.scale, torch.nn.Parameter) for q in quantizers)
    assert all(bool(q.frozen) for q in quantizers if q.initialized)
    assert next(model.parameters()).dtype == torch.float32  # float16 storage, float32 model


def test_it_audits_honest_and_decodes(loaded):
    from fairseq.sequence_generator import SequenceGenerator

    model, task, _ = loaded
    net_input = first_net_input(task, "test", count=2)
    assert qswap.audit(model, net_input).honest
    sample = {"net_input": {k: net_input[k] for k in ("src_tokens", "src_lengths")}}
    hyps = SequenceGenerator([model], task.target_dictionary, beam_size=2).generate([model], sample)
    assert all(len(h[0]["tokens"]) > 1 for h in hyps)
