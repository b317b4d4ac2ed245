"""ShrinkBench's reporting checklist on small fake stores: a complete sweep meets every rule, and each other
sweep breaks exactly one rule, which is named with what is missing."""

from __future__ import annotations

import math

import pytest
from fake_runs import log_fake_runs

from benchkit import analysis as ba
from benchkit.cli import main
from benchkit.verify import checklist

POINTS = (2.0, 4.0, 8.0, 16.0, 32.0)
SEEDS = (0, 1, 2)


def metrics(criterion: str, c: float, seed: int, *, speedup: bool = True) -> dict[str, float]:
    acc = 0.9 - (0.01 if criterion == "magnitude" else 0.04) * math.log2(c) + 0.002 * seed
    out = {"test_acc1": acc, "compression_ratio": c, "dense_test_acc1": 0.9}
    if speedup:
        out["theoretical_speedup"] = c
    return out


def sweep(points=POINTS, seeds=SEEDS, criteria=("magnitude", "random"), dense=True, budgets=None, speedup=True,
          dense_metric=True):
    runs = []
    for criterion in criteria:
        for c in points:
            for seed in seeds:
                m = metrics(criterion, c, seed, speedup=speedup)
                if not dense_metric:
                    m.pop("dense_test_acc1")
                runs.append(({"prune.criterion": criterion, "prune.compression": c, "seed": seed,
                              "prune.post.finetune.epochs": (budgets or {}).get(criterion, 3)}, m))
    if dense:
        for seed in seeds:
            m = {"test_acc1": 0.9, "compression_ratio": 1.0, **({"theoretical_speedup": 1.0} if speedup else {})}
            runs.append(({"prune.compression": 1.0, "seed": seed}, m))
    return runs


STORES = {  # experiments of the fake store; the other broken sweeps are the complete one read through a filter
    "complete": sweep(),
    "no-speedup": sweep(speedup=False),
    "unequal-budgets": sweep(budgets={"random": 1}),
    "no-dense": sweep(dense=False, dense_metric=False),
}
FILTERED = {"few-points": ("complete", "params.`prune.compression` != '32.0'"),
            "two-seeds": ("complete", "params.seed != '2'"),
            "no-random": ("complete", "params.`prune.criterion` != 'random'")}
BROKEN = {"few-points": ("operating-points", "highest 16×, needs one at >= 32×"),
          "no-speedup": ("both-axes", "theoretical speedup (theoretical_speedup) logged by no run"),
          "two-seeds": ("seeds", "2 seed(s), needs >= 3"),
          "no-random": ("baselines", "random pruning (prune.criterion: random) as a baseline"),
          "unequal-budgets": ("equal-budgets", "random: 1 fine-tuning epochs"),
          "no-dense": ("dense-baseline", "add prune.compression: 1 to the grid")}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('checklist') / 'mlflow.db'}"
    for name, runs in STORES.items():
        log_fake_runs(uri, name, runs, base={"prune": {"timing": "post"}})
    return uri


def results(store, name):
    experiment, where = FILTERED.get(name, (name, ""))
    return {r.rule: r for r in checklist(ba.load_runs(experiment, tracking_uri=store, filter_string=where))}


def test_a_complete_sweep_meets_every_rule(store):
    res = results(store, "complete")
    assert list(res) == ["operating-points", "both-axes", "seeds", "baselines", "equal-budgets", "dense-baseline"]
    assert all(r.ok for r in res.values()), {k: r.missing for k, r in res.items() if not r.ok}
    assert "2 method(s) at 5–5 compressions > 1 (2×, 4×, 8×, 16×, 32×)" == res["operating-points"].found
    assert res["equal-budgets"].found == "training after pruning: 3 fine-tuning epochs"
    # the spread reported is the std over seeds of test_acc1 (0.2 pp per seed step: std 0.2 pp)
    assert "std of test_acc1 over seeds 0.20–0.20 pp" in res["seeds"].found


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_each_broken_sweep_misses_exactly_its_rule(store, name):
    rule, missing = BROKEN[name]
    res = results(store, name)
    assert [r for r, v in res.items() if not v.ok] == [rule]
    assert any(missing in m for m in res[rule].missing), res[rule].missing


def test_a_dense_metric_stands_for_dense_runs(store, tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    log_fake_runs(uri, "logged", sweep(dense=False), base={"prune": {"timing": "post"}})
    res = {r.rule: r for r in checklist(ba.load_runs("logged", tracking_uri=uri))}
    assert res["dense-baseline"].ok and "every pruned run logs" in res["dense-baseline"].found


def test_the_cli_prints_the_rules_and_fails_on_a_missing_one(store, capsys):
    assert main(["verify", "--checklist", "complete", "--tracking-uri", store]) == 0
    assert "6 of 6 rules met" in capsys.readouterr().out
    assert main(["verify", "--checklist", "unequal-budgets", "--tracking-uri", store]) == 1
    out = capsys.readouterr().out
    assert "MISS  equal-budgets" in out and "missing: training after pruning differs" in out
    assert main(["verify", "--checklist", "nope", "--tracking-uri", store]) == 2
