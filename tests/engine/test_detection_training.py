"""Detection next to the dense tasks through the engine: training with loss weightings and gradient
methods, evaluation with COCO AP, the config checks, pictures and ONNX export of an FCOS model."""

from __future__ import annotations

import pytest
import torch

from mtvision.balancing import MGDA
from mtvision.config import ConfigError, config_to_dict
from mtvision.engine import Trainer, check_tasks
from mtvision.balancing import GradientBalancer
from mtvision.engine.visualize import LABEL_HEIGHT, write_prediction_pngs
from mtvision.models import build_model
from mtvision.models.heads import decode_detections

from .helpers import tiny_config

DET = ["data.tasks=[seg,depth,normal,det]", "data.size=[64,80]",
       "model.heads.det={name: fcos, num_classes: 6, channels: 16, num_convs: 2}"]


@pytest.mark.parametrize("name,level", [("ew", "param"), ("famo", "param"), ("pcgrad", "param"),
                                        ("mgda", "rep")])
def test_training_steps_move_every_head_with_detection(tmp_path, name, level):
    cfg = tiny_config(tmp_path, [*DET, f"balancer.name={name}", f"balancer.level={level}"])
    trainer = Trainer(cfg, console=False, progress=False)
    assert trainer.tasks == ["seg", "depth", "normal", "det"]
    batch = next(iter(trainer.train_loader))
    assert isinstance(batch["boxes"], list) and len(batch["boxes"]) == 4
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for _ in range(2):
        values = trainer.iterate(batch).as_dict()
        assert values["skipped"] == 0 and torch.isfinite(torch.tensor(values["det"]))
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)}
    assert any(n.startswith("heads.det.") for n in moved) and any(n.startswith("backbone.") for n in moved)
    assert "heads.det.scales.0.scale" in moved  # a 0-dim parameter, through the balancer's buffers


def test_training_run_evaluates_coco_ap(tmp_path):
    cfg = tiny_config(tmp_path, [*DET, "train.max_iters=2", "train.eval_interval=2"])
    metrics = Trainer(cfg, console=False, progress=False).train()
    for key in ("det/AP", "det/AP50", "det/AP75", "det/APs", "det/classAP/box", "seg/mIoU"):
        assert key in metrics
    assert 0.0 <= metrics["det/AP50"] <= 100.0


def test_config_checks_for_detection(tmp_path):
    only_det = "data.tasks=[det]"
    with pytest.raises(ConfigError, match=r"model.heads.det.name: the det task needs a detection head \(fcos\)"):
        check_tasks(tiny_config(tmp_path, [only_det, "model.heads={det: {name: segmentation}}"]))
    with pytest.raises(ConfigError, match=r"heads.det.num_classes \(3\) differs from data.num_classes \(6\)"):
        check_tasks(tiny_config(tmp_path, [only_det, "model.heads={det: {name: fcos, num_classes: 3}}"]))
    with pytest.raises(ConfigError, match=r"unknown task 'box' \(choose from: seg, depth, normal, det\)"):
        check_tasks(tiny_config(tmp_path, ["data.tasks=[box]", "model.heads={box: {name: fcos}}"]))


def test_a_batch_without_boxes_names_what_is_missing(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, DET), console=False, progress=False)
    batch = next(iter(trainer.train_loader))
    del batch["boxes"]
    with pytest.raises(KeyError, match="the det task needs 'boxes' in every batch"):
        trainer.iterate(batch).as_dict()


def test_pictures_draw_predicted_and_true_boxes(tmp_path):
    import cv2

    cfg = tiny_config(tmp_path, DET)
    trainer = Trainer(cfg, console=False, progress=False)
    paths = write_prediction_pngs(trainer.model, trainer.val_set, tmp_path / "pics", 2, mean=cfg.data.mean,
                                  std=cfg.data.std)
    img = cv2.imread(str(paths[0]))
    assert img.shape == (64 + LABEL_HEIGHT, 9 * 80, 3)  # input + (pred, true) x 4 tasks
    true_panel = img[LABEL_HEIGHT:, 8 * 80:]
    input_panel = img[LABEL_HEIGHT:, :80]
    assert (true_panel != input_panel).any()  # the true boxes are drawn


@pytest.mark.slow
def test_onnx_export_of_a_detection_model_decodes_to_the_same_boxes(tmp_path):
    from mtvision.export import check_onnx, export_onnx, onnx_outputs, read_onnx_metadata

    cfg = tiny_config(tmp_path, DET)
    torch.manual_seed(0)
    model = build_model(config_to_dict(cfg.model)).eval()
    path = export_onnx(model, tmp_path / "det.onnx", (64, 80))
    images = torch.randn(2, 3, 64, 80)
    check_onnx(path, model, images)
    assert "FCOS" in read_onnx_metadata(path)["outputs"]["det"]
    with torch.no_grad():
        expected = decode_detections(model(images)["det"], (64, 80), score_threshold=0.0)
    got = decode_detections(onnx_outputs(path, images)["det"], (64, 80), score_threshold=0.0)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g["scores"][:10], e["scores"][:10], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g["boxes"][:10], e["boxes"][:10], rtol=1e-4, atol=1e-3)


