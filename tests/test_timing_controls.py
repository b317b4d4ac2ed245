"""Sanity-check controls (Frankle, Dziugaite, Roy & Carbin 2021) for ``pre``, and ``shuffle`` for ``lottery``:
each control trains beside the run at its per-layer densities. Scores for ``invert`` are recomputed here from
their definitions (|w|; SNIP's |w·dL/dw| on the scoring batch; SynFlow's |w·dR/dw| with R = Σ f(1; |θ|))."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from benchkit.config import ConfigError
from benchkit.data import load_data
from benchkit.experiment import PruningExperiment
from benchkit.models import build_model
from benchkit.pruning.engine import score
from benchkit.pruning.masks import get_masks, plain_state_dict
from benchkit.seeding import seed_everything
from benchkit.timing import base
from benchkit.validation import load_config

torch.set_num_threads(1)
LAYERS = ("fc1", "fc2", "fc3")
PATHS = tuple(f"{n}.weight" for n in LAYERS)
CONTROLS = ["shuffle", "reinit", "invert", "random"]


def tiny(tmp_path, **overrides):
    d = {"data": {"name": "digits"}, "model": {"name": "lenet300", "kwargs": {"hidden": [32, 16]}},
         "train": {"epochs": 1, "lr": 0.05, "batch_size": 64}, "progress": False, "output_dir": str(tmp_path),
         "prune": {"timing": "pre", "sparsity": 0.8, "allocation": "global", "pre": {"controls": CONTROLS}}}
    return load_config(d, overrides)


class Spy:
    """Masks and starting weights of every training phase; the kwargs of every engine call."""

    def __init__(self, monkeypatch):
        self.calls: dict[str, dict] = {}
        self.prunes: list[dict] = []
        real_train, real_prune = base.train, base.prune

        def train(model, data, cfg, **kwargs):
            self.calls[kwargs["desc"]] = {"masks": get_masks(model), "start": plain_state_dict(model)}
            return real_train(model, data, cfg, **kwargs)

        def prune(model, **kwargs):
            self.prunes.append(kwargs)
            return real_prune(model, **kwargs)

        monkeypatch.setattr(base, "train", train)
        monkeypatch.setattr(base, "prune", prune)


def initial_model(cfg):
    data = load_data(cfg.data, cfg.train.batch_size, cfg.train.eval_batch_size, cfg.seed)
    seed_everything(cfg.seed)
    return build_model(cfg.model, data)


def independent_scores(criterion: str, model, batch) -> dict[str, torch.Tensor] | None:
    weights = {n: model.get_submodule(n).weight for n in LAYERS}
    if criterion == "magnitude":
        return {n: w.detach().abs() for n, w in weights.items()}
    if criterion == "snip":
        x, y = batch
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(weights.values()))
        return {n: (w.detach() * g).abs() for (n, w), g in zip(weights.items(), grads)}
    if criterion == "synflow":
        m = copy.deepcopy(model).double()
        with torch.no_grad():
            for p in m.parameters():
                p.abs_()
        ws = [m.get_submodule(n).weight for n in LAYERS]
        r = m(torch.ones((1, 1, 8, 8), dtype=torch.float64)).sum()
        return {n: (w.detach() * g).abs() for n, w, g in zip(LAYERS, ws, torch.autograd.grad(r, ws))}
    return None


@pytest.mark.parametrize("criterion", ["magnitude", "snip", "synflow", "grasp", "random"])
def test_controls_keep_per_layer_density_and_do_what_they_say(tmp_path, monkeypatch, criterion):
    spy = Spy(monkeypatch)
    cfg = tiny(tmp_path, **{"prune.criterion": criterion})
    result = PruningExperiment(cfg).run()
    assert list(spy.calls) == ["train", "train_shuffle", "train_reinit", "train_invert", "train_random"]
    init_model = initial_model(cfg)
    init = plain_state_dict(init_model)
    main = spy.calls["train"]["masks"]
    counts = {p: int(main[p].sum()) for p in PATHS}
    assert 0 < sum(counts.values()) < sum(main[p].numel() for p in PATHS)
    for control in CONTROLS:
        call = spy.calls[f"train_{control}"]
        assert set(call["masks"]) == set(main)
        for p in PATHS:
            assert int(call["masks"][p].sum()) == counts[p]  # per-layer density kept exactly
    # shuffle: a permutation of each layer's mask (same count, checked above), on the initial weights
    shuffle = spy.calls["train_shuffle"]
    assert any(not torch.equal(shuffle["masks"][p], main[p]) for p in PATHS)
    for p in PATHS:
        m = shuffle["masks"][p]
        assert torch.equal(shuffle["start"][p][m], init[p][m]) and not shuffle["start"][p][~m].any()
    # reinit: the same masks, different weights
    reinit = spy.calls["train_reinit"]
    for p in PATHS:
        assert torch.equal(reinit["masks"][p], main[p])
        assert not torch.equal(reinit["start"][p][main[p]], init[p][main[p]])
    # invert: exactly the lowest-scoring weights of each layer under the criterion's scores at init
    invert = spy.calls["train_invert"]["masks"]
    loader = spy.prunes[0].get("loader")  # the run's scoring batches (None for data-free criteria)
    data_kw = {"loader": loader, "score_batches": len(loader)} if loader else {}
    engine_scores = score(init_model, criterion, seed=cfg.seed, input_shape=(1, 8, 8), **data_kw)
    mine = independent_scores(criterion, initial_model(cfg), loader[0] if loader else None)
    for p, n in zip(PATHS, LAYERS):
        k = counts[p]
        order = torch.sort(engine_scores[n].reshape(-1).double(), stable=True).indices
        expected = torch.zeros(order.numel(), dtype=torch.bool)
        expected[order[:k]] = True
        assert torch.equal(invert[p].reshape(-1), expected)
        if mine is not None:  # the kept weights score at most what the pruned ones score, independently
            s = mine[n]
            assert s[invert[p]].max() <= s[~invert[p]].min() * (1 + 1e-5) + 1e-12
    if criterion != "random":
        assert all(not torch.equal(invert[p], main[p]) for p in PATHS)
    # random: a fresh random mask at the same counts, on the initial weights
    rand = spy.calls["train_random"]
    assert any(not torch.equal(rand["masks"][p], main[p]) for p in PATHS)
    assert any(not torch.equal(rand["masks"][p], shuffle["masks"][p]) for p in PATHS)
    for p in PATHS:
        m = rand["masks"][p]
        assert torch.equal(rand["start"][p][m], init[p][m])
    # logged beside the run, like the lottery controls
    assert [r["branch"] for r in result.levels] == ["main", *CONTROLS]
    for row in result.levels:
        assert row["level"] == 1 and {"val_acc1", "test_acc1", "best_step", "percent_remaining"} <= row.keys()
        assert row["percent_remaining"] == result.levels[0]["percent_remaining"]
    assert result.levels[0]["test_acc1"] == result.metrics["test_acc1"]


def test_controls_are_seeded(tmp_path, monkeypatch):
    masks = {}
    for key, seed in (("a", 0), ("b", 0), ("c", 1)):
        spy = Spy(monkeypatch)
        PruningExperiment(tiny(tmp_path / key, **{"seed": seed, "prune.pre.controls": ["shuffle", "random"],
                                                 "prune.criterion": "magnitude"})).run()
        masks[key] = {c: spy.calls[f"train_{c}"]["masks"] for c in ("shuffle", "random")}
    for c in ("shuffle", "random"):
        assert all(torch.equal(masks["a"][c][p], masks["b"][c][p]) for p in PATHS)
        assert any(not torch.equal(masks["a"][c][p], masks["c"][c][p]) for p in PATHS)


def test_no_controls_no_levels(tmp_path):
    result = PruningExperiment(tiny(tmp_path, **{"prune.pre.controls": []})).run()
    assert result.levels == []


@pytest.mark.parametrize("overrides, message", [
    ({"prune.pre.controls": ["flip"]}, "prune.pre.controls: unknown control 'flip'; allowed: shuffle, reinit, invert, random"),
    ({"prune.pre.controls": ["shuffle", "shuffle"]}, "prune.pre.controls: each control once"),
    ({"prune.sparsity": None}, "prune.pre.controls: controls re-draw the run's masks, but this run prunes nothing"),
    ({"prune.granularity": "channel"}, "granularity 'channel' is not supported with them (use element)"),
    ({"prune.timing": "post"}, "prune.pre.controls"),
])
def test_bad_controls_are_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        tiny(tmp_path, **overrides)
    assert message in str(err.value)


def test_lottery_shuffle_permutes_the_ticket_on_the_rewound_weights(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    cfg = load_config({"data": {"name": "digits"}, "model": {"name": "lenet300", "kwargs": {"hidden": [32, 16]}},
                       "train": {"epochs": 1, "lr": 0.05, "batch_size": 64}, "progress": False,
                       "output_dir": str(tmp_path),
                       "prune": {"timing": "lottery", "allocation": "uniform",
                                 "lottery": {"levels": 2, "rate": 0.5, "controls": ["shuffle"]}}})
    result = PruningExperiment(cfg).run()
    init = plain_state_dict(initial_model(cfg))
    for level in (1, 2):
        ticket, shuffle = spy.calls[f"level_{level}"], spy.calls[f"level_{level}_shuffle"]
        for p in PATHS:
            t, s = ticket["masks"][p], shuffle["masks"][p]
            assert int(s.sum()) == int(t.sum()) and not torch.equal(s, t)
            assert torch.equal(shuffle["start"][p][s], init[p][s]) and not shuffle["start"][p][~s].any()
    assert [(r["level"], r["branch"]) for r in result.levels] == [
        (0, "ticket"), (1, "ticket"), (1, "shuffle"), (2, "ticket"), (2, "shuffle")]


def test_engine_score_equals_the_definitions_and_leaves_the_model_alone(tmp_path):
    cfg = tiny(tmp_path)
    model = initial_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(20, 1, 8, 8), torch.randint(0, 10, (20,))
    for criterion in ("magnitude", "snip", "synflow"):
        got = score(model, criterion, batch=(x, y), input_shape=(1, 8, 8))
        ref = independent_scores(criterion, model, (x, y))
        for n in LAYERS:
            if criterion == "snip":  # SNIP's published scores are normalised to sum to 1
                total = sum(float(r.sum()) for r in ref.values())
                assert torch.allclose(got[n], ref[n] / total, rtol=1e-5, atol=0)
            else:
                assert torch.allclose(got[n].double(), ref[n].double(), rtol=1e-6, atol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert get_masks(model) == {}
    assert set(score(model, "magnitude", exclude=["fc3"])) == {"fc1", "fc2"}
