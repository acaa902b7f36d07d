"""Export a quantized checkpoint as ONNX QDQ graphs with qswap's own grids (a deploy directory)."""
from __future__ import annotations

import argparse

from qswap.cli.render import console


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="quantized, calibrated checkpoint written by 'qswap convert'")
    p.add_argument("--onnx", action="store_true", required=True,
                   help="write ONNX QDQ graphs (the only export format)")
    p.add_argument("-o", "--output", required=True,
                   help="directory to write encoder.onnx, cross_kv.onnx, decoder_step.onnx and "
                        "export.json into")
    p.add_argument("--data", help="fairseq data directory (default: the one the checkpoint names)")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow arbitrary pickled objects")


def run(args: argparse.Namespace) -> int:
    from qswap.errors import ExportError
    from qswap.export.onnx_audit import audit_onnx
    from qswap.export.package import SITE_PREFIX, export_model, graph_paths
    from qswap.integration import data as fdata

    model, cfg, _task = fdata.load_model_cfg_task(args.checkpoint, args.data,
                                                  trust_checkpoint=args.trust_checkpoint)
    if getattr(model, "qswap_recipe", None) is None:
        raise ExportError(f"{args.checkpoint} is a float checkpoint; convert and calibrate it with "
                          f"'qswap convert --recipe R --calib-batches N' first")
    manifest = export_model(model, args.output, task_cfg=cfg.task)
    for name, path in graph_paths(args.output, manifest).items():
        report = audit_onnx(path, site_prefix=SITE_PREFIX[name])
        console().print(f"wrote {path}: {report.integer_count} integer and {report.float_count} float "
                        f"nodes after onnxruntime's CPU optimization")
    return 0
