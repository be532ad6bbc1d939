"""AdaMerging (Yang et al., ICLR 2024, "AdaMerging: Adaptive model merging for multi-task
learning"), task-wise and layer-wise, as FusionBench runs it
(``fusion_bench/method/adamerging/``): Task Arithmetic whose coefficients are learned by
minimising the entropy of the merged model's predictions on unlabeled test inputs of every task.

- ``theta = theta_0 + sum_t lam_t tau_t`` (task-wise: one ``lam_t`` per task; layer-wise: one per
  task and parameter tensor), every ``lam`` starting at ``init`` (0.3); Adam (lr 1e-3) for
  ``steps`` steps (1000); each step adds, for every task, the gradient of the mean entropy
  ``-sum_c p log(p + 1e-8)`` of the task's classifier (its own head, never merged) on one batch
  of 16 of its unlabeled test inputs, then takes one optimizer step.
- It sees data: the test split's inputs, without labels, as the paper does (test-time
  adaptation); the record says so (``merge_info["data"]["split"] == "test"``).
- [decision] A float buffer of the backbone (batch-norm running statistics) is merged with the
  same coefficients as every other key, as Task Arithmetic merges it, but passes no gradient to
  them (torch's batch norm has none for its statistics): a layer-wise coefficient of a buffer
  keeps its starting value. FusionBench's AdaMerging, written for CLIP ViTs, which hold no such
  buffer, leaves buffers out of the merge.
- [decision] The batches cycle through each task's first ``examples`` test inputs in order
  (FusionBench draws shuffled batches from its own generator): the same coefficients on every
  run and machine for a given ``steps``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call

from harness.core.data import TaskInputs
from harness.core.progress import progress as bar
from harness.core.tensors import to_float32
from harness.engine.method import hp, require
from harness.engine.result import MergeResult
from harness.engine.templates import DataMerge
from harness.io.resume import ResumeFileError, ResumeState


def entropy_loss(logits: Tensor, eps: float = 1e-8) -> Tensor:
    """The mean entropy of the rows' softmax (FusionBench's ``entropy_loss``)."""
    probs = torch.softmax(logits, dim=-1)
    return -torch.sum(probs * torch.log(probs + eps), dim=-1).mean()


def learn_coefficients(theta0: dict[str, Tensor], taus: dict[str, list[Tensor]],
                       data: TaskInputs, tasks: list[str], *, layer_wise: bool, steps: int,
                       lr: float, init: float, show: bool = False,
                       resume: ResumeState | None = None) -> Tensor:
    """The coefficients ``(tasks,)`` or ``(tasks, keys)`` (keys in ``taus``' order) after
    ``steps`` Adam steps of entropy minimisation; float32.

    Each step builds the merged weights once and back-propagates every task's entropy through
    that one graph, task after task: the gradients, and so the coefficients, are bit for bit
    those of building the weights again for every task (the same operations in the same order),
    without repeating the merge's forward arithmetic per task.

    With ``resume``, the coefficients, Adam's moments and the next step are saved there as the
    steps go, and a run started again continues from them: the same bits as a run never
    stopped (the saved state is exact and the steps deterministic)."""
    keys = list(taus)
    shape = (len(tasks), len(keys)) if layer_wise else (len(tasks),)
    lam = torch.full(shape, float(init), requires_grad=True)
    optimizer = torch.optim.Adam([lam], lr=lr)
    first = _resume(resume, lam, optimizer, steps) if resume is not None else 0
    models = {t: data.task_model(t, theta0) for t in tasks}
    buffers = {name.removeprefix("backbone.") for model in models.values()
               for name, _ in model.named_buffers() if name.startswith("backbone.")}
    steps_left = range(first, steps)
    for step in bar(steps_left, "adamerging", unit="step") if show else steps_left:
        merged = {}
        for index, key in enumerate(keys):
            coefficients = lam.detach() if key in buffers else lam
            value = theta0[key]
            for row, tau in enumerate(taus[key]):
                value = value + (coefficients[row, index] if layer_wise
                                 else coefficients[row]) * tau
            merged[f"backbone.{key}"] = value
        for number, task in enumerate(tasks):
            batches = data.batches[task]
            logits = functional_call(models[task], merged, (batches[step % len(batches)],),
                                     strict=False)
            entropy_loss(logits).backward(retain_graph=number + 1 < len(tasks))
        optimizer.step()
        optimizer.zero_grad()
        if resume is not None:
            resume.save(_state(lam, optimizer, step + 1), final=step + 1 == steps)
    return lam.detach()


def _state(lam: Tensor, optimizer: torch.optim.Adam, next_step: int) -> dict[str, Tensor]:
    """What a resumed run needs: the coefficients, Adam's moments and step, the next step."""
    moments = optimizer.state.get(lam, {})
    state = {"lam": lam.detach(), "next_step": torch.tensor(next_step, dtype=torch.int64)}
    state.update({f"adam.{name}": value for name, value in moments.items()})
    return state


def _resume(resume: ResumeState, lam: Tensor, optimizer: torch.optim.Adam, steps: int) -> int:
    """Load ``resume``'s saved state into ``lam`` and ``optimizer``; the step to continue
    from (0 when there is nothing to resume). A state of another shape is an error naming
    the file."""
    saved = resume.load()
    if not saved:
        return 0
    moments = {"adam.step": (), "adam.exp_avg": lam.shape, "adam.exp_avg_sq": lam.shape}
    expected = {"lam": lam.shape, "next_step": (), **moments}
    wrong = sorted(k for k, shape in expected.items()
                   if k not in saved or tuple(saved[k].shape) != tuple(shape)
                   or saved[k].dtype != (torch.int64 if k == "next_step" else torch.float32))
    next_step = int(saved["next_step"]) if "next_step" not in wrong else -1
    if wrong or set(saved) != set(expected) or not 0 < next_step <= steps:
        raise ResumeFileError(f"{resume.path}: not a state of this merge (tensors "
                              f"{sorted(saved)}, next step {next_step} of {steps}); remove it "
                              "to start the merge over")
    with torch.no_grad():
        lam.copy_(saved["lam"])
    optimizer.state[lam] = {name.removeprefix("adam."): saved[name].clone() for name in moments}
    resume.resumed_from = next_step
    return next_step


@dataclass(frozen=True)
class AdaMerging(DataMerge):
    """AdaMerging, task-wise: one learned coefficient per task. Sees unlabeled test inputs."""

    name = "adamerging"
    display_name = "AdaMerging (task-wise)"
    family = "data-dependent"
    year = 2024
    needs_data = ("each task's classifier and its unlabeled test inputs (entropy minimisation, "
                  "as the paper does)")
    needs_task_models = True
    data_split = "test"
    resumable = True
    layer_wise = False
    steps: int = hp(1000, "Adam steps of entropy minimisation")
    lr: float = hp(1e-3, "Adam learning rate")
    init: float = hp(0.3, "every coefficient's starting value")
    examples: int = hp(1024, "unlabeled test inputs per task, cycled through in order")
    batch_size: int = hp(16, "inputs per task and step")

    def check(self):
        require(self.steps >= 0, self.name, "steps", f"must be >= 0, got {self.steps}")
        require(self.lr > 0, self.name, "lr", f"must be > 0, got {self.lr}")
        require(self.examples >= 1, self.name, "examples", f"must be >= 1, got {self.examples}")
        require(self.batch_size >= 1, self.name, "batch_size",
                f"must be >= 1, got {self.batch_size}")

    def merge_with_data(self, spec, pretrained, finetuned, data, progress, resume=None):
        theta0 = {k: to_float32(pretrained[k]) for k in spec.float_keys}
        taus = {k: [to_float32(finetuned[t][k]) - theta0[k] for t in spec.tasks]
                for k in spec.float_keys}
        with torch.enable_grad():
            lam = learn_coefficients(theta0, taus, data, spec.tasks, layer_wise=self.layer_wise,
                                     steps=self.steps, lr=self.lr, init=self.init,
                                     show=progress, resume=resume)
        merged = {}
        for key, base in pretrained.items():
            if key not in theta0:
                merged[key] = base
                continue
            index = spec.float_keys.index(key)
            value = theta0[key].clone()
            for row, tau in enumerate(taus[key]):
                value += (lam[row, index] if self.layer_wise else lam[row]) * tau
            merged[key] = value.to(base.dtype)
        coefficients = ({t: [float(x) for x in lam[row]] for row, t in enumerate(spec.tasks)}
                        if self.layer_wise else
                        {t: float(lam[row]) for row, t in enumerate(spec.tasks)})
        return MergeResult(self.name, self.params(), merged, spec.tasks,
                           merged_params=spec.merged_params,
                           info={"data": data.summary(), "coefficients": coefficients,
                                 **({"resumed_from_step": resume.resumed_from}
                                    if resume is not None and resume.resumed_from else {})})


@dataclass(frozen=True)
class AdaMergingLayer(AdaMerging):
    """AdaMerging, layer-wise: one learned coefficient per task and parameter tensor."""

    name = "adamerging-layer"
    display_name = "AdaMerging (layer-wise)"
    layer_wise = True