def test_balancer_with_a_0_dim_shared_parameter():
    """GradientBalancer's buffers take 0-dim parameters (e.g. FCOS's per-level scales): the combined
    gradient equals the weighted sum of the per-task gradients."""
    torch.manual_seed(0)
    scalar, vector = torch.nn.Parameter(torch.tensor(1.5)), torch.nn.Parameter(torch.randn(4))
    heads = [torch.nn.Parameter(torch.randn(4)) for _ in range(2)]
    x = torch.randn(4)

    def outputs_and_losses():
        shared = scalar * vector * x
        outs = [(shared * h).sum() for h in heads]
        return outs, torch.stack([outs[0] ** 2, (outs[1] - 1) ** 2])

    outs, losses = outputs_and_losses()
    jac = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], [scalar, vector],
                                                                             retain_graph=True)])
                       for t in range(2)])
    w_ref = MGDA().weights(jac.double() @ jac.double().T)
    balancer = GradientBalancer(MGDA(), [scalar, vector], [[heads[0]], [heads[1]]])
    outs, losses = outputs_and_losses()
    balancer.combine(losses, outs)
    assert scalar.grad.shape == ()
    got = torch.cat([scalar.grad.reshape(1), vector.grad])
    torch.testing.assert_close(got, (w_ref.float() @ jac), rtol=1e-5, atol=1e-6)


def cfg_overrides(root):
    """The tiny experiment on the COCO-format fixture at ``root`` (detection only)."""
    return ["data.dataset=coco", f"data.root={root}", "data.num_classes=3", "data.tasks=[det]",
            "data.batch_size=3", "data.size=[64,64]",
            "model.heads={det: {name: fcos, num_classes: 3, channels: 16, num_convs: 1}}"]


def test_a_coco_format_dataset_trains_and_evaluates_end_to_end(tmp_path):
    """tools/train.py's path on a dataset in COCO's official format (the data tests' fixture): train,
    evaluate with per-class AP under the dataset's class names."""
    from ..data.test_coco import CLASSES, write_coco

    root = tmp_path / "coco"
    write_coco(root, "train")
    write_coco(root, "val")
    cfg = tiny_config(tmp_path, [*cfg_overrides(root), "train.max_iters=2", "train.eval_interval=2"])
    metrics = Trainer(cfg, console=False, progress=False).train()
    assert {f"det/classAP/{c}" for c in CLASSES} <= set(metrics)
    assert "det/AP" in metrics and "seg/mIoU" not in metrics
    # detection's usual resize: aspect ratio kept, padded at the bottom and right
    keep = Trainer(tiny_config(tmp_path, [*cfg_overrides(root), "data.keep_ratio=true", "train.max_iters=1"]),
                   console=False, progress=False)
    sample = keep.val_set[0]
    assert sample["meta"]["transform"]["scaled_size"] != (64, 64)
    assert keep.iterate(next(iter(keep.train_loader))).skipped == 0


def test_keep_ratio_is_refused_for_the_synthetic_scenes(tmp_path):
    with pytest.raises(ConfigError, match="data.keep_ratio: the synthetic scenes are rendered at data.size"):
        Trainer(tiny_config(tmp_path, [*DET, "data.keep_ratio=true"]), console=False, progress=False)


def test_own_folders_with_segmentation_and_boxes_train_together(tmp_path):
    """The custom folder layout with seg label maps and det box files: both heads train and are scored."""
    from ..data.fixtures import write_custom

    root = tmp_path / "mine"
    for split in ("train", "val"):
        write_custom(root, split, stems=("a", "b", "c", "d"), size=(6, 8), tasks=("seg", "det"))
    cfg = tiny_config(tmp_path, ["data.dataset=custom", f"data.root={root}", "data.num_classes=4",
                                 "data.tasks=[seg,det]", "data.batch_size=2", "data.size=[64,64]",
                                 "model.heads={seg: {name: segmentation, num_classes: 4, channels: 16}, "
                                 "det: {name: fcos, num_classes: 4, channels: 16, num_convs: 1}}",
                                 "train.max_iters=2", "train.eval_interval=2"])
    metrics = Trainer(cfg, console=False, progress=False).train()
    assert {"seg/mIoU", "det/AP", "det/classAP/thing0"} <= set(metrics)
