"""``dynamic``: sparse training with drop-and-grow mask updates (SET, RigL) and the static control.

The RigL reference below re-implements the authors' TensorFlow update (``rigl/rigl_tf2/mask_updaters.py``,
``MaskUpdater.generic_mask_update``) line by line with torch: ``top_k`` over every entry (a stable
descending sort: TF's ``top_k`` puts the lower index first among equals), kept entries lifted to
``min(score) - 1`` for the grow ranking, ``n_prune = int(n_ones · drop_fraction)``, new connections =
grown and not alive before; the dense gradient comes from an unpruned copy of the model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchkit.config import ConfigError
from benchkit.experiment import PruningExperiment
from benchkit.pruning.masks import deepcopy_model, get_masks, make_permanent, param_value
from benchkit.timing import base, dynamic
from benchkit.tracking import result_metric_rows
from benchkit.validation import load_config

torch.set_num_threads(1)
LAYERS = ("fc1", "fc2", "fc3")
PATHS = tuple(f"{n}.weight" for n in LAYERS)


def tiny(tmp_path, **overrides):
    d = {"data": {"name": "digits"}, "model": {"name": "lenet300", "kwargs": {"hidden": [32, 16]}},
         "train": {"epochs": 2, "lr": 0.05, "batch_size": 32}, "progress": False, "output_dir": str(tmp_path),
         "prune": {"timing": "dynamic", "sparsity": 0.8, "criterion": "random", "allocation": "erk",
                   "dynamic": {"method": "rigl", "delta_t": 5}}}
    return load_config(d, overrides)


class Watch:
    """Training spy, called after the timing's own callbacks at every step: masks, stored weights and
    optimiser state per step (copies), so a test can look at what each update did."""

    def __init__(self, monkeypatch):
        self.steps: list[dict] = []
        self.start: dict | None = None
        real = base.train

        def spy(model, data, cfg, **kwargs):
            self.start = get_masks(model)
            kwargs["callbacks"] = [*kwargs.get("callbacks", ()), self]
            return real(model, data, cfg, **kwargs)

        monkeypatch.setattr(base, "train", spy)

    def on_step(self, step, model, optimizer):
        masks = get_masks(model)
        record = {"step": step, "masks": masks, "orig": {}, "state": {}}
        for path in PATHS:
            module = model.get_submodule(path.rpartition(".")[0])
            orig = module.weight_orig
            record["orig"][path] = orig.detach().clone()
            record["state"][path] = {k: v.clone() for k, v in optimizer.state.get(orig, {}).items()
                                     if torch.is_tensor(v) and v.shape == orig.shape}
        self.steps.append(record)


def total_steps(cfg) -> int:
    from benchkit.data import load_data

    data = load_data(cfg.data, cfg.train.batch_size, cfg.train.eval_batch_size, cfg.seed)
    return cfg.train.epochs * len(data.train)


# ------------------------------------------------------------------------------------------ schedule
def test_updates_follow_the_cosine_schedule_and_stop_at_t_end(tmp_path, monkeypatch):
    watch = Watch(monkeypatch)
    cfg = tiny(tmp_path, **{"prune.dynamic.alpha": 0.4, "prune.dynamic.t_end": 0.6})
    result = PruningExperiment(cfg).run()
    T = total_steps(cfg)
    end = round(0.6 * T)
    expected_steps = [s for s in range(1, end) if s % 5 == 0]  # at T_end itself the fraction is 0: no update
    assert len(expected_steps) >= 5
    assert [r["step"] for r in result.levels] == expected_steps
    assert [r["update"] for r in result.levels] == list(range(1, len(expected_steps) + 1))
    survivors = {p: int(watch.start[p].sum()) for p in PATHS}
    for row in result.levels:
        f = 0.4 * (1 + math.cos(math.pi * row["step"] / end)) / 2  # Evci et al. 2020, eq. (1)
        assert row["drop_fraction"] == pytest.approx(f, rel=1e-12)
        for path in PATHS:  # n = floor(f · survivors) per layer, RigL's int32 cast
            assert row[f"dropped/{path[:-7]}"] == int(survivors[path] * f)
            assert 0 <= row[f"regrown/{path[:-7]}"] <= row[f"dropped/{path[:-7]}"]
    # the mask changes at update steps only, and never after t_end
    changed = [r["step"] for prev, r in zip([{"masks": watch.start}] + watch.steps, watch.steps)
               if any(not torch.equal(prev["masks"][p], r["masks"][p]) for p in PATHS)]
    assert changed and set(changed) <= set(expected_steps) and max(changed) <= end
    assert len(changed) >= len(expected_steps) - 1  # regrowth really happens (the last fraction may floor to 0)
    assert result.metrics["dynamic_updates"] == len(expected_steps)


# ------------------------------------------------------------------------------------------ regrowth
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_sparsity_exact_regrown_start_at_zero_with_fresh_optimizer_state(tmp_path, monkeypatch, optimizer):
    watch = Watch(monkeypatch)
    lr = 0.05 if optimizer == "sgd" else 0.005
    cfg = tiny(tmp_path, **{"train.optimizer": optimizer, "train.lr": lr, "prune.dynamic.method": "set"})
    result = PruningExperiment(cfg).run()
    counts = {p: int(watch.start[p].sum()) for p in PATHS}
    update_steps = {r["step"] for r in result.levels}
    prev = {"masks": watch.start}
    regrown_seen = 0
    for rec in watch.steps:
        for path in PATHS:
            mask = rec["masks"][path]
            assert int(mask.sum()) == counts[path]  # exactly the initial per-layer density, every step
            assert not rec["orig"][path][~mask].any()  # pruned weights are exactly zero between updates
            for value in rec["state"][path].values():
                assert not value[~mask].any()  # and so is their optimiser state
            new = mask & ~prev["masks"][path]
            if rec["step"] in update_steps:
                regrown_seen += int(new.sum())
                row = next(r for r in result.levels if r["step"] == rec["step"])
                assert row[f"regrown/{path[:-7]}"] == int(new.sum())  # new connections, as logged
                assert not rec["orig"][path][new].any()  # regrown weights start at zero
                assert rec["state"][path]  # momentum / Adam moments exist ...
                for value in rec["state"][path].values():
                    assert not value[new].any()  # ... and are zero at the regrown entries
            else:
                assert not new.any()
        prev = rec
    assert regrown_seen > 50
    for row in result.levels:  # counted from the masks: exactly the initial sparsity after every update
        kept = sum(counts.values())
        total = sum(watch.start[p].numel() for p in PATHS)
        assert row["sparsity"] == 1 - kept / total
        assert row["regrown"] == sum(row[f"regrown/{n}"] for n in LAYERS) <= row["dropped"]
        assert row["dropped"] == sum(row[f"dropped/{n}"] for n in LAYERS)


def test_static_never_changes_the_mask(tmp_path, monkeypatch):
    watch = Watch(monkeypatch)
    result = PruningExperiment(tiny(tmp_path, **{"prune.dynamic.method": "static"})).run()
    assert len(watch.steps) > 50
    for rec in watch.steps:
        for path in PATHS:
            assert torch.equal(rec["masks"][path], watch.start[path])
    assert result.levels == [] and result.metrics["dynamic_updates"] == 0
    assert "regrown_alive_fraction" not in result.metrics


def test_regrown_alive_fraction_counts_the_final_mask(tmp_path, monkeypatch):
    watch = Watch(monkeypatch)
    result = PruningExperiment(tiny(tmp_path, **{"prune.dynamic.method": "set"})).run()
    update_steps = {r["step"] for r in result.levels}
    ever = {p: torch.zeros_like(watch.start[p]) for p in PATHS}
    prev = watch.start
    for rec in watch.steps:
        if rec["step"] in update_steps:
            for p in PATHS:
                ever[p] |= rec["masks"][p] & ~prev[p]
        prev = rec["masks"]
    final = result.masks
    alive = sum(int((ever[p] & final[p]).sum()) for p in PATHS)
    assert result.metrics["regrown_alive_fraction"] == alive / sum(int(e.sum()) for e in ever.values())
    for p in PATHS:
        assert result.metrics[f"regrown_alive_fraction/{p[:-7]}"] == int((ever[p] & final[p]).sum()) / int(ever[p].sum())


# ------------------------------------------------------------------------------------------ RigL reference
def rigl_reference(weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, drop_fraction: float) -> torch.Tensor:
    """The authors' ``generic_mask_update`` (TF2), translated op for op."""
    def top_k_indices(v):  # tf.math.top_k(v, k=n_total).indices: descending, lower index first among equals
        return torch.sort(v, descending=True, stable=True).indices

    mask_f = mask.float().reshape(-1)
    score_drop = (mask_f * weight.reshape(-1)).abs()
    n_total = score_drop.numel()
    n_ones = int(mask_f.sum())
    n_prune = int(float(n_ones) * drop_fraction)
    n_keep = n_ones - n_prune
    sorted_idx = top_k_indices(score_drop)
    mask1 = torch.zeros(n_total)
    mask1[sorted_idx] = (torch.arange(n_total) < n_keep).float()
    score_grow = grad.abs().reshape(-1)
    lifted = torch.where(mask1 == 1, torch.ones_like(mask1) * (score_grow.min() - 1), score_grow)
    sorted_idx = top_k_indices(lifted)
    mask2 = torch.zeros(n_total)
    mask2[sorted_idx] = (torch.arange(n_total) < n_prune).float()
    assert float((mask1 * mask2).sum()) == 0.0
    return (mask1 + mask2).reshape(mask.shape).bool()


