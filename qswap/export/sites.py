"""Which module of the quantized model each node of an exported graph came from.

torch's ONNX exporter names a node after the modules whose calls it ran in: one name per call
on the way down from the exported module, each the module's *unqualified* name in the exported
module's tree (its last attribute name, with the indices after it: ``layers.0``,
``conv_layers.0.2``), then the op (``/layers.0/self_attn/k_proj/MatMul``). The graphs qswap
exports are wrappers that call the model's modules directly (``CtcGraph`` calls
``w2v_encoder.w2v_model.encoder.layers[i]``, ``CrossKVGraph`` each layer's ``encoder_attn``), so
the names skip the modules in between, and a module path cannot be read back from them. A
scope path that two calls share gets ``_1``, ``_2``... after its last part, in the order of the
graph's nodes (torch's ``ScopedNodeNameGenerator``).

``ScopeRecorder`` records, while torch traces the wrapper, each call's chain of modules (the
scopes torch pushes: the modules of the wrapper's own tree, called through ``__call__``);
``site_map`` turns the chains into a map from each scope path the written graph's node names
hold to the path of the very module object in the model (by identity: the wrapper holds the
model's modules). Where one scope path holds calls of different modules, the calls take its
numbered variants in the order they ran, when the graph holds as many variants as there were
calls; otherwise those variants are left out of the map (a node there is credited to no module,
never to a wrong one). The map travels inside the graph file, in its metadata under
``METADATA_KEY`` (JSON), written atomically with it; ``site_in`` reads a node's site from it.
"""
from __future__ import annotations

import json

import torch
from torch import nn

METADATA_KEY = "qswap.sites"


def unqualified(name: str) -> str:
    """The scope name torch's ONNX exporter gives a module at ``name`` in the exported module
    (``torch.onnx``'s ``_unqualified_variable_name``): from its last part that is not an index,
    ``model.encoder.layers.0`` -> ``layers.0``; the exported module itself ("") -> ""."""
    atoms = name.split(".")
    for i in range(len(atoms) - 1, -1, -1):
        if not atoms[i].isnumeric():
            return ".".join(atoms[i:])
    return name


class ScopeRecorder:
    """While torch traces ``graph`` (``with ScopeRecorder(graph) as recorder: torch.onnx.export(graph,
    ...)``), each module call's chain of modules from ``graph`` down, in the order of the calls
    (``recorder.calls``). Calls outside a trace are not recorded (an eager forward)."""

    def __init__(self, graph: nn.Module):
        self.graph = graph
        self.calls: list[tuple[nn.Module, ...]] = []
        self._stack: list[nn.Module] = []
        self._handles: list = []

    def __enter__(self) -> "ScopeRecorder":
        for module in self.graph.modules():  # the modules torch pushes a scope for: its trace map's
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._leave, always_call=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _enter(self, module: nn.Module, args) -> None:
        if not torch.jit.is_tracing():
            return
        self._stack.append(module)
        self.calls.append(tuple(self._stack))

    def _leave(self, module: nn.Module, args, output) -> None:
        if self._stack and self._stack[-1] is module:
            self._stack.pop()

    # torch's tracer pushes a module's scope in ``nn.Module.__call__``: a counterpart that runs a
    # container's children itself (``direct_call.with_own_hooks``: a conformer layer's ffn1) runs
    # the container's own hooks but not these, or its children's nodes would be looked up under a
    # scope no node name has
    _enter.module_call_only = _leave.module_call_only = True


def scope_paths(node_names) -> set[str]:
    """The scope paths of torch-named nodes (``/a/b/Conv`` -> ``a/b``; nodes of the exported
    module's own scope, ``/Add``, and names of other forms have none)."""
    paths = set()
    for name in node_names:
        parts = name.split("/")
        if len(parts) > 2 and parts[0] == "":
            paths.add("/".join(parts[1:-1]))
    return paths


def site_map(graph: nn.Module, calls, model: nn.Module, prefix: str, node_names) -> dict[str, str]:
    """Each scope path of ``node_names`` (the exported graph's nodes, as torch named them) -> the
    path of its module in the quantized model. ``graph``: the traced wrapper; ``calls``: its
    ``ScopeRecorder.calls``; ``model``: the module (in ``graph``'s tree or beside it, holding the
    same module objects) whose ``named_modules`` paths, after ``prefix``, are the quantized
    model's (``"encoder."`` for an exported encoder). A module that is not in ``model`` (the
    wrapper's own) names no site."""
    in_graph = {id(m): name for name, m in graph.named_modules()}  # torch's trace map: first path wins
    real: dict[int, str] = {}
    for name, m in model.named_modules():
        real.setdefault(id(m), f"{prefix}{name}" if name else prefix.rstrip("."))
    by_scope: dict[str, list[str | None]] = {}
    for chain in calls:
        scope = "/".join(unqualified(in_graph[id(m)]) for m in chain[1:])
        if scope:
            by_scope.setdefault(scope, []).append(real.get(id(chain[-1])) or None)
    named = scope_paths(node_names)
    out: dict[str, str] = {}
    dropped: set[str] = set()
    for scope, sites in by_scope.items():
        variants = sorted((v for v in named if v == scope or _numbered(v, scope)), key=lambda v: _index(v, scope))
        if len(set(sites)) == 1:
            pairs = [(v, sites[0]) for v in variants]
        elif len(variants) == len(sites) and [_index(v, scope) for v in variants] == list(range(len(sites))):
            pairs = list(zip(variants, sites))
        else:
            continue  # calls of different modules, not all in the graph: which variant is whose is unknown
        for variant, site in pairs:
            if variant in out and out[variant] != site:
                dropped.add(variant)  # a numbered variant that is also another scope's own path
            elif site is not None:
                out[variant] = site
    return {k: v for k, v in out.items() if k not in dropped}


def _numbered(variant: str, scope: str) -> bool:
    return variant.startswith(scope + "_") and variant[len(scope) + 1:].isdigit()


def _index(variant: str, scope: str) -> int:
    return 0 if variant == scope else int(variant[len(scope) + 1:])


def site_in(node_name: str, sites: dict[str, str]) -> str:
    """The site of a node of a graph whose ``sites`` map is known: that of the longest scope path
    its name starts with (onnxruntime names a fused node after the node the fusion starts from,
    ``/layers.0/self_attn/core/MatMul/MatMulScaleFusion/``); "" where none is in the map."""
    parts = node_name.split("/")
    if len(parts) < 3 or parts[0] != "":
        return ""
    for end in range(len(parts) - 1, 1, -1):
        site = sites.get("/".join(parts[1:end]))
        if site is not None:
            return site
    return ""


def to_metadata(sites: dict[str, str]) -> str:
    return json.dumps(sites, sort_keys=True, separators=(",", ":"))


def from_metadata(metadata: dict[str, str]) -> dict[str, str] | None:
    """The site map of a graph's metadata (``custom_metadata_map`` of its onnxruntime session), or
    None where it has none (a graph written before qswap recorded it) or an unreadable one."""
    text = metadata.get(METADATA_KEY)
    if text is None:
        return None
    try:
        sites = json.loads(text)
    except ValueError:
        return None
    if not isinstance(sites, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sites.items()):
        return None
    return sites

