"""fairseq tasks that quantize the model they build: ``speech_to_text_qswap`` and
``audio_finetuning_qswap``. Registered by the ``--user-dir`` plugin (``qswap.plugin_dir()``).

``build_model`` converts the freshly built model with ``--qswap-recipe`` (so ``fairseq-train``
trains the fake-quant model: QAT with straight-through / LSQ gradients, and a checkpoint it saves
loads back into the same quantized model in ``fairseq-generate``). The checkpoint fairseq-train
will load into it (found as fairseq finds it: the run's own last checkpoint with
``--checkpoint-suffix``, ``--restore-file``, ``--continue-once``, ``--finetune-from-model``) must
hold that recipe's grids, or be a float checkpoint; one that holds a recipe is refused without
``--qswap-recipe``. A recipe whose transforms need activation statistics (smoothquant) trains only
from a checkpoint ``qswap convert`` wrote with that recipe (``--finetune-from-model QCKPT``, or
the run's own checkpoint it resumes: ``qswap.integration.qat_start``), and decodes only such a
checkpoint, not a float one given ``--qswap-recipe``. ``train_step``
calibrates the activation quantizers on the batches of the first ``--qswap-calib-batches``
updates (each of the ``--update-freq`` batches of an update; observing what the recipe's
``observe`` key says: ``qswap.calibrate``), with zero gradients, and ``optimizer_step`` freezes
them after the last of those updates (synchronized across DDP workers). The count is of fairseq's
updates, so a run resumed from a checkpoint saved during calibration calibrates only the updates
left. A model whose grids are already calibrated and frozen (such a QCKPT, a run resumed after
calibration) skips it: its LSQ scales start from the stored grids. A recipe with learned scales
and no calibration updates needs such grids (else a TrainingError before the first update).
``build_generator`` prints the honesty verdict first when ``--qswap-audit`` is given. A model built
from a checkpoint (fairseq-generate) is not calibrated: ``--qswap-calib-batches`` there is ignored,
with a warning.
"""
# no ``from __future__ import annotations`` here: fairseq builds the command-line options of
# AudioFinetuningQswapConfig from its fields' types and refuses string annotations
# ("RuntimeError: field should be a type" in fairseq-train --task audio_finetuning_qswap)
import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.tasks import TASK_REGISTRY, register_task
from fairseq.tasks.audio_finetuning import AudioFinetuningConfig, AudioFinetuningTask
from fairseq.tasks.speech_to_text import SpeechToTextTask
from omegaconf import II, OmegaConf

import qswap
from qswap.transforms import STRUCTURE_ONLY
from qswap.calibrate import activation_quantizers, eval_mode, freeze_observed, observing, recipe_observe
from qswap.integration.data import resolve_data_paths
from qswap.integration.qat_start import converted_start
from qswap.recipe.loader import load_stored_recipe
from qswap.io.checkpoint import set_cfg_option
from qswap.io.dictionary import CFG_KEY as DICTIONARY_KEY, check as check_dictionary, dictionary_facts, recorded_facts

logger = logging.getLogger("qswap")

HELP = {
    "recipe": "qswap recipe (shipped name such as w8a8, or a YAML path) to convert the model with",
    "calib": "calibrate activation quantizers on the training batches of this many updates (with --update-freq K, "
             "K batches each; no weight moves) before training starts",
    "audit": "run the qswap honesty audit on a few batches before decoding and print the verdict",
    "strict": "fail if a recipe rule matches no module or the recipe leaves a module float without a skip rule",
}