def dense_copy_gradient(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    """dL/dW of the effective weights from an unpruned copy (prune hooks removed, masked entries zero)."""
    plain = make_permanent(deepcopy_model(model))
    x, y = batch
    weights = [plain.get_submodule(n).weight for n in LAYERS]
    grads = torch.autograd.grad(F.cross_entropy(plain(x), y), weights)
    return dict(zip(PATHS, grads))


def test_rigl_grows_exactly_the_top_gradient_connections_of_the_reference(tmp_path, monkeypatch):
    batches = []
    real_stream = dynamic.batch_stream

    def recording_stream(*args, **kwargs):
        for batch in real_stream(*args, **kwargs):
            batches.append(batch)
            yield batch

    monkeypatch.setattr(dynamic, "batch_stream", recording_stream)
    compared = []
    real_update = dynamic.MaskUpdater.update

    def checked_update(self, step, model, optimizer):
        before = copy.deepcopy(model.state_dict())
        masks = get_masks(model)
        n = len(batches)
        changed = real_update(self, step, model, optimizer)
        assert len(batches) == n + 1  # one dense gradient (one batch) per update
        snapshot = deepcopy_model(model)
        snapshot.load_state_dict(before)
        for path in PATHS:  # restore the pre-update masks too (state_dict holds them)
            assert torch.equal(get_masks(snapshot)[path], masks[path])
        weights = {p: param_value(snapshot.get_submodule(p[:-7])).detach() * masks[p] for p in PATHS}
        if all(bool((weights[p][masks[p]] != 0).all()) for p in PATHS):  # TF ranks every entry: see docstring
            grads = dense_copy_gradient(snapshot, batches[-1])
            fraction = self.schedule.fraction(step)
            now = get_masks(model)
            for p in PATHS:
                assert torch.equal(now[p], rigl_reference(weights[p], masks[p], grads[p], fraction)), (step, p)
            compared.append(step)
        return changed

    monkeypatch.setattr(dynamic.MaskUpdater, "update", checked_update)
    cfg = tiny(tmp_path)
    result = PruningExperiment(cfg).run()
    assert len(compared) >= 5 and len(compared) >= len(result.levels) - 2


def test_dense_gradient_reaches_pruned_entries_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    from benchkit.pruning.masks import apply_masks

    apply_masks(model, {"1.weight": torch.rand(8, 12) > 0.7, "5.weight": torch.rand(3, 8) > 0.5})
    model.train()
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    rng = torch.get_rng_state()
    grads = dynamic.dense_gradients(model, ["1.weight", "5.weight"], (x, y))
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())  # BN statistics untouched
    assert torch.equal(torch.get_rng_state(), rng)  # dropout drew from a forked RNG
    for path in ("1.weight", "5.weight"):
        mask = get_masks(model)[path]
        assert grads[path][~mask].abs().sum() > 0  # pruned entries get a gradient
    # the same gradient as an unpruned copy in the same mode with the same dropout draws
    plain = make_permanent(deepcopy_model(model))
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng)
        out = plain(x)
    ref = torch.autograd.grad(F.cross_entropy(out, y), [plain[1].weight, plain[5].weight])
    assert torch.allclose(grads["1.weight"], ref[0], atol=0, rtol=0)
    assert torch.allclose(grads["5.weight"], ref[1], atol=0, rtol=0)
    assert model[1].weight is not None and isinstance(model[1].weight, torch.Tensor)
    assert torch.equal(model[1].weight, model[1].weight_orig * model[1].weight_mask)


