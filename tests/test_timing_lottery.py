"""``lottery``: iterative magnitude pruning with rewinding, and its two controls (Frankle & Carbin 2019)."""

from __future__ import annotations

import pytest
import torch

from benchkit.config import ConfigError, ExperimentConfig
from benchkit.data import load_data
from benchkit.experiment import PruningExperiment
from benchkit.models import build_model
from benchkit.pruning.masks import get_masks, plain_state_dict
from benchkit.seeding import seed_everything
from benchkit.timing import base
from benchkit.timing.lottery import lottery_rate
from benchkit.validation import load_config

torch.set_num_threads(1)
LAYERS = ("fc1", "fc2", "fc3")


def tiny(tmp_path, **overrides) -> ExperimentConfig:
    d = {"data": {"name": "digits"}, "model": {"name": "lenet300", "kwargs": {"hidden": [32, 16]}},
         "train": {"epochs": 1, "lr": 0.05, "batch_size": 64}, "progress": False, "output_dir": str(tmp_path),
         "prune": {"timing": "lottery", "scope": "layer"}}
    return load_config(d, overrides)


class TrainSpy:
    """Records, for every training call, its phase and the model's masks and weights at its start;
    ``capture_step`` also keeps the dense run's weights after that optimizer step."""

    def __init__(self, monkeypatch, capture_step: int | None = None):
        self.calls: dict[str, dict] = {}
        self.captured = None
        real = base.train

        def spy(model, data, cfg, **kwargs):
            phase = kwargs["desc"]
            self.calls[phase] = {"masks": get_masks(model), "before": plain_state_dict(model)}
            callbacks = list(kwargs.pop("callbacks", ()))
            if phase == "dense" and capture_step is not None:
                callbacks.append(self)
            out = real(model, data, cfg, callbacks=callbacks, **kwargs)
            self.calls[phase]["after"] = plain_state_dict(model)
            return out

        self.capture_step = capture_step
        monkeypatch.setattr(base, "train", spy)

    def on_step(self, step, model, optimizer):
        if step == self.capture_step:
            self.captured = plain_state_dict(model)


