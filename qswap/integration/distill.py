"""Knowledge distillation for QAT: the fairseq criterion ``qswap_distill``.

fairseq-train with ``--criterion qswap_distill --distill-teacher CKPT`` trains the quantized
model on a mixture of fairseq's label-smoothed cross entropy and the distance of its output
distributions from a teacher's (usually the float model the quantized one was converted from):

    loss = (1 - alpha) * label_smoothed_ce  +  alpha * tau^2 * sum_t KL(p_teacher,t || p_student,t)

summed over the target tokens that are not padding (fairseq's convention: the trainer divides
by the sample size), with ``p = softmax(logits / tau)`` for both models at every teacher-forced
position. The student's term reads its logits (``net_output[0]``, on the logits grid when the
recipe quantizes them), the teacher's are computed under ``torch.no_grad`` in eval mode (no
dropout). ``alpha = 0`` is fairseq's ``label_smoothed_cross_entropy``, to the last bit.

The teacher is loaded once per process from a fairseq or qswap checkpoint with the task's data
directory (so over the task's dictionary), and is kept out of the criterion's modules:
its parameters are neither trained nor saved into the run's checkpoints (the run's saved config
names the teacher: ``fairseq-validate`` on a checkpoint loads it again). The log shows the two
terms per sample-size unit (per token; per sentence with ``--sentence-avg``, as fairseq's
``loss``), ``ce_loss`` and ``kd_loss``, in base 2 beside the mixture; the validation ``loss``, by
which fairseq picks ``checkpoint_best.pt``, is the mixture.
"""
# no ``from __future__ import annotations``: fairseq builds the criterion's command-line options
# from the config dataclass's field types and refuses string annotations
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq.criterions import CRITERION_REGISTRY, register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.logging import metrics

from qswap.calibrate import activation_quantizers
from qswap.errors import CheckpointError, DataError, TrainingError

NAME = "qswap_distill"
DEFAULT_ALPHA = 0.5  # the distillation term's weight
DEFAULT_TEMPERATURE = 1.0
TEMPERATURES = (0.01, 100.0)  # the distillation temperatures taken: 1e-45 and 1e30 made the loss NaN


@dataclass
class DistillConfig(LabelSmoothedCrossEntropyCriterionConfig):
    distill_teacher: str = field(default="", metadata={
        "help": "checkpoint of the teacher (the float model the quantized one was converted from)"})
    distill_alpha: float = field(default=DEFAULT_ALPHA, metadata={
        "help": "weight of the distillation term; 1 - alpha weighs the label-smoothed cross entropy"})
    distill_temperature: float = field(default=DEFAULT_TEMPERATURE, metadata={
        "help": f"softmax temperature of both models' distributions in the distillation term "
                f"({TEMPERATURES[0]:g} to {TEMPERATURES[1]:g})"})