class QswapTaskMixin:
    """What both qswap tasks add to their fairseq parent task."""

    def _qswap_opts(self):
        return getattr(self, "args", None) or self.cfg

    def build_model(self, cfg, from_checkpoint=False):
        # the recipe a checkpoint stores in its model cfg (read first: fairseq's dataclass models
        # drop keys they do not know while building)
        stored = getattr(cfg, "qswap_recipe", None)
        dictionary = recorded_facts(cfg)  # the target dictionary's facts a qswap or QAT checkpoint records
        opts = self._qswap_opts()
        calib = _calib_updates(opts)
        model = super().build_model(cfg, from_checkpoint)
        named = getattr(opts, "qswap_recipe", None)
        if isinstance(named, str) and not named.strip():  # it had been taken for no option: the float model
            from qswap.errors import RecipeError
            raise RecipeError("--qswap-recipe is empty: pass a shipped recipe name (w8a8, ...) or a recipe YAML "
                              "path, or leave the option out for the float model")
        # a checkpoint's own recipe first; otherwise the command line's (legacy fairseq models keep
        # every training arg in their model cfg)
        recipe = (stored or named) if from_checkpoint else (named or stored)
        # the checkpoint fairseq-train loads into the model it builds (a model rebuilt from a
        # checkpoint is that checkpoint's)
        start = None if from_checkpoint else _start_checkpoint(opts)
        if not recipe:
            if start is not None:  # a quantized checkpoint does not load into the float model
                _refuse_unnamed(start)
            given = [option for option, on in (("--qswap-calib-batches", calib),
                                               ("--qswap-strict", getattr(opts, "qswap_strict", False)),
                                               ("--qswap-audit", from_checkpoint and getattr(opts, "qswap_audit", False)))
                     if on]
            if given:  # the audit of a float model had printed its hundreds of float ops as a verdict
                from qswap.errors import TrainingError
                remedy = ("--qswap-recipe RECIPE (or --path a checkpoint 'qswap convert' wrote)" if from_checkpoint
                          else "--qswap-recipe RECIPE")
                raise TrainingError(f"{' and '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to a model qswap "
                                    f"converts: pass {remedy}")
            return model
        if not from_checkpoint:  # fairseq's EMA, where the task's options hold it (speech_to_text's)
            _refuse_ema(opts)
        if not from_checkpoint and getattr(opts, "qswap_audit", False):  # read by fairseq-generate only
            logger.warning("qswap: --qswap-audit runs before decoding (fairseq-generate); fairseq-train does not run "
                           "it: audit the trained checkpoint with 'qswap audit CKPT' or fairseq-generate --qswap-audit")
        if OmegaConf.is_config(recipe):  # a qswap checkpoint stores the recipe itself in its cfg
            recipe = OmegaConf.to_container(recipe, resolve=True)
        float_start = None
        if from_checkpoint:
            # decoded with another dictionary, it had given other words with no error
            check_dictionary(dictionary, getattr(self, "target_dictionary", None),
                             f"the model cfg of the checkpoint {getattr(opts, 'path', None) or ''}".rstrip())
            from qswap.integration.qat_start import float_checkpoint_error, load_recipe_of
            path = getattr(opts, "path", None)
            # the checkpoint's own recipe, or else --qswap-recipe's (a float checkpoint: its RecipeError as is)
            recipe = load_recipe_of(path, recipe) if stored else _named_recipe(recipe)
            if stored and named:  # --qswap-recipe must be the recipe the checkpoint holds
                _refuse_other(_named_recipe(named), recipe, f"the checkpoint {path or ''}".rstrip())
            elif not stored and recipe.transforms:
                # a float checkpoint decoded with --qswap-recipe: a checkpoint's state is taken to
                # hold transformed weights (STRUCTURE_ONLY), which a float one does not
                raise float_checkpoint_error(recipe, path, recipe_arg=named, data=getattr(opts, "data", None))
            # a checkpoint's state holds transformed weights
            data = STRUCTURE_ONLY
            # fairseq-generate: no updates to calibrate on (it had been ignored without a word); not
            # the training run's own value, which fairseq-validate's task (the checkpoint's) holds
            if calib and calib != int(getattr(cfg, "qswap_calib_batches", 0) or 0):
                how = ("'qswap calibrate CKPT --data D --batches N -o OUT'" if stored else
                       f"'qswap convert CKPT --recipe {named} --data D --calib-batches N -o OUT'")
                logger.warning(f"qswap: --qswap-calib-batches {calib} (given, or the training run's, which a task built "
                               f"from the checkpoint's config holds) is ignored: it counts fairseq-train's calibration "
                               f"updates, and a model built from a checkpoint (fairseq-generate) keeps the grids the "
                               f"checkpoint holds; to calibrate it run {how} and decode what it writes")
            calib = 0
        else:
            _check_calib_fits(calib, opts)
            recipe_arg = recipe if isinstance(recipe, str) else None
            # the command line's recipe, or the one a resumed run's cfg stores (read as stored)
            recipe = _named_recipe(recipe) if named else load_stored_recipe(recipe)
            if start is not None and os.path.isfile(start.path):  # trained on, it would be recorded as this one
                _check_start_dictionary(start, getattr(self, "target_dictionary", None))
            # a recipe with transforms (folded into the weights) is applied to a freshly built model
            # that loads a checkpoint only where that is a qswap checkpoint converted (or trained) with
            # it: the start fairseq-train loads (--finetune-from-model QCKPT, or the run's own
            # checkpoint it resumes); a float start would load untransformed weights over the
            # transformed structure (a ConvertError saying what to run). With no start, transforms
            # that need activation statistics (smoothquant) are refused too; the others (hadamard)
            # fold into the built weights. converted_start has read the start's recipe and refused
            # another (STRUCTURE_ONLY)
            reads = start is not None and bool(recipe.transforms)  # it reads the start's recipe
            data = converted_start(recipe, start and start.path, recipe_arg=recipe_arg,
                                   data=getattr(opts, "data", None), source=start and start.source,
                                   state=start.state() if reads else None)
            if start is not None and data is not STRUCTURE_ONLY:  # the checkpoint fairseq-train loads
                float_start = _check_start(recipe, start)  # next must hold this recipe's grids
        # a model rebuilt from a checkpoint: strict's checks ran when it was first converted (a
        # later qswap may check more), unless --qswap-strict asks again
        strict = getattr(opts, "qswap_strict", False) or (False if from_checkpoint else None)
        model = qswap.convert(model, recipe, inplace=True, strict=strict, data=data)
        if not from_checkpoint:  # the recipe's content (not its name or YAML path) in the model cfg
            # fairseq-train saves, so that its checkpoints rebuild the model they were trained as
            set_cfg_option(cfg, "qswap_recipe", recipe.to_dict())
            target = getattr(self, "target_dictionary", None)
            if target is not None:  # checkpoints decoded with another dictionary are refused (from_checkpoint)
                set_cfg_option(cfg, DICTIONARY_KEY, dictionary_facts(target))
        counts = model.qswap_report.counts()
        logger.info(f"qswap: converted with recipe {model.qswap_recipe.name}: {counts['quantized']} "
                    f"modules quantized, {counts['float']} left float, {counts['skipped']} skipped")
        if calib and not activation_quantizers(model):  # its "calibration" updates had trained without a word
            logger.warning(f"qswap: --qswap-calib-batches {calib}: recipe {model.qswap_recipe.name} has no activation "
                           f"quantizers, so there is nothing to calibrate: training starts at the first update")
            calib = 0
        self._qswap_calib_updates = calib
        self._qswap_calibrating = False
        self._qswap_resume_checked = from_checkpoint or not calib  # fairseq-train with calibration updates
        # fairseq-train: with no calibration updates, learned scales need calibrated grids from the
        # checkpoint it loads (checked once it has loaded it: begin_epoch)
        self._qswap_check_learned = None if from_checkpoint or calib else (
            recipe_arg or recipe.name, float_start, getattr(opts, "data", None))
        return model

    def begin_epoch(self, epoch, model):
        """fairseq-train, before an epoch's first update (the start checkpoint loaded): a recipe
        with learned activation scales (LSQ) and no calibration updates must start from calibrated,
        frozen grids; unfrozen, every training forward would set each scale from its observer
        again and throw away what the optimizer learned (a TrainingError saying what to pass)."""
        check, self._qswap_check_learned = getattr(self, "_qswap_check_learned", None), None
        if check is not None:
            _refuse_unlearnable_scales(model, *check)
        return super().begin_epoch(epoch, model)

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        if not getattr(self, "_qswap_dtype_checked", False):
            self._qswap_dtype_checked = True
            _refuse_half(model, "fairseq-train", "--fp16, --memory-efficient-fp16, --bf16 or "
                                                 "--memory-efficient-bf16 (--amp keeps float32 weights and works)")
        if update_num < getattr(self, "_qswap_calib_updates", 0):
            if self._qswap_calibration_step(model, sample):
                # a calibration batch: the loss is computed (fairseq's trainer and DDP expect a
                # backward) but multiplied by 0, so no weight moves before the grids are frozen
                with _grids_held(model):
                    return super().train_step(sample, model, _LoggedApart(criterion), optimizer, update_num,
                                              ignore_grad=True)
            if not getattr(self, "_qswap_said_calibrated", False):  # skipped by design; said once
                self._qswap_said_calibrated = True
                logger.info(f"qswap: every activation grid has its fixed range already (the checkpoint "
                            f"loaded, or a run resumed after calibration): --qswap-calib-batches "
                            f"{self._qswap_calib_updates} is skipped from update {update_num + 1} on, training runs")
        elif not getattr(self, "_qswap_resume_checked", True):
            self._qswap_resume_checked = True
            self._freeze_resumed_calibration(model, update_num)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def _freeze_resumed_calibration(self, model, update_num: int) -> None:
        """The first training update: grids still calibrating here come from a run this one resumes,
        stopped during a longer calibration (``--qswap-calib-batches`` lowered on resuming, so no
        update of this run calibrates and none froze them). Frozen on what they observed (at least
        this run's count of updates), or, with nothing observed to freeze, a TrainingError: the run
        had trained on grids observed anew at every forward, learned scales reset each time."""
        quantizers = activation_quantizers(model)
        if not _to_calibrate(quantizers) or not any(q.initialized for q in quantizers):
            return  # calibrated, or never observed (a start with no grids: begin_epoch's checks)
        frozen = freeze_observed(model)
        if frozen == 0:
            from qswap.errors import TrainingError
            raise TrainingError(f"the run resumes at update {update_num + 1}, past its {self._qswap_calib_updates} "
                                f"calibration update(s) (--qswap-calib-batches), with activation grids that are "
                                f"neither frozen nor hold observed ranges to freeze; resume with the "
                                f"--qswap-calib-batches of the run it continues, or start again")
        logger.warning(f"qswap: the run resumes at update {update_num + 1}, past its {self._qswap_calib_updates} "
                       f"calibration update(s) (--qswap-calib-batches), with grids still calibrating (the run it "
                       f"continues stopped during a longer calibration): froze {frozen} activation quantizers on "
                       f"the batches they observed; training runs")

    def valid_step(self, sample, model, criterion):
        """fairseq's validation, with every calibrated grid held still: a validation between
        calibration updates (at the end of an epoch) must not observe the validation data."""
        if not getattr(self, "_qswap_dtype_checked", False):  # fairseq-validate --fp16: no train step
            self._qswap_dtype_checked = True
            _refuse_half(model, "fairseq-validate", "--fp16 or --memory-efficient-fp16")
        with _grids_held(model):
            return super().valid_step(sample, model, criterion)

    def optimizer_step(self, optimizer, model, update_num):
        """fairseq's step; after the last calibration update (every batch of it observed, all
        gradients zero), the grids are frozen: training starts at the next update."""
        if not getattr(self, "_qswap_calibrating", False):
            return super().optimizer_step(optimizer, model, update_num)
        with _no_weight_decay(optimizer):  # a calibration update's zero gradients move nothing; decay would
            super().optimizer_step(optimizer, model, update_num)
        if update_num + 1 >= self._qswap_calib_updates:
            self._qswap_calibrating = False
            frozen = freeze_observed(model)
            n = self._qswap_calib_updates
            logger.info(f"qswap: calibrated and froze {frozen} activation quantizers on the batches of {n} "
                        f"update{'s' if n != 1 else ''} (the calibration updates moved no weight)")

    def _qswap_calibration_step(self, model, sample) -> bool:
        """Observe ``sample`` in eval mode (no dropout). False when there is nothing to calibrate
        (a resumed or already calibrated model: every quantizer with a grid is frozen; one off the
        forward path never gets a grid, e.g. wav2vec 2.0's attention-bias quantizer, and must not
        make a resumed run calibrate again, which would spend an update on a step whose zero
        gradients Adam's momentum still turns into an update)."""
        quantizers = activation_quantizers(model)
        if not _to_calibrate(quantizers):
            return False
        with eval_mode(model), torch.no_grad(), observing(quantizers, recipe_observe(model)):
            model(**sample["net_input"])
        self._qswap_calibrating = True
        return True

    def build_generator(self, models, args, *a, **kw):
        _refuse_half(models[0], "fairseq-generate", "--fp16")
        quantizers = activation_quantizers(models[0])
        observing = [q for q in quantizers if q.initialized and not bool(q.frozen)]
        if observing:
            logger.warning(f"qswap: {len(observing)} activation quantizers of the model still observe (a checkpoint "
                           f"saved before its calibration updates ended: --qswap-calib-batches larger than the "
                           f"updates run): their ranges move with the decoded batches")
        if quantizers and not any(q.initialized for q in quantizers):
            logger.warning(f"qswap: none of the model's {len(quantizers)} activation quantizers has a calibrated "
                           f"grid (a float checkpoint decoded with --qswap-recipe, or one 'qswap convert "
                           f"--no-calibrate' wrote): their ranges are computed from the decoded batches as they "
                           f"come; for fixed grids decode a checkpoint 'qswap convert CKPT --recipe R --data D "
                           f"--calib-batches N' wrote")
        if getattr(self._qswap_opts(), "qswap_audit", False):
            self._qswap_print_audit(models[0], args)
        return super().build_generator(models, args, *a, **kw)

    def load_dataset(self, split, *args, **kwargs):
        from qswap.integration.audio_rows import with_own_fbank

        self._qswap_subset = split  # fairseq-generate loads its --gen-subset, which the audit reads
        loaded = super().load_dataset(split, *args, **kwargs)
        with_own_fbank(self.datasets[split])  # audio rows where fairseq has no fbank backend
        return loaded

    def _qswap_print_audit(self, model, args):
        from qswap.integration.data import first_net_input
        # fairseq-generate passes cfg.generation, which has no gen_subset: the subset it loaded
        subset = getattr(args, "gen_subset", None) or getattr(self, "_qswap_subset", None) or "test"
        net_input = first_net_input(self, subset, count=2)
        report = qswap.audit(model, net_input)
        # honest, or honest with declared exceptions or dynamic ranges: the report's own verdict
        verdict = "HONEST" + report.verdict[len("honest"):] if report.honest else \
            f"NOT HONEST ({len(report.violations)} violations)"
        print(f"qswap audit: {verdict}; paths: {', '.join(report.paths)}", flush=True)
        for v in report.violations[:20]:
            print(f"qswap audit:   {v.module}: {v.op} ({v.operand}) {v.reason}", flush=True)


