"""Which model outputs a task's loss reads: its prediction, plus deep-supervision outputs in training.

An architecture with intermediate predictions (PAD-Net's initial per-task predictions) returns them in
training next to the final ones, under ``"<task>/initial"``; the task's loss is then the sum of its loss on
both (:class:`mtvision.losses.MultiTaskLoss`), and the gradient methods start each task's backward pass
from all of that task's outputs. In evaluation mode only the final predictions are returned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

__all__ = ["INITIAL_SUFFIX", "as_output_lists", "initial_output_key", "task_output_tensors"]

#: Suffix of a task's deep-supervised intermediate prediction in a training-mode output dict.
INITIAL_SUFFIX = "/initial"


def initial_output_key(task: str) -> str:
    """The output key of ``task``'s intermediate (deep-supervised) prediction."""
    return task + INITIAL_SUFFIX


def task_output_tensors(outputs: Mapping[str, Tensor], tasks: Sequence[str]) -> list[list[Tensor]]:
    """Per task, the outputs its loss depends on: ``[outputs[t]]``, plus ``outputs[t + "/initial"]`` when
    the model returned one."""
    return [[outputs[t], *([outputs[initial_output_key(t)]] if initial_output_key(t) in outputs else [])]
            for t in tasks]


def as_output_lists(outputs: Sequence[Tensor | Sequence[Tensor]]) -> list[list[Tensor]]:
    """Per task a list of tensors, from per-task tensors or lists of them (both are accepted)."""
    return [[o] if isinstance(o, Tensor) else list(o) for o in outputs]
