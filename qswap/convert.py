"""The graph walker: swap float modules for their counterparts as a recipe says.

Walk, collect, check, then replace: the walk decides every module's fate without touching the
tree; every check (strict mode, site names) runs before anything changes; the replacement builds
every counterpart first, then sets them in place shallowest first. A counterpart that keeps its
children (a transformer layer) holds them under their float names, so a converted child is set
into the counterpart by the same path; the root's counterpart takes over the root object itself,
so that ``convert(model, recipe, inplace=True) is model``. An error leaves an ``inplace`` model as it was (a recipe's
transforms, which rewrite weights before the checks, are first tried on a copy).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from qswap.errors import ConvertError, QswapError, QswapWarning, expect_module
from qswap.integration.cost import parameter_bytes
from qswap.nn.base import QuantConfig, QuantModule, param_quantizer, param_quantizer_path
from qswap.nn.registry import (REGISTRY, class_names, find, is_passthrough, known_class_names,
                                register_fairseq_counterparts)
from qswap.quant.fake_quantize import FakeQuantize
from qswap.recipe import Recipe, Rule, load_recipe
from qswap.report import ConvertReport, ModuleEntry
from qswap.transforms import STRUCTURE_ONLY, apply_transforms


@dataclass
class _Plan:
    path: str
    module: nn.Module
    counterpart: type
    config: QuantConfig
    rule: Rule | None  # the rule in effect (its own or an ancestor's); None: the defaults
    rule_label: str
    same_as: str | None = None  # the module is also reached under this (first) path: one counterpart


def convert(model: nn.Module, recipe: "str | Mapping[str, Any] | Recipe", inplace: bool = False,
            strict: bool | None = None, *, data: Any = None) -> nn.Module:
    """Return ``model`` with every module the recipe covers replaced by its counterpart.

    The caller's model is untouched unless ``inplace=True``. The result carries the recipe and
    the convert report as ``.qswap_recipe`` and ``.qswap_report``. ``strict`` (default: the
    recipe's ``strict``) turns rules that match nothing and modules left float without a
    ``skip`` into a ConvertError.

    >>> qmodel = qswap.convert(model, "w8a8")
    >>> qmodel.qswap_report.counts()
    """
    expect_module(model, "convert()", ConvertError)
    for name, flag, allowed in (("inplace", inplace, (bool,)), ("strict", strict, (bool, type(None)))):
        if not isinstance(flag, allowed):  # a truthy string ("no", read from a config) had converted in place
            raise ConvertError(f"convert()'s {name} takes True or False{' (or None: the recipe says)' if name == 'strict' else ''}, "
                               f"got {flag!r}")
    _check_dtypes(model)
    recipe = load_recipe(recipe)
    register_fairseq_counterparts()
    strict = recipe.strict if strict is None else strict
    if _already_converted(model):
        raise ConvertError("this model already contains qswap quantizers; convert the float model "
                           "(or load the quantized checkpoint as it is)")
    if inplace and recipe.transforms:
        # the transforms rewrite weights before the rules and sites are checked: tried on a copy
        # first, so that an error leaves the caller's model as it was (batches given as an
        # iterator are read once, for both)
        if data is not None and data is not STRUCTURE_ONLY and not isinstance(data, (list, tuple)):
            data = list(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert(model, recipe, inplace=False, strict=strict, data=data)
    target = model if inplace else copy_model(model)
    report = ConvertReport(recipe=recipe.name, float_ok=dict(recipe.float_ok))
    report.notes += apply_transforms(target, recipe.transforms, data, strict=bool(strict))
    skipped: list[tuple[str, nn.Module, Rule]] = []
    present = _class_names(target)  # the float model's classes, before the walk swaps them
    plans, hit_rules = _walk(target, recipe, report, skipped)
    _check_rules(recipe, hit_rules, report, strict, plans, skipped, present, target)
    _check_sites(recipe, plans, hit_rules)
    _check_hooks(plans)
    if strict and report.by_action("float"):
        names = ", ".join(e.path or "<root>" for e in report.by_action("float")[:8])
        raise ConvertError(f"strict mode: {len(report.by_action('float'))} module(s) left float "
                           f"without a skip rule: {names}")
    _replace(target, plans, report, signs=data is not STRUCTURE_ONLY)
    if plans and not any(isinstance(m, FakeQuantize) and m.enabled for m in target.modules()):
        report.notes.append(f"recipe {recipe.name} quantizes nothing: every weight and activation spec it gives "
                            f"is float (null), so its counterparts compute in float (fp32's purpose: a baseline "
                            f"of the same structure); give bits for weights or activations to quantize")
    report.float_bytes, report.quantized_bytes = parameter_bytes(target)
    target.qswap_recipe = recipe
    target.qswap_report = report
    return target


def _check_dtypes(model: nn.Module) -> None:
    """The quantizers compute in float32 (float64 runs too): a model with float16 or bfloat16
    parameters would convert, then fail at its first forward (calibration blaming the batches):
    a ConvertError naming a parameter and its dtype now."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and param.dtype not in (torch.float32, torch.float64):
            raise ConvertError(f"convert() takes a float32 model: parameter {name} is {param.dtype}; call "
                               f"model.float() first (the quantized model computes in float32)")


def _check_weight_grids(built: list[tuple[str, nn.Module]], signs: bool = True) -> None:
    """Every weight's grid fits its shape (a per-channel axis it has, a per-group size that divides
    that axis) and, with ``signs``, its signs (an unsigned symmetric grid holds no negative value;
    not checked on a structure whose weights a checkpoint's state replaces): a SpecError naming the
    weight now, rather than a checkpoint written that fails
    at its first forward; checked on the counterparts ``built`` (path, counterpart) before any is
    set in place. A weight is a module's own parameter, or a buffer the state dict stores (an
    online Hadamard transform's ``matrix``; not a table recomputed at run time), whose declared
    quantizer (``param_quantizer``) is an enabled weight FakeQuantize, as ``parameter_bytes``
    counts them; a quantizer that reads several (a weight-normed convolution's ``weight_g`` and
    ``weight_v``) reads a weight the shape of the largest (``weight_v``), checked alone."""
    from qswap.errors import SpecError
    from qswap.quant.primitives import channel_axis, groups_view

    named = ((".".join(p for p in (root, sub) if p), module) for root, new in built
             for sub, module in new.named_modules())
    for path, module in named:
        stored = [(name, b) for name, b in module.named_buffers(recurse=False)
                  if name not in module._non_persistent_buffers_set]  # noqa: SLF001  (not a recomputed table)
        read: dict[int, tuple[str, torch.Tensor, FakeQuantize]] = {}  # id(quantizer) -> its largest weight
        for pname, weight in list(module.named_parameters(recurse=False)) + stored:
            quant = param_quantizer(module, pname)
            if not (isinstance(quant, FakeQuantize) and quant.enabled and quant.kind == "weight"):
                continue
            if id(quant) not in read or weight.numel() >= read[id(quant)][1].numel():
                read[id(quant)] = (pname, weight, quant)
        for pname, weight, quant in read.values():
            spec = quant.spec
            if signs and spec.symmetric and not spec.signed and weight.numel() and bool((weight.detach() < 0).any()):
                raise SpecError(f"{path}.{pname}: its grid ({spec.short()}) is unsigned and symmetric, zero point 0: "
                                f"it holds values >= 0 only, and this weight has negative values (min "
                                f"{float(weight.detach().min()):.3g}), which would all round to 0; use signed: true, "
                                f"or symmetric: false (an affine grid) in the recipe's weight spec for this module")
            if spec.granularity == "per_tensor":
                continue
            try:
                (groups_view if quant.spec.granularity == "per_group" else channel_axis)(weight.detach(), quant.spec)
            except SpecError as e:
                raise SpecError(f"{path}.{pname} (shape {tuple(weight.shape)}): {e}; change the recipe's "
                                f"weight spec for this module (a rule matching it)") from None


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy``, with each ``torch.nn.utils.weight_norm`` weight recomputed without grad
    for the copy: a weight-normed module built or run with grad enabled (wav2vec 2.0's positional
    conv) holds a non-leaf ``weight``, which deepcopy refuses. The recomputed values are the same;
    the caller's model is not written (the recomputed tensors stand for its weights in
    deepcopy's memo)."""
    from torch.nn.utils.weight_norm import WeightNorm
    memo: dict[int, Any] = {}
    with torch.no_grad():
        for module in model.modules():
            for hook in module._forward_pre_hooks.values():
                weight = getattr(module, hook.name, None) if isinstance(hook, WeightNorm) else None
                if isinstance(weight, torch.Tensor) and id(weight) not in memo:
                    memo[id(weight)] = hook.compute_weight(module)
    return copy.deepcopy(model, memo)


def _already_converted(model: nn.Module) -> bool:
    return any(isinstance(m, (FakeQuantize, QuantModule)) for m in model.modules())


def rules_hit(model: nn.Module, recipe: Recipe) -> set[int]:
    """Indices of the recipe's rules that are the first match of some module of ``model`` (its
    containers and skipped subtrees' roots included): the others take no module (``convert``
    warns that they are shadowed or match nothing)."""
    return _walk(model, recipe, ConvertReport(recipe=recipe.name))[1]


def rules_in_effect(model: nn.Module, recipe: Recipe) -> dict[str, Rule | None]:
    """Module path -> the rule ``convert`` applies to each module it would convert in ``model`` as
    it is (its own rule or an ancestor's; None: the defaults), from the same walk, with nothing
    changed. A recipe whose transforms insert modules is asked on a model they were applied to."""
    plans, _ = _walk(model, recipe, ConvertReport(recipe=recipe.name))
    return {p.path: p.rule for p in plans}


def _walk(root: nn.Module, recipe: Recipe, report: ConvertReport,
          skipped: list | None = None) -> tuple[list[_Plan], set[int]]:
    """Every module's fate, without touching the tree: (the plans of the modules to convert, the
    indices of the rules that matched). ``skipped`` collects (path, module, rule) of each module a
    ``skip`` leaves float with its subtree (unvisited). A module object reached under several
    names (``nn.ModuleList([layer] * 3)``, an attribute aliasing another) is visited under each;
    its plans after the first are marked ``same_as`` the first (one counterpart is set under every
    name), and a ConvertError says where its names would be converted differently."""
    plans: list[_Plan] = []
    hit: set[int] = set()
    seen: dict[int, tuple[str, tuple, str]] = {}  # id(module) -> (its first path, its fate, what that is)

    def visit(module: nn.Module, path: str, inherited: Rule | None) -> None:
        rule = recipe.first_rule(path, module)
        if rule is not None:
            hit.add(rule.index)
            for key, why in rule.float_ok.items():  # "PATH:OP" covers the submodules of PATH too
                report.float_ok.setdefault(f"{path}:{key}" if path else key, why)
        effective = rule or inherited
        label = effective.label() if effective else "defaults"
        cls_name = type(module).__name__
        if effective is not None and effective.skip:
            for sub, part in module.named_modules():  # its subtree is left float with it
                _same_module(seen, part, ".".join(p for p in (path, sub) if p), ("skip",),
                             f"left float by {label}'s skip" + (f" of {path or 'the root'}" if sub else ""))
            report.entries.append(ModuleEntry(path, cls_name, "skipped", label,
                                              reason=effective.note or "skip: true"))
            if skipped is not None:
                skipped.append((path, module, effective))
            return
        config = effective.config if effective else recipe.defaults
        counterpart = find(module)
        # every name, aliases too (named_children drops a module's repeats)
        children = [(name, child) for name, child in module._modules.items() if child is not None]  # noqa: SLF001
        fate = ("convert", counterpart, config) if counterpart is not None else ("walk",)
        what = (f"converted to {counterpart.__name__} by {label}" if counterpart is not None
                else f"not skipped ({label})")
        same_as = _same_module(seen, module, path, fate, what)
        if counterpart is not None:
            plans.append(_Plan(path, module, counterpart, config, effective, label, same_as))
            if not counterpart.converts_children:
                if same_as is None:  # its parts are computed by the unit: not to be converted elsewhere
                    for sub, part in list(module.named_modules())[1:]:
                        _same_module(seen, part, f"{path}.{sub}" if path else sub, ("part", path),
                                     f"a part of {path or 'the root'} ({cls_name}), converted as one unit")
                return
        elif is_passthrough(module):
            report.entries.append(ModuleEntry(path, cls_name, "passthrough", label,
                                              reason="no arithmetic at inference"))
        elif not children:
            report.entries.append(ModuleEntry(path, cls_name, "float", label,
                                              reason=f"no counterpart registered for {cls_name}"))
        elif any(True for _ in module.parameters(recurse=False)):
            report.entries.append(ModuleEntry(path, cls_name, "float", label,
                                              reason=f"{cls_name} owns parameters and has no counterpart"))
        else:
            # its children are converted one by one; arithmetic in its own forward (a residual
            # add, a scale) has no counterpart and shows up as float in the audit
            report.entries.append(ModuleEntry(path, cls_name, "container", label,
                                              reason="children converted; its own forward's ops are "
                                                     "checked by qswap audit"))
        for name, child in children:
            visit(child, f"{path}.{name}" if path else name, effective)

    visit(root, "", None)
    return plans, hit


def _same_module(seen: dict, module: nn.Module, path: str, fate: tuple, what: str) -> str | None:
    """Record that ``module`` is reached under ``path``, its fate there ``fate`` (described by
    ``what``): the path it was first reached under if that is another (None otherwise). One object
    can be converted only once: a ConvertError where its fates under two names differ."""
    first, first_fate, first_what = seen.setdefault(id(module), (path, fate, what))
    if first == path:
        return None
    if first_fate != fate:
        raise ConvertError(f"{first or 'the root'} and {path} are one {type(module).__name__} object (reached under "
                           f"both names), {first_what} under the first and {what} under the second; one object is "
                           f"converted once: give both names the same rule, or make them separate modules")
    return first


def _check_rules(recipe: Recipe, hit: set[int], report: ConvertReport, strict: bool,
                 plans: list[_Plan], skipped: list, present: set[str], root: nn.Module) -> None:
    """Each rule that hit nothing: one whose every module an earlier rule matched first
    (shadowed: first match wins) is a QswapWarning; else a class-only rule naming a class that
    exists (registered or passthrough in qswap, the model's own, or any module class defined so
    far) is noted (this model may lack it); any other a QswapWarning. A rule naming a class that
    does not exist beside ones that do is a QswapWarning too. Each warning is a ConvertError in
    strict mode. ``present``: the class names of the model (``_class_names``), ``root`` the model
    before the swap."""
    units = [p for p in plans if not p.counterpart.converts_children]  # converted whole: their parts unvisited
    overruled = _warn_rules_overruled_in_units(recipe, units, report, strict)
    _warn_unknown_classes(recipe, report, strict, present)
    for rule in recipe.rules:
        if rule.index in hit or rule.index in overruled:  # an overruled rule's message says where it reached
            continue
        _refuse_rule_inside_a_unit(recipe, rule, units)
        by_skip = _shadowed_by_skip(rule, skipped)
        shadowed = "" if by_skip else _shadowed_by_rule(recipe, rule, root)
        message = (f"{recipe.name}: {rule.label()} takes no module{shadowed}" if shadowed
                   else f"{recipe.name}: {rule.label()} matched no module{by_skip}")
        if rule.match.path is None and not shadowed:
            likely = known_class_names() | present  # what a rule most often means: the close names offered
            unknown = [name for name in rule.match.classes if name not in likely]
            if unknown and len(unknown) == len(rule.match.classes):
                loaded = _loaded_class_names()
                unknown = [name for name in unknown if name not in loaded]
            if len(unknown) < len(rule.match.classes):  # it names a class that exists: this model may lack it
                report.notes.append(message)
                continue
            message += _unknown_classes_text(unknown, likely)
        if strict:
            raise ConvertError(f"strict mode: {message}; fix or remove the rule")
        report.unmatched_rules.append(rule.label())
        warnings.warn(message, QswapWarning, stacklevel=3)


def _shadowed_by_rule(recipe: Recipe, rule: Rule, root: nn.Module) -> str:
    """Where ``rule`` matches a module of ``root`` that an earlier rule matched first (first
    match wins: ``rule`` gets none of them): what to say after 'takes no module', else ''."""
    for path, module in root.named_modules(remove_duplicate=False):
        if not rule.match.matches(path, module):
            continue
        first = recipe.first_rule(path, module)
        if first is not None and first.index < rule.index:
            return (f": shadowed by rule {first.index} (first match wins): {first.label()} takes {path or 'the root'}, "
                    f"and earlier rules every other module this rule matches; move this rule before rule "
                    f"{first.index}, or narrow rule {first.index}")
    return ""


def _warn_unknown_classes(recipe: Recipe, report: ConvertReport, strict: bool, present: set[str]) -> None:
    """A rule whose class list names a class that does not exist (a misspelling) beside ones
    that do: a QswapWarning naming it (a ConvertError in strict mode); the misspelled class alone
    would never be reported while its neighbours match. (A rule none of whose classes exists
    matches nothing: ``_check_rules`` reports it.)"""
    likely = known_class_names() | present
    loaded = None
    for rule in recipe.rules:
        unknown = [name for name in rule.match.classes if name not in likely]
        if unknown:
            loaded = _loaded_class_names() if loaded is None else loaded
            unknown = [name for name in unknown if name not in loaded]
        if not unknown or len(unknown) == len(rule.match.classes):
            continue
        message = f"{recipe.name}: {rule.label()}" + _unknown_classes_text(unknown, likely)
        if strict:
            raise ConvertError(f"strict mode: {message}; fix or remove the name")
        report.notes.append(message)
        warnings.warn(message, QswapWarning, stacklevel=4)


def _class_names(model: nn.Module) -> set[str]:
    """The names and qualified names of the classes of ``model``'s modules."""
    return {name for m in model.modules() for name in class_names(type(m))}


def _loaded_class_names() -> set[str]:
    """The names and qualified names of every ``nn.Module`` subclass defined so far (torch's,
    fairseq's, the user's): a rule may name one that another architecture has (wav2vec 2.0's
    ``ConvFeatureExtractionModel`` in a recipe also used for S2T models)."""
    seen, stack = set(), [nn.Module]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in seen:  # a class with two module-class bases is listed under both
                seen.add(sub)
                stack.append(sub)
    return {name for cls in seen for name in class_names(cls)}


def _unknown_classes_text(unknown: list[str], known: set[str]) -> str:
    """What a class-only rule's 'matched no module' adds when none of its classes exists: the
    names, and the closest of ``known`` (qswap's float classes and the model's) to each."""
    candidates = sorted(n for n in known if "." not in n)
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
        hints.append(f"{name!r}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    return (f": no module class is named {', '.join(hints)} (none of this model, none qswap registers, "
            f"none defined so far); check the spelling (class names are exact and case-sensitive)")


def _shadowed_by_skip(rule: Rule, skipped: list) -> str:
    """Where ``rule`` would match a module inside a subtree a ``skip`` left float (the walk never
    visits it): what to say after 'matched no module', else ''."""
    for root_path, root, skip in skipped:
        for sub, module in root.named_modules():
            path = f"{root_path}.{sub}" if root_path else sub
            if sub and rule.match.matches(path, module):
                return (f": shadowed by rule {skip.index}'s skip at {root_path or 'the root'} ({skip.label()} "
                        f"leaves {path} float with the rest of that subtree); narrow the skip to let this "
                        f"rule apply")
    return ""


def _warn_rules_overruled_in_units(recipe: Recipe, units: list[_Plan], report: ConvertReport,
                                   strict: bool) -> set[int]:
    """A pattern or class rule that is the first rule of a part of a counterpart converted as one
    unit (``class: Linear`` and an attention's q_proj) asks for what the part does not get: the
    part follows the unit's rule. Reported where the part would compute otherwise: its own sites'
    specs (those of the part's counterpart, read from the rule's config and from the unit's)
    differ, or the rule is a ``skip`` (the part is quantized, not left float). Parts with nothing
    to quantize (a dropout) are left out. A QswapWarning (a ConvertError in strict mode) naming
    the rule, the number of parts and one unit; returns the indices of the rules reported. (A
    rule naming one part by its exact path is refused by ``_refuse_rule_inside_a_unit``.)"""
    overruled: dict[int, list[tuple[str, _Plan]]] = {}
    for plan in units:
        for sub, module in plan.module.named_modules():
            path = f"{plan.path}.{sub}" if plan.path else sub
            rule = recipe.first_rule(path, module) if sub else None
            if rule is None or rule.match.exact_path or (plan.rule is not None and rule.index == plan.rule.index):
                continue
            part = find(module)
            if part is None or is_passthrough(module):  # nothing of it is quantized
                continue
            if rule.skip or _site_specs(rule.config, part) != _site_specs(plan.config, part):
                overruled.setdefault(rule.index, []).append((path, plan))
    for index, parts in overruled.items():
        rule = recipe.rules[index]
        path, plan = parts[0]
        what = ("they are quantized as their unit is, not left float" if rule.skip
                else "they get their unit's specs, not this rule's")
        advice = ("to leave them float, skip the units (their path or class)" if rule.skip else
                  "write the rule for the units (their path or class; a 'sites:' entry tunes one of their "
                  "quantizers)" if plan.rule is None else
                  f"give the units' rule ({plan.rule_label}) the specs they should have, or narrow this rule "
                  f"so that it does not reach their parts")
        message = (f"{recipe.name}: {rule.label()} is the first rule of {len(parts)} part(s) of modules converted "
                   f"as one unit, such as {path} of {plan.path or 'the root'} ({type(plan.module).__name__}, by "
                   f"{plan.rule_label}): {what}; {advice}")
        if strict:
            raise ConvertError(f"strict mode: {message}")
        report.notes.append(message)
        warnings.warn(message, QswapWarning, stacklevel=4)
    return set(overruled)


def _site_specs(config: QuantConfig, counterpart: type) -> dict:
    """The spec ``config`` gives each site ``counterpart`` declares."""
    return {site: config.spec(site, kind) for site, kind in counterpart.sites.items()}


def _refuse_rule_inside_a_unit(recipe: Recipe, rule: Rule, units: list[_Plan]) -> None:
    """A rule naming one module by its exact path that the walk never visits, a part of a
    counterpart converted as one unit (an attention's q_proj), would be ignored: the unit's
    quantizers follow the unit's rule. ConvertError saying so, not a 'matched no module' warning
    that reads as a typo. (A pattern or class rule that reaches only such parts, a recipe's
    catch-all on a model that is one unit, keeps its warning or note.)"""
    if not rule.match.exact_path:
        return
    for plan in units:
        for sub, module in plan.module.named_modules():
            path = f"{plan.path}.{sub}" if plan.path else sub
            if sub and rule.match.matches(path, module):
                unit = plan.path or "the root"
                raise ConvertError(f"{recipe.name}: {rule.label()} matches {path}, a part of {unit} "
                                   f"({type(plan.module).__name__}), which is converted as one unit (by "
                                   f"{plan.rule_label}): its parts' quantizers follow the unit's specs; write the "
                                   f"rule for {unit} instead (a 'sites:' entry there tunes one of its quantizers)")


def _check_sites(recipe: Recipe, plans: list[_Plan], hit: set[int]) -> None:
    """A site name must be a site of a counterpart it can reach: a defaults site of any registered
    counterpart (one recipe serves many architectures: ``softmax_out`` is valid on a model with no
    attention); a rule's own site of one the rule covers (it or an ancestor matched). A rule that
    matched nothing is reported by _check_rules."""
    _check_site_names(recipe, "defaults", recipe.defaults.sites, list(REGISTRY.values()))
    for rule in recipe.rules:
        if rule.own_sites and rule.index in hit:
            covered = [p.counterpart for p in plans if p.rule is not None and p.rule.index == rule.index]
            _check_site_names(recipe, rule.label(), rule.own_sites, covered)


def _check_site_names(recipe: Recipe, where: str, names: Iterable[str], covered: list[type]) -> None:
    valid = {site for cls in covered for site in cls.sites}
    for site in names:
        if site in valid:
            continue
        if where == "defaults":
            have = f"sites of the registered counterparts: {', '.join(sorted(valid))}"
        else:
            have = "; ".join(f"{cls.__name__}: {', '.join(cls.sites) or 'no sites'}"
                             for cls in sorted(set(covered), key=lambda c: c.__name__)) or "none is converted"
        raise ConvertError(f"{recipe.name}: {where}: site {site!r} is not a site of the modules "
                           f"it applies to ({have}); fix the site name or remove it")


def _replace(root: nn.Module, plans: list[_Plan], report: ConvertReport, signs: bool = True) -> None:
    """Build every counterpart, then set each in place (the root's counterpart takes over the
    root object itself: ``_take_over``). ``signs``: the weights are the model's own (not a
    structure a checkpoint's state is loaded into: ``STRUCTURE_ONLY``), checked against grids that
    hold no negative value (``_check_weight_grids``)."""
    shared: dict[int, tuple[FakeQuantize, str]] = {}  # id(param) -> its first quantizer, owner
    built: list[tuple[str, nn.Module]] = []
    modes = {id(m): m.training for m in root.modules()}  # every module's own flag, before any swap
    counterpart_modes: dict[int, bool] = {}  # id(counterpart) -> the flag of the module it replaced
    sorted_plans = sorted((p for p in plans if p.same_as is None), key=lambda p: _depth(p.path), reverse=True)
    for plan in sorted_plans:
        new = _from_float(plan)
        counterpart_modes[id(new)] = modes[id(plan.module)]
        labels, holds = _spec_labels(plan.counterpart, plan.config)
        tied = _share_tied_quantizers(new, plan.path, shared, report)
        if tied:  # the weight is read by the first owner's quantizer, not by one of this rule's spec
            labels["weight"] = "; ".join(tied)
        action = "quantized" if holds or tied or not plan.counterpart.sites else "no_quantizer"
        report.entries.append(ModuleEntry(
            plan.path, type(plan.module).__name__, action, plan.rule_label,
            counterpart=type(new).__name__, **labels))
        built.append((plan.path, new))
    _check_weight_grids(built, signs)  # before anything is set in place
    for plan, (_, new) in zip(sorted_plans, built):
        _move_hooks(plan.module, new)
    built = [(path, _take_over(root, new) if not path else new) for path, new in built]
    placed = sorted(built + _aliases(plans, dict(built), report), key=lambda item: _depth(item[0]))
    for path, new in placed:  # shallowest first: a parent counterpart is in place
        if not path:
            continue
        parent_path, _, name = path.rpartition(".")
        setattr(root.get_submodule(parent_path), name, new)
    _restore_modes(root, counterpart_modes, modes)
    for _, new in built:  # every counterpart is in place: a parent may now tell its children their readers
        if isinstance(new, QuantModule):
            new.bind_readers()
    report.entries.sort(key=lambda e: e.path)


def _from_float(plan: _Plan) -> nn.Module:
    """``plan``'s counterpart built by its ``from_float``; a ConvertError naming the module and the
    counterpart where it fails (other than with a QswapError of its own) or returns no module."""
    where, name = plan.path or "<root>", plan.counterpart.__qualname__
    try:
        new = plan.counterpart.from_float(plan.module, plan.config)
    except ConvertError as exc:
        raise ConvertError(f"{where}: {exc}") from None
    except QswapError:
        raise
    except Exception as exc:  # noqa: BLE001  (a user's counterpart: say whose from_float failed)
        raise ConvertError(f"{where}: {name}.from_float({type(plan.module).__name__}, config) failed: "
                           f"{type(exc).__name__}: {exc}; fix the counterpart (or unregister it)") from exc
    if not (isinstance(new, QuantModule) or new is plan.module):  # the float module itself: kept float on
        # purpose (a user's counterpart may say so); another plain module would stand in the model unquantized
        raise ConvertError(f"{where}: {name}.from_float returned {type(new).__name__}, neither a qswap.QuantModule "
                           f"nor the float module itself (kept float); it must return the counterpart module built "
                           f"from the float one (an instance of {name})")
    return new


def _take_over(root: nn.Module, new: nn.Module) -> nn.Module:
    """The root's counterpart ``new`` put in place of ``root`` by becoming it: ``root`` takes
    ``new``'s class and attributes (its module, parameter and buffer tables), so that the object
    the caller holds (``inplace=True``) is the converted model, not a float root whose children
    were partly swapped. A counterpart that keeps the float module as its child (``QGELU``'s
    ``op``) would then hold itself: that child becomes a shallow copy of the float root (its own
    attribute table, the same parameters and children). Returns ``root``."""
    holders = [(module, name) for module in new.modules() for name, child in module._modules.items()  # noqa: SLF001
               if child is root]
    if holders:
        stand_in = copy.copy(root)  # the float module's state, under a new identity
        for module, name in holders:
            module._modules[name] = stand_in  # noqa: SLF001
    root.__class__ = type(new)
    root.__dict__.clear()
    root.__dict__.update(new.__dict__)
    return root


def _depth(path: str) -> int:
    return path.count(".") + (1 if path else 0)


def _aliases(plans: list[_Plan], built: dict[str, nn.Module], report: ConvertReport) -> list[tuple[str, nn.Module]]:
    """(path, counterpart) for each further name of a module reached under several: the
    counterpart built for its first name, with a report entry saying so."""
    aliases = []
    entries = {e.path: e for e in report.entries}
    for plan in plans:
        if plan.same_as is not None:
            report.entries.append(dataclasses.replace(
                entries[plan.same_as], path=plan.path, rule=plan.rule_label,
                reason=f"the same module object as {plan.same_as}: one counterpart under both names"))
            aliases.append((plan.path, built[plan.same_as]))
    return aliases


_FORWARD_HOOKS = (("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"),
                  ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"))


def _user_hooks(module: nn.Module) -> list[tuple[str, Any]]:
    """(kind, hook) of every forward, forward-pre and backward hook of ``module`` but the
    ``torch.nn.utils.weight_norm`` hooks (conversion computes weight norm itself)."""
    from torch.nn.utils.weight_norm import WeightNorm
    kinds = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
    return [(kind.strip("_"), hook) for kind in kinds for hook in getattr(module, kind).values()
            if not isinstance(hook, WeightNorm)]


def _hook_name(hook: Any) -> str:
    return getattr(hook, "__qualname__", None) or type(hook).__name__


def _check_hooks(plans: list[_Plan]) -> None:
    """A hook on a module that conversion replaces moves to its counterpart (``_move_hooks``) if it
    is a forward or forward-pre hook; a backward hook there, or any hook on a part of a module
    converted as one unit (an attention's q_proj: the counterpart computes its parts itself), would
    be lost: a ConvertError naming the module and the hook, before anything changes."""
    for plan in plans:
        where = plan.path or "the root"
        for kind, hook in _user_hooks(plan.module):
            if kind.startswith("backward"):
                raise ConvertError(f"{where} ({type(plan.module).__name__}) has a {kind} hook "
                                   f"({_hook_name(hook)}), which its counterpart would not run: remove it "
                                   f"before convert and register it on the converted model")
        if plan.counterpart.converts_children:
            continue
        for sub, module in plan.module.named_modules():
            hooks = _user_hooks(module) if sub else []
            if hooks:
                kind, hook = hooks[0]
                raise ConvertError(f"{where}.{sub} ({type(module).__name__}) has a {kind} hook ({_hook_name(hook)}), "
                                   f"but it is a part of {where} ({type(plan.module).__name__}), which is converted as "
                                   f"one unit that computes its parts itself (their hooks would not run): remove the hook before convert, or register it on "
                                   f"{where} or on the converted model")


def _move_hooks(old: nn.Module, new: nn.Module) -> None:
    """The forward and forward-pre hooks of ``old`` (but weight norm's) move to ``new``, its
    counterpart, in their order, with their with_kwargs / always_call flags. Where ``new`` has no
    hooks of its own and ``old`` no weight norm hook, ``new`` takes ``old``'s hook dicts
    themselves: a handle the caller holds (``inplace=True``) still removes its hook."""
    from torch.nn.utils.weight_norm import WeightNorm
    for names in _FORWARD_HOOKS:
        hooks = getattr(old, names[0])
        if not hooks or new is old:
            continue
        if not any(getattr(new, n) for n in names) and not any(isinstance(h, WeightNorm) for h in hooks.values()):
            for n in names:
                setattr(new, n, getattr(old, n))
            continue
        for hid, hook in hooks.items():
            if isinstance(hook, WeightNorm):
                continue
            getattr(new, names[0])[hid] = hook
            for n in names[1:]:
                if hid in getattr(old, n):
                    getattr(new, n)[hid] = getattr(old, n)[hid]


def _restore_modes(root: nn.Module, counterpart_modes: dict[int, bool], modes: dict[int, bool]) -> None:
    """Set every module's training flag once the tree is built: a counterpart takes the flag of
    the float module it replaced, a float module still in the tree (a dropout, a container, a
    child a counterpart kept) its own flag from before the swap, and a module the conversion
    created (a quantizer, a counterpart's part) its nearest such ancestor's. Per module, not
    ``train(mode)``, which would give a float child its parent's flag (a dropout frozen in
    eval inside a training model turned back on); nothing built here has state a mode change
    drops (what the counterparts' and quantizers' ``train`` overrides reset)."""
    def visit(module: nn.Module, inherited: bool) -> None:
        mode = counterpart_modes.get(id(module), modes.get(id(module), inherited))
        module.training = mode
        for child in module.children():
            visit(child, mode)

    visit(root, root.training)


def _share_tied_quantizers(new: nn.Module, path: str, shared: dict, report: ConvertReport) -> list[str]:
    """A parameter shared by two modules (tied embedding / output projection) gets one quantizer:
    the first owner's. Returns the report's weight label of each of ``new``'s parameters so tied
    (its spec, 'tied to' its first owner's parameter)."""
    tied = []
    for pname, param in new.named_parameters(recurse=False):
        quant = param_quantizer(new, pname)
        if not isinstance(quant, FakeQuantize):
            continue
        if id(param) not in shared:
            shared[id(param)] = (quant, path)
            continue
        first, owner = shared[id(param)]
        parent, _, leaf = param_quantizer_path(new, pname).rpartition(".")
        setattr(new.get_submodule(parent) if parent else new, leaf, first)
        tied.append(f"{first.spec.short()}, tied to {owner}.{pname}")
        note = f"{path}.{pname} is tied to {owner}.{pname}: one quantizer ({first.spec.short()})"
        if first.spec != quant.spec:
            note += f"; this module's rule asked for {quant.spec.short()}, the first one wins"
            warnings.warn(note, QswapWarning, stacklevel=4)
        report.notes.append(note)
    return tied


def _spec_labels(counterpart: type, config: QuantConfig) -> tuple[dict[str, str], bool]:
    """The weight / activation labels of the quantizers the counterpart's sites get (the rule's
    spec, or a ``sites:`` entry's: ``sites: {input: null}`` had still been shown as the rule's
    int8), distinct labels joined by " / " in site order; empty where the counterpart declares no
    site of that kind (a ReLU has no weight to quantize). And whether any site gets a quantizer
    (a spec that is not null)."""
    labels, holds = {}, False
    nonnegative = getattr(counterpart, "nonnegative_sites", frozenset())  # unsigned grids (a softmax's output)
    for kind in ("weight", "activation"):
        specs = [config.spec(site, kind, nonnegative=site in nonnegative)
                 for site, declared in counterpart.sites.items() if declared == kind]
        labels[kind] = " / ".join(dict.fromkeys(s.short() if s is not None else "float" for s in specs))
        holds = holds or any(s is not None for s in specs)
    return labels, holds
