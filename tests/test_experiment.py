"""PruningExperiment end to end: reproducibility, the dense-model cache, test-split hygiene, and
what a run writes."""

from __future__ import annotations

import json
import threading
import time

import pandas as pd
import pytest
import torch

import benchkit
from benchkit import cache as cache_mod
from benchkit.cache import DenseCache, DenseEntry, dense_key_material
from benchkit.config import ExperimentConfig
from benchkit.experiment import PruningExperiment, RunResult
from benchkit.models import build_model
from benchkit.pruning.masks import get_masks, load_pruned_state_dict
from benchkit.timing import base
from benchkit.training import evaluate
from benchkit.validation import load_config

torch.set_num_threads(1)


def tiny(tmp_path, **overrides) -> ExperimentConfig:
    d = {"data": {"name": "digits"}, "model": {"name": "lenet300", "kwargs": {"hidden": [32, 16]}},
         "train": {"epochs": 2, "lr": 0.05, "batch_size": 64}, "progress": False,
         "output_dir": str(tmp_path / "runs"), "prune": {"timing": "post", "compression": 4}}
    return load_config(d, overrides)


def count_training(monkeypatch) -> list[str]:
    phases: list[str] = []
    real = base.train

    def spy(model, data, cfg, **kwargs):
        phases.append(kwargs["desc"])
        return real(model, data, cfg, **kwargs)

    monkeypatch.setattr(base, "train", spy)
    return phases


def test_public_contract(tmp_path):
    result = benchkit.PruningExperiment(tiny(tmp_path)).run()
    assert isinstance(result, RunResult)
    m = result.metrics
    for key in ("compression_ratio", "sparsity", "model_compression_ratio", "flops_dense", "flops_nonzero",
                "theoretical_speedup", "size_bytes_dense", "size_bytes_sparse", "val_acc1", "val_acc5", "val_loss",
                "test_acc1", "test_acc5", "test_loss", "dense_val_acc1", "dense_test_acc1", "time_dense_s",
                "time_prune_s", "time_finetune_s", "time_total_s"):
        assert isinstance(m[key], float), key
    assert m["compression_ratio"] == pytest.approx(4, rel=1e-3) and m["sparsity"] == pytest.approx(0.75, abs=1e-3)
    # clocks are exclusive: the phases add up to (at most) the total
    assert sum(v for k, v in m.items() if k.startswith("time_") and k != "time_total_s") <= m["time_total_s"]
    assert list(result.layers["layer"]) == ["fc1", "fc2", "fc3"]
    assert {r["phase"] for r in result.history} == {"dense", "finetune_r1"}
    assert set(result.masks) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    # the written folder has everything, and the saved model reloads to the same numbers
    out = result.output_dir
    assert out == tmp_path / "runs" / result.config_hash
    for name in ("config.yaml", "metrics.json", "history.csv", "levels.csv", "layers.csv", "model.pt"):
        assert (out / name).is_file(), name
    assert load_config(out / "config.yaml").config_hash() == result.config_hash
    assert json.loads((out / "metrics.json").read_text())["test_acc1"] == m["test_acc1"]
    assert len(pd.read_csv(out / "history.csv")) == len(result.history)
    assert list(pd.read_csv(out / "levels.csv")["round"]) == [1]
    model = build_model(result.config.model, (1, 8, 8), 10)
    load_pruned_state_dict(model, torch.load(out / "model.pt"))
    assert all(torch.equal(get_masks(model)[k], v) for k, v in result.masks.items())
    assert evaluate(model, _digits_test(result.config), "cpu")["acc1"] == pytest.approx(m["test_acc1"])


def _digits_test(cfg):
    from benchkit.data import load_data

    return load_data(cfg.data, cfg.train.batch_size, cfg.train.eval_batch_size, cfg.seed).test


