"""Tests for mtvision.config: defaults, _base_ inheritance, overrides, round trip, error messages."""

import dataclasses
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from mtvision.config import (
    Config,
    ConfigError,
    DataConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


# --- defaults ---------------------------------------------------------------------------------------


def test_defaults():
    cfg = Config()
    assert cfg.work_dir == "work_dirs/default" and cfg.seed == 0
    assert cfg.data.dataset == "synthetic" and cfg.data.root is None
    assert cfg.data.size == (128, 160)
    d = cfg.data
    assert (d.num_train, d.num_val, d.batch_size, d.num_workers) == (2000, 200, 8, 2)
    assert cfg.data.mean == (0.485, 0.456, 0.406) and cfg.data.std == (0.229, 0.224, 0.225)
    assert cfg.data.num_classes == 6 and cfg.data.tasks == ["seg", "depth", "normal"]
    assert set(cfg.model.heads) == {"seg", "depth", "normal"}
    assert cfg.model.heads["seg"]["num_classes"] == cfg.data.num_classes
    assert cfg.loss.weights == {} and cfg.loss.ignore_index == 255
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("adamw", 1e-3, 1e-4)
    assert (cfg.optimizer.momentum, cfg.optimizer.backbone_lr_mult) == (0.9, 1.0)
    assert (cfg.schedule.name, cfg.schedule.warmup_iters, cfg.schedule.warmup_factor) == ("cosine", 0, 0.001)
    assert (cfg.schedule.power, cfg.schedule.min_lr_ratio) == (0.9, 0.0)
    t = cfg.train
    assert (t.max_iters, t.eval_interval, t.checkpoint_interval, t.log_interval) == (1000, 500, 500, 20)
    assert (t.amp, t.grad_clip, t.device) == ("none", None, "auto")
    assert (cfg.balancer.name, cfg.balancer.kwargs) == ("ew", {})


def test_mutable_defaults_are_not_shared():
    a, b = Config(), Config()
    a.data.tasks.append("det")
    a.model.heads["seg"]["num_classes"] = 19
    assert b.data.tasks == ["seg", "depth", "normal"]
    assert b.model.heads["seg"]["num_classes"] == 6


def test_empty_dict_and_empty_file_give_defaults(tmp_path):
    assert config_from_dict({}) == Config()
    assert load_config(write(tmp_path / "empty.yaml", "")) == Config()
    assert load_config(write(tmp_path / "sections.yaml", "train:\ndata:\n")) == Config()


# --- loading and _base_ ------------------------------------------------------------------------------


def test_base_inheritance_deep_merge(tmp_path):
    write(
        tmp_path / "configs/base.yaml",
        """
        seed: 3
        data: {size: [64, 80], batch_size: 4, num_workers: 0}
        model:
          backbone: {name: resnet18, pretrained: null}
          heads:
            seg: {name: segmentation, num_classes: 6}
            depth: {name: depth}
        train: {max_iters: 100, amp: bf16}
        """,
    )
    child = write(
        tmp_path / "configs/synthetic/child.yaml",
        """
        _base_: ../base.yaml
        data: {batch_size: 2}
        model:
          heads:
            seg: {num_classes: 19}
        optimizer: {lr: 1e-3, name: sgd}
        train: {max_iters: 50}
        """,
    )
    cfg = load_config(child)
    assert cfg.seed == 3
    assert cfg.data.size == (64, 80) and cfg.data.batch_size == 2 and cfg.data.num_workers == 0
    assert cfg.model.heads == {"seg": {"name": "segmentation", "num_classes": 19}, "depth": {"name": "depth"}}
    assert cfg.model.neck == Config().model.neck  # absent in every file: default
    assert cfg.train.max_iters == 50 and cfg.train.amp == "bf16"
    # `1e-3` is a string to PyYAML; a float field accepts it as the number.
    assert cfg.optimizer.lr == 1e-3 and isinstance(cfg.optimizer.lr, float) and cfg.optimizer.name == "sgd"


def test_base_list_order_nested_chain_and_delete(tmp_path):
    write(tmp_path / "a.yaml", "seed: 1\nwork_dir: from_a\nbalancer: {name: pcgrad, kwargs: {x: 1, y: 2}}\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\nseed: 2\n")
    write(tmp_path / "c.yaml", "seed: 3\ndata: {num_classes: 19}\n")
    top = write(
        tmp_path / "top.yaml",
        """
        _base_: [b.yaml, c.yaml]
        balancer: {kwargs: {_delete_: true, z: 3}}
        """,
    )
    cfg = load_config(top)
    assert cfg.seed == 3  # the later base wins over the earlier one
    assert cfg.work_dir == "from_a"  # inherited through b -> a
    assert cfg.data.num_classes == 19
    assert cfg.balancer.name == "pcgrad" and cfg.balancer.kwargs == {"z": 3}  # _delete_ replaces


def test_diamond_bases_are_not_a_cycle(tmp_path):
    write(tmp_path / "root.yaml", "seed: 7\n")
    write(tmp_path / "l.yaml", "_base_: root.yaml\n")
    write(tmp_path / "r.yaml", "_base_: root.yaml\n")
    assert load_config(write(tmp_path / "d.yaml", "_base_: [l.yaml, r.yaml]\n")).seed == 7


# --- overrides ---------------------------------------------------------------------------------------


def test_overrides_scalars_lists_nulls(tmp_path):
    path = write(tmp_path / "x.yaml", "train: {grad_clip: 1.0, max_iters: 10}\ndata: {batch_size: true}\n")
    cfg = load_config(
        path,
        [
            "train.amp=bf16",
            "data.size=[64,80]",
            "train.grad_clip=null",
            "data.batch_size=2",  # fixes the file's invalid value before validation
            "seed=5",
            "work_dir=runs/exp 1",
            "optimizer.lr=2",  # int accepted for float
            "data.tasks=[seg]",
            "data.root=~/data",
        ],
    )
    assert cfg.train.amp == "bf16" and cfg.data.size == (64, 80) and cfg.train.grad_clip is None
    assert cfg.data.batch_size == 2 and cfg.seed == 5 and cfg.work_dir == "runs/exp 1"
    assert cfg.optimizer.lr == 2.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.data.tasks == ["seg"] and cfg.data.root == "~/data"
    assert cfg.train.max_iters == 10  # untouched file value stays
    later_wins = load_config(path, ["data.batch_size=2", "train.max_iters=3", "train.max_iters=4"])
    assert later_wins.train.max_iters == 4


def test_overrides_free_form_dicts(tmp_path):
    path = write(tmp_path / "x.yaml", "model: {heads: {seg: {name: segmentation, num_classes: 6}}}\n")
    cfg = load_config(
        path,
        [
            "model.heads.seg.num_classes=19",
            "model.heads.depth.name=depth",  # new key inside a free-form dict
            "model.backbone.pretrained=/w/r18.pth",  # backbone absent in the file: starts from the default
            "loss.weights.depth=0.5",
            "balancer.kwargs.alpha=1.5",
            "balancer.name=famo",
        ],
    )
    assert cfg.model.heads == {"seg": {"name": "segmentation", "num_classes": 19}, "depth": {"name": "depth"}}
    assert cfg.model.backbone == {"name": "resnet18", "pretrained": "/w/r18.pth"}
    assert cfg.loss.weights == {"depth": 0.5}
    assert cfg.balancer.kwargs == {"alpha": 1.5} and cfg.balancer.name == "famo"


def test_override_section_with_mapping_keeps_other_keys(tmp_path):
    path = write(tmp_path / "x.yaml", "train: {max_iters: 10, log_interval: 5}\n")
    cfg = load_config(path, ["train={max_iters: 20}"])
    assert cfg.train.max_iters == 20 and cfg.train.log_interval == 5


def test_apply_overrides_on_config():
    base = Config()
    cfg = apply_overrides(base, ["train.amp=fp16", "model.heads.seg.num_classes=19"])
    assert cfg.train.amp == "fp16" and cfg.model.heads["seg"]["num_classes"] == 19
    assert set(cfg.model.heads) == {"seg", "depth", "normal"}
    assert base == Config()  # the input is not modified


# --- round trip --------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        write(tmp_path / "x.yaml", "data: {size: [32, 48]}\n"),
        ["train.grad_clip=2.5", "loss.weights.seg=2", "balancer.kwargs.lr=1e-5", "optimizer.lr=3e-4"],
    )
    out = tmp_path / "work" / "config.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert load_config(out) == config_from_dict(yaml.safe_load(out.read_text()))
    assert save_config(Config(), tmp_path / "d.yaml") is None and load_config(tmp_path / "d.yaml") == Config()


