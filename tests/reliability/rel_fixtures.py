"""Real fairseq checkpoints for the reliability tests, written the way fairseq writes them.

The model is ``qswap.models.build_s2t_transformer()`` (fairseq's S2TTransformerModel, small); its
cfg comes from fairseq's own argument parser and ``convert_namespace_to_omegaconf``, so a
checkpoint written here is what ``fairseq-train`` would write for that architecture. Imports
fairseq only inside the functions.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

NUM_SYMBOLS = 40  # qswap.models.make_dictionary's default: the dict.txt below matches it
ARCH_ARGS = ["--arch", "s2t_transformer", "--encoder-layers", "2", "--decoder-layers", "2",
             "--encoder-embed-dim", "64", "--decoder-embed-dim", "64",
             "--encoder-ffn-embed-dim", "128", "--decoder-ffn-embed-dim", "128",
             "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
             "--conv-channels", "64", "--conv-kernel-sizes", "5,5",
             "--max-source-positions", "6000", "--max-target-positions", "1024",
             "--share-decoder-input-output-embed", "--dropout", "0.0"]
FLAVOURS = ("trainer", "dictconfig", "legacy_args", "legacy_format")


def make_data_dir(root: Path) -> Path:
    """A speech_to_text data directory: config.yaml and the dictionary (no audio needed)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text("vocab_filename: dict.txt\ninput_channels: 1\n"
                                      "input_feat_per_channel: 80\n")
    (root / "dict.txt").write_text("".join(f"\u2581w{i} 1\n" for i in range(NUM_SYMBOLS)))
    return root


@functools.lru_cache(maxsize=None)
def fairseq_args(data_dir: str):
    """The argparse Namespace fairseq-train would build for the small model."""
    from fairseq import options

    parser = options.get_training_parser()
    return options.parse_args_and_arch(parser, [data_dir, "--task", "speech_to_text", *ARCH_ARGS,
                                                "--optimizer", "adam", "--lr", "1e-3",
                                                "--criterion", "label_smoothed_cross_entropy",
                                                "--cpu", "--seed", "1"])


def fairseq_state(data_dir: Path, flavour: str = "trainer", seed: int = 0) -> dict:
    """A checkpoint dict shaped like fairseq's ``Trainer.state_dict()`` (or an older layout)."""
    import numpy as np
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    from qswap.models import build_s2t_transformer

    args = fairseq_args(str(data_dir))
    model = build_s2t_transformer(seed=seed)
    state = {
        "args": None, "model": model.state_dict(), "criterion": None,
        "optimizer_history": [{"criterion_name": "LabelSmoothedCrossEntropyCriterion",
                               "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": np.float64(4.2)}, "num_updates": 10}],
        "task_state": {},
        "extra_state": {"metrics": {}, "previous_training_time": 1.0,
                        "train_iterator": {"epoch": 2, "iterations_in_epoch": 0, "shuffle": True},
                        "val_loss": np.float64(3.5), "best": np.array([3.5])},
        "last_optimizer_state": None,
    }
    if flavour == "trainer":  # fairseq 0.12's Trainer.state_dict
        cfg = convert_namespace_to_omegaconf(args)
        state["cfg"] = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    elif flavour == "dictconfig":  # the cfg pickled as an OmegaConf container
        state["cfg"] = convert_namespace_to_omegaconf(args)
    elif flavour in ("legacy_args", "legacy_format"):  # pre-hydra fairseq: args only
        state["args"] = args
    else:
        raise ValueError(flavour)
    return state


def write_fairseq_checkpoint(path: Path, data_dir: Path, flavour: str = "trainer", **changes) -> Path:
    """Write with fairseq's own ``torch_persistent_save`` (the legacy_format: torch's old format)."""
    from fairseq import checkpoint_utils

    state = fairseq_state(data_dir, flavour)
    state.update(changes)
    if flavour == "legacy_format":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        checkpoint_utils.torch_persistent_save(state, str(path))
    return path


def calibration_batches(n: int = 2):
    from qswap.models import s2t_net_input

    return [s2t_net_input(batch=2, frames=40, seed=i) for i in range(n)]


class Shared:
    """Artifacts built once per test session, on first use; tests must not modify them."""

    def __init__(self, root: Path):
        self.root = root
        self._checkpoints: dict[str, Path] = {}
        self._states: dict[str, dict] = {}
        self._qswap: Path | None = None
        self.qswap_report: dict | None = None  # the convert report of qswap_checkpoint()

    @functools.cached_property
    def data_dir(self) -> Path:
        return make_data_dir(self.root / "data")

    def state(self, flavour: str = "trainer") -> dict:
        """A fresh copy of a fairseq checkpoint state, to modify."""
        import copy
        if flavour not in self._states:
            self._states[flavour] = fairseq_state(self.data_dir, flavour)
        return copy.deepcopy(self._states[flavour])

    def checkpoint(self, flavour: str = "trainer") -> Path:
        if flavour not in self._checkpoints:
            path = self.root / f"float_{flavour}.pt"
            self._checkpoints[flavour] = write_fairseq_checkpoint(path, self.data_dir, flavour)
        return self._checkpoints[flavour]

    def qswap_checkpoint(self) -> Path:
        """The trainer checkpoint converted with w8a8 and calibrated on two batches."""
        if self._qswap is None:
            import qswap
            from qswap.io import load_fairseq_model, save_qswap_checkpoint

            model, cfg, _task = load_fairseq_model(self.checkpoint())
            qmodel = qswap.convert(model, "w8a8")
            qswap.calibrate(qmodel, calibration_batches())
            self._qswap = save_qswap_checkpoint(self.root / "w8a8.pt", qmodel, {"cfg": cfg})
            self.qswap_report = qmodel.qswap_report.to_dict()
        return self._qswap
