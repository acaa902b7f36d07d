"""Safe loading: a malicious checkpoint is refused without running its payload."""
from __future__ import annotations

import argparse
import os

import pytest
import torch

from qswap.errors import UnsafeCheckpointError
from qswap.io import load_checkpoint, load_fairseq_model


class Payload:
    """Unpickling this would create ``marker`` by running a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_malicious_pickle_is_refused_without_running(tmp_path, shared, zip_format):
    marker = tmp_path / "PWNED"
    state = shared.state()
    state["extra_state"]["payload"] = Payload(marker)
    path = tmp_path / "checkpoint_best.pt"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_fairseq_model(path)
    message = str(info.value)
    assert f"{os.system.__module__}.system" in message  # the offending global, e.g. posix.system
    assert "--trust-checkpoint" in message and "trust_checkpoint=True" in message
    assert not marker.exists(), "the payload ran"


def test_the_allowlist_is_scoped_to_the_load(shared):
    from qswap.io.safe_load import allowed_globals

    ours = {id(g[0] if isinstance(g, tuple) else g) for g in allowed_globals()}
    before = {id(g[0] if isinstance(g, tuple) else g) for g in torch.serialization.get_safe_globals()}
    load_checkpoint(shared.checkpoint("dictconfig"))
    after = {id(g[0] if isinstance(g, tuple) else g) for g in torch.serialization.get_safe_globals()}
    assert not (after - before) & ours  # none of qswap's entries outlive the load


def test_a_load_keeps_what_the_process_allowed_before(shared):
    """The fairseq plugin allows fairseq's checkpoint classes for the whole process; a qswap load
    in that process (e.g. the QAT start reading its converted checkpoint) must leave them allowed,
    or fairseq-train's later resume from checkpoint_last.pt fails on argparse.Namespace."""
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        load_checkpoint(shared.checkpoint("dictconfig"))
        assert argparse.Namespace in torch.serialization.get_safe_globals()
    finally:  # the process's allowlist as it was
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def test_trust_checkpoint_is_the_opt_in(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"note": argparse.ArgumentParser}, path)  # a class no checkpoint needs
    with pytest.raises(UnsafeCheckpointError, match="argparse.ArgumentParser"):
        load_checkpoint(path)
    assert load_checkpoint(path, trust_checkpoint=True)["note"] is argparse.ArgumentParser


def test_a_qswap_checkpoint_needs_no_allowlist_at_all(shared):
    path = shared.qswap_checkpoint()
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    state = torch.load(path, weights_only=True)  # plain torch, no safe_globals
    assert state["qswap"]["recipe"]["name"] == "w8a8"
