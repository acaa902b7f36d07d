"""Export a quantized checkpoint: the integer model (safetensors + JSON, the default), or the
encoder and a decoder step as ONNX QDQ graphs with qswap's own grids (``--onnx``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from qswap.cli.render import console

ENCODER_FILE, DECODER_FILE = "encoder.onnx", "decoder_step.onnx"
EXAMPLE_FRAMES = 100  # the traced example's length; the graph's batch and time axes are dynamic


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="quantized, calibrated checkpoint written by 'qswap convert'")
    p.add_argument("--onnx", action="store_true",
                   help="write ONNX QDQ graphs instead of the integer model")
    p.add_argument("-o", "--output", required=True,
                   help="directory to write into: model.json and model.safetensors (the integer model, "
                        "which 'qswap eval DIR' decodes), or with --onnx encoder.onnx and decoder_step.onnx")
    p.add_argument("--data", help="fairseq data directory (default: the one the checkpoint names)")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow arbitrary pickled objects")


def run(args: argparse.Namespace) -> int:
    import torch

    from qswap.errors import ExportError, OutputError
    from qswap.export.decoder_step import export_decoder_step
    from qswap.export.onnx import export_encoder
    from qswap.export.onnx_audit import audit_onnx
    from qswap.integration import data as fdata

    model, cfg, task = fdata.load_model_cfg_task(args.checkpoint, args.data, trust_checkpoint=args.trust_checkpoint)
    if getattr(model, "qswap_recipe", None) is None:
        raise ExportError(f"{args.checkpoint} is a float checkpoint; convert and calibrate it with "
                          f"'qswap convert --recipe R --calib-batches N' first")
    if not args.onnx:
        return _export_integer(args, model, cfg, task)
    out = Path(args.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output directory {out}: {e.strerror}") from e
    example = example_input(model)
    encoder = export_encoder(model, out / ENCODER_FILE, example)
    with torch.no_grad():
        encoded = model.encoder(example["src_tokens"], example["src_lengths"])
    decoder = export_decoder_step(model, out / DECODER_FILE, encoded["encoder_out"][0],
                                  encoded["encoder_padding_mask"][0])
    for path, prefix in ((encoder, "encoder."), (decoder, "")):
        report = audit_onnx(path, site_prefix=prefix)
        console().print(f"wrote {path}: {report.integer_count} integer and {report.float_count} float "
                        f"nodes after onnxruntime's CPU optimization")
    return 0


def _export_integer(args: argparse.Namespace, model, cfg, task) -> int:
    import qswap
    from qswap.export.integer_format import TENSOR_FILE, write_integer_model
    from qswap.integration.integer_decode import dictionary_facts, task_config

    imodel = qswap.integerize(model)
    path = write_integer_model(imodel, args.output, task=task_config(cfg),
                               decoding=dictionary_facts(task.target_dictionary),
                               source=f"qswap export {Path(args.checkpoint).name} (recipe {model.qswap_recipe.name})")
    size = sum((path.parent / name).stat().st_size for name in (path.name, TENSOR_FILE))
    console().print(f"wrote the integer model to {path.parent} ({path.name} and {TENSOR_FILE}, "
                    f"{size / 1e6:.1f} MB); decode it with 'qswap eval {path.parent} --data DIR --subset S'")
    return 0


def example_input(model) -> dict:
    """A padded two-utterance batch of the features the model's encoder reads."""
    from qswap.models import s2t_net_input

    conv = model.encoder.subsample.conv_layers[0]
    return s2t_net_input(2, EXAMPLE_FRAMES, conv.weight.shape[1] * conv.groups)
