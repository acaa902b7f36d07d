"""The dispatch mode that watches every aten op on the executed path, and the temporary module
hooks that tell it where it is.

* Module hooks (installed by ``Tracker.attach``, removed by ``detach``) keep a stack of dotted
  module paths, count counterpart calls, and tag each quantizer's output with its grid after
  checking that the values really lie on it. Hooks are right for an inspection tool; qswap's
  own modules never use them.
* ``__torch_dispatch__`` runs each op, then classifies it (``qswap.honesty.ops``), decides it
  (``qswap.honesty.classify``) and tags its outputs. Ops run by a quantizer itself (rounding,
  observers) are not classified: inside qswap's own ``FakeQuantize`` / ``BiasQuantize`` (exactly
  those classes) the Python dispatch is switched off altogether (their output is checked on its
  grid anyway); inside a subclass of one the ops are only counted, and each call of it is an
  ``untrusted_quantizer`` finding (its own code could hide float math on its input).
* Integer tensors need a seen origin too (``Tracker._check_origins``): float math done where the
  dispatch mode does not watch (numpy, ``.tolist()`` and Python arithmetic, a block with the
  Python dispatch key excluded) and handed back as integers would otherwise pass as integer data.
  A seen integer origin is one of:

  - a model input, or an integer parameter, buffer or tensor attribute the model held when the
    audit attached (model state, not made by the run);
  - the output of an op the mode watched, but not ``torch.tensor(data)`` / ``torch.from_numpy``
    (``aten.lift_fresh``) of more than one number (Python or numpy data: ``UNSEEN_LIFT``);
  - the codes a qswap quantizer (``FakeQuantize`` / ``BiasQuantize``) returns (``codes``);
  - what qswap's integer simulation declares (``declare_integers``, from ``qswap.nn.simulate``):
    a constant folded from scales and weights (``_constant_fold``, ``cached``) by a function
    defined in qswap itself, or exact integer arithmetic done in Python on integer tensors
    (``row_isqrt``), which carries whatever those carry.

  Any other integer tensor is tagged ``UNSEEN_INT`` where an op first reads it; integer ops pass
  the tag on, and it is reported (``unseen_origin``, naming the module and op) where it enters
  float data: cast to float, or promoted into float compute or a float result as values. As an
  index (``x[idx]``, ``gather``) it only picks values and is not reported; bool tensors are masks,
  and a 0-d ``torch.tensor(n)`` is a number written in the code.

  Known limit: an in-place write into an integer tensor of seen origin with the Python dispatch
  key excluded (``codes.copy_(rounded)`` inside ``torch._C._DisableTorchDispatch()``) is not
  caught: the origin is kept per tensor, not per write (``_int_seen``). Version counters do not
  settle it cheaply: qswap's own quantizers rewrite their integer
  buffers that way, and aliases share a counter without a ``_base`` (``detach``) or views of one
  base are written through each other, so a moved counter alone reports honest models.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import threading
import types
import weakref
from collections import Counter
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

from qswap.honesty import classify as C
from qswap.honesty import gemm as G
from qswap.honesty import ops as O
from qswap.honesty.findings import Findings
from qswap.honesty.values import MAX_CHECKED_BITS, on_uniform_grid
from qswap.honesty.tags import (ACC, CONST, FLOAT, KERNEL, PARAM, QUANT, UNSEEN, GridInfo, Scratch, Tag,
                                off_grid_count, on_grid_per_tensor)
from qswap.nn.base import QuantModule
from qswap.quant.bias import BiasQuantize, OWN_CODE as bias_code
from qswap.quant.fake_quantize import FakeQuantize, OWN_CODE as fake_quantize_code

_NUMBER = (int, float)
# torch's own tables of every module: parameters/buffers (tagged as such), children (walked), and
# hook/flag tables that hold callables and bools only
_MODULE_TABLES = frozenset(vars(nn.Module()))
_SCALARS = (type(None), bool, int, float, str)
_OWN_QUANTIZERS = (FakeQuantize, BiasQuantize)  # exact classes: their internals are trusted code
_PLAIN, _COUNTERPART, _QUANTIZER, _OWN_QUANTIZER = range(4)  # what the module hooks do (Tracker._role)


class Tracker(TorchDispatchMode):
    """Use as ``tracker.attach(model)``, then ``with tracker, tracker.path("name"): ...``."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """torch wraps a mode's ``__torch_dispatch__`` in ``torch._dynamo.disable`` unless this
        says False (``TorchDispatchMode._should_skip_dynamo``): two frames and two eval-frame
        switches per op, and an import of torch._dynamo on the first audit. The audit never
        compiles, and runs the model eagerly."""
        return False

    def __init__(self, float_ok: dict[str, str] | None = None, values_bits: int | None = None):
        """``values_bits``: run the value-level check (``qswap.honesty.values``) too, with this
        bound for operands whose tag claims no width; None: tags only."""
        super().__init__()
        self.values_bits = values_bits
        self._before = None  # (tensor, its values before an in-place op), for the value check
        self._tainted = False  # whether any integer tensor carries a tag (rounded float data)
        self.tags = _TagMap()
        # integer tensors of a seen origin (``_check_origins``): model inputs, parameters, buffers,
        # tensor attributes, outputs of watched ops and of qswap's quantizers, and the tables
        # qswap's integer simulation declares (``declare_integers``)
        self._ints = _TagMap()
        # integer buffers of qswap's own quantizers (a zero point), which their own code, run with
        # dispatch off, rewrites in place (a weight grid derived again): seen whatever their version
        self._own_ints = _TagMap()
        self._declared: dict = {}  # id -> each value qswap's own code declared (``declare_integers``)
        self.findings = Findings(float_ok or {})
        # where each thread is (its module path stack, counterpart calls, quantizer depth): a model
        # running branches on threads (watched: ``threads.watch_threads``) had shared one stack and
        # one quantizer depth, so one thread inside a quantizer hid every other thread's ops
        self._here = _ThreadState()
        self.call_counts: Counter = Counter()  # id(counterpart) -> calls
        self.ran_quantizers: set[int] = set()  # id() of every quantizer that ran
        self._next_call = 0
        self._verified = _TagMap()  # quantizer output -> (path, _version) checked
        # tensors that share storage without sharing a version counter (``_unsafe_view``): each ->
        # a weak reference to the other; a write through one is a change of the other that its
        # own counter does not show
        self._shared = _TagMap()
        self._any_shared = False
        self._scratch = Scratch()  # the on-grid checks' buffer
        self._handles: list = []
        self._tree: set = set()  # id() of every module of the attached model
        self.hooked: dict[int, tuple] = {}  # id(module) -> (path, module) of every module attach hooked
        self._rules: dict = {}  # id(OpOverload) -> its rule (OpOverload.__hash__ is Python code)
        self._roles: dict = {}  # module class -> its role for the hooks (_role)
        self._specs: dict = {}  # id(QuantSpec) -> (the spec, qmin, qmax, bits, short label)
        self._grid_tags: dict = {}  # what a checked quantizer output's tag says -> that tag
        self._inplace: dict = {}  # id(OpOverload) -> whether it writes its first argument

    # -- module hooks ----------------------------------------------------------------------------
    def attach(self, model: nn.Module, named: list | None = None) -> None:
        """Hook every module (but a quantizer's own children) and tag every parameter, buffer
        and tensor attribute. ``named``: ``list(model.named_modules())``, if the caller has it.

        Two global module hooks (``torch.nn.modules.module.register_module_forward_*``) that look
        the module up, rather than two hooks per module: the same calls at a fraction of the set-up
        cost (a model has thousands of modules). A global pre-hook runs before a module's own
        pre-hooks; the global forward hook runs before its own forward hooks, which therefore
        run watched (their ops are classified like the model's)."""
        inside = None  # the path prefix of the last quantizer: its observers are its own
        named = list(model.named_modules()) if named is None else named
        self._tree = {id(m) for _, m in named}  # modules tagged as themselves, never as an attribute
        for path, module in named:
            if inside is not None and path.startswith(inside):
                continue  # named_modules is pre-order: a quantizer's children follow it
            if isinstance(module, (FakeQuantize, BiasQuantize)):
                inside = f"{path}." if path else ""
            self.hooked[id(module)] = (path, module)
            self._tag_module_tensors(path, module)
        self._handles.append(register_module_forward_pre_hook(self._global_pre))
        self._handles.append(register_module_forward_hook(self._global_post, always_call=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _global_pre(self, module: nn.Module, args) -> None:
        entry = self.hooked.get(id(module))
        if entry is not None and entry[1] is module:
            self._pre(entry[0], module, args)

    def _global_post(self, module: nn.Module, args, output) -> None:
        entry = self.hooked.get(id(module))
        if entry is not None and entry[1] is module:
            self._post(entry[0], module, args, output)

    # per-thread state, read and written as attributes
    stack = property(lambda self: self._here.stack)
    calls = property(lambda self: self._here.calls)
    in_quantizer = property(lambda self: self._here.in_quantizer,
                            lambda self, v: setattr(self._here, "in_quantizer", v))
    last_quant_op = property(lambda self: self._here.last_quant_op,
                             lambda self, v: setattr(self._here, "last_quant_op", v))
    _unobserved = property(lambda self: self._here.unobserved,  # the guard that switches dispatch off
                           lambda self, v: setattr(self._here, "unobserved", v))  # inside a quantizer

    def _role(self, cls: type) -> int:
        """What the hooks do for a module of class ``cls`` (``_PLAIN``, ``_COUNTERPART``,
        ``_QUANTIZER``, ``_OWN_QUANTIZER``), worked out once per class: read from the class of
        the module at each call, so a module whose class changes is handled as its new class."""
        role = self._roles.get(cls)
        if role is None:
            role = self._roles[cls] = (
                (_OWN_QUANTIZER if cls in _OWN_QUANTIZERS else _QUANTIZER)
                if issubclass(cls, (FakeQuantize, BiasQuantize))
                else _COUNTERPART if issubclass(cls, QuantModule) else _PLAIN)
        return role

    def _tag_module_tensors(self, path: str, module: nn.Module) -> None:
        prefix = f"{path}." if path else ""
        tags = self.tags
        for name, p in _own(module._parameters):  # noqa: SLF001  (named_parameters walks every module)
            tags[p] = (Tag(PARAM, f"parameter {prefix}{name}"), p._version)
        for name, b in _own(module._buffers):  # noqa: SLF001
            if _floating(b):
                tags[b] = (Tag(PARAM, f"buffer {prefix}{name}"), b._version)
            elif type(module) in _OWN_QUANTIZERS:
                self._own_ints[b] = True
            else:
                self._seen_int(b)
        if type(module) in _OWN_QUANTIZERS:
            return  # their tensor attributes are their own caches, read only with dispatch off
        for name, v in vars(module).items():  # tensors kept as state (a derived weight's cache)
            if name in _MODULE_TABLES or isinstance(v, _SCALARS):
                continue
            for t in _tensors(v, self._tree):
                if not _floating(t):
                    self._seen_int(t)  # integer state the model held before it ran
                elif t not in self.tags:
                    self._set([t], Tag(CONST, f"tensor attribute {prefix}{name}"))

    def _pre(self, path: str, module: nn.Module, args) -> None:
        self.stack.append(path)
        role = self._role(type(module))
        altered = role == _OWN_QUANTIZER and not _intact(module)
        if altered:  # its code replaced, or hooked: not qswap's own any more
            role = _QUANTIZER
        self._here.roles.append(role)  # read back by ``_post``, not worked out again
        if role >= _QUANTIZER:
            if not self.in_quantizer:
                self._check_seen(path, args)
                if role == _QUANTIZER:  # a subclass: what its own code computes is not watched
                    self.findings.untrusted_quantizer(path, type(module), _OWN_QUANTIZERS, altered)
            self.in_quantizer += 1
            self.last_quant_op = None
            self.ran_quantizers.add(id(module))
            self.findings.count("quantizer_calls")
            if self.in_quantizer == 1 and role == _OWN_QUANTIZER:
                self._unobserved = torch._C._DisableTorchDispatch()  # noqa: SLF001
                self._unobserved.__enter__()
        elif role == _COUNTERPART and not self.in_quantizer:
            self.call_counts[id(module)] += 1
            self._next_call += 1
            # only a leaf counterpart is one kernel: a container's own ops (a layer's residual
            # add) are separate ops whose results must be quantized before the next compute
            self.calls.append(-1 if module.converts_children else self._next_call)

    def _check_seen(self, path: str, args) -> None:
        """A quantizer's input must have an origin the audit saw: requantizing a value does not
        make whatever computed it honest."""
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            tag = self._tag_of(x)
            if tag.unseen:
                self.findings.unseen(path, "<quantizer input>", None, [(0, x)], [tag])
            elif tag.kind == C.INDEX and tag.input and not tag.integral:
                # the model's integer input data under float math (an int16 waveform normalized):
                # index math while it stays index math, float math on data where a quantizer reads it
                self.findings.input_math(path, x, tag)

    def _post(self, path: str, module: nn.Module, args, output) -> None:
        self.stack.pop()
        role = self._here.roles.pop()  # what ``_pre`` decided for this call
        if role >= _QUANTIZER:
            self.in_quantizer -= 1
            if self.in_quantizer:
                return
            try:
                if role == _OWN_QUANTIZER:  # qswap's own, run with dispatch off: its integer buffers
                    for t in module._buffers.values():  # noqa: SLF001  (a zero point it rewrites in place)
                        if t is not None and not _floating(t):
                            self._own_ints[t] = True
                    if isinstance(output, torch.Tensor) and not _floating(output):
                        # its codes (``FakeQuantize.codes``): integers of quantized data, as those
                        # rounded in watched ops (``_rounded``): cast back to float an integer
                        # kernel's accumulator, which only a quantizer, a constant rescale or an
                        # exact integer GEMM may take, never index math
                        self.tags[output] = (Tag(ACC, f"{path}.codes (integer codes of quantized data)"), output._version)
                        self._tainted = True
                if isinstance(output, torch.Tensor):
                    self._tag_quantizer_output(path, module, args, output)
            finally:
                if self._unobserved is not None:
                    self._unobserved.__exit__(None, None, None)
                    self._unobserved = None
        elif role == _COUNTERPART and not self.in_quantizer:
            self.calls.pop()

    def _tag_quantizer_output(self, path: str, q: nn.Module, args, out: torch.Tensor) -> None:
        if not out.is_floating_point():
            return
        if isinstance(q, FakeQuantize):
            if not q.enabled:
                return  # a disabled quantizer returns its input: that site is float
            spec = q.spec
            scale, zp = q.grid_tensors()[:2] if type(q) is FakeQuantize else (q.scale, q.zero_point)
            qmin, qmax, bits, label = self._spec_facts(spec)
        else:
            if args and out is args[0]:
                return  # the bias stays float, and keeps its own tag
            if q.last_scale is None:
                self._set([out], Tag(FLOAT, f"bias left float by {path} (no scale to align to)"))
                return
            spec, scale, qmin, qmax, bits, label = None, q.last_scale, q.qmin, q.qmax, 32, "int32 bias"
            zp = None
        numel = out.numel()
        if numel == 0:
            self._set([out], Tag(QUANT, path, GridInfo(path, bits, label)))
            return
        version = out._version
        if self._verified.get(out) == (path, version):
            return  # a cached weight, already checked
        # every audit reads a kept weight output again: one written through ``.data`` (which
        # bumps no version counter) since an earlier audit must not pass on that audit's proof
        with torch._C._DisableTorchDispatch():  # noqa: SLF001  (the check is not the model's)
            step = (scale.item(), 0.0 if zp is None else float(zp.item())) if scale.numel() == 1 else (None, 0.0)
            if step[0] is not None and on_grid_per_tensor(out, step[0], step[1], qmin, qmax,
                                                          _inverse(q, step[0]), self._scratch):
                off = 0
            else:
                zp = torch.zeros_like(scale) if zp is None else zp
                off = off_grid_count(out, scale, zp, spec, qmin, qmax)
        self._verified[out] = (path, version)
        self.tags[out] = (self._grid_tag(path, bits, label, off, numel, step, qmin, qmax), version)
        if off:
            self.findings.quantizer_off_grid(path, self.last_quant_op, out, off, label)

    def _spec_facts(self, spec) -> tuple:
        """(qmin, qmax, bits, short label) of a spec, worked out once per spec object (a frozen
        dataclass: hashing one hashes every field)."""
        facts = self._specs.get(id(spec))
        if facts is None or facts[0] is not spec:
            facts = self._specs[id(spec)] = (spec, spec.qmin, spec.qmax, spec.bits, spec.short())
        return facts[1:]

    def _grid_tag(self, path: str, bits: int, label: str, off: int, numel: int, step: tuple,
                  qmin: int, qmax: int) -> Tag:
        """The tag of a checked quantizer output; one object per distinct tag (tags are frozen):
        a quantizer's outputs of one size on one grid share it."""
        key = (path, bits, label, off, numel, step, qmin, qmax)
        tag = self._grid_tags.get(key)
        if tag is None:
            tag = self._grid_tags[key] = Tag(QUANT, path, GridInfo(path, bits, label, off == 0, off, numel,
                                                                   step[0], step[1], qmin, qmax))
        return tag

    # -- paths -----------------------------------------------------------------------------------
    def path(self, name: str, scope: str = ""):
        """Context manager: ops run inside belong to inference path ``name``; ops outside any
        module are attributed to module ``scope``."""
        return _PathScope(self, name, scope)

    # -- the dispatch mode -----------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.values_bits is not None and O.is_inplace(func) and args and isinstance(args[0], torch.Tensor):
            with torch._C._DisableTorchDispatch():  # noqa: SLF001  (the value check reads the input)
                self._before = (args[0], args[0].clone())
        out = func(*args, **kwargs)
        here = self._here
        if here.in_quantizer:  # a quantizer class of the user's own: its ops are not the model's
            here.last_quant_op = func
            return out
        self.findings.count("ops")
        self._observe(func, args, kwargs, out)
        return out

    def _rule(self, func):
        """(table name, rule, "aten.op", whether its arguments refine the rule, ``_one_move``'s
        answer), made once per op."""
        hit = self._rules.get(id(func))  # an OpOverload lives as long as torch
        if hit is None:
            name, rule = O.op_name(func), O.lookup(func)
            refined = O.refines(func, name, rule)
            hit = self._rules[id(func)] = (name, rule, f"{func.namespace}.{func.overloadpacket.__name__}",
                                           refined, _one_move(func, name, rule, refined))
        return hit

    def _observe(self, func, args, kwargs, out) -> None:
        name, rule, op, refined, one_move = self._rule(func)
        if (one_move is not None and not kwargs and out.is_floating_point() and args[0].is_floating_point()
                and out.dtype == args[0].dtype):
            tag = self._tag_of(args[0])  # a view (or copy) of one float tensor: it keeps that tag
            if not tag.unseen:  # what ``_movement`` does for it, without its general work
                self.findings.count("movement")
                self.tags[out] = (tag, args[0]._version if one_move else out._version)
                if not one_move and rule.family == "view":
                    self._link_storage(out, args[0])
                return
        operands, ints = _operands(args, kwargs)
        outputs = _float_outputs(out)
        if ints and name not in O.LIFTS:  # a lift's argument is its fresh data itself (``_record_ints``)
            self._check_origins(ints)
        self._record_ints(func, name, args, kwargs, out)
        tainted = [(i, t) for i, t in ints if t in self.tags] if self._tainted else []  # rounded data
        values = _value_ints(func, args, ints) if ints and outputs and rule is not None and rule.family not in (
            "copy", *O.ACCUMULATING) else []  # integers promoted into the float result as values
        if not operands and not outputs:
            self.findings.count("ignored")  # integer / bool ops
            if tainted:  # the worst of what its integer operands carry, whatever their order
                self._taint(_nonfloat_outputs(out), _worst([self._tag_of(t) for _, t in tainted]), func, args)
            return
        if refined and rule is not None:
            rule = O.refine(func, name, rule, args, kwargs)
        if rule is None:
            self._unclassified(func, op, args, kwargs, operands, outputs)
        elif rule.cls in (O.COMPUTE, O.GRID):
            if tainted:  # an integer tensor of unseen origin, or a mask of activations (``_mask_tag``), as an
                value_pos = {pos for pos, _ in values}  # index or a mask only picks values: reported as a value
                tainted = [(i, t) for i, t in tainted if i in value_pos or not _picks(self._tag_of(t))]
            self._compute(func, name, rule, op, args, kwargs, operands + _union(tainted, values), outputs)
            if rule.cls == O.GRID and operands and isinstance(out, (tuple, list)):  # the indices of a sort,
                self._predicate(op, operands, out)  # a topk, a max(dim): an argmax's
        elif rule.cls == O.MOVEMENT:
            self._movement(func, name, rule, op, args, kwargs, operands + values, outputs, out, tainted,
                           len(values) < len(ints))
        elif rule.cls == O.FACTORY:
            self._factory(func, name, op, args, kwargs, outputs)
        elif rule.cls == O.FUSED:
            self._fused(func, op, args, kwargs, operands, outputs)
        else:
            self.findings.count("ignored")  # predicates, metadata reads
            if rule.cls == O.PREDICATE and operands:
                self._predicate(op, operands, out)

    def _check_origins(self, ints: list) -> None:
        """An integer tensor the audit never saw made (``_ints`` does not hold it: numpy data
        through ``torch.from_numpy``, a tensor made with the Python dispatch key excluded) is
        tagged ``UNSEEN_INT``, as integers rounded from float data carry their source: what
        integer ops make of it carries it too, and it is reported (``unseen_origin``) where it
        is cast to float or promoted into float compute as values. Bool tensors are masks."""
        for _, t in ints:
            if t.dtype != torch.bool and t not in self.tags and not self._int_seen(t):
                self.tags[t] = (UNSEEN_INT, t._version)
                self._tainted = True

    def _int_seen(self, t: torch.Tensor) -> bool:
        """Whether integer tensor ``t`` has a seen origin. A write where the audit does not watch
        is not checked (the module docstring's known limit): qswap's own quantizers rewrite their
        integer buffers with dispatch off, and aliases that share a counter without a ``_base``
        (``detach``) would make a version check report honest models."""
        return t in self._ints or t in self._own_ints

    def _seen_int(self, t: torch.Tensor) -> None:
        """Record integer tensor ``t`` as of a seen origin."""
        self._ints[t] = True

    def _record_ints(self, func, name: str, args, kwargs, out) -> None:
        """The integer outputs of a watched op have a seen origin (the base of a view written in
        place too); but those of ``torch.tensor(data)`` (``lift_fresh``) of
        more than one number are Python or numpy data, whatever computed it unseen
        (``UNSEEN_LIFT``). A 0-d one is a number written in the code (``torch.tensor(0)``)."""
        mutated = self._mutates(func)
        written = args[0] if mutated and args else kwargs.get("out")
        for t in (out if isinstance(out, (list, tuple)) else (out,)):
            if isinstance(t, torch.Tensor) and not _floating(t) and t.dtype != torch.bool:
                if name in O.LIFTS and t.dim() > 0:
                    self.tags[t] = (UNSEEN_LIFT, t._version)
                    self._tainted = True
                else:
                    self._seen_int(t)
                    if t is written and t._base is not None:
                        self._seen_int(t._base)

    def declare_integers(self, value, source=None, derived_from: tuple = ()) -> None:
        """qswap's integer simulation (``qswap.nn.simulate``) declaring the integer tensors in
        ``value`` (and the tuples, lists, dicts and dataclasses inside it), which it made outside
        the dispatcher's view:

        * ``derived_from`` given: exact integer arithmetic of those integer tensors done in
          Python (``row_isqrt``): each carries what they carry (their taint, or a seen origin);
        * else a constant folded from scales and weights only (``_constant_fold``) by ``source``,
          the function that built it: a seen origin where that function is qswap's own code
          (``qswap.*``), left unseen where it is not (a user module's build is not vouched for)."""
        if derived_from:
            self._check_origins([(None, t) for t in derived_from if not _floating(t)])
            held = [self.tags.get(t)[0] for t in derived_from if t in self.tags]
            carried = (_worst(held),) if held else None
            for t in _tensors(value, self._tree, objects=True):
                if not _floating(t) and t.dtype != torch.bool:
                    if carried is not None:
                        self.tags[t] = (carried[0], t._version)
                        self._tainted = True
                    else:
                        self.tags.pop(t)
                        self._seen_int(t)
            return
        if self._declared.get(id(value)) is value or not _qswap_code(source):
            return  # declared already (a cached table, at each call): what it held then is seen
        self._declared[id(value)] = value  # kept, so its id is not reused within the audit
        for t in _tensors(value, self._tree, objects=True):
            if not _floating(t) and t not in self.tags:
                self._seen_int(t)

    def _predicate(self, op: str, operands: list, out) -> None:
        """A comparison or arg-reduction (``argmax``, ``bucketize``, a sort's indices) of float
        data: its bool or integer result is a fact about that data. Of parameters, constants or
        integer data it is a mask or an index, as any. Of unquantized values (an accumulator,
        float data) it carries their float tag, so that arithmetic on it (cast back to float, or
        as an operand) is arithmetic on that float data: a finding where the result is computed
        with. Of quantized values, integers are that data's integers (``_rounded``: an
        accumulator once cast back to float, which only a quantizer or a constant rescale may
        consume), and a bool result a mask of activations (``_mask_tag``): it may mask, and any
        other float math on it is math on activations, not index math (``bucketize`` gives
        a quantized tensor's codes back)."""
        tags = [self._tag_of(t) for _, t in operands]
        where = self._where(op)
        source = next((t for t in tags if t.kind in (FLOAT, ACC, KERNEL)), None)
        if source is not None:
            tag = Tag(FLOAT, f"{source.describe()}, compared by {where}")
        else:
            source = next((t for t in tags if t.kind == QUANT or t.activation), None)
            if source is None:
                return
            tag = _rounded(source, f"compared by {where}")
        self._taint(_nonfloat_outputs(out), tag)

    def _taint(self, int_outputs: list, source: Tag, func=None, args=()) -> None:
        """Integers made from float data carry where they came from: cast back to float, they
        are that data rounded (not a qswap quantizer), never index math; a bool one a mask of it
        (``_mask_tag``), and integers computed from such a mask (its sum) that data's integers.
        An in-place op (``func`` on ``args``) writes its first argument, whose version counter
        moves after this handler: its tag is kept for the version it will have."""
        mutated = func is not None and self._mutates(func)
        for t in int_outputs:
            tag = _mask_tag(source) if t.dtype == torch.bool else (
                _rounded(source, "integer ops") if source.kind == C.INDEX and not source.input else source)
            if tag is None:
                continue
            self.tags[t] = (tag, t._version + 1 if mutated and args and t is args[0] else t._version)
            self._tainted = True

    def _mutates(self, func) -> bool:
        """Whether an op writes its first argument in place (``add_``), kept per op."""
        mutated = self._inplace.get(id(func))
        if mutated is None:
            mutated = self._inplace[id(func)] = O.is_inplace(func)
        return mutated

    def tag_inputs(self, inputs) -> None:
        """The model's inputs are the one float data the audit does not see made. Its integer
        inputs (an int16 waveform, lengths, token ids) are data: they carry ``_INPUT_INT`` through
        integer ops and casts, so that index math on them is ignored but compute of them with a
        parameter (a convolution with a raw weight) is not constant-foldable preprocessing."""
        for t in _tensors(inputs):
            if _floating(t):
                self._set([t], Tag(FLOAT, "a model input"))
            else:
                self._seen_int(t)
                if t.dtype != torch.bool:  # a bool input is a mask as any
                    self.tags[t] = (_INPUT_INT, t._version)
                    self._tainted = True

    def _tag_of(self, t: torch.Tensor) -> Tag:
        entry = self.tags.get(t)
        if entry is None:
            if not _floating(t):  # integer data moved into a float result (``_value_ints``)
                return _BOOL_DATA if t.dtype == torch.bool else _INT_DATA
            return UNSEEN
        tag, version = entry
        if t._version != version:  # an alias of it was changed in place after it was tagged
            return Tag(FLOAT, f"changed in place after it was tagged ({tag.describe()})")
        return tag

    def _link_storage(self, out: torch.Tensor, src: torch.Tensor) -> None:
        """``out`` made from ``src`` by a reshape that is not a view (``_unsafe_view``): when they
        share storage, a write through either changes the other without its version counter
        (``_set_out`` then re-tags the other)."""
        if out.numel() and out.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
            self._shared[out] = weakref.ref(src)  # weak: a dead tensor is read no more
            self._shared[src] = weakref.ref(out)
            self._any_shared = True

    def _where(self, op: str) -> str:
        return f"{op} at {self.stack[-1] or '<model>'}"

    def _set(self, outputs: list, tag: Tag) -> None:
        """Tag tensors whose version counter is final (outside an op: hooks, attach)."""
        for t in outputs:
            self.tags[t] = (tag, t._version)

    def _set_out(self, func, args, kwargs, outputs: list, tag: Tag) -> None:
        """Tag an op's outputs with the version they will have once the op returns: a view
        shares its base's counter, and an in-place op bumps the counter after this handler."""
        base = args[0] if func.is_view and args and isinstance(args[0], torch.Tensor) else None
        mutated = self._mutates(func)
        written = args[0] if mutated and args else kwargs.get("out")
        if self._any_shared and isinstance(written, torch.Tensor):
            other = self._shared.get(written)
            other = None if other is None else other()
            if other is not None:
                self.tags[other] = (Tag(FLOAT, f"its storage was written by {func.name()} through another tensor "
                                               f"sharing it ({self._tag_of(other).describe()})"), other._version)
        for t in outputs:
            if base is not None:
                version = base._version
            elif (mutated and args and t is args[0]) or t is kwargs.get("out"):
                version = t._version + 1
            else:
                version = t._version
            self.tags[t] = (tag, version)

    def _compute(self, func, name, rule, op, args, kwargs, operands, outputs) -> None:
        tags = [self._tag_of(t) for _, t in operands]
        if not tags:  # e.g. true division of two integer tensors
            self.findings.count("ignored")
            self._set_out(func, args, kwargs, outputs, Tag(C.INDEX, self._where(op)))
            return
        if name in O.INTEGER_GEMMS and self._integer_gemm(func, name, op, args, kwargs, operands, tags, outputs):
            return
        scalars = tuple(a for a in args if isinstance(a, _NUMBER) and not isinstance(a, bool))
        rescale = _scalar_rescale(name, args, kwargs, len(tags))
        options = kwargs
        if name == "pow" and len(args) == 2 and isinstance(args[1], _NUMBER) and not isinstance(args[1], bool):
            options = {**kwargs, "exponent": args[1]}  # ``w ** 2``: the number is the exponent, not a base
        d = C.decide_compute(name, rule, tags, self.calls[-1], self._where(op), rescale, scalars, options)
        self._set_out(func, args, kwargs, outputs, _integral(name, func, d.out))
        module = self.stack[-1]
        if d.bucket == C.FLOAT_BUCKET:
            self.findings.operand_findings(module, op, func, operands, tags, d.findings)
        else:
            self.findings.bucket(d.bucket, module, op, d.bits)
        if self.values_bits is not None and d.bucket in (C.QUANTIZED, C.FLOAT_BUCKET):
            self._check_values(module, op, func, operands, tags, {i for i, _ in d.findings})

    def _integer_gemm(self, func, name, op, args, kwargs, operands, tags, outputs) -> bool:
        """A float GEMM on integer data (``qswap.honesty.gemm``): counted as ``integer_gemm``
        (its output: codes) when proven exact, an ``inexact_gemm`` finding when not; False where
        the rule does not cover it (decided as any compute op)."""
        verdict = G.decide(func, name, args, kwargs, tags, operands)
        if verdict is None:
            return False
        module, where = self.stack[-1], self._where(op)
        if verdict.exact:
            self._set_out(func, args, kwargs, outputs, Tag(ACC, f"exact integer GEMM {where}", call=self.calls[-1],
                                                           integral=True))
            self.findings.bucket(C.INTEGER_GEMM, module, op, [])
        else:
            self._set_out(func, args, kwargs, outputs, Tag(FLOAT, f"output of {where}: {verdict.why}"))
            self.findings.inexact_gemm(module, op, operands[0][1], verdict.why)
        return True

    def _check_values(self, module, op, func, operands, tags, flagged: set[int]) -> None:
        """The value-level line: is each operand on a uniform grid, and do the tags agree?"""
        for i, ((pos, t), tag) in enumerate(zip(operands, tags)):
            if not t.is_floating_point():
                continue
            bits = tag.grid.bits if tag.kind == QUANT else self.values_bits
            if self._before is not None and self._before[0] is t:
                t = self._before[1]  # an in-place op's input, as it was before the op
            on = on_uniform_grid(t, bits)
            self.findings.value_checked(on or bits > MAX_CHECKED_BITS)
            if on == (i in flagged):
                self.findings.values_disagree(module, op, func, (pos, t), tag, on, bits)
        self._before = None

    def _movement(self, func, name, rule, op, args, kwargs, operands, outputs, out, tainted,
                  indexed: bool = True) -> None:
        """``operands``: the float tensors moved, and the integer tensors moved into the float result
        as values (``_value_ints``); ``indexed``: whether an integer tensor is an argument otherwise
        (an index, a mask)."""
        self.findings.count("movement")
        if name == "copy" and O.is_inplace(func) and len(args) > 1 and isinstance(args[1], torch.Tensor):
            # copy_(dst, src): dst is fully overwritten; by integers when src is an integer tensor
            operands = [(pos, t) for pos, t in operands if pos != 0]
        fills: tuple = ()
        if O.grid_rule(name, rule) == O.FILL:
            operands, fills = self._fill_values(func, args, kwargs, operands)
        has_index = indexed and _has_index(args)
        tags = [self._tag_of(t) for _, t in operands]
        unseen = [(o, tag) for o, tag in zip(operands, tags) if tag.unseen]
        if unseen:
            self.findings.unseen(self.stack[-1], op, func, *map(list, zip(*unseen)))
        reinterpreted = (func.overloadpacket is torch.ops.aten.view and func._overloadname == "dtype"
                         and isinstance(out, torch.Tensor) and args[0].is_floating_point() != out.is_floating_point())
        if reinterpreted:  # bits read as another kind of number (float as integer, or integer as float)
            self._reinterpreted(func, op, args[0])
        if not outputs and operands:  # float -> integer cast: the integers are rounded data
            if reinterpreted:
                # a float's bits read as integers are no rounding of it (nor codes, nor integers
                # an exact GEMM may multiply): float data, wherever they go
                self._taint(_nonfloat_outputs(out), Tag(FLOAT, f"{tags[0].describe()}, its bits reinterpreted as "
                                                          f"{outputs[0].dtype if outputs else out.dtype} by "
                                                          f"{self._where(op)}"))
            elif not all(t.kind == C.INDEX and not t.activation for t in tags):
                self._taint(_nonfloat_outputs(out), _rounded(tags[0], f"cast at {self._where(op)}"))
            elif any(t.input for t in tags):  # the model's integer data, cast back: still that data
                self._taint(_nonfloat_outputs(out), _INPUT_INT)
            return
        if len(tags) == 1 and not fills and not has_index:
            tag = tags[0]  # one tensor moved keeps its tag: combine_movement's answer, without its work
        else:
            tag = C.combine_movement(tags, has_index, self._where(op), fills)
        if name in O.STORAGE_VIEWS and tags and tag.kind != FLOAT and not _within_footprint(func, args, kwargs):
            tag = Tag(FLOAT, f"{tag.describe()}, re-strided by {self._where(op)}: it reads storage outside "
                             f"its input")
        retyped = _retyped(operands, outputs, name) if tags and tag.kind != FLOAT else None
        if retyped is not None and not (tag.kind == C.INDEX and tag.input and name != "view"):
            # another float dtype: the values are not the grid's any more (the model's integer input
            # data, or math on it, converted keeps its tag: float64 math on it cast to float32 had
            # reached a quantizer as plain float data, where the same math in float32 was a finding)
            tag = Tag(FLOAT, f"{tag.describe()}, {retyped} by {self._where(op)}")
        if reinterpreted and outputs:  # integer bits read as floats: float data
            tag = Tag(FLOAT, f"integer bits reinterpreted as {outputs[0].dtype} by {self._where(op)}")
        elif not tags and tainted:  # integers rounded from float data, cast back to float
            held = [self._tag_of(t) for _, t in tainted]
            tag = _worst(held)
            if tag.unseen:  # integers of unseen origin cast to float: where they enter float data
                self.findings.unseen(self.stack[-1], op, func, [tainted[held.index(tag)]], [tag])
        elif not tags and rule.family == "copy" and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in _flat(args)):
            tag = Tag(C.INDEX, self._where(op), binary=True)  # a bool mask cast to float: 0/1
        if rule.family == "view" and not func.is_view and outputs and operands:
            self._link_storage(outputs[0], operands[0][1])
        if not tags or tag.integral:  # floats made from integers, or integers moved: still integers?
            integral = all(t.integral for t in tags) and all(float(v).is_integer() for v in fills)
            if integral != tag.integral:
                tag = dataclasses.replace(tag, integral=integral)
        self._set_out(func, args, kwargs, outputs, tag)

    def _fill_values(self, func, args, kwargs, operands):
        """The numbers a fill-like op writes (``GRID_RULES`` "fill"): its number arguments, and
        0-d constants and 0-d integer tensors (``where(m, q, torch.tensor(0))``) read back; a 0-d
        float tensor of data stays an operand."""
        named = [*zip(func._schema.arguments, args), *((O.schema_arg(func, k), v) for k, v in kwargs.items())]
        fills = [v for a, v in named if a is not None and "number" in str(a.type)
                 and isinstance(v, _NUMBER) and not isinstance(v, bool)]
        kept = []
        for pos, t in operands:
            tag = self._tag_of(t) if t.dim() == 0 else None
            if tag is not None and ((tag.kind in (CONST, PARAM) and not tag.lookup)
                                    or (tag.kind == C.INDEX and not _floating(t))):  # a 0-d integer: its value
                with torch._C._DisableTorchDispatch():  # noqa: SLF001  (the audit's own read)
                    fills.append(float(t))
            else:
                kept.append((pos, t))
        return kept, tuple(float(v) for v in fills)

    def _reinterpreted(self, func, op, source: torch.Tensor) -> None:
        """``view(dtype)`` between float and integer dtypes on data (not a parameter's or a
        constant's bits): bit arithmetic on floats (an exp from an accumulator's integer bits, a
        log2 from a float's exponent field) that no float op shows, a finding at the view."""
        tag = self._tag_of(source)
        if not (tag.kind in (PARAM, CONST) and not tag.lookup):
            self.findings.reinterpreted(self.stack[-1], op, func, (0, source), tag)

    def _factory(self, func, name, op, args, kwargs, outputs) -> None:
        self.findings.count("factory")
        value = O.argument(func, args, kwargs, "value")
        if isinstance(value, torch.Tensor) and _floating(value):  # fill_(self, tensor)
            tag = self._tag_of(value)
            if tag.kind not in (CONST, PARAM, QUANT):
                tag = Tag(FLOAT, f"made by {self._where(op)} from a computed value ({tag.describe()})")
            self._set_out(func, args, kwargs, outputs, tag)
            return
        if name in O.LIFTS and outputs and outputs[0].dim() > 0:  # torch.tensor(data), from_numpy
            where = f"made from Python or numpy data by {self._where(op)} (what computed it is not seen)"
            self._set_out(func, args, kwargs, outputs, Tag(FLOAT, where, unseen=True))
            return
        zero = name in O.ZERO_FACTORIES or (name in O.FILL_FACTORIES and args and
                                            isinstance(args[-1], _NUMBER) and args[-1] == 0)
        if name in O.LIFTS and outputs:  # a Python number made a tensor (``x[m] = 0``): read it
            with torch._C._DisableTorchDispatch():  # noqa: SLF001  (the audit's own read)
                zero = float(outputs[0]) == 0
        self._set_out(func, args, kwargs, outputs, Tag(CONST, f"made by {self._where(op)}", zero=zero))

    def _fused(self, func, op, args, kwargs, operands, outputs) -> None:
        tags = [self._tag_of(t) for _, t in operands]
        self.findings.fused(self.stack[-1], op, func, operands, tags)
        self._set_out(func, args, kwargs, outputs, Tag(FLOAT, f"output of fused kernel {self._where(op)}"))

    def _unclassified(self, func, op, args, kwargs, operands, outputs) -> None:
        self.findings.unclassified(self.stack[-1], op, func, operands)
        self._set_out(func, args, kwargs, outputs, Tag(FLOAT, f"output of unclassified {self._where(op)}"))


# Integer tensors of unseen origin (``Tracker._check_origins``, ``_record_ints``): reported, as float
# ones are, where they enter float data (cast to float, or promoted into float compute as values)
UNSEEN_INT = Tag(FLOAT, "an integer tensor of unseen origin (made where the audit does not watch: numpy, "
                        "torch.from_numpy, the Python dispatch key excluded)", unseen=True)
UNSEEN_LIFT = Tag(FLOAT, "integers made from Python or numpy data by aten.lift_fresh (torch.tensor(data): "
                         "what computed them is not seen)", unseen=True)


def _qswap_code(fn, depth: int = 0) -> bool:
    """Whether ``fn`` (a function, lambda, bound method or ``functools.partial``) is qswap's own
    code: defined in qswap's package, as is each function, method or partial it closes over or
    binds (``onto_grid``'s ``lambda: form_or_none(build, grid_out)`` is qswap's only where
    ``build`` is: a ``to_integer`` a user subclass overrides is not)."""
    if depth > 8:
        return False
    if isinstance(fn, functools.partial):
        return _qswap_code(fn.func, depth + 1) and all(
            _qswap_code(a, depth + 1) for a in (*fn.args, *fn.keywords.values()) if _is_code(a))
    fn = getattr(fn, "__func__", fn)  # a bound method: its function
    module = getattr(fn, "__module__", None) or ""
    if not (module == "qswap" or module.startswith("qswap.")):
        return False
    cells = getattr(fn, "__closure__", None) or ()
    return all(_qswap_code(c.cell_contents, depth + 1) for c in cells
               if _cell_full(c) and _is_code(c.cell_contents))


def _is_code(v) -> bool:
    return isinstance(v, (types.FunctionType, types.MethodType, functools.partial))


def _cell_full(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # an empty cell (a name not bound yet)
        return False
    return True


def _inverse(q: nn.Module, step: float) -> torch.Tensor | None:
    """The 0-d float32 ``1 / step`` a frozen FakeQuantize keeps for its own passes (None: none
    kept for this step). Any value is sound for ``on_grid_per_tensor``: its last comparison is
    against grid points of ``step`` itself."""
    grid = q.kept_grid if isinstance(q, FakeQuantize) else None
    return grid.inverse if grid is not None and grid.scale == step else None


def _one_move(func, name: str, rule, refined: bool) -> bool | None:
    """For an op that moves the data of its one tensor argument and nothing else (``view``,
    ``transpose``, ``t``, ``expand``, ``slice``, ...: a movement rule that writes no numbers, its
    first argument its only tensor, one tensor out, not in place): whether its output is a
    view (it shares the argument's version counter). None for any other op: ``_movement``
    decides it."""
    schema = func._schema
    if (rule is None or rule.cls != O.MOVEMENT or refined or name == "copy" or name in O.STORAGE_VIEWS
            or O.is_inplace(func)
            or O.grid_rule(name, rule) == O.FILL or len(schema.returns) != 1
            or str(schema.returns[0].type) != "Tensor" or not schema.arguments
            or str(schema.arguments[0].type) != "Tensor"
            or any("Tensor" in str(a.type) for a in schema.arguments[1:])):
        return None
    return bool(func.is_view)


# Arguments that choose, mask or place values rather than being values (``_value_ints``)
_INDEX_ARGS = frozenset({"condition", "index", "indices", "mask", "offsets", "repeats", "start", "length",
                         "tensor_indices_or_sections", "el", "sorter", "boundaries", "lengths"})
# The tags of integer and bool tensors taking part in a float result as values: integer data (as a
# float cast from them is), a bool tensor a 0/1 mask (as a bool mask cast to float is)
_INT_DATA = Tag(C.INDEX, "integer data, promoted to float", integral=True)
# The tag the model's integer inputs carry (``tag_inputs``), and the integers made from them
_INPUT_INT = Tag(C.INDEX, "integer data of a model input", integral=True, input=True)
_BOOL_DATA = Tag(C.INDEX, "a bool tensor, promoted to float (0/1)", binary=True, integral=True)


def _value_ints(func, args, ints: list) -> list:
    """The integer (and bool) tensors of an op with a float result that type promotion makes
    values of that result (``q * torch.arange(8)``, ``torch.cat([q, ints])``, ``where(m, q,
    torch.tensor(10))``, ``clamp(q, min=ints)``): every one but an index, a mask or a condition
    (``_INDEX_ARGS``) or a tensor the op writes (an ``out=``)."""
    schema = func._schema.arguments
    found = []
    for pos, t in ints:
        i = pos[0] if isinstance(pos, tuple) else pos
        a = O.schema_arg(func, i) if isinstance(i, str) else schema[i] if i < len(schema) else None
        if a is None or a.name in _INDEX_ARGS or (a.alias_info is not None and a.alias_info.is_write):
            continue
        found.append((pos, t))
    return found


def _union(first: list, second: list) -> list:
    """(position, tensor) pairs of both lists, each position once, in order."""
    if not second:
        return first
    seen = {pos for pos, _ in first}
    return first + [(pos, t) for pos, t in second if pos not in seen]


def _within_footprint(func, args, kwargs) -> bool:
    """Whether ``as_strided(x, size, stride, storage_offset)`` reads only elements of ``x``: every
    storage offset its layout addresses is one that ``x``'s own layout addresses. It addresses the
    storage, not the view: ``x[0].as_strided(...)`` can read ``x[1]``'s memory, which the tag of
    ``x[0]`` says nothing about."""
    if O.is_inplace(func):  # as_strided_: x already has the new layout; the old one is gone
        return False
    x = args[0]
    size, stride = O.argument(func, args, kwargs, "size"), O.argument(func, args, kwargs, "stride")
    offset = O.argument(func, args, kwargs, "storage_offset")
    offset = x.storage_offset() if offset is None else int(offset)
    size, stride = [int(v) for v in size], [int(v) for v in stride]
    if math.prod(size) == 0:
        return True
    if x.numel() == 0:
        return False
    lo, hi = _span(size, stride, offset)
    own_shape, own_stride, own_offset = list(x.shape), list(x.stride()), x.storage_offset()
    own_lo, own_hi = _span(own_shape, own_stride, own_offset)
    if lo < own_lo or hi > own_hi:  # its lowest or highest offset is one x does not address
        return False
    if _dense(own_shape, own_stride):  # x addresses [own_lo, own_hi] exactly, every offset in it
        return True
    with torch._C._DisableTorchDispatch():  # noqa: SLF001  (the audit's own arithmetic)
        wanted = _footprint(size, stride, offset)
        own = _footprint(own_shape, own_stride, own_offset)
        return bool(torch.isin(wanted, own).all())


def _span(size: list, stride: list, offset: int) -> tuple[int, int]:
    """The lowest and highest storage offsets a (size, stride, storage_offset) layout of at least
    one element addresses."""
    lo = hi = offset
    for n, st in zip(size, stride):
        lo, hi = lo + min(0, (n - 1) * st), hi + max(0, (n - 1) * st)
    return lo, hi


def _dense(size: list, stride: list) -> bool:
    """Whether a layout addresses every offset of its span, each once (a contiguous tensor, or a
    permutation of one: ``x.t()``): its dims of more than one element, by stride, each step over
    all the ones before it."""
    step = 1
    for st, n in sorted((st, n) for n, st in zip(size, stride) if n != 1):
        if st != step:
            return False
        step *= n
    return True


def _footprint(size: list, stride: list, offset: int) -> torch.Tensor:
    """The storage offsets a (size, stride, storage_offset) layout addresses, flattened (a dim of
    one element or of stride 0 adds none: it is left out, not repeated)."""
    offsets = torch.full((), offset, dtype=torch.int64)
    for n, st in zip(size, stride):
        if n != 1 and st != 0:
            offsets = (offsets[..., None] + torch.arange(n, dtype=torch.int64) * st)
    return offsets.reshape(-1)


def _integral(name: str, func, tag: Tag) -> Tag:
    """The tag of a compute op's output: marked ``integral`` after a rounding to integers
    (``round`` without decimals, ``floor``, ``ceil``, ``trunc``) of codes or a kernel
    intermediate (its tag says which: a float operand's output is float), unmarked after any
    other compute (its values are integers only if the integer-GEMM rule proves them so)."""
    if name in O.ROUNDINGS and func._overloadname != "decimals" and tag.kind in (ACC, KERNEL):
        return tag if tag.integral else dataclasses.replace(tag, integral=True)
    if tag.kind == C.INDEX and name in O.ROUNDINGS and func._overloadname == "decimals":
        return dataclasses.replace(tag, integral=False) if tag.integral else tag  # round(x, 2): not integers
    if tag.kind == C.INDEX:  # index math: ``classify.decide_compute`` decided it (``_integral_math``)
        return tag
    return dataclasses.replace(tag, integral=False) if tag.integral else tag


def _scalar_rescale(name: str, args, kwargs, n_tensors: int) -> float | None:
    """The Python number a mul/div multiplies its one tensor operand by; None otherwise."""
    if n_tensors != 1 or len(args) < 2 or kwargs.get("rounding_mode") is not None:
        return None
    a, b = args[0], args[1]
    if name == "mul":
        factor = a if isinstance(a, _NUMBER) else b if isinstance(b, _NUMBER) else None
        return None if factor is None or isinstance(factor, bool) else float(factor)
    if (name in ("div", "true_divide") and isinstance(a, torch.Tensor) and isinstance(b, _NUMBER)
            and not isinstance(b, bool) and b != 0):
        return 1.0 / float(b)
    return None


# float dtype changes that keep every value (a conversion, not a reinterpretation of the bits)
_EXACT_WIDENING = frozenset({(torch.float16, torch.float32), (torch.float16, torch.float64),
                             (torch.bfloat16, torch.float32), (torch.bfloat16, torch.float64),
                             (torch.float32, torch.float64)})


def _retyped(operands: list, outputs: list, name: str) -> str | None:
    """How a data movement changed its float values by changing their dtype, or None: a view of
    the bits as another dtype (``view(dtype)``), or a conversion to a dtype that does not hold
    every value of the source (``half()``, ``to(bfloat16)``, ``copy_`` into a narrower tensor).
    The same dtype, or an exact widening (``float16 -> float32``), keeps the values."""
    sources = {t.dtype for _, t in operands if _floating(t)}
    for o in outputs:
        for src in sources:
            if o.dtype == src:
                continue
            if name == "view":
                return f"its bits reinterpreted as {o.dtype}"
            if (src, o.dtype) not in _EXACT_WIDENING:
                return f"rounded to {o.dtype}"
    return None


def _rounded(source: Tag, how: str) -> Tag:
    """The tag integers made from float data carry (and the floats they are cast back to);
    ``how``: what made them ("cast at aten._to_copy at fc", "compared by aten.gt at fc")."""
    if source.kind in (PARAM, CONST):
        return Tag(source.kind, f"{source.where}, turned into integers ({how})", lookup=source.lookup)
    if source.kind in (QUANT, KERNEL, ACC, C.INDEX) and (source.kind != QUANT or source.grid.on_grid):
        # codes of quantized data (the integer simulation, qswap.nn.simulate), or integers of a
        # mask of them (``_predicate``): what integer ops make of them, cast back to float, is an
        # integer kernel's accumulator, which its consumer must quantize before any other compute
        return Tag(ACC, f"integers from {source.describe()}, {how}")
    return Tag(FLOAT, f"{source.describe()}, turned into integers ({how}; not a qswap quantizer)")


class _ThreadState(threading.local):
    """One thread's place in the audited model: its module path stack, its counterpart calls, the
    role of each module call in progress and how deep it is inside quantizers (with the guard that
    switches dispatch off there)."""

    def __init__(self):
        self.stack: list[str] = [""]
        self.calls: list[int] = [-1]
        self.roles: list[int] = []  # the hooks' role of each module call in progress (``_pre``)
        self.in_quantizer = 0
        self.last_quant_op = None
        self.unobserved = None


# qswap's own quantizers' code as their modules define it: a quantizer is trusted (its ops run
# unwatched) only while its class's methods and the instance are that code, with no hook of its own
_OWN_CODE = {FakeQuantize: fake_quantize_code, BiasQuantize: bias_code}
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                 "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def _intact(module: nn.Module) -> bool:
    """Whether one of qswap's own quantizers runs qswap's code: its class's ``__call__`` and
    ``forward`` are the package's (not patched over), the instance overrides neither, and no hook is
    registered on it (a pre-hook rescaling its input, a forward hook rewriting its output: code
    the audit does not watch while it trusts the quantizer)."""
    call, forward = _OWN_CODE[type(module)]
    if type(module).__call__ is not call or type(module).forward is not forward:
        return False
    if "forward" in module.__dict__ or "__call__" in module.__dict__:
        return False
    return not any(getattr(module, name, None) for name in _MODULE_HOOKS)


def _severity(tag: Tag) -> int:
    """How much a tag an integer carries says against the data (lower: worse): of unseen origin,
    then float data, an accumulator, a kernel intermediate, quantized values, a mask of
    activations; integers rounded from index data; last the model's own integer inputs (index
    math)."""
    if tag.unseen:
        return 0
    rank = {FLOAT: 1, ACC: 2, KERNEL: 3, QUANT: 4}.get(tag.kind)
    if rank is not None:
        return rank
    if tag.kind == C.INDEX:
        return 5 if tag.activation else 7 if tag.input else 6
    return 8


def _worst(tags: list) -> Tag:
    """The tag an integer op's result carries from several tagged integer operands: the worst
    (``_severity``), so that the model's integer input joined with integers of activations (``lengths
    * 0 + codes``) is not the model's input data, whichever operand comes first."""
    return min(tags, key=_severity)


def _mask_tag(source: Tag) -> Tag | None:
    """The tag of a bool tensor made from data tagged ``source`` (a comparison, a cast to bool,
    integer ops on tagged integers); None: a mask as any (of parameters, constants or integers
    of unseen origin, which are reported where they enter float data as values). Of float data it
    is that data; of activations (quantized values, their codes) a mask of activations: cast to
    float it may mask quantized data (0/1), and any other float math on it is a finding."""
    if source.unseen or source.kind in (PARAM, CONST) or source.input:  # (a padding mask of lengths)
        return None
    if source.kind == FLOAT or (source.activation and source.binary):
        return source
    return Tag(C.INDEX, f"a mask computed from {source.describe()}", binary=True, integral=True, activation=True)


def _picks(tag: Tag) -> bool:
    """Whether an integer or bool tensor with this tag, as an index or mask (not a value) of a
    compute op, only picks values: one of unseen origin, a mask of activations (as any mask), or
    the model's integer inputs (token ids). Integers made from float data (rounded, compared)
    stay operands there."""
    return tag.unseen or tag.activation or tag.input


def _own(table: dict) -> list:
    """(name, tensor) of a module's own parameter or buffer table, first name of each tensor (as
    ``named_parameters(recurse=False)``), without walking the module tree."""
    if len(table) < 2:  # most modules hold at most one: nothing to deduplicate
        return [(name, t) for name, t in table.items() if t is not None]
    seen: set[int] = set()
    found = []
    for name, t in table.items():
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            found.append((name, t))
    return found


def _tensors(value, tree: set = frozenset(), objects: bool = False) -> list:
    """Every tensor in ``value``, in order, each once: in the tuples, lists and dicts inside it,
    and the parameters, buffers and attributes of a module there that is not one of ``tree``
    (ids of the model's own modules, tagged as themselves): e.g. an integer form a simulation
    keeps, with its float copies of weight codes. ``objects``: also the fields of the
    dataclasses and other plain objects there (an integer form's tables). Each object is walked
    once (held while walking, so that its id is not reused by another)."""
    if isinstance(value, torch.Tensor):
        return [value]
    found, stack, seen = [], [value], {}
    while stack:
        v = stack.pop()
        if isinstance(v, _SCALARS) or id(v) in seen:
            continue
        seen[id(v)] = v
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, (list, tuple)):
            stack.extend(reversed(v))
        elif isinstance(v, (dict, Mapping)):
            stack.extend(reversed(list(v.values())))
        elif isinstance(v, nn.Module):
            if id(v) not in tree:
                state = [*v._parameters.values(), *v._buffers.values(), *v._modules.values(),  # noqa: SLF001
                         *(x for k, x in vars(v).items() if k not in _MODULE_TABLES)]
                stack.extend(reversed(state))
        elif not objects or isinstance(v, _CODE):
            continue  # classes, functions and Python modules hold no tables (a callable object can:
            # a ``Requant`` holds its per-channel multipliers and zero points)
        elif dataclasses.is_dataclass(v):
            stack.extend(reversed([getattr(v, f.name) for f in dataclasses.fields(v)]))
        elif hasattr(v, "__dict__"):
            stack.extend(reversed(list(vars(v).values())))
    return found


_CODE = (type, types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.BuiltinMethodType,
         types.ModuleType, functools.partial)


def _floating(t: torch.Tensor) -> bool:
    """Whether ``t`` holds floating-point values: a real float dtype, or a complex one (two floats
    each, computed in float arithmetic)."""
    return t.is_floating_point() or t.is_complex()


def _nonfloat_outputs(out) -> list[torch.Tensor]:
    """An op's integer and bool outputs."""
    outs = out if isinstance(out, (list, tuple)) else (out,)
    return [t for t in outs if isinstance(t, torch.Tensor) and not _floating(t)]


def _has_index(args) -> bool:
    """Whether an argument (or an element of a list argument) is an integer tensor: an index."""
    for a in args:
        for t in a if isinstance(a, (list, tuple)) else (a,):
            if isinstance(t, torch.Tensor) and not _floating(t) and t.dtype != torch.bool:
                return True
    return False


def _flat(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


def _operands(args, kwargs) -> tuple[list, list]:
    """(position, tensor) of every float tensor argument, and of every integer one; position is
    an int, (int, int) for an element of a list argument, or a keyword name."""
    floats, ints = [], []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            (floats if _floating(a) else ints).append((i, a))
        elif isinstance(a, (list, tuple)):
            for j, t in enumerate(a):
                if isinstance(t, torch.Tensor):
                    (floats if _floating(t) else ints).append(((i, j), t))
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            (floats if _floating(v) else ints).append((k, v))
    return floats, ints


def _float_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if _floating(out) else []
    if isinstance(out, (list, tuple)):
        return [t for t in out if isinstance(t, torch.Tensor) and _floating(t)]
    return []


class _TagMap:
    """tensor -> value, by identity, without keeping the tensor alive (``WeakIdKeyDictionary``
    semantics at a plain dict's cost: an entry whose tensor died never matches the tensor that
    reuses its id, because its weak reference no longer points at that object)."""

    __slots__ = ("_d",)

    def __init__(self):
        self._d: dict = {}

    def get(self, t, default=None):
        entry = self._d.get(id(t))
        if entry is None or entry[0]() is not t:
            return default
        return entry[1]

    def __setitem__(self, t, value) -> None:
        self._d[id(t)] = (weakref.ref(t), value)

    def __contains__(self, t) -> bool:
        entry = self._d.get(id(t))
        return entry is not None and entry[0]() is t

    def pop(self, t) -> None:
        if t in self:
            del self._d[id(t)]


class _PathScope:
    def __init__(self, tracker: Tracker, name: str, scope: str):
        self.tracker, self.name, self.scope = tracker, name, scope

    def __enter__(self):
        self.tracker.findings.start_path(self.name)
        self.tracker.stack.append(self.scope)
        return self

    def __exit__(self, *exc):
        self.tracker.stack.pop()
        self.tracker.findings.end_path()
        return False

