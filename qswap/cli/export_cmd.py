"""Export a quantized checkpoint's encoder as an ONNX QDQ graph with qswap's own grids."""
from __future__ import annotations

import argparse
from pathlib import Path

from qswap.cli.render import console

ENCODER_FILE = "encoder.onnx"
EXAMPLE_FRAMES = 100  # the traced example's length; the graph's batch and time axes are dynamic


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="quantized, calibrated checkpoint written by 'qswap convert'")
    p.add_argument("--onnx", action="store_true", required=True,
                   help="write ONNX QDQ graphs (the only export format)")
    p.add_argument("-o", "--output", required=True, help="directory to write encoder.onnx into")
    p.add_argument("--data", help="fairseq data directory (default: the one the checkpoint names)")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow arbitrary pickled objects")


def run(args: argparse.Namespace) -> int:
    from qswap.errors import ExportError, OutputError
    from qswap.export.onnx import export_encoder
    from qswap.export.onnx_audit import audit_onnx
    from qswap.integration import data as fdata

    model, _task = fdata.load_model_and_task(args.checkpoint, args.data, trust_checkpoint=args.trust_checkpoint)
    if getattr(model, "qswap_recipe", None) is None:
        raise ExportError(f"{args.checkpoint} is a float checkpoint; convert and calibrate it with "
                          f"'qswap convert --recipe R --calib-batches N' first")
    out = Path(args.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output directory {out}: {e.strerror}") from e
    path = export_encoder(model, out / ENCODER_FILE, example_input(model))
    report = audit_onnx(path, site_prefix="encoder.")
    console().print(f"wrote {path}: {report.integer_count} integer and {report.float_count} float "
                    f"nodes after onnxruntime's CPU optimization ('qswap' deploy audit)")
    console().print("decoder: not exported yet (the step graph with cached keys and values is pending)")
    return 0


def example_input(model) -> dict:
    """A padded two-utterance batch of the features the model's encoder reads."""
    from qswap.models import s2t_net_input

    conv = model.encoder.subsample.conv_layers[0]
    return s2t_net_input(2, EXAMPLE_FRAMES, conv.weight.shape[1] * conv.groups)