@pytest.mark.parametrize("timing", ["post", "lottery", "during", "pre"])
def test_same_config_and_seed_give_identical_results(tmp_path, monkeypatch, timing):
    extra = {"prune.lottery.levels": 1, "prune.lottery.controls": ["random"]} if timing == "lottery" else {}
    cfg = tiny(tmp_path, **{"prune.timing": timing, "prune.criterion": "random", **extra})
    monkeypatch.setenv("BENCHKIT_CACHE", str(tmp_path / "cache_a"))
    a = PruningExperiment(cfg).run()
    monkeypatch.setenv("BENCHKIT_CACHE", str(tmp_path / "cache_b"))  # retrain the dense net too
    b = PruningExperiment(cfg).run()
    assert a.dense_cache_hit in (None, False) and b.dense_cache_hit in (None, False)
    strip = {k: v for k, v in a.metrics.items() if not k.startswith("time_")}
    assert strip == {k: v for k, v in b.metrics.items() if not k.startswith("time_")}
    assert a.masks.keys() == b.masks.keys() and all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    different = PruningExperiment(cfg.replace(seed=1)).run()
    assert not all(torch.equal(a.masks[k], different.masks[k]) for k in a.masks)
    # the output folder: a run without rounds or levels writes no (empty, unreadable) levels.csv
    assert (a.output_dir / "levels.csv").is_file() == bool(a.levels)
    if a.levels:
        assert len(pd.read_csv(a.output_dir / "levels.csv")) == len(a.levels)


def test_dense_model_is_trained_once_per_key(tmp_path, monkeypatch):
    phases = count_training(monkeypatch)
    first = PruningExperiment(tiny(tmp_path)).run()
    second = PruningExperiment(tiny(tmp_path, **{"prune.compression": 8, "prune.scope": "layer"})).run()
    third = PruningExperiment(tiny(tmp_path, **{"prune.timing": "lottery", "prune.compression": None,
                                                "prune.lottery.levels": 1})).run()
    assert phases == ["dense", "finetune_r1", "finetune_r1", "level_1"]
    assert (first.dense_cache_hit, second.dense_cache_hit, third.dense_cache_hit) == (False, True, True)
    for key in ("dense_val_acc1", "dense_test_acc1", "dense_val_loss"):
        assert first.metrics[key] == second.metrics[key] == third.metrics[key]
    # the cached history is part of the run's history
    assert [r for r in second.history if r["phase"] == "dense"] == [r for r in first.history if r["phase"] == "dense"]
    # anything that changes the dense model is a different key: retrained
    PruningExperiment(tiny(tmp_path, **{"train.lr": 0.04})).run()
    PruningExperiment(tiny(tmp_path, **{"seed": 3})).run()
    assert phases.count("dense") == 3


def test_rewind_checkpoint_missing_from_cache_retrains_and_adds_it(tmp_path, monkeypatch):
    phases = count_training(monkeypatch)
    PruningExperiment(tiny(tmp_path)).run()
    lottery = tiny(tmp_path, **{"prune.timing": "lottery", "prune.compression": None, "prune.lottery.levels": 1,
                                "prune.lottery.rewind_iteration": 5})
    first = PruningExperiment(lottery).run()
    second = PruningExperiment(lottery).run()
    assert phases.count("dense") == 2 and (first.dense_cache_hit, second.dense_cache_hit) == (False, True)
    # a cache hit changes nothing downstream: every later phase starts from the same RNG state
    drop = {"dense_cache_hit"}
    assert ({k: v for k, v in first.metrics.items() if not k.startswith("time_") and k not in drop}
            == {k: v for k, v in second.metrics.items() if not k.startswith("time_") and k not in drop})


def test_stale_or_foreign_entries_are_never_served(tmp_path, monkeypatch):
    cfg = tiny(tmp_path)
    cache = DenseCache(tmp_path / "c")
    material = dense_key_material(cfg, "cpu")
    entry = DenseEntry(state_dict={"w": torch.ones(2)}, history={"records": []}, metrics={"dense_val_acc1": 0.5})
    cache.store(material, entry)
    assert cache.load(material).metrics == {"dense_val_acc1": 0.5}
    # a file under this key whose stored key material differs (collision, tampering) is a miss
    path = cache.path(cache_mod.stable_hash(material))
    blob = torch.load(path, weights_only=True)
    blob["material"]["train"]["lr"] = 123.0
    torch.save(blob, path)
    assert cache.load(material) is None
    # a new trainer version changes the key: old entries are not found
    cache.store(material, entry)
    monkeypatch.setattr(cache_mod, "TRAINER_VERSION", cache_mod.TRAINER_VERSION + 1)
    assert cache.load(dense_key_material(cfg, "cpu")) is None
    # a truncated file is a miss, not a crash
    path.write_bytes(b"not a torch file")
    assert cache.load(material) is None
    # the key covers data, model, train, seed and device type; not where outputs go
    base_key = cache_mod.stable_hash(dense_key_material(cfg, "cpu"))
    for changed in (cfg.replace(data__val_fraction=0.2), cfg.replace(model__init="kaiming_normal"),
                    cfg.replace(train__epochs=3), cfg.replace(seed=2)):
        assert cache_mod.stable_hash(dense_key_material(changed, "cpu")) != base_key
    assert cache_mod.stable_hash(dense_key_material(cfg, "cuda")) != base_key
    # another torchvision or scikit-learn (the data's readers, the digits split) is another key
    real_version = cache_mod._version
    monkeypatch.setattr(cache_mod, "_version", lambda d: "0.0-other" if d == "scikit-learn" else real_version(d))
    assert cache_mod.stable_hash(dense_key_material(cfg, "cpu")) != base_key
    monkeypatch.setattr(cache_mod, "_version", real_version)
    for same in (cfg.replace(output_dir="/elsewhere"), cfg.replace(prune__compression=16),
                 cfg.replace(data__num_workers=2)):
        assert cache_mod.stable_hash(dense_key_material(same, "cpu")) == base_key


