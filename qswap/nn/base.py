"""What every counterpart shares: its QuantConfig and the QuantModule base class."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Mapping

import torch
from torch import nn

from qswap.quant.fake_quantize import FakeQuantize
from qswap.quant.spec import QuantSpec


@dataclass(frozen=True)
class QuantConfig:
    """The specs one recipe rule gives one module.

    ``weight`` / ``activation`` apply to every weight and every activation site of the module;
    ``sites`` overrides single sites by name (``softmax_in``, ``q``, ``norm_weight``...), and a
    site mapped to None stays float (the audit will say so).
    """

    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    sites: Mapping[str, QuantSpec | None] = field(default_factory=dict)

    def weight_spec(self, site: str = "weight") -> QuantSpec | None:
        return self.sites.get(site, self.weight)

    def act_spec(self, site: str, *, nonnegative: bool = False) -> QuantSpec | None:
        if site in self.sites:
            return self.sites[site]
        if self.activation is not None and nonnegative and self.activation.signed:
            return self.activation.unsigned()
        return self.activation


def weight_quantizer(config: QuantConfig, site: str = "weight") -> nn.Module:
    spec = config.weight_spec(site)
    return FakeQuantize(spec, kind="weight") if spec is not None else nn.Identity()


def act_quantizer(config: QuantConfig, site: str, *, nonnegative: bool = False) -> nn.Module:
    spec = config.act_spec(site, nonnegative=nonnegative)
    return FakeQuantize(spec, kind="activation") if spec is not None else nn.Identity()


class QuantModule(nn.Module):
    """Base class of counterparts.

    ``float_class`` is set by ``register``. ``converts_children`` says whether the walker keeps
    descending into the counterpart's children (a transformer layer: its residual adds are its
    own, its linears are converted by their own rules) or not (attention: swapped as a unit).
    """

    float_class: ClassVar[type]
    converts_children: ClassVar[bool] = False
    sites: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_float(cls, module: nn.Module, config: QuantConfig) -> "QuantModule":
        raise NotImplementedError(f"{cls.__name__} must implement from_float")

    def quantizers(self) -> dict[str, FakeQuantize]:
        """This module's own quantizers by site name (not those of converted children)."""
        return {n: m for n, m in self.named_children() if isinstance(m, FakeQuantize)}


def derived_weight(owner: nn.Module, slot: str, compute: Callable[[], torch.Tensor],
                   *sources: torch.Tensor) -> torch.Tensor:
    """A weight computed from parameters/buffers only (weight norm, folded BatchNorm): constant-
    foldable preprocessing, recomputed when a source changes (its version or storage).

    The latest result stays referenced as the plain tensor attribute ``owner.<slot>`` until the
    next one exists, so two successive results never share an address: a weight FakeQuantize,
    which recognizes its input by address and version, re-derives its grid exactly when the
    weight changes.
    """
    key = tuple((s._version, s.data_ptr()) for s in sources)
    cached = owner.__dict__.get(slot)
    if cached is not None and owner.__dict__.get(f"{slot}_key") == key and not torch.is_grad_enabled():
        return cached
    weight = compute()
    owner.__dict__[slot], owner.__dict__[f"{slot}_key"] = weight.detach(), key
    return weight
