"""The multi-task architectures (model.arch): shapes, that each shares what it says it shares (against
independent computations), the parameter split the gradient methods use, training with a loss weighting
and a gradient method, checkpoints, ONNX export."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mtvision.config import ConfigError
from mtvision.losses import MultiTaskLoss
from mtvision.models import MultiTaskModel, build_model
from mtvision.models.arch import CrossStitchModel, MTANModel, PADNetModel, SoftSharingModel
from mtvision.tasks import build_tasks

from ..engine.helpers import TINY, tiny_config

ARCHS = ["hps", "soft_sharing", "cross_stitch", "mtan", "padnet"]
TASKS = ["seg", "depth", "normal"]
DET = {"name": "fcos", "num_classes": 6, "channels": 16, "num_convs": 1}


def tiny(arch: str | dict, det: bool = False, seed: int = 0, **model) -> nn.Module:
    """The engine tests' tiny model (test_resnet, 16-channel FPN and heads) as architecture ``arch``."""
    torch.manual_seed(seed)
    heads = dict(TINY["model"]["heads"], **({"det": DET} if det else {}))
    arch = arch if isinstance(arch, dict) else {"name": arch}
    cfg = {**TINY["model"], "heads": heads, "arch": arch, **model}  # model: sections replaced
    return build_model(cfg)


def batch(n=2, h=32, w=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, h, w, generator=g),
            "seg": torch.randint(0, 6, (n, h, w), generator=g),
            "depth": torch.rand(n, 1, h, w, generator=g) + 0.5,
            "normal": torch.nn.functional.normalize(torch.randn(n, 3, h, w, generator=g), dim=1)}


def loss_fn(tasks=TASKS, heads=None):
    return MultiTaskLoss(build_tasks(tasks, 6, 255, heads))


# ---------------------------------------------------------------------------------------------------
# Shapes and the parameter split


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes_in_training_and_evaluation(arch):
    model = tiny(arch)
    out = model(batch()["image"])
    expected = {"seg": (2, 6, 32, 48), "depth": (2, 1, 32, 48), "normal": (2, 3, 32, 48)}
    if arch == "padnet":  # deep-supervised initial predictions, in training only
        expected.update({f"{t}/initial": s for t, s in list(expected.items())})
    assert {k: tuple(v.shape) for k, v in out.items()} == expected
    model.eval()
    assert sorted(model(batch(h=40, w=56)["image"])) == sorted(TASKS)  # another size; finals only
    assert model.tasks == TASKS and set(model.heads) == set(TASKS)


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_and_task_parameters_split_every_parameter_by_which_losses_reach_it(arch):
    """Shared ∪ task parameters = all, each once; task t's loss has zero gradient on every other task's
    parameters; a shared parameter is reached by more than one task's loss (soft sharing: each copy by its
    own task only, by definition, as the docs say)."""
    model = tiny(arch).double()
    for m in model.modules():  # BatchNorm on fixed statistics: the check is about the graph
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    shared = list(model.shared_parameters())
    own = {t: list(model.task_parameters(t)) for t in TASKS}
    ids = [id(p) for p in shared] + [id(p) for ps in own.values() for p in ps]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    b = batch()
    losses = loss_fn().task_losses(model(b["image"].double()), b)
    reached = {}
    for i, t in enumerate(TASKS):
        grads = torch.autograd.grad(losses[i], list(model.parameters()), retain_graph=True, allow_unused=True)
        reached[t] = {id(p) for p, g in zip(model.parameters(), grads)
                      if g is not None and bool(g.abs().sum() > 0)}
        for s in TASKS:
            hit = reached[t] & {id(p) for p in own[s]}
            assert bool(hit) == (s == t), (t, s)
    many = {id(p) for p in shared if sum(id(p) in reached[t] for t in TASKS) > 1}
    if arch == "soft_sharing":
        assert not many
        for t in TASKS:
            copy_t = {id(p) for p in [*model.backbones[t].parameters(), *model.necks[t].parameters()]}
            assert reached[t] & {id(p) for p in shared} <= copy_t
    else:
        assert many  # every architecture but soft sharing couples the tasks through its shared parameters
    last = {id(p) for p in model.last_shared_parameters()}
    assert last and last <= {id(p) for p in shared}


