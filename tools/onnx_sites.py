#!/usr/bin/env python3
"""Site by site: where an exported graph, run by onnxruntime, writes other codes than the
fake-quant model on the same input (issue 18's deployment agreement).

Every activation ``QuantizeLinear`` of the graph becomes a graph output (its codes); the
fake-quant model runs on the same input with a hook on every activation quantizer (its codes:
output / scale). Each site's codes are compared in grid steps, in the graph's node order, with
onnxruntime at the optimization level asked for (``disabled``: ONNX's float ops as written;
``extended``/``all``: onnxruntime's QDQ fusions, what ``qswap eval --backend onnxruntime``
runs). A site the graph quantizes and the fake-quant model does not (or under another module
name) is counted as having no reference. The first site more than one step away is where a
deployment computes something else than rounding ties explain.

    python tools/onnx_sites.py --recipe w8a8 --graph encoder --utterances 1 --level extended
    python tools/onnx_sites.py --recipe w8a8 --graph decoder_step --steps 12 --level all
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
ASSET = REPO / "qswap" / "assets" / "s2t_demo"


@dataclass
class Site:
    """One activation site's comparison: codes compared, codes different, the largest difference."""

    name: str
    codes: int = 0
    different: int = 0
    largest: float = 0.0


@dataclass
class SiteTable:
    """Every site of one graph, in node order; ``missing``: sites with no fake-quant reference."""

    sites: list[Site] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def first_beyond(self, steps: float = 1.0) -> "Site | None":
        """The first site (node order) whose codes differ by more than ``steps``."""
        return next((s for s in self.sites if s.largest > steps), None)

    def render(self, title: str) -> str:
        lines = [title, "", "| site | codes | different | largest (steps) |", "|---|---:|---:|---:|"]
        lines += [f"| {s.name} | {s.codes} | {s.different} | {s.largest:g} |" for s in self.sites if s.different]
        same = sum(1 for s in self.sites if not s.different)
        first = self.first_beyond()
        lines += ["", f"{same} of {len(self.sites)} sites give the same codes; first site more than one step "
                      f"away: {first.name if first else 'none'}; no fake-quant reference: {len(self.missing)}"]
        return "\n".join(lines)


def graph_sites(graph_path, prefix: str = "") -> list[tuple[str, str, str]]:
    """(site, codes value name, zero point name) of every activation QuantizeLinear (one read by a
    DequantizeLinear, by the Flatten before a linear layer's: ``graph_passes.linear_as_gemm``, or
    by the Concat of a cache's codes: ``graph_passes.code_caches``), in node order. ``site`` is the
    quantized model's module path of the node, as the deploy audit names it: from the graph's
    recorded site map (``qswap.export.sites``), or for a graph written without one, the path its
    node name spells after ``prefix``. A grid with fewer codes than uint8's (4-bit) has its
    codes clipped to the grid's after the QuantizeLinear (``qswap.export.qdq``): the site's codes
    are the Clip's output."""
    import onnx

    from qswap.export.onnx_audit import site_of
    from qswap.export.sites import from_metadata, site_in

    model = onnx.load(str(graph_path))
    graph = model.graph
    recorded = from_metadata({p.key: p.value for p in model.metadata_props})
    readers = {name for node in graph.node if node.op_type == "DequantizeLinear" for name in node.input[:1]}
    readers |= {node.input[0] for node in graph.node if node.op_type == "Flatten" and node.output[0] in readers}
    readers |= {name for node in graph.node if node.op_type == "Concat" and node.output[0] in readers
                for name in node.input}
    clipped = {node.input[0]: node.output[0] for node in graph.node if node.op_type == "Clip"}
    sites = []
    for n in graph.node:
        codes = clipped.get(n.output[0], n.output[0]) if n.op_type == "QuantizeLinear" else None
        if codes is not None and codes in readers and len(n.input) > 2:
            site = site_of(n.name, prefix) if recorded is None else site_in(n.name, recorded)
            sites.append((site, codes, n.input[2]))
    return sites


