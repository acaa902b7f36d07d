"""Buffers whose shape is only known after the first observation (per-channel qparams,
observer ranges). Loading a state_dict resizes them on the device they are on (a model that
fairseq-train moved to the GPU before loading a checkpoint keeps them there); loading a float state_dict, which has
none of them, leaves them as they are instead of reporting them missing."""
from __future__ import annotations

import torch
from torch import nn


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
