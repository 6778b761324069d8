"""Schedules, optimizer groups, data builders and config checks of mtvision.engine.builders."""

import math

import pytest
import torch

from mtvision.config import ConfigError, ScheduleConfig, apply_overrides, config_to_dict
from mtvision.data.builders import VAL_SEED_OFFSET, build_dataset
from mtvision.engine.builders import (
    LRLambda,
    build_dataloader,
    build_optimizer,
    build_scheduler,
    check_amp,
    check_tasks,
)
from mtvision.balancing import build_task_balancer
from mtvision.models import build_model

from .helpers import tiny_config


def test_lr_lambda_warmup_then_cosine_poly_constant():
    cos = LRLambda(ScheduleConfig(name="cosine", warmup_iters=10, warmup_factor=0.1, min_lr_ratio=0.0), 110)
    assert cos(0) == pytest.approx(0.1)
    assert cos(5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cos(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.5)
    assert cos(110) == pytest.approx(0.0, abs=1e-12)
    poly = LRLambda(ScheduleConfig(name="poly", power=2.0, min_lr_ratio=0.1), 100)
    assert poly(50) == pytest.approx(0.1 + 0.9 * 0.25)
    assert LRLambda(ScheduleConfig(name="constant"), 100)(77) == 1.0


def test_scheduler_is_per_iteration_and_follows_backbone_multiplier(tmp_path):
    cfg = tiny_config(tmp_path, ["optimizer.lr=0.01", "optimizer.backbone_lr_mult=0.1",
                                 "schedule.name=cosine", "schedule.warmup_iters=0"])
    model = build_model(config_to_dict(cfg.model))
    opt = build_optimizer(model, cfg.optimizer)
    sched = build_scheduler(opt, cfg.schedule, max_iters=4)
    names = {g["name"]: g for g in opt.param_groups}
    assert set(names) == {"backbone", "backbone_no_decay", "heads", "heads_no_decay"}
    assert names["backbone"]["lr"] == pytest.approx(0.001) and names["heads"]["lr"] == pytest.approx(0.01)
    assert names["heads_no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in names["heads_no_decay"]["params"])
    n = sum(len(g["params"]) for g in opt.param_groups)
    assert n == len(list(model.parameters()))
    lrs = []
    for _ in range(4):
        opt.step()
        sched.step()
        lrs.append(names["heads"]["lr"])
    expected = [0.01 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(1, 5)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert names["backbone"]["lr"] == pytest.approx(0.1 * lrs[-1], abs=1e-12)


def test_sgd_optimizer(tmp_path):
    cfg = tiny_config(tmp_path, ["optimizer.name=sgd", "optimizer.momentum=0.8"])
    opt = build_optimizer(build_model(config_to_dict(cfg.model)), cfg.optimizer)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.8


def test_train_and_val_sets_are_different_and_repeatable(tmp_path):
    cfg = tiny_config(tmp_path)
    train, val = build_dataset(cfg.data, "train", seed=3), build_dataset(cfg.data, "val", seed=3)
    assert (len(train), len(val)) == (8, 4)
    assert train.seed == 3 and val.seed == 3 + VAL_SEED_OFFSET
    assert not torch.equal(train[0]["image"], val[0]["image"])
    assert torch.equal(train[1]["depth"], build_dataset(cfg.data, "train", seed=3)[1]["depth"])
    assert train[0]["image"].shape == (3, 32, 48)


def test_dataset_config_errors(tmp_path):
    cfg = tiny_config(tmp_path)
    with pytest.raises(ConfigError, match=r"data.dataset: unknown dataset 'nyu'"):
        build_dataset(apply_overrides(cfg, ["data.dataset=nyu"]).data, "train")
    with pytest.raises(ConfigError, match=r"data.root"):
        build_dataset(apply_overrides(cfg, ["data.root=/data"]).data, "train")
    with pytest.raises(ConfigError, match=r"data.num_classes"):
        build_dataset(apply_overrides(cfg, ["data.num_classes=19"]).data, "val")


def test_loader_order_depends_only_on_seed(tmp_path):
    cfg = tiny_config(tmp_path)
    ds = build_dataset(cfg.data, "train")

    def order(seed):
        loader = build_dataloader(ds, 4, 0, train=True, seed=seed)
        out = []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            out += [tuple(m["index"] for m in b["meta"]) for b in loader]
        return out

    assert order(5) == order(5)
    assert order(5) != order(6)
    first_epoch, second_epoch = order(5)[:2], order(5)[2:]
    assert first_epoch != second_epoch  # each epoch draws a new permutation
    with pytest.raises(ConfigError, match=r"data.batch_size \(16\) is larger than the training set"):
        build_dataloader(ds, 16, 0, train=True)


def test_config_checks_name_the_key(tmp_path):
    cfg = tiny_config(tmp_path)
    assert check_tasks(cfg) == ["seg", "depth", "normal"]
    with pytest.raises(ConfigError, match=r"data.tasks \['seg'\] and model.heads"):
        check_tasks(apply_overrides(cfg, ["data.tasks=[seg]"]))
    with pytest.raises(ConfigError, match=r"data.tasks: unknown task 'boxes'"):
        check_tasks(apply_overrides(cfg, ["data.tasks=[seg, boxes]"]))
    with pytest.raises(ConfigError, match=r"model.heads.seg.num_classes \(5\) differs from data.num_classes"):
        check_tasks(apply_overrides(cfg, ["model.heads.seg.num_classes=5"]))
    with pytest.raises(ConfigError, match=r"loss.weights.edges: no such task"):
        check_tasks(apply_overrides(cfg, ["loss.weights={edges: 1.0}"]))
    model = build_model(config_to_dict(cfg.model))
    with pytest.raises(ConfigError, match=r"balancer.name: unknown balancing method 'pcgard'"):
        build_task_balancer(apply_overrides(cfg, ["balancer.name=pcgard"]), model, ["seg", "depth", "normal"])
    with pytest.raises(ConfigError, match=r"balancer.kwargs.cc: unexpected argument for balancing method 'cagrad'"):
        build_task_balancer(apply_overrides(cfg, ["balancer.name=cagrad", "balancer.kwargs={cc: 1}"]), model,
                            ["seg", "depth", "normal"])
    with pytest.raises(ConfigError, match=r"loss.weights: static task weights apply to balancer 'ew' only"):
        build_task_balancer(apply_overrides(cfg, ["balancer.name=uw", "loss.weights={seg: 2.0}"]), model,
                            ["seg", "depth", "normal"])
    with pytest.raises(ConfigError, match=r"balancer.level: 'rep' is for gradient methods"):
        build_task_balancer(apply_overrides(cfg, ["balancer.name=dwa", "balancer.level=rep"]), model,
                            ["seg", "depth", "normal"])
    with pytest.raises(ConfigError, match=r"train.amp: 'fp16' needs a CUDA device"):
        check_amp("fp16", torch.device("cpu"))
    assert check_amp("bf16", torch.device("cpu")) == "bf16"