def _refuse_other(recipe, stored, where):
    from qswap.recipe import same_recipe
    if not same_recipe(stored, recipe):
        from qswap.errors import ConvertError
        raise ConvertError(f"--qswap-recipe {recipe.name} is not the recipe {stored.name} that {where} was "
                           f"converted or trained with (its grids and weights are that recipe's): pass the "
                           f"recipe it was converted with (--qswap-recipe {stored.name}), or start from a "
                           f"checkpoint converted with {recipe.name}")


class Start:
    """The checkpoint fairseq-train loads into the model it built (``path``), what made it load it
    as an error message names it (``source``), and its content, read once on first use
    (``state``: the start's checks each read it)."""

    __slots__ = ("path", "source", "_state")

    def __init__(self, path: str, source: str):
        self.path, self.source, self._state = path, source, None

    def state(self):
        if self._state is None:
            from qswap.integration.qat_start import read_start
            self._state = read_start(self.path)
        return self._state


def _start_checkpoint(opts) -> Optional[Start]:
    """The checkpoint fairseq-train loads into the model it built, found as fairseq's
    ``checkpoint_utils.load_checkpoint`` finds it: with the default --restore-file
    (checkpoint_last.pt), SAVE_DIR/checkpoint_last{--checkpoint-suffix}.pt when it exists; on a
    first launch (no such file) --continue-once, else --finetune-from-model; another
    --restore-file as given, with the suffix before its ``.pt``. None where fairseq-train loads
    nothing (no such file: it trains the model it built); a missing --finetune-from-model is
    returned (fairseq refuses it, and loading it is a CheckpointError). The --reset-* flags
    change what of a checkpoint's training state is restored, not whose weights load.
    (audio_finetuning_qswap's dataclass cfg carries these options as interpolations of fairseq's
    checkpoint section.) Not followed: the suffixes fairseq adds per worker for model-parallel,
    base-layers and sharded FSDP training."""
    restore = getattr(opts, "restore_file", None) or "checkpoint_last.pt"
    suffix = getattr(opts, "checkpoint_suffix", None) or ""
    if restore != "checkpoint_last.pt":
        path = restore.replace(".pt", suffix + ".pt")
        return Start(path, f"--restore-file {path}") if os.path.isfile(path) else None
    last = os.path.join(getattr(opts, "save_dir", None) or "checkpoints", f"checkpoint_last{suffix}.pt")
    if os.path.exists(last):
        return Start(last, f"the checkpoint {last} that fairseq-train resumes")
    once = getattr(opts, "continue_once", None)
    if once is not None:
        return Start(once, f"--continue-once {once}") if os.path.isfile(once) else None
    finetune = getattr(opts, "finetune_from_model", None)
    return Start(finetune, f"--finetune-from-model {finetune}") if finetune else None


