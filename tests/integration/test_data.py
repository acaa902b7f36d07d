"""Subsets as qswap reads them: evaluation features, the same on every read."""
import torch

from qswap.assets import __path__ as asset_path
from qswap.integration.data import load_model_and_task, load_subset

ASSET = f"{asset_path[0]}/s2t_demo"


def test_a_train_named_subset_is_read_without_training_augmentation():
    """fairseq applies the config's `_train` transforms (SpecAugment) to splits named train*;
    calibration on the shipped `train_calib` subset must see inference features instead."""
    _, task = load_model_and_task(f"{ASSET}/checkpoint.pt", ASSET)
    task.load_dataset("train_calib")  # fairseq's own reading: augmented
    augmented = task.dataset("train_calib")
    assert "SpecAugment" in repr(augmented.feature_transforms)
    _, task = load_model_and_task(f"{ASSET}/checkpoint.pt", ASSET)
    ours = load_subset(task, "train_calib")
    assert "SpecAugment" not in repr(ours.feature_transforms)
    assert not ours.shuffle
    first, again = ours[0].source, ours[0].source
    assert torch.equal(first, again)
    _, task = load_model_and_task(f"{ASSET}/checkpoint.pt", ASSET)
    test_style = load_subset(task, "test")  # an eval split: utterance CMVN only
    assert repr(test_style.feature_transforms) == repr(ours.feature_transforms)
    torch.manual_seed(0)
    assert not torch.equal(augmented[0].source, first)  # SpecAugment's masks change the features


def test_batches_are_batched_as_asked_on_every_call():
    """fairseq's task keeps a batch iterator per dataset; a second call for the same subset with
    another batch size (or shard) must not get the first call's batches."""
    from qswap.integration.data import batches

    _, task = load_model_and_task(f"{ASSET}/checkpoint.pt", ASSET)
    sizes = lambda **kw: [len(s["id"]) for s in batches(task, "train_calib", **kw)]  # noqa: E731
    assert sizes(max_sentences=4) == [4] * 8
    assert sizes(max_sentences=32) == [32]
    assert sizes(max_sentences=16, num_shards=2, shard_id=1) == [16]
    ids = lambda **kw: [i for s in batches(task, "train_calib", **kw) for i in s["id"].tolist()]  # noqa: E731
    assert sorted(ids(max_sentences=8)) == list(range(32))
