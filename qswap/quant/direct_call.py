"""DirectCall: a module whose call goes straight to ``forward`` when nothing watches it.

A quantizer is called on every tensor a model computes: a decoding step of the shipped model
calls about 130 of them on a few rows each, so the two Python frames of ``nn.Module.__call__``
(``_wrapped_call_impl``, ``_call_impl``) cost as much as a third of a quantizer's own arithmetic.
``DirectCall.__call__`` makes the same test as ``nn.Module._call_impl``'s fast path (no hook of
the module, no global module hook, no JIT trace, no ``torch.compile`` of the module, and
``nn.Module.__call__`` not patched, as ``torch.fx`` tracing does) and then calls ``forward``
itself; in every other case it is ``nn.Module.__call__``, so hooks (the honesty audit's global
module hooks among them), tracing and compiling see the module as before.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as torch_module


_MODULE_CALL = nn.Module.__call__


def watched(module: nn.Module) -> bool:
    """Whether a call of ``module`` must go through ``nn.Module.__call__``: a hook of its own, a
    global module hook, a JIT trace, ``torch.compile`` of it, or ``nn.Module.__call__`` patched."""
    return bool(nn.Module.__call__ is not _MODULE_CALL or module._forward_hooks or module._forward_pre_hooks
                or module._backward_hooks or module._backward_pre_hooks or module._compiled_call_impl is not None
                or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks
                or torch._C._get_tracing_state())


class DirectCall(nn.Module):
    def __call__(self, *args, **kwargs):
        if watched(self):
            return nn.Module.__call__(self, *args, **kwargs)
        return self.forward(*args, **kwargs)
