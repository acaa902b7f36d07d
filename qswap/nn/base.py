"""What every counterpart shares: its QuantConfig and the QuantModule base class."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Mapping

import torch
from torch import nn

from qswap.quant import fused
from qswap.quant.fake_quantize import KINDS, FakeQuantize
from qswap.quant.spec import QuantSpec
from qswap.quant.stamp import stamp, unchanged
from qswap.nn.simulate import SIMULATIONS, drop_kept_forms


SITE_KINDS = KINDS  # what a site's declared kind can be: a FakeQuantize's kind


def check_finite_input(x: torch.Tensor, model: str = "the quantized model") -> None:
    """DataError where ``x``, a model's input (features, audio), holds NaN or +-inf. The integer
    model refuses such an input before quantizing it (``qswap.nn.integer_steps.QuantizeStep``): a
    NaN has no code (cast to an integer it becomes an arbitrary one, and the model decodes it as
    ordinary speech); its simulation refuses it at the same place, in both ``simulate`` modes. One
    read of the input by qswap's C kernel (``qswap.quant.fused.min_max``), or where it cannot read
    it (not built, not a dense float32 CPU tensor, the honesty audit watching) two passes of
    predicates only (``isnan``, ``isinf``: the audit reads no arithmetic in them, where
    ``isfinite`` computes an ``abs``). Not while an ONNX export traces the model: a graph holds no
    Python branch (its runners check what they feed it: ``run_encoder``)."""
    if torch.jit.is_tracing() or not x.is_floating_point() or x.numel() == 0:
        return
    read = fused.min_max(x)
    if read[2] if read is not None else (bool(torch.isnan(x).any()) or bool(torch.isinf(x).any())):
        from qswap.errors import DataError
        raise DataError(f"{model}'s input holds NaN or +-inf values; check the features or audio fed to it "
                        f"(a broken file, a division by zero in preprocessing)")


def own(module: nn.Module, *names: str) -> list:
    """``[module.<name> for name in names]``, read from the module's own tables (parameters,
    submodules, then its instance dict; anything else, a buffer or a class attribute, by
    ``getattr``): ``Module.__getattr__`` costs a Python frame per name, and a decoding step reads a
    linear's weight, bias and quantizers on every call of every linear. The same objects as
    ``getattr`` wherever no class attribute or descriptor shares a parameter's or submodule's name
    (``register_parameter`` and ``add_module`` refuse one)."""
    params, modules, plain = module._parameters, module._modules, module.__dict__
    out = []
    for name in names:
        out.append(params[name] if name in params else modules[name] if name in modules
                   else plain[name] if name in plain else getattr(module, name))
    return out


@dataclass(frozen=True)
class SiteSpecs:
    """A recipe's ``sites:`` entry merged over its rule's weight spec and over its activation spec.

    A recipe cannot know a site's kind (the counterparts that own the site may not even be
    imported when it loads); the counterpart that creates the quantizer declares the kind
    (``QuantModule.sites``) and that picks one of the two.
    """

    weight: QuantSpec | None
    activation: QuantSpec | None


@dataclass(frozen=True)
class QuantConfig:
    """The specs one recipe rule gives one module.

    ``weight`` / ``activation`` apply to every weight and every activation site of the module;
    ``sites`` overrides single sites by name (``softmax_in``, ``q``, ``norm_weight``...) with a
    QuantSpec, a SiteSpecs (a recipe's entry, resolved by the site's declared kind), or None:
    the site stays float (the audit will say so). ``simulate`` (the recipe's key): "integer"
    (the default) computes the insides of softmax, LayerNorm and GLU as their integer forms do
    and requantizes onto each reader's grid in fixed point, "float" as float32 kernels with
    float rounding (``qswap.nn.simulate``).
    """

    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    sites: Mapping[str, QuantSpec | SiteSpecs | None] = field(default_factory=dict)
    simulate: str = SIMULATIONS[0]  # "integer"

    def spec(self, site: str, kind: str, *, nonnegative: bool = False) -> QuantSpec | None:
        """The spec of ``site``, whose declared kind is ``kind`` ("weight" or "activation");
        ``nonnegative``: an activation that is never negative (softmax output) gets an unsigned
        grid unless its site names its own spec."""
        if site in self.sites:
            value = self.sites[site]
            return getattr(value, kind) if isinstance(value, SiteSpecs) else value
        if kind == "weight":
            return self.weight
        if self.activation is not None and nonnegative and self.activation.signed:
            return self.activation.unsigned()
        return self.activation


def quantizer(config: QuantConfig, sites: Mapping[str, str], site: str, *,
              nonnegative: bool = False) -> nn.Module:
    """The quantizer of ``site`` as its owner declares it in ``sites`` (site -> kind): a
    FakeQuantize of that kind with the config's spec for it, or an Identity when the spec is None."""
    kind = sites[site]
    spec = config.spec(site, kind, nonnegative=nonnegative)
    return FakeQuantize(spec, kind=kind) if spec is not None else nn.Identity()


class QuantModule(nn.Module):
    """Base class of counterparts.

    ``float_class`` is set by ``register``. ``converts_children`` says whether the walker keeps
    descending into the counterpart's children (a transformer layer: its residual adds are its
    own, its linears are converted by their own rules) or not (attention: swapped as a unit).

    ``sites`` declares every quantizer site the counterpart creates (``quantizer(config,
    self.sites, name)``) and its kind: "weight" for a parameter, buffer or constant (quantized
    from its own values, with the recipe's weight spec), "activation" for a tensor computed at
    run time (calibrated, with the activation spec).

    Every parameter ``p`` is quantized by the child ``{p}_quant`` (a FakeQuantize, or a
    BiasQuantize for a bias added to an integer accumulator). ``param_quantizers`` names the
    exceptions, ``p`` -> the dotted path of its quantizer (a weight-normed conv's ``weight_g`` and
    ``weight_v`` -> ``weight_quant``), or None for a parameter inference never reads.

    ``takes_reader`` says that ``forward`` takes ``out_quant``, the quantizer that reads the result,
    and with ``simulate: integer`` writes onto its grid as the integer form does
    (``qswap.nn.simulate.onto_grid``); a container calls it so (``told``).

    ``normalizes`` says that the counterpart is a normalization (LayerNorm, GroupNorm, BatchNorm):
    its weights are a per-channel scale and shift, not a weight matrix; ``qswap search`` leaves
    their bits as the recipe gives them.
    """

    float_class: ClassVar[type]
    converts_children: ClassVar[bool] = False
    takes_reader: ClassVar[bool] = False  # forward(x, out_quant=...): writes onto its reader's grid
    normalizes: ClassVar[bool] = False  # a normalization: a per-channel scale and shift
    sites: ClassVar[Mapping[str, str]] = {}
    param_quantizers: ClassVar[Mapping[str, str | None]] = {}

    @classmethod
    def from_float(cls, module: nn.Module, config: QuantConfig) -> "QuantModule":
        raise NotImplementedError(f"{cls.__name__} must implement from_float")

    def train(self, mode: bool = True) -> "QuantModule":
        """``nn.Module.train``; entering training also drops the kept integer forms
        (``qswap.nn.simulate.cached``'s ``_integer*`` slots) of this module and of the plain modules
        inside it: the optimizer writes learned scales and
        weights through ``.data``, which no stamp sees, and a path that runs only at inference
        (a residual add onto the next layer's readers) would otherwise keep a form built from the
        values before training."""
        super().train(mode)
        if mode:  # its own forms, and those of plain modules inside it (an attention core, a
            # projection) down to the next counterpart, whose own train (called above) drops its
            drop_kept_forms(self)
            inside = list(self.children())
            while inside:
                module = inside.pop()
                if not isinstance(module, QuantModule):
                    drop_kept_forms(module)
                    inside.extend(module.children())
        return self

    def bind_readers(self) -> None:
        """Tell children the quantizers that read their results where those live outside the child
        (the S2T model: its encoder's output is read by every decoder layer, its decoder's logits
        by the model's ``logits_quant``), for ``simulate: integer``'s requantization onto the
        readers' grids. ``convert`` calls it once every counterpart is in place. Default: none."""


def told(module: nn.Module, x: torch.Tensor, reader: nn.Module | None, **kwargs) -> torch.Tensor:
    """``module(x, **kwargs)``, told ``reader`` (``out_quant=reader``), the quantizer that reads its
    result, where it takes one (``QuantModule.takes_reader``); a container's call of a child."""
    if reader is None or not getattr(module, "takes_reader", False):
        return module(x, **kwargs)
    return module(x, out_quant=reader, **kwargs)


def param_quantizer_path(module: nn.Module, pname: str) -> str | None:
    """The dotted path, under ``module``, of the quantizer of its own parameter ``pname``: the
    class's ``param_quantizers`` entry, else ``{pname}_quant`` (see ``QuantModule``); None for a
    parameter inference never reads."""
    declared = getattr(type(module), "param_quantizers", {})
    return declared[pname] if pname in declared else f"{pname}_quant"


def param_quantizer(module: nn.Module, pname: str) -> nn.Module | None:
    """The quantizer of ``module``'s own parameter ``pname`` (see ``QuantModule``), or None."""
    path = param_quantizer_path(module, pname)
    if path is None:
        return None
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def derived_weight(owner: nn.Module, slot: str, compute: Callable[[], torch.Tensor],
                   *sources: torch.Tensor) -> torch.Tensor:
    """A weight computed from parameters/buffers only (weight norm, folded BatchNorm, a signed sine
    table): constant-foldable preprocessing.

    Without autograd the result is kept (``owner.<slot>``, with a stamp of its sources) and the
    same tensor returned while every source is unchanged (``qswap.quant.stamp``), so the weight
    FakeQuantize it feeds keeps its own cache too. With autograd (a training step) it is computed
    afresh and the kept one dropped: an optimizer may then write the sources through ``.data``.
    """
    if torch.is_grad_enabled():
        owner.__dict__.pop(slot, None)
        return compute()
    kept = owner.__dict__.get(slot)
    if kept is not None and unchanged(kept[1], *sources):
        return kept[0]
    weight = compute()
    owner.__dict__[slot] = (weight, stamp(*sources))
    return weight