class DistillCriterion(LabelSmoothedCrossEntropyCriterion):
    def __init__(self, task, sentence_avg, label_smoothing, distill_teacher, distill_alpha=DEFAULT_ALPHA,
                 distill_temperature=DEFAULT_TEMPERATURE, ignore_prefix_size=0, report_accuracy=False):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        check_settings(distill_teacher, distill_alpha, distill_temperature)
        self.alpha = float(distill_alpha)
        self.temperature = float(distill_temperature)
        teacher = load_teacher(distill_teacher, task)
        # a tuple, not a submodule: the trainer would otherwise save the teacher's weights in
        # every checkpoint (it saves a criterion that has parameters) and move them with the model
        self._teacher = (teacher,)

    @property
    def teacher(self) -> torch.nn.Module:
        return self._teacher[0]

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        ce, nll = self.compute_loss(model, net_output, sample, reduce=reduce)
        kd = self.distill_loss(net_output[0], sample, reduce=reduce)
        if not reduce:
            kd = kd.view_as(ce)  # fairseq's unreduced cross entropy is one row per position: (B * T, 1)
        loss = (1.0 - self.alpha) * ce + self.alpha * kd
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        # a copy: fairseq zeroes the returned loss in place on an update that applies no gradient (qswap's
        # calibration updates), and the logged train loss had read 0 there
        logging_output = {"loss": loss.detach().clone(), "nll_loss": nll.data, "ce_loss": ce.data, "kd_loss": kd.data,
                          "ntokens": sample["ntokens"], "nsentences": sample["target"].size(0),
                          "sample_size": sample_size}
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = n_correct.item()
            logging_output["total"] = total.item()
        return loss, sample_size, logging_output

    def distill_loss(self, student_logits: torch.Tensor, sample, reduce=True) -> torch.Tensor:
        """``tau^2 * KL(teacher || student)`` per target token that is not padding, summed
        (``reduce``) or one per token position (B * T, padding positions 0)."""
        teacher = self.teacher
        first = next(teacher.parameters())
        if first.device != student_logits.device:
            teacher.to(student_logits.device)
        dtype = first.dtype  # fp16 training halves the samples, not the teacher
        net_input = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                     for k, v in sample["net_input"].items()}
        with torch.no_grad():
            teacher_logits = teacher(**net_input)[0]
        if teacher_logits.shape != student_logits.shape:
            raise CheckpointError(f"the distillation teacher's output has shape {tuple(teacher_logits.shape)}, "
                                  f"the model's {tuple(student_logits.shape)}: distill from a model trained "
                                  f"with the same dictionary")
        tau = self.temperature
        # float64: the two distributions are close (a quantized copy of its teacher, a high tau), and
        # float32's KL of them cancels (2 % off at tau 100, single tokens by far more); a vocabulary's
        # logits are small beside the model's own work; float32 again for the mix
        student = F.log_softmax(student_logits.double() / tau, dim=-1)
        target = F.log_softmax(teacher_logits.double() / tau, dim=-1)
        per_token = (F.kl_div(student, target, log_target=True, reduction="none").sum(-1) * (tau * tau)).float()
        start = self.ignore_prefix_size
        per_token = per_token[:, start:]
        pad = sample["target"][:, start:].eq(self.padding_idx)
        per_token = per_token.masked_fill(pad, 0.0).reshape(-1)
        return per_token.sum() if reduce else per_token

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        for key in ("ce_loss", "kd_loss"):
            total = sum(log.get(key, 0) for log in logging_outputs)
            metrics.log_scalar(key, total / sample_size / math.log(2), sample_size, round=3)


def check_settings(teacher: str, alpha: float, temperature: float) -> None:
    if not teacher:
        raise TrainingError(f"--criterion {NAME} needs --distill-teacher CKPT: the checkpoint of the model "
                          f"to distill from (the float model the quantized one was converted from)")
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise TrainingError(f"--distill-alpha {alpha}: pick a weight between 0 and 1 (0 trains on the "
                          f"cross entropy alone, 1 on the distillation term alone)")
    if not (math.isfinite(temperature) and TEMPERATURES[0] <= temperature <= TEMPERATURES[1]):
        raise TrainingError(f"--distill-temperature {temperature}: pick a temperature from {TEMPERATURES[0]:g} to "
                          f"{TEMPERATURES[1]:g} (1 compares the models' own distributions; far outside, the logits "
                          f"divided by it or its square overflow float32, and the loss is NaN)")


def load_teacher(path: str, task) -> torch.nn.Module:
    """The teacher model in eval mode with frozen parameters, built with the task's data
    directory (its dictionary: a teacher trained with another one does not load, a typed error
    that says so)."""
    from qswap.integration.data import load_model_and_task

    opts = getattr(task, "args", None) or getattr(task, "cfg", None)
    try:
        teacher, _ = load_model_and_task(path, getattr(opts, "data", None))
    except CheckpointError as exc:
        if exc.kind != "build":
            raise  # a missing, unreadable or unsafe file: its own error says what to change
        raise CheckpointError(f"the distillation teacher does not load with this run's data directory "
                              f"and dictionary: {exc}; distill from a model trained with the same "
                              f"dictionary") from None
    except DataError as exc:  # a qswap checkpoint's recorded dictionary is not the run's
        raise CheckpointError(f"the distillation teacher {path} does not match this run's data directory: {exc}; "
                              f"distill from a model trained with the same dictionary") from None
    quantizers = [q for q in activation_quantizers(teacher) if q.enabled]
    if quantizers and not any(bool(q.frozen) for q in quantizers):  # an uncalibrated quantized model (a
        # calibrated one keeps observing only sites its paths never ran): each teacher forward would move its
        # grids, and the target the student learns would drift
        raise CheckpointError(f"the distillation teacher {path} is quantized but not calibrated (its "
                              f"{len(quantizers)} activation quantizers still observe: 'qswap convert "
                              f"--no-calibrate'): its outputs would change with every batch; distill from the "
                              f"float model or a calibrated checkpoint")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def register_criterions() -> None:
    """Register ``qswap_distill`` once; importing the plugin twice must not crash."""
    if NAME not in CRITERION_REGISTRY:
        register_criterion(NAME, dataclass=DistillConfig)(DistillCriterion)