# ------------------------------------------------------------------------------------------ reproducibility
def test_set_regrowth_is_seeded_and_runs_are_bit_reproducible(tmp_path):
    runs = {}
    for key, method, seed in (("set_a", "set", 0), ("set_b", "set", 0), ("set_c", "set", 1),
                              ("rigl_a", "rigl", 0), ("rigl_b", "rigl", 0)):
        cfg = tiny(tmp_path / key, **{"prune.dynamic.method": method, "seed": seed})
        runs[key] = PruningExperiment(cfg).run()
    for a, b in (("set_a", "set_b"), ("rigl_a", "rigl_b")):
        assert runs[a].levels == runs[b].levels
        assert runs[a].state_dict.keys() == runs[b].state_dict.keys()
        assert all(torch.equal(runs[a].state_dict[k], runs[b].state_dict[k]) for k in runs[a].state_dict)
    assert any(not torch.equal(runs["set_a"].masks[p], runs["set_c"].masks[p]) for p in PATHS)
    assert any(not torch.equal(runs["set_a"].masks[p], runs["rigl_a"].masks[p]) for p in PATHS)


def test_per_update_figures_become_stepped_mlflow_metrics(tmp_path):
    result = PruningExperiment(tiny(tmp_path)).run()
    rows = result_metric_rows(result)
    by_key: dict[str, list[tuple[int, float]]] = {}
    for key, value, step in rows:
        by_key.setdefault(key, []).append((step, value))
    steps = [r["step"] for r in result.levels]
    assert [s for s, _ in by_key["dynamic/sparsity"]] == steps  # at the training step of each update
    assert [v for _, v in by_key["dynamic/regrown/fc1"]] == [r["regrown/fc1"] for r in result.levels]
    assert [s for s, _ in by_key["level_dropped/fc2"]] == [r["update"] for r in result.levels]
    assert by_key["regrown_alive_fraction"][0][1] == result.metrics["regrown_alive_fraction"]


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("key, value, message", [
    ("prune.dynamic.method", "deepr", "unknown method 'deepr'; allowed: static, set, rigl"),
    ("prune.dynamic.alpha", 0.0, "prune.dynamic.alpha: the initial drop fraction must be in (0, 1)"),
    ("prune.dynamic.alpha", 1.0, "prune.dynamic.alpha: the initial drop fraction must be in (0, 1)"),
    ("prune.dynamic.delta_t", 0, "prune.dynamic.delta_t: must be an integer >= 1"),
    ("prune.dynamic.t_end", 0.0, "prune.dynamic.t_end: the fraction of training with mask updates must be in (0, 1]"),
    ("prune.dynamic.t_end", 1.5, "prune.dynamic.t_end: the fraction of training with mask updates must be in (0, 1]"),
    ("prune.granularity", "2:4", "timing dynamic drops and grows single weights; granularity '2:4'"),
    ("prune.granularity", "channel", "timing dynamic drops and grows single weights; granularity 'channel'"),
])
def test_bad_settings_are_refused_before_any_work(tmp_path, key, value, message):
    overrides = {key: value}
    if key == "prune.granularity":
        overrides["prune.sparsity"] = None if value == "2:4" else 0.5
    with pytest.raises(ConfigError) as err:
        tiny(tmp_path, **overrides)
    assert message in str(err.value)


