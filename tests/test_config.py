"""Config validation: every bad value is refused before any data loads, with the dotted key, its
YAML line and the allowed values in the message."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from benchkit.config import ConfigError, ExperimentConfig
from benchkit.validation import load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return str(info.value)


def test_unknown_criterion_names_key_line_and_allowed_values(tmp_path):
    msg = error_of(tmp_path, """\
        data: {name: digits}
        prune:
          timing: post
          criterion: magnitud
        """)
    assert "prune.criterion" in msg and "(line 4)" in msg
    assert "'magnitud'" in msg and "magnitude" in msg and "random" in msg


def test_unknown_key_in_sweep_base_names_line(tmp_path):
    msg = error_of(tmp_path, """\
        experiment: x
        base:
          prune:
            compresion: 4
        grid: {}
        """)
    assert "prune.compresion" in msg and "(line 4)" in msg and "compression" in msg


@pytest.mark.parametrize("key,value,expect", [
    ("prune.timing", "sometime", ["prune.timing", "during", "lottery", "post", "pre"]),
    ("prune.allocation", "planet", ["prune.allocation", "global", "uniform", "erk", "lamp"]),
    ("prune.granularity", "blob", ["prune.granularity", "element", "channel"]),
    ("model.name", "not_a_net", ["model.name", "lenet300", "torchvision"]),
    ("data.name", "imagenet22k", ["data.name", "digits", "fashion-mnist"]),
    ("train.optimizer", "lbfgs", ["train.optimizer", "adam", "sgd"]),
    ("train.schedule", "warmup", ["train.schedule", "cosine", "multistep"]),
    ("prune.post.finetune.optimizer", "rmsprop", ["prune.post.finetune.optimizer", "sgd"]),
    ("prune.reduce", "max", ["prune.reduce", "l1", "l2", "mean"]),
])
def test_unknown_names_list_allowed_values(key, value, expect):
    with pytest.raises(ConfigError) as info:
        load_config({}, {key: value})
    msg = str(info.value)
    for word in expect:
        assert word in msg, (word, msg)


@pytest.mark.parametrize("overrides,key,fragment", [
    ({"prune.compression": 0.5}, "prune.compression", ">= 1"),
    ({"prune.sparsity": 1.0}, "prune.sparsity", "[0, 1)"),
    ({"prune.sparsity": -0.1}, "prune.sparsity", "[0, 1)"),
    ({"prune.compression": 4, "prune.sparsity": 0.75}, "prune.compression", "not both"),
    ({"prune.overrides": {"fc3": 0.5}}, "prune.overrides", ">= 1"),
    ({"prune.granularity": "2:4", "prune.compression": 4}, "prune.compression", "M/N = 2"),
    ({"prune.granularity": "2:4", "prune.timing": "during"}, "prune.granularity", "gradually"),
    ({"prune.granularity": "2:4", "prune.post.rounds": 3}, "prune.post.rounds", "rounds: 1"),
    ({"prune.during.soft": True, "prune.timing": "post"}, "prune.during.soft", "timing during"),
    ({"prune.post.rounds": 3, "prune.timing": "pre"}, "prune.post.rounds", "timing post"),
    ({"prune.post.lr_rewind": True, "prune.timing": "lottery"}, "prune.post.lr_rewind", "timing post"),
    ({"prune.post.distill.enabled": True, "prune.timing": "during"}, "prune.post.distill.enabled", "timing post"),
    ({"prune.lottery.controls": ["reinit"], "prune.timing": "post"}, "prune.lottery.controls", "timing lottery"),
    ({"prune.timing": "lottery", "prune.criterion": "snip"}, "prune.criterion", "magnitude or random"),
    ({"prune.timing": "lottery", "prune.lottery.controls": ["invert"]}, "prune.lottery.controls", "reinit, random"),
    ({"prune.timing": "lottery", "prune.lottery.rate": 0.2, "prune.compression": 8}, "prune.compression",
     "not both"),
    ({"prune.timing": "lottery", "prune.lottery.rate": 1.5}, "prune.lottery.rate", "(0, 1)"),
    ({"prune.timing": "during", "prune.during.start": 0.8, "prune.during.end": 0.5}, "prune.during.start",
     "start < end"),
    ({"prune.timing": "during", "prune.compression": 2, "prune.during.initial_sparsity": 0.9},
     "prune.during.initial_sparsity", "final sparsity"),
    ({"prune.post.lr_rewind": True, "prune.post.finetune.epochs": 20, "train.epochs": 10}, "prune.post.finetune.epochs",
     "at most 10"),
    ({"prune.post.lr_rewind": True, "prune.post.finetune.lr": 0.01}, "prune.post.finetune.lr", "original training lr"),
    ({"prune.post.distill.enabled": True, "prune.post.distill.alpha": 2.0}, "prune.post.distill.alpha", "[0, 1]"),
    ({"train.lr": 0.0}, "train.lr", "> 0"),
    ({"device": "tpu"}, "device", "cuda:N"),
])
def test_impossible_values_and_combinations(overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_config({}, overrides)
    msg = str(info.value)
    assert key in msg and fragment in msg, msg


def test_all_problems_reported_at_once(tmp_path):
    msg = error_of(tmp_path, """\
        prune:
          criterion: nope
          compression: 0.1
        train:
          optimizer: nada
        """)
    assert "prune.criterion (line 2)" in msg
    assert "prune.compression (line 3)" in msg
    assert "train.optimizer (line 5)" in msg


def test_valid_combinations_pass():
    for overrides in (
        {"prune.timing": "pre", "prune.criterion": "snip", "prune.compression": 10},
        {"prune.timing": "during", "prune.sparsity": 0.9, "prune.during.soft": True},
        {"prune.timing": "post", "prune.post.rounds": 3, "prune.compression": 8, "prune.post.lr_rewind": True,
         "prune.post.finetune.epochs": 2},
        {"prune.timing": "post", "prune.granularity": "2:4"},
        {"prune.timing": "lottery", "prune.lottery.controls": ["reinit", "random"],
         "prune.lottery.layer_rates": {"fc3": 0.1}, "prune.lottery.rewind_iteration": 100},
    ):
        load_config({}, overrides)


def test_sweep_files_give_their_base_run():
    for name in ("quickstart.yaml", "fashion_lenet300.yaml"):
        cfg = load_config(REPO / "experiments" / name)
        assert cfg.prune.timing == "post"
    quick = load_config(REPO / "experiments" / "quickstart.yaml", ["prune.compression=8"])
    assert quick.experiment == "quickstart" and quick.data.name == "digits" and quick.prune.compression == 8
    fashion = load_config(REPO / "experiments" / "fashion_lenet300.yaml")
    assert fashion.data.name == "fashion-mnist" and fashion.prune.compression == 10
    assert fashion.prune.allocation == "global" and fashion.prune.criterion == "magnitude"


def test_layer_pattern_matching_nothing_fails_before_training(tmp_path, monkeypatch):
    """Layer globs need the model: checked in the experiment's preflight, before any training."""
    from benchkit.experiment import PruningExperiment
    from benchkit.timing import base

    def no_training(*args, **kwargs):
        raise AssertionError("training started before the config was fully checked")

    monkeypatch.setattr(base, "train", no_training)
    cfg = load_config({"data": {"name": "digits"}, "output_dir": str(tmp_path), "progress": False,
                                      "prune": {"compression": 4, "exclude": ["classifier.*"]}})
    with pytest.raises(ConfigError) as info:
        PruningExperiment(cfg).run()
    assert "prune.exclude" in str(info.value) and "fc1" in str(info.value)