class GraphCodes:
    """An onnxruntime session of ``graph_path`` (qswap's session options, ``level``) whose outputs
    are the graph's own outputs followed by every activation site's codes minus its zero point."""

    def __init__(self, graph_path, level: str, prefix: str = ""):
        import onnx
        from onnx import numpy_helper

        from qswap.export.onnx import load_session

        model = onnx.load(str(graph_path))
        self.outputs = [o.name for o in model.graph.output]
        self.sites = graph_sites(graph_path, prefix)
        for _, codes, _ in self.sites:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(codes))
        initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.zeros = [initializers[zero].astype(np.int64) for _, _, zero in self.sites]
        with tempfile.TemporaryDirectory(prefix="qswap-sites-") as tmp:
            path = Path(tmp) / "graph.onnx"
            onnx.save(model, str(path))
            self.session = load_session(path, level=level)

    def run(self, feeds: dict) -> tuple[list, dict[str, list[np.ndarray]]]:
        """The graph's outputs and {site: [codes - zero point, ...]} (one entry per quantizer call)."""
        values = self.session.run(self.outputs + [codes for _, codes, _ in self.sites], feeds)
        found: dict[str, list[np.ndarray]] = {}
        for (site, _, _), zero, codes in zip(self.sites, self.zeros, values[len(self.outputs):]):
            found.setdefault(site, []).append(codes.astype(np.int64) - zero)
        return values[:len(self.outputs)], found


class FakeQuantCodes:
    """Forward hooks on every enabled activation quantizer of ``model`` (named ``prefix`` + its
    path): their outputs as codes minus zero point (per-tensor grids), call after call."""

    def __init__(self, model: torch.nn.Module, prefix: str = ""):
        from qswap.quant.fake_quantize import FakeQuantize

        self.found: dict[str, list[np.ndarray]] = {}
        self.hooks = []
        for name, module in model.named_modules():
            if isinstance(module, FakeQuantize) and module.kind == "activation" and module.enabled \
                    and module.initialized and module.scale.numel() == 1:
                self.hooks.append(module.register_forward_hook(self._hook(prefix + name)))

    def _hook(self, site: str):
        def record(module, args, out):
            self.found.setdefault(site, []).append(torch.round(out.detach() / module.scale).to(torch.int64).numpy())
        return record

    def clear(self) -> None:
        self.found = {}

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def compare(table: SiteTable, graph: dict, reference: dict) -> None:
    """Add one run's codes to ``table``: each graph site against the reference call of the same
    site and size (the k-th such call for the k-th time the graph quantizes the site)."""
    names = {s.name: s for s in table.sites}
    for site, calls in graph.items():
        for k, codes in enumerate(calls):
            candidates = [r for r in reference.get(site, []) if r.size == codes.size]
            if not candidates:
                if site not in table.missing:
                    table.missing.append(site)
                continue
            ref = candidates[min(k, len(candidates) - 1)]
            diff = np.abs(codes.reshape(-1) - ref.reshape(-1))
            row = names.get(site)
            if row is None:
                row = names[site] = Site(site)
                table.sites.append(row)
            row.codes += diff.size
            row.different += int((diff != 0).sum())
            row.largest = max(row.largest, float(diff.max()) if diff.size else 0.0)


def encoder_table(qmodel, graph_path, net_input: dict, level: str) -> SiteTable:
    """The encoder graph's sites against ``qmodel.encoder`` on ``net_input`` (all frames: pass
    one utterance, or utterances of one length, to leave padding out)."""
    from qswap.nn.simulate import simulating

    graph = GraphCodes(graph_path, level, prefix="encoder.")
    reference = FakeQuantCodes(qmodel.encoder, prefix="encoder.")
    try:
        with torch.no_grad(), simulating(qmodel, "float"):  # what a QDQ graph computes
            qmodel.encoder(net_input["src_tokens"], net_input["src_lengths"])
    finally:
        reference.remove()
    _, found = graph.run({"src_tokens": net_input["src_tokens"].numpy(),
                          "src_lengths": net_input["src_lengths"].numpy()})
    table = SiteTable()
    compare(table, found, reference.found)
    return table