def _check_start(recipe, start: Start) -> Optional[str]:
    """Refuse a start checkpoint converted or trained with another recipe; its path when it is a
    float checkpoint (None otherwise)."""
    from qswap.integration.qat_start import stored_recipe
    stored = stored_recipe(start.path, start.state())
    if stored is not None:
        _refuse_other(recipe, stored, f"the checkpoint {start.path}")
        return None
    return start.path


def _check_start_dictionary(start: Start, dictionary) -> None:
    """A DataError where the checkpoint fairseq-train starts from records another target
    dictionary than the task's (the run's checkpoints would record the task's, hiding it)."""
    from qswap.integration.qat_start import stored_dictionary
    check_dictionary(stored_dictionary(start.path, start.state()), dictionary, start.source)


def _named_recipe(named) -> "qswap.recipe.Recipe":
    """``--qswap-recipe``'s recipe; a RecipeError that names the option where it does not load."""
    from qswap.errors import RecipeError
    try:
        return qswap.load_recipe(named)
    except RecipeError as exc:
        raise RecipeError(f"--qswap-recipe {named}: {exc}") from None


def _refuse_unnamed(start: Start) -> None:
    """No --qswap-recipe: fairseq-train builds the float model, into which a checkpoint qswap
    converted or trained does not load (fairseq's "Cannot load model parameters" exception)."""
    from qswap.errors import TrainingError
    from qswap.integration.qat_start import stored_recipe
    from qswap.recipe.loader import shipped_recipe_names
    if not os.path.isfile(start.path):  # fairseq-train says so itself
        return
    stored = stored_recipe(start.path, start.state())
    if stored is None:
        return
    option = (f"--qswap-recipe {stored.name}" if stored.name in shipped_recipe_names() else
              f"--qswap-recipe RECIPE.yaml with its recipe {stored.name}")
    raise TrainingError(f"{start.source} holds a model quantized with qswap recipe {stored.name}, which does not "
                        f"load into the float model fairseq-train builds without --qswap-recipe: pass {option}, "
                        f"the recipe it was converted or trained with")


