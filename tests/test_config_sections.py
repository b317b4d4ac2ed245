"""Each timing owns its settings (issue 15.3): a section ``prune.<timing>`` declared beside the timing's
code, checked by it, logged and hashed only when that timing runs; today's YAML keeps working (old keys are
read under their new names, with a warning); and the reliability checks that now sit with the sections and
the allocation axis (issue 16.1): nothing finishes with a silently wrong result."""

from __future__ import annotations

import textwrap
import warnings
from dataclasses import dataclass, field

import pytest
import torch

from benchkit.config import ConfigError, ExperimentConfig, PruneConfig
from benchkit.experiment import PruningExperiment
from benchkit.timing import TIMINGS
from benchkit.timing.base import CollapseError, Timing, register_timing
from benchkit.validation import load_config


def tiny(tmp_path, overrides=None, **prune):
    d = {"data": {"name": "digits"}, "model": {"name": "lenet300", "kwargs": {"hidden": [32, 16]}},
         "train": {"epochs": 1, "lr": 0.05, "batch_size": 64}, "progress": False,
         "output_dir": str(tmp_path / "runs"), "prune": {"timing": "post", "compression": 4, **prune}}
    return load_config(d, overrides)


def test_every_built_in_timing_with_settings_has_its_section():
    assert {"post", "during", "lottery"} <= set(PruneConfig.SECTIONS)
    cfg = ExperimentConfig()
    assert cfg.prune.post.finetune.epochs == 3 and cfg.prune.during.every == 50 and cfg.prune.lottery.levels == 5
    assert cfg.prune.settings is cfg.prune.post


def test_only_the_active_timings_section_is_logged_and_hashed():
    post = load_config({}, {"prune.timing": "post"})
    keys = set(post.flat())
    assert "prune.post.finetune.epochs" in keys and not any(k.startswith(("prune.lottery.", "prune.during.")) for k in keys)
    # a setting of another timing cannot change this run: same hash
    assert load_config({}, {"prune.lottery.levels": 9}).config_hash() == post.config_hash()
    assert load_config({}, {"prune.post.finetune.epochs": 9}).config_hash() != post.config_hash()
    # the whole config (every section) still round-trips through config.yaml
    again = ExperimentConfig.from_dict(post.to_dict())
    assert again == post and again.to_dict() == post.to_dict()


