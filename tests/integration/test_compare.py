"""qswap.integration.compare's library functions on the shipped model."""
import pytest

import qswap
from qswap.convert import copy_model
from qswap.integration import data as fdata
from qswap.errors import DataError, RecipeError
from qswap.integration.compare import compare, prepare_recipe, score

ASSET = f"{qswap.__path__[0]}/assets/s2t_demo"


def shipped():
    return fdata.load_model_and_task(f"{ASSET}/checkpoint.pt", ASSET)


def test_macs_per_second_do_not_depend_on_the_batching():
    """MMACs/s and GBOPs/s had been one forward of the first batch, its padded frames counted, over
    its unpadded seconds: 86.8 MMACs/s at --max-sentences 1, 104.0 at 8 for one float model."""
    model, task = shipped()
    fp32 = prepare_recipe(copy_model(model), task, "fp32", calib_subset="train_calib", calib_batches=1)
    rates = {ms: score(fp32, task, "fp32", subset="test", beam=1, max_sentences=ms, batches=1) for ms in (1, 8)}
    assert rates[1].mmacs_per_s == rates[8].mmacs_per_s
    assert rates[1].gbops_per_s == rates[8].gbops_per_s


@pytest.mark.parametrize("name, other", [("w8a8", "w8a8"), ("fp32", "fp32")])
def test_two_recipes_of_one_name_are_refused_before_any_decoding(tmp_path, name, other):
    """A copy of w8a8.yaml that keeps `name: w8a8` (4-bit weights inside) had made two rows labelled
    w8a8 that no reader could tell apart; the checkpoint is not even read."""
    copy = tmp_path / "w4a8_copy.yaml"
    copy.write_text(f"version: 1\nname: {name}\n"
                    "defaults:\n  weight: {bits: 4, symmetric: true, granularity: per_channel, axis: 0}\n")
    with pytest.raises(RecipeError) as exc:
        compare(str(tmp_path / "missing.pt"), str(tmp_path), [other, str(copy)] if other != "fp32" else [str(copy)])
    assert f"both named {name!r}" in str(exc.value) and str(copy) in str(exc.value)
    assert other in str(exc.value)


def test_integer_comparison_without_a_quantized_row_is_refused_by_the_library(tmp_path):
    """compare(..., integer=True) with the recipe fp32 alone had decoded the float row and written
    integer columns of '-' (only the CLI refused it); refused before the checkpoint (missing) is read."""
    with pytest.raises(DataError) as exc:
        compare(str(tmp_path / "missing.pt"), str(tmp_path), ["fp32"], integer=True)
    assert "the recipe fp32 alone gives none" in str(exc.value) and "missing.pt" not in str(exc.value)


def test_an_integer_model_that_refuses_an_utterance_is_a_row_note():
    """16-bit softmax probabilities sum exactly over at most a few hundred keys in int32: an
    utterance of 300 keys had aborted the whole comparison (every row lost), naming no recipe."""
    import torch

    from qswap.integration.compare import evaluate_integer

    model, task = shipped()
    softmax16 = {"version": 1, "name": "softmax16", "defaults": {
        "weight": {"bits": 8, "symmetric": True, "granularity": "per_tensor", "observer": "minmax"},
        "activation": {"bits": 8, "symmetric": False, "granularity": "per_tensor", "observer": "minmax"},
        "sites": {"softmax_out": {"bits": 16}}}}
    qmodel = prepare_recipe(copy_model(model), task, softmax16, calib_subset="train_calib", calib_batches=1)
    sample = next(fdata.batches(task, "test", max_sentences=1))
    net = sample["net_input"]
    long = {**sample, "net_input": {**net, "src_tokens": net["src_tokens"].repeat(1, 6, 1),
                                    "src_lengths": net["src_lengths"] * 6}}
    assert long["net_input"]["src_tokens"].shape[1] >= 1000  # past 242 keys after the subsampler's 4x
    result = evaluate_integer(qmodel, task, [long], net, [""], beam=1)
    assert result.wer is None and result.note.startswith("the integer model refuses an utterance: ")
    assert "keys" in result.note and "\n" not in result.note
    assert torch.equal(long["net_input"]["src_lengths"], net["src_lengths"] * 6)


def test_the_note_of_a_model_without_an_integer_form_names_every_module():
    """Its note had kept the last line of the error alone: one of the modules it names."""
    from qswap.integration.compare import evaluate_integer

    model, task = shipped()
    skip_two = {"version": 1, "name": "skip_two", "defaults": {
        "weight": {"bits": 8, "symmetric": True, "granularity": "per_tensor", "observer": "minmax"},
        "activation": {"bits": 8, "symmetric": False, "granularity": "per_tensor", "observer": "minmax"}},
        "rules": [{"match": {"path": "encoder.transformer_layers.0"}, "skip": True},
                  {"match": {"path": "decoder.layers.0"}, "skip": True}]}
    qmodel = prepare_recipe(copy_model(model), task, skip_two, calib_subset="train_calib", calib_batches=1)
    net = next(fdata.net_inputs(task, "test", 1, max_sentences=1))
    note = evaluate_integer(qmodel, task, [], net, [], beam=1).note
    assert note.startswith("no integer form: ") and "encoder.transformer_layers.0" in note
    assert "decoder.layers.0" in note and "\n" not in note
