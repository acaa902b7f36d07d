"""Re-calibrate the activation quantizers of a quantized checkpoint on a data subset."""
from __future__ import annotations

import argparse

from qswap.calibrate import OBSERVE  # `import qswap` has imported torch already: free here
from qswap.cli.args import MAX_SENTENCES, POSITIVE
from qswap.cli.render import console, progress_bar


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="quantized checkpoint written by 'qswap convert' or QAT")
    p.add_argument("--data", required=True, help="fairseq data directory")
    p.add_argument("--subset", default="train", help="calibration subset (default: train)")
    p.add_argument("--batches", type=POSITIVE, default=16, help="calibration batches (default: 16)")
    p.add_argument("--max-sentences", type=POSITIVE, default=MAX_SENTENCES, help="utterances per batch")
    p.add_argument("--observe", choices=OBSERVE,
                   help="what each activation quantizer observes: the quantized model's activations "
                        "(quantized) or those of the model with its activation sites in float, as torch.ao "
                        "and Brevitas calibrate (float; faster); default: the recipe's observe key "
                        "(quantized unless it says float)")
    p.add_argument("-o", "--output", required=True, help="calibrated checkpoint to write (atomically)")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow arbitrary pickled objects")


def run(args: argparse.Namespace) -> int:
    import qswap
    from qswap.calibrate import activation_quantizers, observed_note, recipe_observe
    from qswap.errors import CalibrationError
    from qswap.integration import data as fdata
    from qswap.io.checkpoint import save_qswap_checkpoint

    model, task = fdata.load_model_and_task(args.checkpoint, args.data, trust_checkpoint=args.trust_checkpoint)
    if getattr(model, "qswap_recipe", None) is None:
        raise CalibrationError(f"{args.checkpoint} is a float checkpoint; use 'qswap convert --recipe R "
                               f"--calib-batches N' to convert and calibrate it")
    if not activation_quantizers(model):  # it had run the batches and rewritten the file, calibrating nothing
        raise CalibrationError(f"{args.checkpoint} (recipe {model.qswap_recipe.name}) has no activation quantizers: "
                               f"nothing to calibrate (its weight grids come from the weights); a recipe that "
                               f"quantizes activations is converted with 'qswap convert --recipe R --calib-batches N'")
    with progress_bar("calibrating", args.batches) as advance:
        used = qswap.calibrate(model, fdata.net_inputs(task, args.subset, args.batches,
                                                       max_sentences=args.max_sentences),
                               progress=lambda n: advance(1), observe=args.observe)
    save_qswap_checkpoint(args.output, model, args.checkpoint, trust_checkpoint=args.trust_checkpoint,
                          data=args.data, dictionary=task.target_dictionary)
    observe = args.observe or recipe_observe(model)
    console().print(f"calibrated on {used} batches of {args.subset}{observed_note(observe)}; wrote {args.output}")
    return 0