def initial_weights(cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    """The run's initialisation, rebuilt independently: seed, then build the model for the data."""
    data = load_data(cfg.data, cfg.train.batch_size, cfg.train.eval_batch_size, cfg.seed)
    seed_everything(cfg.seed)
    return {k: v.clone() for k, v in build_model(cfg.model, data).state_dict().items()}


def test_ticket_rewinds_to_init_and_controls_differ_as_specified(tmp_path, monkeypatch):
    spy = TrainSpy(monkeypatch)
    cfg = tiny(tmp_path, **{"prune.lottery.levels": 2, "prune.lottery.rate": 0.5,
                            "prune.lottery.controls": ["reinit", "random"]})
    result = PruningExperiment(cfg).run()
    init = initial_weights(cfg)
    assert list(spy.calls) == ["dense", "level_1", "level_1_reinit", "level_1_random",
                               "level_2", "level_2_reinit", "level_2_random"]
    for level in (1, 2):
        ticket = spy.calls[f"level_{level}"]
        for name in LAYERS:
            key = f"{name}.weight"
            mask = ticket["masks"][key]
            # survivors take exactly their initial values; pruned weights are zero
            assert torch.equal(ticket["before"][key][mask], init[key][mask])
            assert not ticket["before"][key][~mask].any()
            # reinit: identical masks, different (fresh) weights
            reinit = spy.calls[f"level_{level}_reinit"]
            assert torch.equal(reinit["masks"][key], mask)
            assert not torch.equal(reinit["before"][key][mask], init[key][mask])
            # random: same count per layer, different masks, rewound weights on its own survivors
            rand = spy.calls[f"level_{level}_random"]
            rmask = rand["masks"][key]
            assert int(rmask.sum()) == int(mask.sum()) and not torch.equal(rmask, mask)
            assert torch.equal(rand["before"][key][rmask], init[key][rmask])
        # the ticket is pruned from its own trained weights, then rewound: level 2 ⊂ level 1
        if level == 2:
            for name in LAYERS:
                key = f"{name}.weight"
                assert not (ticket["masks"][key] & ~spy.calls["level_1"]["masks"][key]).any()
    branches = [(r["level"], r["branch"]) for r in result.levels]
    assert branches == [(0, "ticket"), (1, "ticket"), (1, "reinit"), (1, "random"),
                        (2, "ticket"), (2, "reinit"), (2, "random")]
    for row in result.levels:
        assert {"percent_remaining", "val_acc1", "test_acc1", "best_step"} <= row.keys()
    assert [r["percent_remaining"] for r in result.levels if r["branch"] == "ticket"] == pytest.approx(
        [100, 50, 25], abs=0.1)
    phases = {r["phase"] for r in result.history}
    assert {"dense", "level_1", "level_2_reinit", "level_2_random"} <= phases


def test_rewind_to_iteration_k(tmp_path, monkeypatch):
    spy = TrainSpy(monkeypatch, capture_step=7)
    cfg = tiny(tmp_path, **{"prune.lottery.levels": 1, "prune.lottery.rewind_iteration": 7})
    PruningExperiment(cfg).run()
    assert spy.captured is not None
    ticket = spy.calls["level_1"]
    init = initial_weights(cfg)
    for name in LAYERS:
        key, mask = f"{name}.weight", ticket["masks"][f"{name}.weight"]
        assert torch.equal(ticket["before"][key][mask], spy.captured[key][mask])
        assert not torch.equal(ticket["before"][key][mask], init[key][mask])
    for key in ("fc1.bias", "fc3.bias"):  # unpruned parameters rewind too
        assert torch.equal(ticket["before"][key], spy.captured[key])


def test_a_layer_rate_glob_skips_excluded_layers_as_overrides_do(tmp_path, monkeypatch):
    """``fc*`` with ``exclude: [fc3]``: fc1 and fc2 lose 10% per level, fc3 stays dense (it used to
    fail with 'both excluded and overridden' after the dense model had trained)."""
    spy = TrainSpy(monkeypatch)
    cfg = tiny(tmp_path, **{"prune.lottery.levels": 2, "prune.exclude": ["fc3"],
                            "prune.lottery.layer_rates": {"fc*": 0.1}})
    PruningExperiment(cfg).run()
    masks = spy.calls["level_2"]["masks"]
    assert "fc3.weight" not in masks
    for name, n in (("fc1", 64 * 32), ("fc2", 32 * 16)):
        assert abs(int(masks[f"{name}.weight"].sum()) - n * 0.9 ** 2) <= 1, name


def test_percent_remaining_follows_the_rate_per_layer(tmp_path, monkeypatch):
    """Layer-wise 20% per level, output layer at half the rate, as in the LTH paper."""
    spy = TrainSpy(monkeypatch)
    cfg = tiny(tmp_path, **{"prune.lottery.levels": 3, "prune.lottery.layer_rates": {"fc3": 0.1}})
    result = PruningExperiment(cfg).run()
    for level in (1, 2, 3):
        masks = spy.calls[f"level_{level}"]["masks"]
        for name in LAYERS:
            mask = masks[f"{name}.weight"]
            rate = 0.1 if name == "fc3" else 0.2
            # each level aims at (1 - rate)^level of the original weights: one weight of rounding
            assert abs(int(mask.sum()) - mask.numel() * (1 - rate) ** level) <= 1, (name, level)
    sizes = {"fc1": 64 * 32, "fc2": 32 * 16, "fc3": 16 * 10}
    expected = [sum(n * (1 - (0.1 if k == "fc3" else 0.2)) ** lv for k, n in sizes.items()) / sum(sizes.values())
                for lv in range(4)]
    got = [r["percent_remaining"] / 100 for r in result.levels]
    assert got == pytest.approx(expected, abs=3 / sum(sizes.values()))  # a weight per layer


def test_rate_derived_from_target_compression():
    cfg = load_config({"prune": {"timing": "lottery", "compression": 8, "lottery": {"levels": 3}}})
    assert lottery_rate(cfg) == pytest.approx(0.5)
    assert lottery_rate(load_config({"prune": {"timing": "lottery"}})) == 0.2


def test_target_compression_reached_after_the_levels(tmp_path):
    cfg = tiny(tmp_path, **{"prune.lottery.levels": 2, "prune.compression": 9, "prune.scope": "global"})
    result = PruningExperiment(cfg).run()
    kept = sum(int(m.sum()) for m in result.masks.values())
    assert abs(kept - (64 * 32 + 32 * 16 + 16 * 10) / 9) <= 1


def test_rewinding_to_iteration_k_retrains_the_rest_of_the_run_at_its_own_rates(tmp_path):
    """Frankle et al. 2020 / OpenLTH: rewound to iteration k, the ticket and both controls train
    steps k+1..T with the learning rates those steps had in the dense run (not the schedule restarted
    over a full-length run)."""
    cfg = tiny(tmp_path, **{"train.iterations": 40, "train.eval_every": 10, "train.lr": 0.08,
                            "train.schedule": "step", "train.step_size": 10, "train.gamma": 0.5,
                            "prune.lottery.levels": 1, "prune.lottery.rewind_iteration": 20,
                            "prune.lottery.controls": ["reinit", "random"]})
    result = PruningExperiment(cfg).run()
    by_phase: dict[str, list[tuple[int, float]]] = {}
    for r in result.history:
        by_phase.setdefault(r["phase"], []).append((r["step"], r["lr"]))
    assert by_phase["dense"] == [(10, 0.08), (20, 0.04), (30, 0.02), (40, 0.01)]
    for phase in ("level_1", "level_1_reinit", "level_1_random"):
        assert by_phase[phase] == [(30, 0.02), (40, 0.01)], phase


def test_a_dense_run_that_stops_early_before_k_is_reported_and_not_retrained(tmp_path, monkeypatch):
    dense_calls = []
    real = base.train

    def spy(model, data, cfg, **kwargs):
        if kwargs["desc"] == "dense":
            dense_calls.append(1)
        return real(model, data, cfg, **kwargs)

    monkeypatch.setattr(base, "train", spy)
    cfg = tiny(tmp_path, **{"train.iterations": 400, "train.eval_every": 2,
                            "train.patience": 1, "train.lr": 0.5, "prune.lottery.levels": 1,
                            "prune.lottery.rewind_iteration": 300})
    for _ in range(2):
        with pytest.raises(ConfigError, match=r"stopped early at step \d+ .*before iteration 300"):
            PruningExperiment(cfg).run()
    assert len(dense_calls) == 1  # the second run is served the cached dense model and told the same
