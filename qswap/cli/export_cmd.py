"""Export a quantized checkpoint: the integer model (safetensors + JSON, the default), or ONNX
QDQ graphs with qswap's own grids (``--onnx``: a deploy directory)."""
from __future__ import annotations

import argparse
from pathlib import Path

from qswap.cli.render import console


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="quantized, calibrated checkpoint written by 'qswap convert'")
    p.add_argument("--onnx", action="store_true",
                   help="write ONNX QDQ graphs instead of the integer model")
    p.add_argument("-o", "--output", required=True,
                   help="directory to write into: model.json and model.<hash>.safetensors (the integer model, "
                        "which 'qswap eval DIR' decodes), or with --onnx encoder.onnx, cross_kv.onnx, "
                        "decoder_step.onnx (wav2vec 2.0 CTC: ctc.onnx) and export.json (which "
                        "'qswap eval DIR --backend onnxruntime' runs)")
    p.add_argument("--data", help="fairseq data directory (default: the one the checkpoint names)")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow arbitrary pickled objects")


def run(args: argparse.Namespace) -> int:
    from qswap.errors import ExportError
    from qswap.export.onnx_audit import audit_onnx
    from qswap.export.package import SITE_PREFIX, check_export_directory, export_model, graph_paths
    from qswap.integration import data as fdata

    check_export_directory(args.output, onnx=args.onnx, clear=False)  # before the checkpoint is loaded
    model, cfg, task = fdata.load_model_cfg_task(args.checkpoint, args.data, trust_checkpoint=args.trust_checkpoint)
    if getattr(model, "qswap_recipe", None) is None:
        raise ExportError(f"{args.checkpoint} is a float checkpoint; convert and calibrate it with "
                          f"'qswap convert --recipe R --calib-batches N' first")
    from qswap.calibrate import activation_quantizers
    from qswap.export.onnx import calibrated

    quantizers = activation_quantizers(model)
    if quantizers and not calibrated(quantizers):  # the library's check says so too, with the Python API's advice
        raise ExportError(f"{args.checkpoint} is not calibrated (no activation quantizer has a frozen grid); "
                          f"calibrate it first: qswap calibrate {args.checkpoint} --data DIR -o CALIBRATED.pt")
    if not args.onnx:
        return _export_integer(args, model, cfg, task)
    manifest = export_model(model, args.output, task_cfg=cfg.task, dictionary=task.target_dictionary)
    for name, path in graph_paths(args.output, manifest).items():
        report = audit_onnx(path, site_prefix=SITE_PREFIX[name])
        console().print(f"wrote {path}: {report.integer_count} integer and {report.float_count} float "
                        f"nodes after onnxruntime's CPU optimization")
    return 0


def _export_integer(args: argparse.Namespace, model, cfg, task) -> int:
    import qswap
    from qswap.export.integer_format import tensor_path, write_integer_model
    from qswap.integration.integer_decode import task_config
    from qswap.io.dictionary import dictionary_facts

    imodel = qswap.integerize(model)
    path = write_integer_model(imodel, args.output, task=task_config(cfg),
                               decoding=dictionary_facts(task.target_dictionary),
                               source=f"qswap export {Path(args.checkpoint).name} (recipe {model.qswap_recipe.name})")
    tensors = tensor_path(path.parent)
    size = path.stat().st_size + tensors.stat().st_size
    console().print(f"wrote the integer model to {path.parent} ({path.name} and {tensors.name}, "
                    f"{size / 1e6:.1f} MB); decode it with 'qswap eval {path.parent} --data DIR --subset S'")
    return 0