def test_config_to_dict_is_plain_yaml():
    d = config_to_dict(Config())
    assert d["data"]["size"] == [128, 160] and isinstance(d["data"]["mean"], list)
    assert yaml.safe_load(yaml.safe_dump(d)) == d  # only plain types inside
    assert config_from_dict(d) == Config()
    assert config_to_dict(DataConfig(batch_size=3))["batch_size"] == 3


# --- custom_imports and data.check --------------------------------------------------------------------

PLUGIN_ENTRY = "test_plugin_balancer_xyz"


@pytest.fixture
def plugin(tmp_path, monkeypatch, request):
    """A module on sys.path registering a balancer; its name and registration are removed afterwards."""
    from mtvision.registry import BALANCERS

    name = f"mtv_test_plugin_{request.node.callspec.id}"
    write(
        tmp_path / "plugins" / f"{name}.py",
        f"""
        from mtvision.registry import BALANCERS

        @BALANCERS.register({PLUGIN_ENTRY!r}, override=True)
        class PluginBalancer:
            pass
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    assert PLUGIN_ENTRY not in BALANCERS
    yield name
    sys.modules.pop(name, None)
    # The registry has no public removal; other tests compare the balancer list with the shipped configs.
    BALANCERS._entries.pop(PLUGIN_ENTRY, None)


@pytest.mark.parametrize("how", ["file", "dict", "override", "apply_overrides"])
def test_custom_imports_register_a_plugin(plugin, how, tmp_path):
    from mtvision.registry import BALANCERS

    if how == "file":
        cfg = load_config(write(tmp_path / "x.yaml", f"custom_imports: [{plugin}]\n"))
    elif how == "dict":
        cfg = config_from_dict({"custom_imports": [plugin]})
    elif how == "override":  # as on the command line: the value is parsed as a YAML list
        cfg = load_config(write(tmp_path / "x.yaml", "seed: 1\n"), [f"custom_imports=[{plugin}]"])
    else:
        cfg = apply_overrides(Config(), [f"custom_imports=[{plugin}]"])
    assert cfg.custom_imports == [plugin]
    assert BALANCERS[PLUGIN_ENTRY] is sys.modules[plugin].PluginBalancer


def test_custom_imports_errors(tmp_path):
    assert Config().custom_imports == []
    msg = err(config_from_dict, {"custom_imports": ["mtv_no_such_module_xyz"]})
    assert msg.startswith("custom_imports[0]: cannot import 'mtv_no_such_module_xyz'"), msg
    path = write(tmp_path / "x.yaml", "seed: 1\n")
    assert err(load_config, path, ["custom_imports=[os, mtv_no_such_module_xyz]"]).startswith(
        "custom_imports[1]: cannot import 'mtv_no_such_module_xyz'"
    )
    msg = err(load_config, path, ["custom_imports=os"])  # one name, not a list
    assert msg.startswith("custom_imports: expected a list of str, got 'os'"), msg


def test_data_check_is_true_false_or_null():
    assert Config().data.check is None
    for value in (True, False, None):
        assert config_from_dict({"data": {"check": value}}).data.check is value
    assert apply_overrides(Config(), ["data.check=false"]).data.check is False
    msg = err(config_from_dict, {"data": {"check": "yes"}}, "exp.yaml")
    assert msg == "data.check: expected bool or null, got 'yes' (str) in exp.yaml"


# --- errors ------------------------------------------------------------------------------------------


def err(fn, *args):
    with pytest.raises(ConfigError) as info:
        fn(*args)
    return str(info.value)


def test_config_errors_are_value_errors():
    """Callers that catch ValueError (argument errors in general) also catch config errors."""
    assert issubclass(ConfigError, ValueError)


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path / "configs/x.yaml", "train: {max_iter: 5}\n")
    msg = err(load_config, path)
    assert msg == f"unknown key 'train.max_iter' in {path} (did you mean 'train.max_iters'?)"
    assert "'data.batch_size'" in err(config_from_dict, {"train": {"batch_size": 2}})  # same name elsewhere
    assert "unknown key 'trian'" in err(config_from_dict, {"trian": {}})
    assert "'model.foo'" in err(config_from_dict, {"model": {"foo": {}}})  # model itself is not free-form


def test_unknown_key_names_the_base_file_it_came_from(tmp_path):
    base = write(tmp_path / "base.yaml", "data: {batchsize: 2}\n")
    child = write(tmp_path / "sub/child.yaml", "_base_: ../base.yaml\nseed: 1\n")
    msg = err(load_config, child)
    assert "'data.batchsize'" in msg and str(base) in msg and "'data.batch_size'" in msg


def test_wrong_types_name_key_expected_and_got():
    cases = [
        ({"data": {"batch_size": True}}, ["data.batch_size", "int", "True"]),  # bool is not an int
        ({"data": {"batch_size": 2.0}}, ["data.batch_size", "int", "2.0"]),
        ({"optimizer": {"lr": "fast"}}, ["optimizer.lr", "float", "'fast'"]),
        ({"optimizer": {"lr": False}}, ["optimizer.lr", "float", "False"]),
        ({"work_dir": 5}, ["work_dir", "str", "5"]),
        ({"data": {"size": [64]}}, ["data.size", "list of 2 int", "[64]"]),
        ({"data": {"size": [64, "a"]}}, ["data.size[1]", "int", "'a'"]),
        ({"data": {"mean": [0.5, 0.5]}}, ["data.mean", "list of 3 float"]),
        ({"data": {"tasks": "seg"}}, ["data.tasks", "list of str", "'seg'"]),
        ({"train": {"grad_clip": "x"}}, ["train.grad_clip", "float or null", "'x'"]),
        ({"loss": {"weights": {"seg": "high"}}}, ["loss.weights.seg", "float", "'high'"]),
        ({"model": {"heads": [1]}}, ["model.heads", "mapping", "[1]"]),
        ({"train": 3}, ["train", "mapping", "3"]),
    ]
    for d, parts in cases:
        msg = err(config_from_dict, d, "exp.yaml")
        assert "exp.yaml" in msg, msg
        for p in parts:
            assert p in msg, (p, msg)


def test_enum_values_are_listed():
    for key, bad, allowed in [
        ("train.amp", "bf15", ["'none'", "'bf16'", "'fp16'"]),
        ("optimizer.name", "adam", ["'adamw'", "'sgd'"]),
        ("schedule.name", "step", ["'cosine'", "'poly'", "'constant'"]),
        ("train.device", "gpu", ["'auto'", "'cpu'", "'cuda'"]),
    ]:
        msg = err(apply_overrides, Config(), [f"{key}={bad}"])
        assert msg.startswith(f"{key}: expected one of") and repr(bad) in msg and f"{key}={bad}" in msg
        for a in allowed:
            assert a in msg


def test_non_positive_values_name_the_key():
    for key, value in [
        ("train.max_iters", 0),
        ("data.batch_size", 0),
        ("train.eval_interval", -1),
        ("data.num_workers", -1),
        ("optimizer.lr", 0),
        ("train.grad_clip", 0),
        ("data.size", [0, 8]),
        ("data.std", [0.2, 0.0, 0.2]),
        ("loss.weights", {"seg": -1}),
    ]:
        section, name = key.split(".")
        msg = err(config_from_dict, {section: {name: value}})
        assert msg.startswith(f"{key}: must be"), msg
    assert "data.tasks: must be non-empty" in err(config_from_dict, {"data": {"tasks": []}})
    assert Config().train.grad_clip is None  # null skips the check
    assert config_from_dict({"data": {"num_workers": 0}}).data.num_workers == 0


def test_missing_config_file_names_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert err(load_config, missing) == f"config file not found: {missing}"


def test_missing_base_names_both_files(tmp_path):
    child = write(tmp_path / "configs/child.yaml", "_base_: gone.yaml\n")
    msg = err(load_config, child)
    assert "'gone.yaml'" in msg and str(child) in msg and str(tmp_path / "configs/gone.yaml") in msg


def test_base_cycle_is_detected(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    msg = err(load_config, tmp_path / "a.yaml")
    assert "cycle" in msg and "a.yaml" in msg and "b.yaml" in msg
    write(tmp_path / "self.yaml", "_base_: self.yaml\n")
    assert "cycle" in err(load_config, tmp_path / "self.yaml")


def test_bad_files(tmp_path):
    bad = write(tmp_path / "bad.yaml", "train: {max_iters: [\n")
    assert str(bad) in err(load_config, bad) and "invalid YAML" in err(load_config, bad)
    lst = write(tmp_path / "list.yaml", "- 1\n")
    assert str(lst) in err(load_config, lst) and "mapping" in err(load_config, lst)
    base_bad = write(tmp_path / "base_bad.yaml", "_base_: {a: 1}\n")
    assert "_base_" in err(load_config, base_bad)


def test_bad_overrides_name_the_override(tmp_path):
    path = write(tmp_path / "x.yaml", "seed: 1\n")
    assert "'train.amp'" in err(load_config, path, ["train.amp"])
    assert "key=value" in err(load_config, path, ["seed"])
    assert "'=3'" in err(load_config, path, ["=3"])
    assert "'data.size=[64,'" in err(load_config, path, ["data.size=[64,"])  # value is not YAML
    msg = err(load_config, path, ["train.max_iter=3"])
    assert msg == (
        "unknown key 'train.max_iter' in override 'train.max_iter=3' (did you mean 'train.max_iters'?)"
    )
    assert "'data.size'" in err(load_config, path, ["data.size.h=3"])  # not a mapping
    msg = err(load_config, path, ["train.max_iters=many"])
    assert "train.max_iters" in msg and "override 'train.max_iters=many'" in msg


def test_config_is_a_plain_dataclass():
    assert dataclasses.is_dataclass(Config) and issubclass(ConfigError, ValueError)
    assert [f.name for f in dataclasses.fields(Config)] == [
        "work_dir", "seed", "custom_imports", "data", "model", "loss", "optimizer", "schedule", "train",
        "balancer",
    ]


def test_readme_custom_config_and_its_single_task_baseline_load_from_anywhere(tmp_path, monkeypatch):
    """The README's configs/my_data/mtl.yaml and stl_seg.yaml (_base_ relative to the file, _delete_ for
    the baseline's heads) load from another working directory."""
    import re
    import shutil

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(_base_: (?:\.\./synthetic/base\.yaml|mtl\.yaml)\n.*?)```", readme, re.S)
    mtl = next(b for b in blocks if "dataset: custom" in b)
    stl = next(b for b in blocks if b.startswith("_base_: mtl.yaml"))
    (tmp_path / "configs" / "synthetic").mkdir(parents=True)
    shutil.copy(root / "configs" / "synthetic" / "base.yaml", tmp_path / "configs" / "synthetic" / "base.yaml")
    (tmp_path / "configs" / "my_data").mkdir()
    (tmp_path / "configs" / "my_data" / "mtl.yaml").write_text(mtl)
    (tmp_path / "configs" / "my_data" / "stl_seg.yaml").write_text(stl)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    multi = load_config(tmp_path / "configs" / "my_data" / "mtl.yaml")
    single = load_config(tmp_path / "configs" / "my_data" / "stl_seg.yaml")
    assert list(multi.model.heads) == ["seg", "depth", "normal"] and multi.data.num_classes == 5
    assert list(single.model.heads) == ["seg"] and single.data.tasks == ["seg"]
    assert single.data.root == multi.data.root and single.optimizer == multi.optimizer
