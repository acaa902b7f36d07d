"""The integer audit (issue 16): every aten op an integer model runs, with the module that ran
it and the dtypes it read and wrote. Outside the model's declared float steps, an op that reads or
writes a floating-point tensor is a finding, named with its module and op.

* ``check_integer(imodel, x)``: one forward of an ``IntegerModel``-like object split into
  ``quantize_input`` / ``forward_codes`` / ``dequantize_output`` (the middle must be integer).
* ``audit_integer(model, net_input)``: the integer audit level of ``qswap audit --integer`` and
  ``qswap.audit(model, inputs, integer=True)``: integerizes a calibrated qswap model (or takes an
  integer model) and runs every inference path fairseq's SequenceGenerator runs (batch forward,
  ``reorder_encoder_out``, incremental decoding steps, the beam reorder of the decoding caches,
  ``get_normalized_probs``; any other integer model: its forward). Declared float steps: modules
  with a ``declared_float_step`` (``qswap.nn.integer_steps``) and the output normalization
  (``get_normalized_probs``: the float log-softmax beam search reads). Returns an
  ``IntegerAuditReport`` (terminal rendering in the CLI; ``to_json``, ``to_markdown``).

>>> report = audit_integer(qmodel, net_input)
>>> report.integer_only, [(f.module, f.op) for f in report.findings][:3]
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

PHASES = ("quantize_input", "compute", "dequantize_output")


def _float_name(dtype: str) -> bool:
    """Whether a recorded dtype name is a floating type: real (float32, bfloat16, half, ...) or
    complex (complex64: two floats, computed in float arithmetic)."""
    return dtype.startswith(("float", "complex")) or dtype in ("bfloat16", "half")


@dataclass(frozen=True)
class OpRecord:
    phase: str
    module: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @property
    def touches_float(self) -> bool:
        return any(_float_name(d) for d in self.inputs + self.outputs)

    def __str__(self) -> str:
        return f"{self.module}: {self.op} ({', '.join(self.inputs)} -> {', '.join(self.outputs)})"


@dataclass
class IntegerReport:
    ops: list[OpRecord] = field(default_factory=list)

    @property
    def findings(self) -> list[OpRecord]:
        """Ops on float tensors outside the declared float steps."""
        return [r for r in self.ops if r.phase == "compute" and r.touches_float]

    @property
    def declared(self) -> list[OpRecord]:
        return [r for r in self.ops if r.phase != "compute"]

    @property
    def compute_ops(self) -> list[OpRecord]:
        return [r for r in self.ops if r.phase == "compute"]

    @property
    def ok(self) -> bool:
        return bool(self.compute_ops) and not self.findings

    def dtypes(self) -> set[str]:
        """Every dtype the compute ops read or wrote."""
        return {d for r in self.compute_ops for d in r.inputs + r.outputs}


def _dtypes(tree) -> tuple[str, ...]:
    leaves, _ = tree_flatten(tree)
    return tuple(str(t.dtype).replace("torch.", "") for t in leaves if isinstance(t, torch.Tensor))


class _Recorder(TorchDispatchMode):
    def __init__(self, report: IntegerReport):
        super().__init__()
        self.report, self.phase, self.stack = report, PHASES[0], ["(model)"]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs, outputs = _dtypes((args, kwargs)), _dtypes(out)
        if inputs or outputs:
            self.report.ops.append(OpRecord(self.phase, self.stack[-1], str(func.overloadpacket.__name__),
                                            inputs, outputs))
        return out


def check_integer(model: nn.Module, x: torch.Tensor) -> IntegerReport:
    """Run ``model`` (an ``IntegerModel``: ``quantize_input``, ``forward_codes``,
    ``dequantize_output``) on ``x`` and record every op, by phase and module."""
    report = IntegerReport()
    recorder = _Recorder(report)
    def enter(name: str):
        def hook(module, args) -> None:
            recorder.stack.append(name)
        return hook

    def leave(module, args, output) -> None:
        recorder.stack.pop()

    handles = []
    for name, module in model.named_modules():
        if name:
            handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    try:
        with torch.no_grad(), recorder:
            codes = model.quantize_input(x)
            recorder.phase = "compute"
            acc = model.forward_codes(codes)
            recorder.phase = "dequantize_output"
            model.dequantize_output(acc)
    finally:
        for h in handles:
            h.remove()
    return report


# -- the integer audit level -------------------------------------------------------------------------

NORMALIZE_STEP = "log-softmax of the float scores (get_normalized_probs, what beam search reads)"


@dataclass(frozen=True)
class IntegerFinding:
    """An op on float tensors outside the declared float steps (``count`` times on ``path``)."""
    path: str
    module: str
    op: str
    dtypes: str
    count: int


@dataclass(frozen=True)
class DeclaredStep:
    """A declared float step that ran: its module (or path), what it is, its ops."""
    module: str
    step: str
    ops: tuple[str, ...]
    count: int


@dataclass(frozen=True)
class IntegerPath:
    name: str
    ops: int  # aten ops of the integer model on this path (declared steps included)
    integer_ops: int  # ops outside the declared steps, on integer and bool tensors only
    findings: int


@dataclass
class IntegerAuditReport:
    """The integer audit's verdict: ``integer_only`` when every path ran ops and every op outside
    the declared float steps ran on integer (or bool) tensors only."""
    model: str
    recipe: str | None
    paths: list[IntegerPath] = field(default_factory=list)
    findings: list[IntegerFinding] = field(default_factory=list)
    declared: list[DeclaredStep] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)  # every dtype the integer ops read or wrote

    @property
    def integer_only(self) -> bool:
        return bool(self.paths) and all(p.integer_ops for p in self.paths if p.name not in _DECLARED_PATHS) \
            and not self.findings

    @property
    def verdict(self) -> str:
        return "integer-only" if self.integer_only else "NOT integer-only"

    def to_dict(self) -> dict:
        from dataclasses import asdict
        return {"model": self.model, "recipe": self.recipe, "integer_only": self.integer_only,
                "verdict": self.verdict, "dtypes": self.dtypes, "paths": [asdict(p) for p in self.paths],
                "findings": [asdict(f) for f in self.findings],
                "declared_float_steps": [dict(asdict(d), ops=list(d.ops)) for d in self.declared]}

    def to_json(self, indent: int = 1) -> str:
        import json
        return json.dumps(self.to_dict(), indent=indent) + "\n"

    def to_markdown(self, max_rows: int | None = None) -> str:
        from qswap.honesty.markdown import _table
        out = [f"# qswap integer audit: {self.model}", "",
               f"Verdict: **{self.verdict}** (recipe: {self.recipe or 'none'})", "", "## Paths covered", ""]
        out += _table(["path", "aten ops", "integer ops", "float ops (findings)"],
                      [[p.name, p.ops, p.integer_ops, p.findings] for p in self.paths])
        out += ["## Declared float steps", ""]
        out += _table(["module", "step", "ops", "count"],
                      [[d.module, d.step, ", ".join(f"`{o}`" for o in d.ops), d.count] for d in self.declared]
                      or [["-", "-", "-", 0]])
        shown = self.findings if max_rows is None else self.findings[:max_rows]
        out += [f"## Float ops outside the declared steps ({len(self.findings)})", ""]
        if self.findings:
            out += _table(["path", "module", "op", "dtypes", "count"],
                          [[f.path, f.module, f"`{f.op}`", f.dtypes, f.count] for f in shown])
        else:
            out += ["None.", ""]
        out += [f"Dtypes of the integer ops: {', '.join(self.dtypes) or 'none'}.", ""]
        return "\n".join(out)


_DECLARED_PATHS = ("get_normalized_probs (batch)", "get_normalized_probs (incremental)")


class _PathRecorder(TorchDispatchMode):
    """Records (path, module, declared step or None, op, dtypes) of every aten op."""

    def __init__(self):
        super().__init__()
        self.path, self.stack, self.records = "", [], []  # stack: (module name, declared step or None)
        self.path_module, self.path_step = "", None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs, outputs = _dtypes((args, kwargs)), _dtypes(out)
        if inputs or outputs:
            module = self.stack[-1][0] if self.stack else self.path_module
            declared = next((s for _, s in reversed(self.stack) if s), self.path_step)
            self.records.append((self.path, module, declared, str(func.overloadpacket.__name__),
                                 inputs + ("->",) + outputs))
        return out

    @contextlib.contextmanager
    def on(self, path: str, module: str, step: str | None = None):
        """Ops run inside this block belong to ``path``; outside the model's modules, to
        ``module`` (a method name); all of them declared as ``step`` when given."""
        self.path, self.path_module, self.path_step = path, module, step
        yield


def _hooks(model: nn.Module, recorder: _PathRecorder) -> list:
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue
        step = getattr(module, "declared_float_step", None)

        def enter(mod, args, name=name, step=step):
            recorder.stack.append((name, step))

        def leave(mod, args, output):
            recorder.stack.pop()
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def _seq2seq_paths(model, net_input: dict, recorder: _PathRecorder, steps: int) -> None:
    """What fairseq's SequenceGenerator runs: the batch forward and its normalization, the
    encoder once, ``reorder_encoder_out``, decoder steps with an ``incremental_state``, a beam
    reorder of the caches after the first step (rows reversed), each step's normalization."""
    prev = net_input["prev_output_tokens"]
    with recorder.on("batch forward (teacher-forced)", "forward"):
        out = model(**net_input)
    with recorder.on("get_normalized_probs (batch)", "get_normalized_probs", NORMALIZE_STEP):
        model.get_normalized_probs(out, log_probs=True)
    encoder_input = {k: v for k, v in net_input.items() if k != "prev_output_tokens"}
    with recorder.on("encoder forward", "encoder.forward"):
        encoder_out = model.encoder(**encoder_input)
    order = torch.arange(prev.size(0) - 1, -1, -1, device=prev.device)
    state: dict = {}
    steps = max(1, min(steps, prev.size(1)))
    for t in range(steps):
        if t == 1:
            with recorder.on("reorder_incremental_state (beam reorder)", "decoder.reorder_incremental_state_scripting"):
                model.decoder.reorder_incremental_state_scripting(state, order)
            with recorder.on("reorder_encoder_out", "encoder.reorder_encoder_out"):
                encoder_out = model.encoder.reorder_encoder_out(encoder_out, order)
            prev = prev.index_select(0, order)
        with recorder.on(f"incremental decoding ({steps} steps)", "decoder.forward"):
            out = model.decoder(prev[:, : t + 1], encoder_out=encoder_out, incremental_state=state)
        with recorder.on("get_normalized_probs (incremental)", "get_normalized_probs", NORMALIZE_STEP):
            model.get_normalized_probs(out, log_probs=True)


