"""Counterpart modules. Importing this package registers the torch.nn counterparts; the
fairseq ones register when ``qswap.nn.fairseq`` is imported (it imports fairseq)."""
from qswap.nn import activation, attention, embedding, hadamard, linear, norm  # noqa: F401  (registration)
from qswap.nn.base import QuantConfig, QuantModule
from qswap.nn.registry import REGISTRY, lookup, register, unregister

__all__ = ["QuantConfig", "QuantModule", "REGISTRY", "lookup", "register", "unregister"]