def _calib_updates(opts) -> int:
    calib = int(getattr(opts, "qswap_calib_batches", 0) or 0)
    if calib < 0:
        from qswap.errors import TrainingError
        raise TrainingError(f"--qswap-calib-batches {calib}: pass the number of updates whose batches calibrate "
                            f"the activation quantizers (0: none)")
    return calib


def _check_calib_fits(calib: int, opts) -> None:
    """A warning where fairseq-train stops (--max-update, where its options show it) before the
    calibration updates end: no grid is frozen, every update is a zero-gradient one, and the
    checkpoint's quantizers still observe (the run had ended with exit 0 and nothing said). Not an
    error: a run resumed with a larger --max-update goes on calibrating. As many calibration updates
    as --max-update is a calibration-only run."""
    from omegaconf.errors import OmegaConfBaseException
    try:
        max_update = getattr(opts, "max_update", None)
    except OmegaConfBaseException:  # a cfg that cannot resolve fairseq's optimization section: not known
        max_update = None
    if calib and isinstance(max_update, int) and not isinstance(max_update, bool) and 0 < max_update < calib:
        logger.warning(f"qswap: --qswap-calib-batches {calib} is more than --max-update {max_update}: this run ends "
                       f"before calibration does (no grid frozen, no weight trained; a run resumed with a larger "
                       f"--max-update goes on calibrating): pass --qswap-calib-batches {max_update} or fewer, or a "
                       f"larger --max-update")


