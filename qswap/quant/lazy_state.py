"""Buffers whose shape is only known after the first observation (per-channel qparams,
observer ranges). Loading a state_dict resizes them on the device they are on (a model that
fairseq-train moved to the GPU before loading a checkpoint keeps them there); loading a float state_dict, which has
none of them, leaves them as they are instead of reporting them missing."""
from __future__ import annotations

import torch
from torch import nn


def ordinary_tensors(module: nn.Module) -> None:
    """Make ordinary tensors of the buffers and parameters a run under ``torch.inference_mode``
    (a model that enters it in its own forward) replaced with inference tensors: no in-place write
    reaches those outside that mode, and the next calibration, grid update or rollback had raised
    a RuntimeError of its own."""
    for owner in module.modules():
        for name, buffer in owner._buffers.items():
            if buffer is not None and buffer.is_inference():
                owner._buffers[name] = buffer.clone()
        for param in owner._parameters.values():
            if param is not None and param.data.is_inference():
                param.data = param.data.clone()


def load_state_back(module: nn.Module, state: dict) -> None:
    """``module.load_state_dict(state)``, also after a run that left inference tensors in it
    (the rollback of a failed calibration or audit had raised its own RuntimeError there, hiding
    the error that says what happened): those are made ordinary (``ordinary_tensors``) only when
    the load meets one, so an ordinary restore walks nothing more."""
    try:
        module.load_state_dict(state)
    except RuntimeError:
        ordinary_tensors(module)
        module.load_state_dict(state)


class LazyStateModule(nn.Module):
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        own = {**dict(self._parameters), **dict(self._buffers)}
        present = [k for k in own if prefix + k in state_dict]
        for name in present:
            incoming, local = state_dict[prefix + name], own[name]
            if local is not None and incoming.shape != local.shape:
                with torch.no_grad():
                    local.data = torch.empty_like(incoming, dtype=local.dtype, device=local.device)
        before = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if not present:  # a float checkpoint: this quantizer keeps its own state
            del missing_keys[before:]