@pytest.mark.parametrize("overrides,key,fragment", [
    ({"prune.post.finetune.iterations": 0}, "prune.post.finetune.iterations", ">= 1"),
    ({"prune.post.finetune.iterations": -5}, "prune.post.finetune.iterations", ">= 1"),
    ({"prune.post.finetune.epochs": -1}, "prune.post.finetune.epochs", ">= 0"),
    ({"train.iterations": 0}, "train.iterations", ">= 1"),
    ({"train.iterations": -3}, "train.iterations", ">= 1"),
    ({"train.nesterov": True, "train.momentum": 0.0}, "train.nesterov", "train.momentum > 0"),
    ({"train.nesterov": True, "train.optimizer": "adam"}, "train.nesterov", "sgd"),
    ({"train.nesterov": True, "train.optimizer": "adamw", "train.momentum": 0.0}, "train.nesterov", "sgd"),
    ({"train.schedule": "step", "train.step_size": 0}, "train.step_size", "> 0"),
    ({"train.schedule": "step", "train.step_size": -2}, "train.step_size", "> 0"),
    ({"prune.post.finetune.schedule": "step", "train.step_size": 0}, "train.step_size", "> 0"),
    ({"train.milestones": [5, 8]}, "train.milestones", "multistep"),
    ({"train.schedule": "cosine", "train.milestones": [5]}, "train.milestones", "multistep"),
    ({"prune.post.finetune.schedule": "multistep"}, "train.milestones", "needs milestones"),
])
def test_training_settings_that_would_fail_or_be_ignored_are_refused(overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_config({}, overrides)
    msg = str(info.value)
    assert f"{key}: " in msg and fragment in msg, msg


def test_training_settings_that_apply_pass():
    for overrides in (
        {"train.nesterov": True, "train.momentum": 0.9},
        {"train.schedule": "constant", "train.step_size": 0},  # step_size only matters for schedule step
        {"train.schedule": "multistep", "train.milestones": [5, 8]},
        {"prune.post.finetune.schedule": "multistep", "train.milestones": [2]},  # the fine-tuning schedule uses them
        {"prune.post.finetune.epochs": 0},  # no fine-tuning
        {"prune.post.finetune.iterations": 5},
        {"train.nesterov": True, "train.optimizer": "adam", "prune.post.finetune.optimizer": "sgd"},  # sgd fine-tuning
    ):
        load_config({}, overrides)


# --------------------------------------------------------------------------------------------- review fixes
def _old_hash(cfg: ExperimentConfig) -> str:
    """The config hash as computed before imagefolder roots and text keys counted: every other config keeps it."""
    from benchkit.config import NON_SEMANTIC_KEYS, TEXT_KEYS, stable_hash

    return stable_hash({k: v for k, v in cfg.flat().items() if k not in NON_SEMANTIC_KEYS | TEXT_KEYS})


def _image_folder(path: Path) -> Path:
    (path / "train").mkdir(parents=True)
    (path / "val").mkdir()
    return path


def test_imagefolder_root_is_part_of_the_config_hash(tmp_path):
    for name in ("digits", "mnist", "cifar10"):  # a torchvision root is only where the files are
        a = load_config({"data": {"name": name, "root": str(tmp_path / "a")}})
        b = load_config({"data": {"name": name, "root": str(tmp_path / "b")}})
        assert a.config_hash() == b.config_hash() == _old_hash(a)
    assert ExperimentConfig().config_hash() == _old_hash(ExperimentConfig())
    a = load_config({"data": {"name": "imagefolder", "root": str(tmp_path / "a")}})
    b = load_config({"data": {"name": "imagefolder", "root": str(tmp_path / "b")}})
    assert a.config_hash() != b.config_hash()


def test_imagefolder_dense_cache_key_includes_the_dataset_folder(tmp_path, monkeypatch):
    from benchkit.cache import dense_key_material

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder_a, folder_b = _image_folder(tmp_path / "a"), _image_folder(tmp_path / "b")

    def material(name: str, root: str | None) -> dict:
        return dense_key_material(load_config({"data": {"name": name, "root": root}}), "cpu")

    assert material("imagefolder", str(folder_a)) != material("imagefolder", str(folder_b))
    assert material("imagefolder", str(folder_a))["data"]["folder"] == str(folder_a.resolve())
    # data.root unset: the folder comes from $BENCHKIT_DATA/imagenet, so two data roots are two datasets
    monkeypatch.setenv("BENCHKIT_DATA", str(tmp_path / "x"))
    _image_folder(tmp_path / "x" / "imagenet")
    from_x = material("imagefolder", None)
    monkeypatch.setenv("BENCHKIT_DATA", str(tmp_path / "y"))
    _image_folder(tmp_path / "y" / "imagenet")
    from_y = material("imagefolder", None)
    assert from_x != from_y and from_y["data"]["folder"] == str((tmp_path / "y" / "imagenet").resolve())
    # other datasets: the key ignores the root, as before
    digits_a, digits_b = material("digits", str(folder_a)), material("digits", str(folder_b))
    assert digits_a == digits_b and "root" not in digits_a["data"] and "folder" not in digits_a["data"]


def test_imagefolder_dense_cache_key_follows_the_folder_contents(tmp_path):
    """Same path, other images: the dense cache must not serve the model trained on the old ones."""
    import os

    from benchkit.cache import dense_key_material

    folder = _image_folder(tmp_path / "imgs")
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (folder / split / cls).mkdir()
            (folder / split / cls / "0.png").write_bytes(f"{split}-{cls}".encode())
    cfg = load_config({"data": {"name": "imagefolder", "root": str(folder)}})

    def key() -> str:
        return dense_key_material(cfg, "cpu")["data"]["folder_contents"]

    first = key()
    assert key() == first  # reading the folder changes nothing
    image = next((folder / "train").rglob("*.png"))
    extra = image.with_name("extra.png")
    extra.write_bytes(image.read_bytes())  # an image added
    added = key()
    extra.unlink()
    assert added != first and key() == first
    st = image.stat()
    image.write_bytes(image.read_bytes() + b"\0")  # an image rewritten (other size)
    assert key() not in (first, added)
    image.write_bytes(image.read_bytes()[:-1])
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, newer mtime: rewritten
    assert key() not in (first, added)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert key() == first
    (folder / "val" / next(iter(os.listdir(folder / "val")))).rename(folder / "val" / "renamed")  # a class renamed
    assert key() != first


def test_yaml_1_2_numbers_in_files_overrides_and_sweeps(tmp_path):
    import yaml

    from benchkit.sweep import load_sweep

    path = write(tmp_path, """\
        data: {name: digits, val_fraction: .5}
        train:
          lr: 1e-3
          weight_decay: 5E-4
        prune:
          granularity: 2:4
        """)
    cfg = load_config(path)
    assert cfg.train.lr == 0.001 and cfg.train.weight_decay == 0.0005 and cfg.data.val_fraction == 0.5
    assert cfg.prune.granularity == "2:4"
    cfg = ExperimentConfig.from_dict({}, ["train.lr=1e-3", "prune.granularity=2:4", "train.gamma=-2.5e-4"])
    assert (cfg.train.lr, cfg.prune.granularity, cfg.train.gamma) == (0.001, "2:4", -0.00025)
    # line numbers survive the custom loader
    msg = error_of(tmp_path, """\
        train:
          lr: 1e-3
          optimizer: lbfgs
        """)
    assert "train.optimizer (line 3)" in msg
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base: {data: {name: digits}}\ngrid:\n  train.lr: [1e-3, 1E+5]\n  prune.granularity: [2:4]\n")
    spec = load_sweep(sweep)
    assert spec.grid == {"train.lr": [0.001, 100000.0], "prune.granularity": ["2:4"]}
    assert yaml.safe_load("2:4") == 124  # yaml.SafeLoader itself is left alone


def test_duplicate_yaml_keys_are_refused_with_both_lines(tmp_path):
    from benchkit.sweep import load_sweep

    msg = error_of(tmp_path, """\
        prune:
          compression: 4
          compression: 8
        """)
    assert "'prune.compression'" in msg and "lines 2 and 3" in msg and "Fix" in msg
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base: {data: {name: digits}}\ngrid:\n  seed: [0]\n  seed: [1, 2]\n")
    with pytest.raises(ConfigError) as info:
        load_sweep(sweep)
    assert "'grid.seed'" in str(info.value) and "lines 3 and 4" in str(info.value)
    # the same name in two sections is not a duplicate
    load_config(write(tmp_path, "train: {epochs: 2}\nprune: {finetune: {epochs: 2}}\n"))


def test_free_form_keys_keep_their_dots_in_overrides_and_grid_axes(tmp_path):
    from benchkit.sweep import expand, load_sweep

    cfg = ExperimentConfig.from_dict({}, ["prune.overrides.layer1.0.conv1=4",
                                          "prune.lottery.layer_rates.features.0=0.1"])
    assert cfg.prune.overrides == {"layer1.0.conv1": 4.0}
    assert cfg.prune.lottery.layer_rates == {"features.0": 0.1}
    cfg = ExperimentConfig.from_dict({"model": {"kwargs": {"a": 1}}}, {"model.kwargs.b.c": 2})
    assert cfg.model.kwargs == {"a": 1, "b.c": 2}
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base: {data: {name: digits}, model: {name: resnet20}, prune: {compression: 2}}\n"
                     "grid:\n  prune.overrides.layer1.0.conv1: [2, 4]\n")
    entries = expand(load_sweep(sweep))
    assert [e.config.prune.overrides for e in entries] == [{"layer1.0.conv1": 2.0}, {"layer1.0.conv1": 4.0}]
    assert all(e.runnable for e in entries), [e.reason for e in entries]