@contextlib.contextmanager
def _no_weight_decay(optimizer):
    """``optimizer``'s parameter groups with weight decay 0 (restored after): fairseq's optimizers
    decay every parameter at each step, gradient or not, and a calibration update (loss times 0)
    had shrunk every weight and learned scale by ``lr * weight_decay`` while the log said no weight
    moved (the step itself is still taken: an AMP grad scaler expects it)."""
    groups = list(getattr(optimizer, "param_groups", None) or [])
    saved = [g.get("weight_decay") for g in groups]
    for g in groups:
        if "weight_decay" in g:
            g["weight_decay"] = 0.0
    try:
        yield
    finally:
        for g, wd in zip(groups, saved):
            if wd is not None:
                g["weight_decay"] = wd


class _LoggedApart:
    """``criterion`` whose logging output holds copies of its tensors: a calibration update's loss
    is multiplied by 0 in place (fairseq's ``ignore_grad``), and a criterion that logs the loss
    tensor itself (label-smoothed cross entropy) had logged 0 for every calibration update.
    Attributes are the criterion's (speech_to_text's multitask weights are set on it)."""

    def __init__(self, criterion):
        self.criterion = criterion

    def __call__(self, *args, **kwargs):
        loss, sample_size, logging_output = self.criterion(*args, **kwargs)
        return loss, sample_size, _copied(logging_output)

    def __getattr__(self, name):
        return getattr(self.criterion, name)