def test_concurrent_runs_create_the_entry_once(tmp_path):
    cache = DenseCache(tmp_path / "c")
    material = {"any": "key"}
    created = []

    def create():
        created.append(1)
        time.sleep(0.3)
        return DenseEntry(state_dict={"w": torch.zeros(1)}, history={"records": []}, metrics={})

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_create(material, create)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(created) == 1
    assert sorted(r.hit for r in results) == [False, True, True]
    assert not list((tmp_path / "c").glob("*.tmp"))  # temp files are moved into place


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCHKIT_CACHE", str(tmp_path / "env"))
    assert cache_mod.cache_root(tiny(tmp_path)) == tmp_path / "env"
    assert cache_mod.cache_root(tiny(tmp_path, cache_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    monkeypatch.delenv("BENCHKIT_CACHE")
    assert cache_mod.cache_root(tiny(tmp_path)).parts[-2:] == (".cache", "benchkit")


class GuardedLoader:
    """A test loader that refuses to be read while any training call is running."""

    def __init__(self, loader, state):
        self.loader, self.state = loader, state
        self.reads_outside_training = 0

    def __iter__(self):
        if self.state["training"]:
            raise AssertionError("the test split was read during training")
        self.reads_outside_training += 1
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)


@pytest.mark.parametrize("overrides", [
    {"prune.timing": "post", "prune.post.rounds": 2},
    {"prune.timing": "lottery", "prune.compression": None, "prune.lottery.levels": 1,
     "prune.lottery.controls": ["reinit"]},
    {"prune.timing": "during"},
])
def test_test_split_is_never_read_during_training(tmp_path, monkeypatch, overrides):
    import benchkit.experiment as experiment

    state = {"training": False}
    guards = []
    real_load, real_train = experiment.load_data, base.train

    def load(*args, **kwargs):
        bundle = real_load(*args, **kwargs)
        bundle.test = GuardedLoader(bundle.test, state)
        guards.append(bundle.test)
        return bundle

    def train(*args, **kwargs):
        state["training"] = True
        try:
            return real_train(*args, **kwargs)
        finally:
            state["training"] = False

    monkeypatch.setattr(experiment, "load_data", load)
    monkeypatch.setattr(base, "train", train)
    result = PruningExperiment(tiny(tmp_path, **overrides)).run()
    assert guards[0].reads_outside_training >= 1 and "test_acc1" in result.metrics


def test_structured_run_reports_compacted_figures(tmp_path):
    cfg = tiny(tmp_path, **{"prune.granularity": "channel", "prune.compression": 2, "prune.scope": "layer",
                            "prune.exclude": ["fc3"]})
    result = PruningExperiment(cfg).run()
    m = result.metrics
    # fc1 keeps 16 of 32 neurons, fc2 8 of 16, fc3 (excluded) loses the inputs fc2 no longer feeds:
    # 64·16 + 16·8 + 8·10 = 1232 weights and multiply-adds, against 2720 dense
    assert m["compacted_params_prunable"] == 1232 and m["compacted_flops"] == 1232
    assert m["compacted_speedup"] == pytest.approx(2720 / 1232)
    assert m["theoretical_speedup"] == pytest.approx(2720 / (1024 + 256 + 160))  # masks alone
    assert "fc1.bias" in result.masks  # channel pruning masks the bias with its row


def test_invalid_config_fails_before_data_loads(tmp_path, monkeypatch):
    import benchkit.experiment as experiment

    def no_data(*args, **kwargs):
        raise AssertionError("data loaded before validation")

    monkeypatch.setattr(experiment, "load_data", no_data)
    cfg = tiny(tmp_path)
    cfg.prune.criterion = "magnitudes"  # edited after construction: validated again by the experiment
    with pytest.raises(benchkit.ConfigError, match="prune.criterion"):
        PruningExperiment(cfg)


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_latency_is_measured_with_its_setting_and_compaction_when_channels_die(tmp_path, granularity):
    cfg = tiny(tmp_path, **{"prune.granularity": granularity, "latency.enabled": True, "latency.batch_size": 4,
                            "latency.repeats": 5, "latency.warmup": 1, "latency.threads": 1})
    m = PruningExperiment(cfg).run().metrics
    assert m["latency_ms"] > 0 and m["time_latency_s"] > 0
    assert (m["latency_batch_size"], m["latency_threads"], m["latency_repeats"], m["latency_warmup"]) == (4, 1, 5, 1)
    if granularity == "element":  # no whole neuron is dead: nothing to compact, so no compacted timing
        assert "latency_compacted_ms" not in m and "compacted_speedup" not in m
    else:  # 4x over hidden neurons: the compacted copy is smaller and timed beside the masked one
        assert m["compacted_params"] < m["params_total"]
        assert m["latency_speedup"] == pytest.approx(m["latency_ms"] / m["latency_compacted_ms"])


def test_latency_off_by_default_and_bad_setting_refused(tmp_path):
    assert not any(k.startswith("latency") for k in PruningExperiment(tiny(tmp_path)).run().metrics)
    with pytest.raises(benchkit.ConfigError, match=r"latency\.repeats: must be >= 1"):
        tiny(tmp_path, **{"latency.repeats": 0})


def test_registered_model_and_granularity_run_end_to_end_by_name(tmp_path):
    """A researcher's own model and granularity, registered by name, go through config validation,
    pruning and metrics without touching the core."""
    from torch import nn

    from benchkit.models import MODELS
    from benchkit.pruning.granularity import GRANULARITIES, Granularity

    class Pairs(Granularity):
        """Two neighbouring input weights of one output unit (``w[o, 2j:2j+2]``)."""

        name = "test_pairs"

        def group(self, t):
            return t.reshape(-1, 2)

        def ungroup(self, g, shape):
            return g.reshape(shape)

    def tiny_mlp(input_shape, num_classes, hidden=12):
        c, h, w = input_shape
        return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    MODELS.register("test_tiny_mlp", tiny_mlp)
    GRANULARITIES.register("test_pairs")(Pairs)
    try:
        cfg = tiny(tmp_path, **{"model.name": "test_tiny_mlp", "model.kwargs": {"hidden": 16},
                                "prune.granularity": "test_pairs", "prune.scope": "layer"})
        result = PruningExperiment(cfg).run()
        assert list(result.layers["layer"]) == ["1", "3"]
        assert result.metrics["compression_ratio"] == pytest.approx(4)
        for path, mask in result.masks.items():  # whole pairs: both weights of a pair share their fate
            pairs = mask.reshape(-1, 2)
            assert torch.equal(pairs[:, 0], pairs[:, 1]), path
    finally:
        MODELS._items.pop("test_tiny_mlp")
        GRANULARITIES._items.pop("test_pairs")


def test_threads_of_a_run_are_restored_afterwards(tmp_path, monkeypatch):
    """cfg.threads applies to its run only: a later run with threads unset gets the process's count."""
    before = torch.get_num_threads()
    other = before + 1
    PruningExperiment(tiny(tmp_path, **{"threads": other, "train.epochs": 1})).run()
    assert torch.get_num_threads() == before

    def boom(*args, **kwargs):
        assert torch.get_num_threads() == other
        raise RuntimeError("training failed")

    monkeypatch.setattr(base, "train", boom)
    with pytest.raises(RuntimeError, match="training failed"):
        PruningExperiment(tiny(tmp_path, **{"threads": other, "seed": 7})).run()
    assert torch.get_num_threads() == before


class _Terminal:
    """A stand-in for stderr on a terminal, keeping what is written."""

    def __init__(self):
        self.parts: list[str] = []

    def write(self, s: str) -> int:
        self.parts.append(s)
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("ci", ["true", None])
def test_epoch_progress_bar_is_silent_in_ci(tmp_path, monkeypatch, ci):
    """The per-run bar follows benchkit.progress: shown on a terminal, never when CI is set."""
    import sys

    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    PruningExperiment(tiny(tmp_path, **{"progress": True, "train.epochs": 1}), write=False).run()
    out = "".join(term.parts)
    if ci:
        assert "dense" not in out and "it/s" not in out, out
    else:
        assert "dense" in out  # the phase name is the bar's description


def test_dense_key_follows_the_dense_source_code_and_threads(tmp_path, monkeypatch):
    phases = count_training(monkeypatch)
    monkeypatch.setattr(cache_mod, "dense_source_hash", lambda: "source-a")
    first = PruningExperiment(tiny(tmp_path)).run()
    same_source = PruningExperiment(tiny(tmp_path)).run()
    monkeypatch.setattr(cache_mod, "dense_source_hash", lambda: "source-b")  # an edit to the training code
    edited = PruningExperiment(tiny(tmp_path)).run()
    assert (first.dense_cache_hit, same_source.dense_cache_hit, edited.dense_cache_hit) == (False, True, False)
    assert phases.count("dense") == 2
    cfg = tiny(tmp_path)
    key_b = cache_mod.stable_hash(dense_key_material(cfg, "cpu"))
    monkeypatch.setattr(cache_mod, "dense_source_hash", lambda: "source-a")
    assert cache_mod.stable_hash(dense_key_material(cfg, "cpu")) != key_b
    # the thread count is part of the key; unset, it is torch's current count
    assert dense_key_material(cfg, "cpu")["threads"] == torch.get_num_threads()
    assert dense_key_material(cfg.replace(threads=torch.get_num_threads()), "cpu") == dense_key_material(cfg, "cpu")
    assert dense_key_material(cfg.replace(threads=torch.get_num_threads() + 1), "cpu") != dense_key_material(cfg, "cpu")


def test_dense_source_hash_covers_the_dense_path_and_is_computed_once():
    labels = set(cache_mod.dense_sources())
    assert {"training.py", "data.py", "seeding.py", "timing/base.py:RunContext.fit", "pruning/masks.py:plain_state_dict",
            "models/__init__.py", "models/lenet.py", "models/resnet_cifar.py"} <= labels
    assert not {"experiment.py", "pruning/engine.py", "timing/base.py", "masked_training.py"} & labels
    value = cache_mod.dense_source_hash()
    assert len(value) == 16 and cache_mod.dense_source_hash() == value
    assert cache_mod.dense_source_hash.cache_info().hits >= 1
    assert dense_key_material(ExperimentConfig(), "cpu")["source"] == value
    assert not hasattr(cache_mod, "_training_module_version")


def test_planning_data_shapes_match_the_loaded_data():
    """Sweep planning checks models against shapes known without loading data: they must be the real ones."""
    from benchkit.config import DataConfig
    from benchkit.data import DATASETS, KNOWN_SHAPES, known_shape

    assert set(KNOWN_SHAPES) <= set(DATASETS.names())  # datasets not listed are simply not checked when planning
    for cfg in (DataConfig(name="digits"), DataConfig(name="synthetic", input_shape=[3, 5, 4], num_classes=7)):
        source = DATASETS.get(cfg.name)(cfg)
        assert known_shape(cfg) == (tuple(source.input_shape), source.num_classes)


def test_an_unchanged_model_is_evaluated_once_and_any_change_evaluates_again(tmp_path, monkeypatch):
    """RunContext.evaluate reuses the figures of a model unchanged since its last evaluation on that split
    (a post run's last round and its final metrics); a training step, pruning or a loaded state evaluates again."""
    from benchkit.data import load_data
    from benchkit.pruning.masks import apply_masks
    from benchkit.timing.base import RunContext

    cfg = tiny(tmp_path)
    ctx = RunContext(cfg=cfg, data=load_data(cfg.data, 64, 1000, 0), device=torch.device("cpu"))
    calls = []
    real = base.evaluate
    monkeypatch.setattr(base, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = ctx.build_model()
    first = ctx.evaluate(model, "val")
    assert ctx.evaluate(model, "val") == first and len(calls) == 1
    ctx.evaluate(model, "test")
    assert len(calls) == 2  # another split
    apply_masks(model, {"fc1.weight": torch.rand_like(model.fc1.weight) > 0.5})
    pruned = ctx.evaluate(model, "val")
    assert len(calls) == 3 and pruned != first
    with torch.no_grad():
        model.fc2.bias.add_(1.0)  # any in-place change
    ctx.evaluate(model, "val")
    model.load_state_dict(model.state_dict())
    ctx.evaluate(model, "val")
    assert len(calls) == 5
    assert ctx.evaluate(ctx.build_model(), "val") == first and len(calls) == 6  # another model object