def test_registry_names_are_one_config_whatever_their_case():
    lower = load_config({}, {"prune.allocation": "uniform", "prune.criterion": "magnitude"})
    upper = load_config({}, {"prune.allocation": "Uniform", "prune.criterion": "Magnitude"})
    assert (upper.prune.allocation, upper.prune.criterion) == ("uniform", "magnitude")
    assert upper.config_hash() == lower.config_hash()
    cfg = load_config({}, {
        "prune.timing": "Post", "prune.granularity": "ELEMENT", "prune.reduce": "L1", "train.optimizer": "SGD",
        "train.schedule": "Cosine", "prune.post.finetune.optimizer": "Adam", "prune.post.finetune.schedule": "Step",
        "data.name": "Digits", "model.name": "LeNet300"})
    p = cfg.prune
    assert (p.timing, p.granularity, p.reduce, p.post.finetune.optimizer, p.post.finetune.schedule) == \
        ("post", "element", "l1", "adam", "step")
    assert (cfg.train.optimizer, cfg.train.schedule, cfg.data.name, cfg.model.name) == \
        ("sgd", "cosine", "digits", "lenet300")
    # torchvision's names are all lowercase: any spelling is one config
    assert ExperimentConfig.from_dict({}, {"model.name": "ResNet18"}).model.name == "resnet18"


def test_imagefolder_fingerprint_survives_what_imagefolder_tolerates(tmp_path):
    """A link cycle, a broken link and a name that is not UTF-8 load in torchvision's ImageFolder, so
    the cache key must not crash on them; each still changes the key."""
    import os

    from benchkit.data import folder_fingerprint

    folder = _image_folder(tmp_path / "imgs")
    (folder / "train" / "a").mkdir()
    (folder / "train" / "a" / "0.png").write_bytes(b"x")
    keys = [folder_fingerprint(folder)]
    os.symlink("../a", folder / "train" / "a" / "loop")  # a cycle: train/a/loop/loop/...
    keys.append(folder_fingerprint(folder))
    os.symlink("/nonexistent/readme", folder / "train" / "a" / "README.txt")  # broken
    keys.append(folder_fingerprint(folder))
    (folder / "train" / "a" / os.fsdecode(b"caf\xe9.png")).write_bytes(b"y")  # latin-1 name
    keys.append(folder_fingerprint(folder))
    assert len(set(keys)) == 4 and folder_fingerprint(folder) == keys[-1]
