"""Bad data never costs work silently: data.check finds a corrupt file before the first step, skip_bad
names every skipped file (log, metrics.json, in training and in evaluation), a ViT's data.size is checked
before any work, and a failure after training started leaves last.pth."""

import json
import re
from pathlib import Path

import pytest
import torch

from mtvision.config import ConfigError
from mtvision.data.sample import DataError
from mtvision.engine import Trainer

from ..data import fixtures as F
from ..multiprocess import gloo_process_group, run_two_processes
from .helpers import tiny_config

STEMS = ("a", "b", "c", "d", "e", "f", "g", "h")


def _folders(tmp_path):
    """A custom folder dataset (seg + depth) of 8 training and 4 validation images of 8x10 (resized to
    data.size)."""
    root = tmp_path / "data"
    F.write_custom(root, "train", stems=STEMS, size=(8, 10), num_classes=6, tasks=("seg", "depth"))
    F.write_custom(root, "val", stems=STEMS[:4], size=(8, 10), num_classes=6, tasks=("seg", "depth"))
    return root


def _config(tmp_path, root, overrides=()):
    return tiny_config(tmp_path, ["data.dataset=custom", f"data.root={root}", "data.tasks=[seg,depth]",
                                  "model.heads={seg: {name: segmentation, num_classes: 6, channels: 16}, "
                                  "depth: {name: depth, channels: 16}}", *overrides])


@pytest.mark.slow
def test_data_check_stops_before_any_work_naming_the_file(tmp_path):
    root = _folders(tmp_path)
    bad = root / "val" / "seg" / "c.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match=rf"1 unreadable sample\(s\) found before training: val: {bad}: seg"):
        Trainer(_config(tmp_path, root), console=False, progress=False)
    assert not (tmp_path / "work").exists()  # nothing was started, nothing to lose
    # data.check=false: the same file is found only at the first evaluation (the old behaviour)
    late = Trainer(_config(tmp_path, root, ["data.check=false"]), console=False, progress=False)
    with pytest.raises(DataError, match=str(bad)):
        late.train()


@pytest.mark.slow
def test_skip_bad_names_every_skipped_file_in_training_and_evaluation(tmp_path):
    root = _folders(tmp_path)
    bad_train = root / "train" / "depth" / "b.png"
    bad_val = root / "val" / "seg" / "a.png"
    for path in (bad_train, bad_val):
        path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    trainer = Trainer(_config(tmp_path, root, ["data.skip_bad=true", "train.max_iters=4"]), console=False,
                      progress=False)
    assert {k: len(v) for k, v in trainer.bad_samples.items()} == {"train": 1, "val": 1}
    trainer.train()
    summary = json.loads((tmp_path / "work" / "metrics.json").read_text())
    # 4 steps of 4 over 8 samples: two epochs, the bad sample is met once in each
    assert [k.split(": ")[:2] for k in summary["skipped_files"]] == [[str(bad_train), "depth"]]
    assert list(summary["skipped_files"].values()) == [2] and summary["skipped_samples"] == 2
    assert [k.split(": ")[0] for k in summary["eval_skipped_files"]] == [str(bad_val)]
    log = (tmp_path / "work" / "train.log").read_text()
    assert log.count(f"skipped an unreadable sample (data.skip_bad): {bad_train}") == 1  # named once
    assert f"evaluation skipped an unreadable sample (data.skip_bad): {bad_val}" in log
    assert "2 samples skipped (unreadable)" in log and "0 steps skipped (non-finite)" in log


def test_vit_input_size_is_checked_before_any_work(tmp_path):
    cfg = tiny_config(tmp_path, ["model.backbone.name=test_vit", "data.size=[30,46]"])
    with pytest.raises(ConfigError, match=r"data.size: \[30, 46\] is not a multiple of the backbone's patch "
                                          r"size (\d+)"):
        Trainer(cfg, console=False, progress=False)


NO_PERIODIC_SAVE = ["train.max_iters=6", "train.checkpoint_interval=100", "train.eval_interval=100"]


def _fail_at(tmp_path, iteration: int, message: str, overrides=()) -> dict:
    """Train the tiny run whose loss raises ``RuntimeError(message)`` at ``iteration``; the ``last.pth``
    that the failure left."""
    trainer = Trainer(tiny_config(tmp_path, [*NO_PERIODIC_SAVE, *overrides]), console=False, progress=False)
    real = trainer.loss_fn.task_losses

    def failing(outputs, batch):
        if trainer.iteration == iteration:
            raise RuntimeError(message)
        return real(outputs, batch)

    trainer.loss_fn.task_losses = failing
    with pytest.raises(RuntimeError, match=re.escape(message)):
        trainer.train()
    return torch.load(tmp_path / "work" / "checkpoints" / "last.pth", weights_only=True)


@pytest.mark.slow
def test_a_failure_after_training_started_saves_last_pth_at_the_failing_step(tmp_path):
    state = _fail_at(tmp_path, 3, "out of memory (simulated)")
    # three steps done; the data position is that of the failed step, so a resume retries its batch
    assert state["iteration"] == 3 and state["data"]["epoch"] == 1 and state["data"]["batch_in_epoch"] == 1
    assert "run failed at iteration 3 (RuntimeError: out of memory (simulated))" in \
        (tmp_path / "work" / "train.log").read_text()
    resumed = Trainer(tiny_config(tmp_path, NO_PERIODIC_SAVE), console=False, progress=False)
    resumed.resume(tmp_path / "work" / "checkpoints" / "last.pth")
    resumed.train()
    assert resumed.iteration == 6


@pytest.mark.slow
def test_a_failure_at_an_epochs_first_batch_saves_the_position_after_the_epoch_change(tmp_path):
    """The saved position is that of the failed batch after the epoch change (epoch 1, batch 0), not the
    end of epoch 0: a resume must not end epoch 0 a second time (DWA's per-epoch averages would shift)."""
    state = _fail_at(tmp_path, 2, "simulated", ["balancer.name=dwa"])  # 2 batches an epoch
    assert state["iteration"] == 2 and (state["data"]["epoch"], state["data"]["batch_in_epoch"]) == (1, 0)


def _check_share(rank, init_file, out_dir):
    from mtvision.data import FolderDataset
    from mtvision.data.check import find_bad_samples

    with gloo_process_group(rank, init_file):
        dataset = FolderDataset(f"{out_dir}/data", "train", tasks=("seg", "depth"), num_classes=6)
        found = find_bad_samples(dataset, rank=rank, world_size=2)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(found))


@pytest.mark.distributed
def test_data_check_splits_the_reading_over_processes_and_agrees(tmp_path):
    """Under torch.distributed each process reads every other sample; both end with the whole list, the
    same as one process reading everything."""
    from mtvision.data import FolderDataset
    from mtvision.data.check import find_bad_samples

    root = _folders(tmp_path)
    for stem in ("b", "c"):  # indices 1 and 2: one in each process's share
        (root / "train" / "seg" / f"{stem}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    expected = find_bad_samples(FolderDataset(root, "train", tasks=("seg", "depth"), num_classes=6))
    assert [p.split(": ")[0] for p in expected] == [str(root / "train" / "seg" / f"{s}.png") for s in "bc"]
    run_two_processes(_check_share, tmp_path)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected
