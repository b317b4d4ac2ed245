"""Config validation: every bad value is refused before any data loads, with the dotted key, its
YAML line and the allowed values in the message."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from benchkit.config import ConfigError, ExperimentConfig

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_yaml(write(tmp_path, text))
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
    ("prune.scope", "planet", ["prune.scope", "global", "layer"]),
    ("prune.granularity", "blob", ["prune.granularity", "element", "channel"]),
    ("model.name", "not_a_net", ["model.name", "lenet300", "torchvision"]),
    ("data.name", "imagenet22k", ["data.name", "digits", "fashion-mnist"]),
    ("train.optimizer", "lbfgs", ["train.optimizer", "adam", "sgd"]),
    ("train.schedule", "warmup", ["train.schedule", "cosine", "multistep"]),
    ("prune.finetune.optimizer", "rmsprop", ["prune.finetune.optimizer", "sgd"]),
    ("prune.reduce", "max", ["prune.reduce", "l1", "l2", "mean"]),
])
def test_unknown_names_list_allowed_values(key, value, expect):
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict({}, {key: value})
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
    ({"prune.granularity": "2:4", "prune.rounds": 3}, "prune.rounds", "rounds: 1"),
    ({"prune.schedule.soft": True, "prune.timing": "post"}, "prune.schedule.soft", "timing during"),
    ({"prune.rounds": 3, "prune.timing": "pre"}, "prune.rounds", "timing post"),
    ({"prune.lr_rewind": True, "prune.timing": "lottery"}, "prune.lr_rewind", "timing post"),
    ({"prune.distill.enabled": True, "prune.timing": "during"}, "prune.distill.enabled", "timing post"),
    ({"prune.lottery.controls": ["reinit"], "prune.timing": "post"}, "prune.lottery.controls", "timing lottery"),
    ({"prune.timing": "lottery", "prune.criterion": "snip"}, "prune.criterion", "magnitude or random"),
    ({"prune.timing": "lottery", "prune.lottery.controls": ["shuffle"]}, "prune.lottery.controls", "reinit, random"),
    ({"prune.timing": "lottery", "prune.lottery.rate": 0.2, "prune.compression": 8}, "prune.compression",
     "not both"),
    ({"prune.timing": "lottery", "prune.lottery.rate": 1.5}, "prune.lottery.rate", "(0, 1)"),
    ({"prune.timing": "during", "prune.schedule.start": 0.8, "prune.schedule.end": 0.5}, "prune.schedule.start",
     "start < end"),
    ({"prune.timing": "during", "prune.compression": 2, "prune.schedule.initial_sparsity": 0.9},
     "prune.schedule.initial_sparsity", "final sparsity"),
    ({"prune.lr_rewind": True, "prune.finetune.epochs": 20, "train.epochs": 10}, "prune.finetune.epochs",
     "at most 10"),
    ({"prune.lr_rewind": True, "prune.finetune.lr": 0.01}, "prune.finetune.lr", "original training lr"),
    ({"prune.distill.enabled": True, "prune.distill.alpha": 2.0}, "prune.distill.alpha", "[0, 1]"),
    ({"train.lr": 0.0}, "train.lr", "> 0"),
    ({"device": "tpu"}, "device", "cuda:N"),
])
def test_impossible_values_and_combinations(overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict({}, overrides)
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
        {"prune.timing": "during", "prune.sparsity": 0.9, "prune.schedule.soft": True},
        {"prune.timing": "post", "prune.rounds": 3, "prune.compression": 8, "prune.lr_rewind": True,
         "prune.finetune.epochs": 2},
        {"prune.timing": "post", "prune.granularity": "2:4"},
        {"prune.timing": "lottery", "prune.lottery.controls": ["reinit", "random"],
         "prune.lottery.layer_rates": {"fc3": 0.1}, "prune.lottery.rewind_iteration": 100},
    ):
        ExperimentConfig.from_dict({}, overrides)


def test_sweep_files_give_their_base_run():
    for name in ("quickstart.yaml", "fashion_lenet300.yaml"):
        cfg = ExperimentConfig.from_yaml(REPO / "experiments" / name)
        assert cfg.prune.timing == "post"
    quick = ExperimentConfig.from_yaml(REPO / "experiments" / "quickstart.yaml", ["prune.compression=8"])
    assert quick.experiment == "quickstart" and quick.data.name == "digits" and quick.prune.compression == 8
    fashion = ExperimentConfig.from_yaml(REPO / "experiments" / "fashion_lenet300.yaml")
    assert fashion.data.name == "fashion-mnist" and fashion.prune.compression == 10
    assert fashion.prune.scope == "global" and fashion.prune.criterion == "magnitude"


def test_layer_pattern_matching_nothing_fails_before_training(tmp_path, monkeypatch):
    """Layer globs need the model: checked in the experiment's preflight, before any training."""
    from benchkit.experiment import PruningExperiment
    from benchkit.timing import base

    def no_training(*args, **kwargs):
        raise AssertionError("training started before the config was fully checked")

    monkeypatch.setattr(base, "train", no_training)
    cfg = ExperimentConfig.from_dict({"data": {"name": "digits"}, "output_dir": str(tmp_path), "progress": False,
                                      "prune": {"compression": 4, "exclude": ["classifier.*"]}})
    with pytest.raises(ConfigError) as info:
        PruningExperiment(cfg).run()
    assert "prune.exclude" in str(info.value) and "fc1" in str(info.value)