def test_method_is_refused_under_another_timing(tmp_path):
    with pytest.raises(ConfigError, match=r"prune\.dynamic\.method"):
        tiny(tmp_path, **{"prune.timing": "post", "prune.dynamic.method": "set"})


def test_a_schedule_that_would_never_update_is_refused_before_training(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(base, "train", lambda *a, **k: trained.append(1))
    with pytest.raises(ConfigError, match=r"prune\.dynamic\.delta_t: 500 steps is more than t_end × training steps"):
        PruningExperiment(tiny(tmp_path, **{"prune.dynamic.delta_t": 500})).run()
    assert not trained


@pytest.mark.parametrize("seed", range(6))
def test_drop_and_grow_equals_the_reference_with_many_ties(seed):
    """Integer-valued weights and gradients: most decisions are ties, which go to the lower index as in TF."""
    g = torch.Generator().manual_seed(seed)
    shape = (37, 23) if seed % 2 else (5, 4, 3, 3)
    alive = torch.rand(shape, generator=g) < (0.1 + 0.15 * seed)
    weight = torch.randint(1, 4, shape, generator=g).float() * torch.where(torch.rand(shape, generator=g) < 0.5, -1, 1)
    weight = weight * alive  # survivors nonzero, pruned entries zero (as stored)
    grad = torch.randint(0, 3, shape, generator=g).float() * torch.where(torch.rand(shape, generator=g) < 0.5, -1, 1)
    for fraction in (0.05, 0.3, 0.5, 0.999):
        new, n = dynamic.drop_and_grow(weight, alive, grad.abs(), fraction)
        assert n == int(int(alive.sum()) * fraction)
        assert torch.equal(new, rigl_reference(weight, alive, grad, fraction))


def test_largest_breaks_ties_like_top_k():
    v = torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0, 2.0, 0.0])
    for k in range(0, 8):
        expected = torch.zeros(7, dtype=torch.bool)
        expected[torch.sort(v, descending=True, stable=True).indices[:k]] = True
        assert torch.equal(dynamic.largest(v, k), expected), k