def decoder_step_table(qmodel, graph_path, encoder_out: dict, tokens: torch.Tensor, level: str) -> SiteTable:
    """The step graph's sites against fairseq's incremental decoder on ``qmodel``, step after step
    through ``tokens`` (B, T), each side feeding back its own caches; ``encoder_out`` is the
    fake-quant encoder's output (its padding mask present)."""
    from qswap.export.decoder_step import CrossKVGraph, empty_cache, names
    from qswap.nn.simulate import simulating

    layers = len(qmodel.decoder.layers)
    inputs, outputs = names(layers)
    graph = GraphCodes(graph_path, level)
    reference = FakeQuantCodes(qmodel)
    table, state = SiteTable(), {}
    with torch.no_grad(), simulating(qmodel, "float"):  # what a QDQ graph computes
        cross = [c.numpy() for c in CrossKVGraph(qmodel)(encoder_out["encoder_out"][0])]
    cache = [c.numpy() for c in empty_cache(qmodel, tokens.shape[0])]
    try:
        for t in range(1, tokens.shape[1] + 1):
            reference.clear()
            with torch.no_grad(), simulating(qmodel, "float"):  # what a QDQ graph computes
                logits, _ = qmodel.decoder(tokens[:, :t], encoder_out=encoder_out, incremental_state=state)
                qmodel.logits_quant(logits)
            feeds = {"tokens": tokens[:, :t].numpy(),
                     "encoder_padding_mask": encoder_out["encoder_padding_mask"][0].numpy(),
                     **dict(zip(inputs[2:2 + 2 * layers], cache)), **dict(zip(inputs[2 + 2 * layers:], cross))}
            (_, *cache), found = graph.run(feeds)
            compare(table, found, reference.found)
    finally:
        reference.remove()
    return table


def with_padding_mask(encoder_out: dict) -> dict:
    """fairseq leaves ``encoder_padding_mask`` empty for a batch without padding; the step graph
    reads one."""
    if encoder_out["encoder_padding_mask"]:
        return encoder_out
    out = encoder_out["encoder_out"][0]  # (S, B, E)
    return {**encoder_out, "encoder_padding_mask": [torch.zeros(out.shape[1], out.shape[0], dtype=torch.bool)]}


def first_utterances(task, subset: str, count: int) -> dict:
    """The ``net_input`` of the first ``count`` utterances of ``subset``'s first batch (of the
    default size, as the WER decodes batch it), cut to the longest of them."""
    from qswap.integration import data as fdata

    net = next(iter(fdata.batches(task, subset)))["net_input"]
    lengths = net["src_lengths"][:count]
    frames = int(lengths.max())
    return {"src_tokens": net["src_tokens"][:count, :frames], "src_lengths": lengths,
            "prev_output_tokens": net["prev_output_tokens"][:count]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="w8a8", help="a shipped recipe, or 'searched'")
    ap.add_argument("--graph", choices=("encoder", "decoder_step"), default="encoder")
    ap.add_argument("--subset", default="test")
    ap.add_argument("--utterances", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12, help="decoder steps (reference tokens)")
    ap.add_argument("--level", choices=("disabled", "basic", "extended", "all"), default="extended")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    import deploy_doc

    from qswap.export.package import export_model
    from qswap.integration import data as fdata
    from qswap.nn.simulate import simulating

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    model, cfg, task = fdata.load_model_cfg_task(ASSET / "checkpoint.pt", ASSET)
    calib = list(fdata.net_inputs(task, "train_calib", deploy_doc.CALIB_BATCHES))
    qmodel = deploy_doc.calibrated(model, deploy_doc.WER_RECIPES.get(args.recipe, args.recipe), calib)
    net = first_utterances(task, args.subset, args.utterances)
    with tempfile.TemporaryDirectory(prefix="qswap-sites-") as tmp:
        export_model(qmodel, tmp, audit=False)
        path = Path(tmp) / f"{args.graph}.onnx"
        if args.graph == "encoder":
            table = encoder_table(qmodel, path, net, args.level)
        else:
            with torch.no_grad(), simulating(qmodel, "float"):  # what a QDQ graph computes
                encoder_out = with_padding_mask(qmodel.encoder(net["src_tokens"], net["src_lengths"]))
            table = decoder_step_table(qmodel, path, encoder_out, net["prev_output_tokens"][:, :args.steps], args.level)
    print(table.render(f"{args.recipe}, {args.graph}, onnxruntime level {args.level}, first {args.utterances} "
                       f"`{args.subset}` utterance(s): sites whose codes differ from the fake-quant model's"))


if __name__ == "__main__":
    main()