def _forward_path(model, inputs, recorder: _PathRecorder) -> None:
    """Any other integer model: its forward (a net_input dict as keywords, else one argument)."""
    with recorder.on("forward", "forward"):
        model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _integer_model(model: nn.Module) -> tuple[nn.Module, str | None]:
    """(the integer form, recipe name): ``model`` itself when it is one already (an integer model
    splits its forward into ``quantize_input`` / ``forward_codes`` / ``dequantize_output``)."""
    from qswap.integerize import integerize
    recipe = getattr(getattr(model, "qswap_recipe", None), "name", None)
    if callable(getattr(model, "forward_codes", None)):
        return model, recipe
    return integerize(model), recipe


def audit_integer(model: nn.Module, inputs, *, decode_steps: int = 3) -> IntegerAuditReport:
    """The integer audit of ``model`` (a calibrated qswap model, integerized here, or an integer
    model) on ``inputs`` (a fairseq net_input dict for an encoder-decoder, a tensor for a chain).
    Raises ``IntegerizeError`` naming what cannot be integerized.

    >>> report = audit_integer(qmodel, net_input)
    >>> report.integer_only, [(f.path, f.module, f.op) for f in report.findings]
    """
    from collections import Counter
    imodel, recipe = _integer_model(model)
    recorder = _PathRecorder()
    handles = _hooks(imodel, recorder)
    try:
        with torch.no_grad(), recorder:
            if isinstance(inputs, dict) and "prev_output_tokens" in inputs and hasattr(imodel, "decoder"):
                _seq2seq_paths(imodel, inputs, recorder, decode_steps)
            else:
                _forward_path(imodel, inputs, recorder)
    finally:
        for h in handles:
            h.remove()
    report = IntegerAuditReport(type(model).__name__, recipe)
    path_ops: dict[str, Counter] = {}
    found: Counter = Counter()
    steps: dict[tuple[str, str], Counter] = {}
    dtypes: set[str] = set()
    for path, module, declared, op, types in recorder.records:
        float_op = any(_float_name(d) for d in types if d != "->")
        kind = "declared" if declared else ("float" if float_op else "integer")
        path_ops.setdefault(path, Counter())[kind] += 1
        if kind == "declared":
            steps.setdefault((module, declared), Counter())[op] += 1
        elif kind == "float":
            found[(path, module, op, " ".join(types))] += 1
        else:
            dtypes.update(d for d in types if d != "->")
    report.paths = [IntegerPath(p, sum(c.values()), c["integer"], c["float"]) for p, c in path_ops.items()]
    report.findings = [IntegerFinding(*key, n) for key, n in found.items()]
    report.declared = [DeclaredStep(m, s, tuple(sorted(c)), sum(c.values())) for (m, s), c in steps.items()]
    report.dtypes = sorted(dtypes)
    return report
