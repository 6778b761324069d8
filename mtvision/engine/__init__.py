"""Training and evaluation machinery: the Trainer and its hooks, its builders, checkpoints, logging,
evaluation loops, trivial baselines and prediction pictures."""

from .baselines import TrivialPredictor, fit_trivial_baseline, trivial_baseline
from .builders import (
    LRLambda,
    build_dataloader,
    build_optimizer,
    build_scheduler,
    check_amp,
    check_input_size,
    check_tasks,
    resolve_device,
    seed_everything,
)
from .checkpoint import load_checkpoint, load_model_weights, save_checkpoint
from .evaluator import build_metrics, evaluate, evaluate_model, primary_score, scalar_metrics
from .hooks import HookBase, TrainingError
from .trainer import StepOutcome, Trainer
from .utils import autocast_context, write_json

__all__ = [
    "HookBase",
    "LRLambda",
    "StepOutcome",
    "Trainer",
    "TrainingError",
    "TrivialPredictor",
    "autocast_context",
    "build_dataloader",
    "build_metrics",
    "build_optimizer",
    "build_scheduler",
    "check_amp",
    "check_input_size",
    "check_tasks",
    "evaluate",
    "evaluate_model",
    "fit_trivial_baseline",
    "load_checkpoint",
    "load_model_weights",
    "primary_score",
    "resolve_device",
    "save_checkpoint",
    "scalar_metrics",
    "seed_everything",
    "trivial_baseline",
    "write_json",
]
