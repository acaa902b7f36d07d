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


def with_own_hooks(module: nn.Module, args: tuple, run):
    """``run(*args)``, a counterpart's own path through ``module``'s children in place of
    ``module(*args)`` (a conformer layer runs its ``ffn1``'s ops itself, wav2vec 2.0's model its
    feature extractor's), with ``module``'s own forward pre-hooks and forward hooks run around it
    in the order ``nn.Module.__call__`` runs them: a pre-hook may replace the arguments, a forward
    hook the result, so that a hook on the container (a feature tap) sees and does on the converted
    model what it does on the float one (it had never run). Global module hooks (the honesty
    audit's) see the children's calls, not the container's. A backward hook on the container: a
    ConvertError (its gradients are the children's). A hook marked ``module_call_only`` (a record
    of the module scopes torch's tracer pushes, which it pushes in ``nn.Module.__call__`` only:
    ``qswap.export.sites.ScopeRecorder``) does not run here."""
    if not (module._forward_pre_hooks or module._forward_hooks or module._backward_hooks
            or module._backward_pre_hooks):
        return run(*args)
    if module._backward_hooks or module._backward_pre_hooks:
        from qswap.errors import ConvertError
        raise ConvertError(f"a backward hook on {type(module).__name__}, whose children the converted model "
                           f"runs itself, would not run: register it on its children (the last one's output "
                           f"is the container's)")
    kwargs: dict = {}
    for key, hook in list(module._forward_pre_hooks.items()):
        if getattr(hook, "module_call_only", False):
            continue
        if key in module._forward_pre_hooks_with_kwargs:
            result = hook(module, args, kwargs)
            if result is not None:
                args, kwargs = result
        else:
            result = hook(module, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
    out = run(*args, **kwargs)
    for key, hook in list(module._forward_hooks.items()):
        if getattr(hook, "module_call_only", False):
            continue
        result = (hook(module, args, kwargs, out) if key in module._forward_hooks_with_kwargs
                  else hook(module, args, out))
        if result is not None:
            out = result
    return out


class DirectCall(nn.Module):
    def __call__(self, *args, **kwargs):
        if watched(self):
            return nn.Module.__call__(self, *args, **kwargs)
        return self.forward(*args, **kwargs)