def _copied(value):
    """``value`` with every tensor in it copied (dicts, lists and tuples walked)."""
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_copied(v) for v in value)
    return value


def _refuse_half(model, tool: str, options: str) -> None:
    """A TrainingError where fairseq cast a quantized ``model`` to half precision: qswap's
    quantizers keep float32 grids and biases, and the first forward had failed deep inside with
    torch's dtype error."""
    from qswap.quant.fake_quantize import FakeQuantize

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if dtype in (torch.float16, torch.bfloat16) and any(isinstance(m, FakeQuantize) for m in model.modules()):
        from qswap.errors import TrainingError
        raise TrainingError(f"{tool} cast the quantized model to {str(dtype).replace('torch.', '')}; qswap's fake "
                            f"quantization computes in float32 (its grids, scales and quantized biases): drop "
                            f"{options}")


def _refuse_ema(opts) -> None:
    """A TrainingError for ``--store-ema``: fairseq's EMA averages every entry of the model's state
    dict, the quantizers' integer zero points, frozen flags and observer counts among them (it
    failed at the first update with torch's cast error; an average of frozen flags means nothing)."""
    if getattr(opts, "store_ema", False):
        from qswap.errors import TrainingError
        raise TrainingError("--store-ema keeps an exponential moving average of every entry of the model's state "
                            "dict, which for a quantized model includes its quantizers' integer zero points and "
                            "frozen flags: drop --store-ema for a run with --qswap-recipe")


def _to_calibrate(quantizers) -> bool:
    """Whether ``quantizers`` (a model's activation quantizers) are to be calibrated: False when
    there are none or every one with a grid is frozen (one off the forward path never gets a
    grid, e.g. wav2vec 2.0's attention-bias quantizer, and does not count)."""
    observed = [q for q in quantizers if q.initialized]
    return bool(quantizers) and not (observed and all(bool(q.frozen) for q in observed))


def _refuse_unlearnable_scales(model, recipe_arg, float_start, data) -> None:
    """Learned scales with no calibrated grid: a TrainingError. Fixed ones: a warning, since the run
    trains on grids that move (every training forward observed, dropout on, none ever frozen: the
    run had ended with exit 0 and nothing said)."""
    quantizers = activation_quantizers(model)
    if not _to_calibrate(quantizers):
        return
    if not any(q.spec.learnable for q in quantizers):
        logger.warning(f"qswap: recipe {model.qswap_recipe.name} with no calibration updates (--qswap-calib-batches 0) "
                       f"and no calibrated start checkpoint: its {len(quantizers)} activation quantizers observe "
                       f"every training batch (dropout on) and none is ever frozen, so the model trains on grids "
                       f"that move; pass --qswap-calib-batches N (the first N updates calibrate, e.g. 4), or "
                       f"fine-tune from a calibrated checkpoint (--finetune-from-model QCKPT)")
        return
    from qswap.errors import TrainingError
    from qswap.integration.qat_start import convert_command
    raise TrainingError(f"recipe {model.qswap_recipe.name} learns its activation scales (LSQ) from calibrated, "
                        f"frozen grids, and neither --qswap-calib-batches (0) nor the checkpoint fairseq-train "
                        f"loaded gives them: every training forward would set each scale from its observer "
                        f"again, and nothing would be learned. Pass --qswap-calib-batches N (the first N updates "
                        f"calibrate, e.g. 4), or fine-tune from a calibrated checkpoint, "
                        f"`{convert_command(recipe_arg, float_start, data)}` (--finetune-from-model QCKPT)")