@pytest.mark.parametrize("arch", ARCHS)
def test_features_then_heads_is_the_forward(arch):
    model = tiny(arch).eval()
    x = batch()["image"]
    full = model(x)
    split = model.forward_heads(model.forward_features(x), x.shape[-2:])
    for t in TASKS:
        torch.testing.assert_close(split[t], full[t], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# Each architecture shares what it says


def _hps_of(backbone, neck, head, task) -> MultiTaskModel:
    return MultiTaskModel(backbone, None if isinstance(neck, nn.Identity) else neck, {task: head})


@pytest.mark.parametrize("backbone", ["test_resnet", "vit_tiny_patch16_224"])
def test_cross_stitch_at_identity_equals_independent_networks(backbone):
    vit = {"backbone": {"name": backbone, "timm_kwargs": {"depth": 2}}}
    extra = vit if backbone.startswith("vit") else {}
    model = tiny({"name": "cross_stitch", "self_weight": 1.0}, **extra).eval()
    assert isinstance(model, CrossStitchModel)
    x = batch()["image"]
    out = model(x)
    for t in TASKS:
        alone = _hps_of(model.backbones[t], model.necks[t], model.heads[t], t).eval()
        torch.testing.assert_close(out[t], alone(x)[t], rtol=0, atol=0)
    # the networks do differ (independent initialisations), so the equality is not trivial
    assert not torch.equal(model.backbones["seg"](x)[0], model.backbones["depth"](x)[0])


def test_cross_stitch_units_start_as_the_paper_does_and_mix_per_channel():
    model = tiny("cross_stitch")  # self_weight 0.9: the other two streams 0.05 each (rows sum to 1)
    alpha = model.stitches[0].weight.detach()
    T, _, C = alpha.shape
    expected = torch.full((T, T), 0.05)
    expected.fill_diagonal_(0.9)
    torch.testing.assert_close(alpha, expected[:, :, None].expand(T, T, C))
    # a unit against a direct per-channel sum, NCHW and channels-last
    g = torch.Generator().manual_seed(0)
    unit = model.stitches[1]
    with torch.no_grad():
        unit.weight.copy_(torch.randn(unit.weight.shape, generator=g))
    xs = [torch.randn(2, unit.weight.shape[2], 5, 6, generator=g) for _ in range(T)]
    out = unit(xs)
    for t in range(T):
        direct = sum(unit.weight[t, s][None, :, None, None] * xs[s] for s in range(T))
        torch.testing.assert_close(out[t], direct)
    unit.channel_dim = -1
    xs_last = [x.permute(0, 2, 3, 1) for x in xs]
    for t, o in enumerate(unit(xs_last)):
        torch.testing.assert_close(o, out[t].permute(0, 2, 3, 1))


def test_cross_stitch_refuses_a_backbone_that_cannot_run_stage_by_stage():
    with pytest.raises(ConfigError, match=r"model\.backbone\.name: .*efficientnet_b0.*stage"):
        tiny("cross_stitch", backbone={"name": "efficientnet_b0"})


def test_mtan_with_all_ones_attention_equals_the_shared_features():
    model = tiny("mtan").eval()
    assert isinstance(model, MTANModel)
    with torch.no_grad():  # the masks' last BatchNorm outputs 30: sigmoid(30) == 1.0 in float32
        for att in model.attention.values():
            for mask in att.masks:
                mask[4].weight.zero_()
                mask[4].bias.fill_(30.0)
    x = batch()["image"]
    features = model.forward_features(x)
    for t in TASKS:
        for a, f in zip(model.attention[t](features), features):
            assert torch.equal(a, f)
    shared = MultiTaskModel(model.backbone, model.neck, dict(model.heads)).eval()
    out, ref = model(x), shared(x)
    for t in TASKS:
        assert torch.equal(out[t], ref[t])


def test_mtan_attention_is_carried_from_level_to_level():
    """Changing a task's first-level attention changes its masks at the later levels (the path), and no
    other task's output."""
    model = tiny("mtan").eval()
    x = batch()["image"]
    before = model(x)
    features = model.forward_features(x)
    with torch.no_grad():
        model.attention["seg"].paths[0][0].weight.mul_(3.0)
    after = model(x)
    assert not torch.allclose(after["seg"], before["seg"])
    assert torch.equal(after["depth"], before["depth"]) and torch.equal(after["normal"], before["normal"])
    # the second level's mask takes [level, path]: its input width is 2C
    assert model.attention["seg"].masks[1][0].in_channels == 2 * features[1].shape[1]


def test_soft_sharing_penalty_value_and_gradient_equal_a_direct_computation():
    model = tiny({"name": "soft_sharing", "weight": 0.3}).double()
    assert isinstance(model, SoftSharingModel)
    copies = [[*model.backbones[t].parameters(), *model.necks[t].parameters()] for t in TASKS]
    direct = sum(((a - b) ** 2).sum() for i in range(3) for j in range(i + 1, 3)
                 for a, b in zip(copies[i], copies[j])) * 0.3
    torch.testing.assert_close(model.penalty(), direct, rtol=1e-12, atol=0)
    want = torch.autograd.grad(direct, [p for c in copies for p in c])
    model.zero_grad(set_to_none=True)
    value = model.add_penalty_grad(scale=4.0)
    assert value == pytest.approx(float(direct), rel=1e-12)
    for p, g in zip([p for c in copies for p in c], want):
        torch.testing.assert_close(p.grad, 4.0 * g, rtol=1e-10, atol=1e-14)
    for p in (p for t in TASKS for p in model.heads[t].parameters()):
        assert p.grad is None  # the heads are not in the penalty


def test_soft_sharing_penalty_pulls_the_copies_together_in_training(tmp_path):
    from mtvision.engine.trainer import Trainer

    cfg = tiny_config(tmp_path, ["model.arch.name=soft_sharing", "model.arch.weight=10.0", "train.max_iters=3",
                                 "train.eval_interval=100", "optimizer.name=sgd", "optimizer.lr=0.01",
                                 "optimizer.momentum=0", "train.grad_clip=null", "optimizer.weight_decay=0"])
    trainer = Trainer(cfg)
    start = float(trainer.model.penalty())
    values = [trainer.run_step(next(iter(trainer.train_loader))).values for _ in range(3)]
    assert [v["penalty"] for v in values] == sorted((v["penalty"] for v in values), reverse=True)
    assert values[0]["penalty"] == pytest.approx(start, rel=1e-5)
    assert float(trainer.model.penalty()) < 0.9 * start


def test_padnet_distils_between_dense_tasks_and_supervises_the_initial_predictions():
    model = tiny("padnet", det=True)
    assert isinstance(model, PADNetModel)
    assert model.distilled == TASKS and set(model.distillation["seg"]) == {"depth", "normal"}
    assert model.tasks == [*TASKS, "det"]  # the config's order (detection's head is built first)
    b = batch()
    out = model(b["image"])
    assert "det/initial" not in out and "det" in out  # detection reads the shared levels, no distillation
    # the loss of a task = its loss on the final plus on the initial prediction
    fn = loss_fn(TASKS)
    dense_out = {k: v for k, v in out.items() if k != "det"}
    total = fn.task_losses(dense_out, b)
    finals = fn.task_losses({t: out[t] for t in TASKS}, b)
    initials = fn.task_losses({t: out[f"{t}/initial"] for t in TASKS}, b)
    torch.testing.assert_close(total, finals + initials)
    # with the distillation's feature convs at zero, a final prediction is its head on its own trunk
    model.eval()
    with torch.no_grad():
        for into in model.distillation.values():
            for att in into.values():
                att.features.weight.zero_()
                att.features.bias.zero_()
    feats = model.forward_features(b["image"])
    trunk = dict(zip(model.distilled, feats[-3:]))
    out = model(b["image"])
    for t in TASKS:
        torch.testing.assert_close(out[t], model.heads[t]([trunk[t]], b["image"].shape[-2:]), rtol=0, atol=0)


def test_loss_refuses_initial_predictions_for_part_of_the_fused_tasks():
    b = batch()
    model = tiny("padnet")
    out = model(b["image"])
    del out["depth/initial"]
    with pytest.raises(ValueError, match="some of the fused dense tasks"):
        loss_fn().task_losses(out, b)


@pytest.mark.parametrize("arch,key,value,match", [
    ("soft_sharing", "weight", -1, r"^model\.arch\.weight: .*>= 0"),
    ("cross_stitch", "self_weight", 2.0, r"^model\.arch\.self_weight: .*\[0, 1\]"),
    ("padnet", "channels", 0, r"^model\.arch\.channels: .*positive int"),
    ("mtan", "channels", 8, r"^model\.arch\.channels: unexpected argument"),
    ("mtn", None, None, r"^model\.arch\.name: unknown architecture 'mtn' \(choose from: hps, cross_stitch, mtan"),
])
def test_arch_config_errors_name_the_key(arch, key, value, match):
    with pytest.raises(ConfigError, match=match):
        tiny({"name": arch, **({key: value} if key else {})})


# ---------------------------------------------------------------------------------------------------
# Training, checkpoints, export


@pytest.mark.parametrize("arch,weighting,method,level", [
    ("soft_sharing", "ew", "mgda", "param"), ("cross_stitch", "uw", "pcgrad", "param"),
    ("mtan", "gradnorm", "upgrad", "rep"), ("padnet", "ew", "cagrad", "rep"),
])
def test_trains_with_a_loss_weighting_and_a_gradient_method(tmp_path, arch, weighting, method, level):
    from mtvision.engine.trainer import Trainer

    for name, lvl in [(weighting, "param"), (method, level)]:
        (tmp_path / name).mkdir()
        trainer = Trainer(tiny_config(tmp_path / name, [f"model.arch.name={arch}", f"balancer.name={name}",
                                                        f"balancer.level={lvl}"]))
        batch = next(iter(trainer.train_loader))
        before = [p.detach().clone() for p in trainer.model.parameters()]
        for _ in range(2):
            out = trainer.run_step(batch)
            assert not out.skipped and all(torch.isfinite(torch.tensor(v)) for v in out.values.values())
        params = list(trainer.model.parameters())
        moved = [not torch.equal(a, p) for a, p in zip(before, params)]
        assert sum(moved) > 0.9 * len(moved), name  # every part trains (a few biases before BatchNorm stay)
        shared = {id(p) for p in trainer.model.shared_parameters()}
        assert any(m for m, p in zip(moved, params) if id(p) in shared)


@pytest.mark.parametrize("arch", ["soft_sharing", "cross_stitch"])
def test_rep_level_is_refused_without_a_shared_representation(tmp_path, arch):
    from mtvision.engine.trainer import Trainer

    cfg = tiny_config(tmp_path, [f"model.arch.name={arch}", "balancer.name=mgda", "balancer.level=rep"])
    with pytest.raises(ConfigError, match=r"balancer\.level: 'rep' .*gives each task its own network"):
        Trainer(cfg)


def test_padnet_with_detection_and_bf16_autocast_trains(tmp_path):
    from mtvision.engine.trainer import Trainer

    over = ["model.arch.name=padnet", "train.amp=bf16", "train.max_iters=2", "train.eval_interval=2",
            "data.tasks=[seg,depth,normal,det]", "balancer.name=pcgrad",
            "model.heads.det={name: fcos, num_classes: 6, channels: 16, num_convs: 1}"]
    trainer = Trainer(tiny_config(tmp_path, over))
    metrics = trainer.train()
    assert "det/AP" in metrics and trainer.iteration == 2


@pytest.mark.parametrize("arch", ["cross_stitch", "padnet"])
def test_resume_continues_exactly(tmp_path, arch):
    from mtvision.engine.trainer import Trainer

    common = [f"model.arch.name={arch}", "train.eval_interval=100", "train.checkpoint_interval=2",
              "balancer.name=pcgrad", "schedule.name=constant"]  # the first run's schedule ends at step 2
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    straight = Trainer(tiny_config(tmp_path / "a", [*common, "train.max_iters=4"]))
    straight.train()
    first = Trainer(tiny_config(tmp_path / "b", [*common, "train.max_iters=2"]))
    first.train()
    resumed = Trainer(tiny_config(tmp_path / "b", [*common, "train.max_iters=4"]))
    resumed.resume(tmp_path / "b" / "work" / "checkpoints" / "last.pth")
    resumed.train()
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["soft_sharing", "cross_stitch", "mtan", "padnet"])
def test_onnx_export_matches_pytorch(tmp_path, arch):
    pytest.importorskip("onnxruntime")
    from mtvision.export import check_onnx, export_onnx

    # two tasks keep the graph (and the export's time) smaller, on the same path; PAD-Net distils among three
    tasks = TASKS if arch == "padnet" else ["seg", "normal"]
    model = tiny(arch, heads={t: TINY["model"]["heads"][t] for t in tasks}).eval()
    path = export_onnx(model, tmp_path / f"{arch}.onnx", (32, 48), dynamic_size=True)
    for shape in [(2, 3, 32, 48), (1, 3, 48, 40)]:
        diffs = check_onnx(path, model, torch.randn(*shape, generator=torch.Generator().manual_seed(3)))
        assert sorted(diffs) == sorted(tasks) and max(diffs.values()) < 1e-4, diffs


def test_checkpoint_of_an_architecture_loads_into_the_predictor(tmp_path):
    from mtvision import Predictor
    from mtvision.engine.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path, ["model.arch.name=mtan", "train.max_iters=1",
                                             "train.eval_interval=100", "train.checkpoint_interval=1"]))
    trainer.train()
    ckpt = tmp_path / "work" / "checkpoints" / "last.pth"
    predictor = Predictor(None, ckpt, device="cpu")
    assert isinstance(predictor.model, MTANModel)
    image = (torch.rand(40, 50, 3) * 255).to(torch.uint8).numpy()
    out = predictor(image)
    assert out["seg"].shape == (40, 50) and out["normal"].shape == (40, 50, 3)
    copy.deepcopy(predictor.model)  # an export copies the model: the architecture must deep-copy