@pytest.mark.parametrize("overrides,key,fragment", [
    ({"prune.finetune.iterations": 0}, "prune.finetune.iterations", ">= 1"),
    ({"prune.finetune.iterations": -5}, "prune.finetune.iterations", ">= 1"),
    ({"prune.finetune.epochs": -1}, "prune.finetune.epochs", ">= 0"),
    ({"prune.timing": "pre", "prune.finetune.epochs": -1}, "prune.finetune.epochs", ">= 0"),
    ({"train.iterations": 0}, "train.iterations", ">= 1"),
    ({"train.iterations": -3}, "train.iterations", ">= 1"),
    ({"train.nesterov": True, "train.momentum": 0.0}, "train.nesterov", "train.momentum > 0"),
    ({"train.nesterov": True, "train.optimizer": "adam"}, "train.nesterov", "sgd"),
    ({"train.nesterov": True, "train.optimizer": "adamw", "train.momentum": 0.0}, "train.nesterov", "sgd"),
    ({"train.schedule": "step", "train.step_size": 0}, "train.step_size", "> 0"),
    ({"train.schedule": "step", "train.step_size": -2}, "train.step_size", "> 0"),
    ({"prune.finetune.schedule": "step", "train.step_size": 0}, "train.step_size", "> 0"),
    ({"train.milestones": [5, 8]}, "train.milestones", "multistep"),
    ({"train.schedule": "cosine", "train.milestones": [5]}, "train.milestones", "multistep"),
    ({"prune.finetune.schedule": "multistep"}, "train.milestones", "needs milestones"),
])
def test_training_settings_that_would_fail_or_be_ignored_are_refused(overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict({}, overrides)
    msg = str(info.value)
    assert f"{key}: " in msg and fragment in msg, msg


def test_training_settings_that_apply_pass():
    for overrides in (
        {"train.nesterov": True, "train.momentum": 0.9},
        {"train.schedule": "constant", "train.step_size": 0},  # step_size only matters for schedule step
        {"train.schedule": "multistep", "train.milestones": [5, 8]},
        {"prune.finetune.schedule": "multistep", "train.milestones": [2]},  # the fine-tuning schedule uses them
        {"prune.finetune.epochs": 0},  # no fine-tuning
        {"prune.finetune.iterations": 5},
        {"train.nesterov": True, "train.optimizer": "adam", "prune.finetune.optimizer": "sgd"},  # sgd fine-tuning
    ):
        ExperimentConfig.from_dict({}, overrides)