@contextlib.contextmanager
def _grids_held(model):
    """Hold every calibrated activation grid still (frozen) for one training forward, so the
    dropout-perturbed activations of a calibration step's zero-weighted loss are not observed; and
    the running statistics of its batch norms (a conformer's), which a training forward updates:
    a calibration update had moved them (and the grids observed the moving statistics), where it
    moves no weight."""
    held = [q for q in activation_quantizers(model) if q.initialized and not bool(q.frozen)]
    statistics = [(t, t.clone()) for m in model.modules()
                  for name in ("running_mean", "running_var", "num_batches_tracked")
                  if isinstance(t := getattr(m, name, None), torch.Tensor)]
    for q in held:
        q.frozen.fill_(True)
    try:
        yield
    finally:
        for q in held:
            q.frozen.fill_(False)
        with torch.no_grad():
            for t, kept in statistics:
                t.copy_(kept)


class SpeechToTextQswapTask(QswapTaskMixin, SpeechToTextTask):
    def __init__(self, args, tgt_dict):
        super().__init__(args, tgt_dict)
        resolve_data_paths(self.data_cfg)

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        parser.add_argument("--qswap-recipe", type=str, default=None, metavar="RECIPE", help=HELP["recipe"])
        parser.add_argument("--qswap-calib-batches", type=int, default=0, metavar="N", help=HELP["calib"])
        parser.add_argument("--qswap-audit", action="store_true", help=HELP["audit"])
        parser.add_argument("--qswap-strict", action="store_true", help=HELP["strict"])


@dataclass
class AudioFinetuningQswapConfig(AudioFinetuningConfig):
    qswap_recipe: Optional[str] = field(default=None, metadata={"help": HELP["recipe"]})
    qswap_calib_batches: int = field(default=0, metadata={"help": HELP["calib"]})
    qswap_audit: bool = field(default=False, metadata={"help": HELP["audit"]})
    qswap_strict: bool = field(default=False, metadata={"help": HELP["strict"]})
    # fairseq's own --finetune-from-model (no option of its own: fairseq skips an interpolated
    # field without help), which build_model reads for a recipe with data-dependent transforms
    finetune_from_model: Optional[str] = II("checkpoint.finetune_from_model")
    # and fairseq's --save-dir / --restore-file, so that build_model finds the checkpoint a resumed
    # run loads (SAVE_DIR/checkpoint_last.pt) and refuses one trained with another recipe, as for
    # speech_to_text_qswap (whose args carry them); a checkpoint stores them resolved, as plain
    # values, and one saved without them loads as before (a rebuilt model never reads them)
    save_dir: str = II("checkpoint.save_dir")
    restore_file: str = II("checkpoint.restore_file")
    # and --checkpoint-suffix / --continue-once, which fairseq's loader reads as well
    checkpoint_suffix: str = II("checkpoint.checkpoint_suffix")
    continue_once: Optional[str] = II("checkpoint.continue_once")
    # and --max-update: more --qswap-calib-batches than the run's updates is said (_check_calib_fits)
    max_update: int = II("optimization.max_update")


class AudioFinetuningQswapTask(QswapTaskMixin, AudioFinetuningTask):
    pass


def allow_fairseq_checkpoints() -> None:
    """Let fairseq's own ``torch.load`` calls (``--finetune-from-model``, ``--path``, resuming)
    read fairseq checkpoints under torch >= 2.6, whose ``weights_only=True`` default refuses
    ``argparse.Namespace`` and OmegaConf containers. This adds qswap's allowlist of exactly those
    classes (``qswap.io.checkpoint.allowed_globals``) for the fairseq process that loaded the
    plugin: still ``weights_only`` loading, never arbitrary pickles. Distributed training also
    sends the loaded checkpoint from rank 0 to the others through ``torch.load`` with tensors
    swapped for fairseq's ``_TensorPlaceholder`` (a plain index record), allowed too. (fairseq's
    ``Dictionary``, which ``audio_finetuning`` checkpoints pickle, is in ``allowed_globals``.)"""
    from fairseq.distributed.utils import _TensorPlaceholder

    from qswap.io.checkpoint import allowed_globals
    torch.serialization.add_safe_globals(allowed_globals() + [_TensorPlaceholder])


def register_tasks() -> None:
    """Register both tasks once; importing the plugin twice must not crash."""
    if "speech_to_text_qswap" not in TASK_REGISTRY:
        register_task("speech_to_text_qswap")(SpeechToTextQswapTask)
    if "audio_finetuning_qswap" not in TASK_REGISTRY:
        register_task("audio_finetuning_qswap", dataclass=AudioFinetuningQswapConfig)(AudioFinetuningQswapTask)
