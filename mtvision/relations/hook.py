"""Task relations measured while training (``train.monitor_interval``, ``train.affinity_interval``): a hook
of the training loop that fills ``trainer.relations`` (:class:`~mtvision.relations.stats.TaskRelations`,
saved in checkpoints and summarised in ``metrics.json``) and writes TensorBoard scalars and heatmaps."""

from __future__ import annotations

from torch import Tensor

from ..engine.hooks import HookBase
from ..engine.logging import format_table
from .plot import heatmap
from ..tasks.outputs import task_output_tensors
from .probe import ProbeResult, TaskGradientProbe

__all__ = ["TaskRelationHook", "relations_table"]


def _pairs(tasks):
    return [(i, j) for i in range(len(tasks)) for j in range(len(tasks)) if i < j]


def relations_table(summary: dict) -> str:
    """The plain-text tables of a :meth:`TaskRelations.summary`: per task pair the mean cosine and the
    conflict fraction; the mean affinity matrix (row: the task whose step is taken)."""
    tasks = summary["tasks"]
    parts = []
    grads = summary.get("gradients")
    if grads:
        rows = [f"{tasks[i]} / {tasks[j]}" for i, j in _pairs(tasks)]
        cos = {r: grads["mean_cosine"][i][j] for r, (i, j) in zip(rows, _pairs(tasks))}
        conflict = {r: grads["conflict_fraction"][i][j] for r, (i, j) in zip(rows, _pairs(tasks))}
        parts.append(f"gradient cosine on the shared parameters ({grads['steps']} measurements)\n"
                     + format_table(rows, {"mean cosine": cos, "conflicting": conflict}, row_title="tasks"))
    aff = summary.get("affinity")
    if aff:
        columns = {f"onto {t}": {s: aff["mean"][i][j] for i, s in enumerate(tasks)}
                   for j, t in enumerate(tasks)}
        parts.append(f"lookahead affinity Z[step of row task -> loss of column task] ({aff['steps']} "
                     f"measurements)\n"
                     + format_table(tasks, columns, row_title="step of"))
    return "\n\n".join(parts)


class TaskRelationHook(HookBase):
    """Measures the task relations every ``train.monitor_interval`` / ``train.affinity_interval`` steps
    (``mtvision.relations``), on the step's batch (the first one of a method that draws several) and at
    the parameters the step starts from. The gradient statistics come, cheapest first: from every step of
    a gradient method whose Gramian is that of the raw task gradients (``Balancer.provides_gramian``: no
    cost); from within the step of a loss weighting (``Balancer.request_gramian``: T - 1 backward passes
    more); else from the probe before the step (one forward and T backward passes), which also gives the
    lookahead affinity (T forwards more). Every process measures (averaged over processes); rank 0
    writes."""

    def __init__(self):
        self.probe: TaskGradientProbe | None = None

    def before_train(self) -> None:
        t = self.trainer
        self.monitor = int(t.cfg.train.monitor_interval)
        self.affinity = int(t.cfg.train.affinity_interval)
        self.free = bool(getattr(t.balancer, "provides_gramian", False))
        self.probe = TaskGradientProbe(list(t.model.shared_parameters()), t.model)

    def _due(self, interval: int, step: int) -> bool:
        return interval > 0 and step % interval == 0

    def before_step(self, batch) -> None:
        t = self.trainer
        step = t.iteration + 1
        grads = self._due(self.monitor, step) and not self.free
        if grads and t.balancer.request_gramian():  # measured within the step (a loss weighting)
            grads = False
        affinity = self._due(self.affinity, step)
        if not (grads or affinity):
            return
        data = t._to_device(batch[0] if isinstance(batch, list) else batch)
        if not t.model.training:
            t.model.train()

        def task_losses():
            with t.autocast():
                outputs = t.model(data["image"])
            return t.loss_fn.task_losses(outputs, data).float(), task_output_tensors(outputs, t.tasks)

        lr = t.cfg.train.affinity_lr or float(t.optimizer.param_groups[0]["lr"])
        scale = float(t.scaler.get_scale()) if t.scaler.is_enabled() else 1.0  # fp16, as the step's backward
        result = self.probe.measure(task_losses, lr if affinity else None, loss_scale=scale)
        if result is None:
            if t.logger is not None:
                t.logger.warning("iter %d: task relations not measured (non-finite loss or gradient)", step)
            return
        if grads and t.relations.add_gram(result.gram):
            self._write_gradients(step, result.gram)
        if affinity and t.relations.add_affinity(result.affinity):
            self._write_affinity(step, result, lr)

    def after_step(self, outcome) -> None:
        if not (self.monitor and outcome.gram is not None):
            return
        t = self.trainer
        if t.relations.add_gram(outcome.gram) and self._due(self.monitor, t.iteration):
            self._write_gradients(t.iteration, outcome.gram)

    def _write_gradients(self, step: int, gram: Tensor) -> None:
        t = self.trainer
        if t.writer is None:
            return
        tasks, rel = t.tasks, t.relations
        cos = rel.last_cosine
        norms = gram.diagonal().clamp_min(0).sqrt()
        t.writer.add_scalars("relations/grad_norm", {k: float(v) for k, v in zip(tasks, norms)}, step)
        t.writer.add_scalars("relations/cosine", {f"{tasks[i]}~{tasks[j]}": float(cos[i, j])
                                                  for i, j in _pairs(tasks)}, step)
        t.writer.add_scalars("relations/conflict_fraction", {
            f"{tasks[i]}~{tasks[j]}": float(rel.conflict_fraction[i, j]) for i, j in _pairs(tasks)}, step)
        t.writer.add_image("relations/mean_cosine", heatmap(
            rel.mean_cosine, tasks, f"mean gradient cosine, {rel.gradient_steps} steps", limit=1.0), step)

    def _write_affinity(self, step: int, result: ProbeResult, lr: float) -> None:
        t = self.trainer
        if t.writer is None:
            return
        tasks, rel = t.tasks, t.relations
        pairs = {f"{a}->{b}": float(result.affinity[i, j])
                 for i, a in enumerate(tasks) for j, b in enumerate(tasks)}
        t.writer.add_scalars("relations/affinity", pairs, step)
        t.writer.add_image("relations/mean_affinity", heatmap(
            rel.mean_affinity, tasks, f"mean lookahead affinity (lr {lr:.3g}), {rel.affinity_steps} steps",
            row_title="row: the task whose step is taken"), step)

    def after_train(self) -> None:
        t = self.trainer
        if t.logger is not None and (t.relations.gradient_steps or t.relations.affinity_steps):
            t.logger.info("task relations:\n%s", relations_table(t.relations.summary()))