def test_yaml_with_todays_keys_keeps_working_under_the_new_names(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(textwrap.dedent("""\
        experiment: old
        base:
          prune:
            timing: post
            scope: layer
            compression: 4
            rounds: 2
            lr_rewind: false
            finetune: {epochs: 2, lr: 0.01}
            distill: {enabled: true}
            schedule: {every: 7}
        grid:
          prune.scope: [global, layer]
          prune.finetune.lr: [0.01, 0.001]
        """))
    with pytest.warns(FutureWarning, match="'prune.scope' is now 'prune.allocation'"):
        old = load_config(path)
    new = load_config({"experiment": "old", "prune": {
        "timing": "post", "allocation": "uniform", "compression": 4, "during": {"every": 7},
        "post": {"rounds": 2, "lr_rewind": False, "finetune": {"epochs": 2, "lr": 0.01}, "distill": {"enabled": True}}}})
    assert old == new and old.config_hash() == new.config_hash()
    from benchkit.sweep import expand, load_sweep

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        entries = expand(load_sweep(path, []))
    assert [(e.config.prune.allocation, e.config.prune.post.finetune.lr) for e in entries] == \
        [("global", 0.01), ("global", 0.001), ("uniform", 0.01), ("uniform", 0.001)]


def test_a_setting_under_its_old_and_new_name_is_refused():
    with pytest.raises(ConfigError, match="prune.rounds.*prune.post.rounds are the same setting"):
        ExperimentConfig.from_dict({"prune": {"rounds": 2, "post": {"rounds": 3}}})


@pytest.mark.parametrize("overrides,key", [
    ({"prune.timing": "pre", "prune.post.rounds": 3}, "prune.post.rounds"),
    ({"prune.timing": "post", "prune.during.soft": True}, "prune.during.soft"),
    ({"prune.timing": "during", "prune.post.distill.enabled": True}, "prune.post.distill.enabled"),
    ({"prune.timing": "post", "prune.lottery.controls": ["reinit"]}, "prune.lottery.controls"),
])
def test_exclusive_settings_of_another_timing_are_refused(overrides, key):
    with pytest.raises(ConfigError, match=f"{key}: only applies to timing"):
        load_config({}, overrides)


def test_plain_settings_of_another_timing_are_accepted_for_a_shared_sweep_base():
    load_config({}, {"prune.timing": "pre", "prune.post.finetune.epochs": 5, "prune.during.every": 10,
                     "prune.lottery.levels": 3})


def test_a_new_timing_is_one_file_and_one_registration(tmp_path):
    """A timing registered with its own settings dataclass gets ``prune.<name>``: typed, checked by the
    timing, hashed when it runs, with no edit to the config module or the validation table."""

    @dataclass
    class WarmupSettings:
        warmup_epochs: int = 1
        layers: dict[str, float] = field(default_factory=dict)

    @register_timing("test_warmup", config=WarmupSettings)
    class Warmup(Timing):
        def run(self, ctx):
            model = ctx.build_model()
            ctx.fit(model, "train", epochs=ctx.cfg.prune.test_warmup.warmup_epochs)
            ctx.prune(model, ctx.cfg.prune.target_compression())
            return model

        def check(self, cfg):
            if cfg.prune.test_warmup.warmup_epochs < 1:
                yield "prune.test_warmup.warmup_epochs", "must be >= 1"

    try:
        cfg = tiny(tmp_path, {"prune.timing": "test_warmup", "prune.test_warmup.warmup_epochs": 2,
                              "prune.test_warmup.layers.fc1": 0.5})
        assert cfg.prune.test_warmup.layers == {"fc1": 0.5}
        assert "prune.test_warmup.warmup_epochs" in cfg.flat()
        with pytest.raises(ConfigError, match="prune.test_warmup.warmup_epochs: must be >= 1"):
            tiny(tmp_path, {"prune.timing": "test_warmup", "prune.test_warmup.warmup_epochs": 0})
        with pytest.raises(ConfigError, match="unknown config key 'prune.test_warmup.warmup'"):
            tiny(tmp_path, {"prune.timing": "test_warmup", "prune.test_warmup.warmup": 1})
        result = PruningExperiment(cfg).run()
        assert result.metrics["compression_ratio"] == pytest.approx(4, rel=0.01)
    finally:
        TIMINGS._items.pop("test_warmup", None)
        PruneConfig.SECTIONS.pop("test_warmup", None)


def test_excluding_every_prunable_layer_is_refused_before_the_run(tmp_path):
    cfg = tiny(tmp_path, exclude=["fc*"])
    with pytest.raises(ConfigError, match="excludes every prunable layer"):
        PruningExperiment(cfg).run()
    from benchkit.experiment import plan_preflight

    with pytest.raises(ConfigError, match="excludes every prunable layer"):  # and in sweep planning
        plan_preflight(cfg)


def test_every_layer_that_does_not_fit_n_m_is_named_at_once(tmp_path):
    cfg = load_config({"data": {"name": "synthetic", "input_shape": [3, 6, 6]}, "model": {"name": "lenet5"},
                       "prune": {"granularity": "2:4"}})
    from benchkit.experiment import plan_preflight

    with pytest.raises(ConfigError) as info:
        plan_preflight(cfg)
    msg = str(info.value)
    assert "layers do not fit '2:4'" in msg and msg.count("does not divide") >= 2, msg


def test_structured_pruning_keeps_the_classes_in_a_run(tmp_path):
    result = PruningExperiment(tiny(tmp_path, granularity="channel", allocation="uniform")).run()
    fc3 = result.layers.set_index("layer").loc["fc3"]
    assert fc3["nonzero"] == fc3["params"]
    assert any("fc3" in n for n in result.notes)


def test_a_collapsed_layer_is_reported_and_refused_when_strict(tmp_path):
    with pytest.warns(UserWarning, match="nearly collapsed"):
        result = PruningExperiment(tiny(tmp_path, {"prune.timing": "pre", "prune.compression": 64,
                                                    "prune.collapse.min_relative_density": 0.5})).run()
    assert result.metrics["collapsed_layers"] >= 1 and result.collapsed
    with pytest.raises(CollapseError, match="nearly collapsed.*prune.collapse.strict"):
        PruningExperiment(tiny(tmp_path, {"prune.timing": "pre", "prune.compression": 64,
                                          "prune.collapse.min_relative_density": 0.5,
                                          "prune.collapse.strict": True})).run()


def test_snip_scores_every_scoring_batch():
    """SNIP used only the first scoring batch even with score_batches > 1; now all (as one batch)."""
    import benchkit as bk

    torch.manual_seed(0)
    x, y = torch.randn(40, 1, 4, 4), torch.randint(0, 3, (40,))
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]

    def build():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))

    two = bk.prune(build(), compression=3, criterion="snip", loader=batches, score_batches=2).masks
    one_big = bk.prune(build(), compression=3, criterion="snip", batch=(x, y)).masks
    first = bk.prune(build(), compression=3, criterion="snip", loader=batches, score_batches=1).masks
    assert all(torch.equal(two[k], one_big[k]) for k in two)
    assert any(not torch.equal(two[k], first[k]) for k in two)


def test_reading_a_config_before_the_timings_are_imported_says_what_to_do():
    import subprocess
    import sys

    code = ("from benchkit.config import ExperimentConfig\n"
            "try:\n    ExperimentConfig.from_dict({'prune': {'lottery': {'levels': 2}}})\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ConfigError prune.lottery is the settings section of timing 'lottery'" in out.stdout, out.stderr
    assert "benchkit.load_config" in out.stdout
