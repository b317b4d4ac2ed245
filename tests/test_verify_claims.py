"""The claim vocabulary of reproduction cards, on small frames whose numbers are known in closed form: every kind
passes and fails where the arithmetic says, statuses follow known differences, and cards are checked when read."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from benchkit.verify import (
    ERROR,
    FAIL,
    KNOWN,
    PASS,
    XPASS,
    CardError,
    ClaimContext,
    StudyData,
    build_claim,
    load_card,
)
from benchkit.verify.report import evaluate_claim, markdown, read_blocks, verify_card, write_blocks

SEEDS = (0, 1, 2)
NOISE = {("magnitude", "global"): (0.0, 0.002, -0.001), ("magnitude", "uniform"): (0.001, 0.0, 0.0015),
         ("random", "global"): (0.004, -0.004, 0.0), ("random", "uniform"): (0.003, -0.002, 0.001)}
DROP = {("magnitude", "global"): 0.01, ("magnitude", "uniform"): 0.02, ("random", "global"): 0.05,
        ("random", "uniform"): 0.05}


def acc(criterion: str, allocation: str, c: float, seed: int) -> float:
    return 0.9 - DROP[(criterion, allocation)] * math.log2(c) + NOISE[(criterion, allocation)][seed]


def speedup(allocation: str, c: float, seed: int) -> float:
    """Global allocation reaches less speedup than compression (conv layers kept dense), uniform exactly c."""
    return (c ** 0.5 if allocation == "global" else c) * (1 + 0.01 * seed)


def runs_frame() -> pd.DataFrame:
    rows = []
    for (criterion, allocation) in DROP:
        for c in (2.0, 4.0, 8.0):
            for seed in SEEDS:
                rows.append({"criterion": criterion, "allocation": allocation, "compression": c, "seed": seed,
                             "test_acc1": acc(criterion, allocation, c, seed), "compression_ratio": c,
                             "theoretical_speedup": speedup(allocation, c, seed),
                             "dense_test_acc1": 0.9 + 0.001 * seed, "prune.post.rounds": 1})
    return pd.DataFrame(rows)


def study(**frames: pd.DataFrame) -> StudyData:
    s = StudyData("fake", None)
    s._frames.update(frames)
    return s


DEFAULTS = {"metric": "test_acc1", "scale": 100, "unit": "%", "x": "compression"}


def evaluate(raw: dict, frames: dict | None = None):
    claim = build_claim({"id": "c", "says": "a claim", **raw}, DEFAULTS)
    return evaluate_claim(claim, ClaimContext(study(**(frames or {"runs": runs_frame()}))))


def diffs_pp(a: tuple, b: tuple, c: float) -> np.ndarray:
    return np.array([(acc(*a, c, s) - acc(*b, c, s)) * 100 for s in SEEDS])


# --------------------------------------------------------------------------------------------- kinds
def test_ordering_passes_where_the_mean_difference_is_above_the_margin():
    out = evaluate({"kind": "ordering", "a": {"criterion": "magnitude", "allocation": "global"},
                    "b": {"criterion": "magnitude", "allocation": "uniform"}, "at": {">=": 4}, "significant": True})
    assert out.status == PASS and [c.point for c in out.checks] == ["4×", "8×"]
    d = diffs_pp(("magnitude", "global"), ("magnitude", "uniform"), 8.0)
    lo, hi = stats.t.interval(0.95, 2, loc=d.mean(), scale=stats.sem(d))
    assert f"{d.mean():+.2f} pp [95% CI {lo:+.2f}, {hi:+.2f}], n=3" in out.checks[1].text
    # the other way round it fails at every point
    back = evaluate({"kind": "ordering", "a": {"criterion": "magnitude", "allocation": "uniform"},
                     "b": {"criterion": "magnitude", "allocation": "global"}, "at": [2, 4, 8]})
    assert back.status == FAIL and not any(c.ok for c in back.checks)


def test_significant_needs_the_interval_above_the_margin():
    # at 2× magnitude·global − random·global = +4 pp with noise of a few tenths; margin 3.9 lies inside the CI
    d = diffs_pp(("magnitude", "global"), ("random", "global"), 2.0)
    lo, _ = stats.t.interval(0.95, 2, loc=d.mean(), scale=stats.sem(d))
    base = {"kind": "ordering", "a": {"criterion": "magnitude", "allocation": "global"},
            "b": {"criterion": "random", "allocation": "global"}, "at": [2]}
    assert lo < 3.9 < d.mean()
    assert evaluate({**base, "margin": 3.9}).status == PASS
    assert evaluate({**base, "margin": 3.9, "significant": True}).status == FAIL


def test_known_differences_and_errors_set_the_status():
    failing = {"kind": "ordering", "a": {"criterion": "random", "allocation": "global"},
               "b": {"criterion": "magnitude", "allocation": "global"}, "at": [8]}
    assert evaluate(failing).status == FAIL
    known = evaluate({**failing, "known_difference": "random pruning is worse here"})
    assert known.status == KNOWN and not known.holds
    passing = {**failing, "a": failing["b"], "b": failing["a"], "known_difference": "was different before"}
    assert evaluate(passing).status == XPASS
    missing = evaluate({**failing, "a": {"criterion": "snip"}})
    assert missing.status == ERROR and "no runs row" in missing.error
    no_column = evaluate({**failing, "a": {"scope": "global"}})
    assert no_column.status == ERROR and "no column 'scope'" in no_column.error


def test_gap_bounds_the_difference_and_the_ratio():
    a, b = ("magnitude", "global"), ("random", "global")
    d = diffs_pp(a, b, 8.0)  # 12 pp
    base = {"kind": "gap", "a": {"criterion": a[0], "allocation": a[1]}, "b": {"criterion": b[0], "allocation": b[1]},
            "at": [8]}
    assert evaluate({**base, "min": 11.0, "max": 13.0}).status == PASS
    assert evaluate({**base, "min": d.mean() + 0.1}).status == FAIL
    ratios = np.array([acc(*a, 8.0, s) / acc(*b, 8.0, s) for s in SEEDS])
    out = evaluate({**base, "ratio": True, "min": ratios.mean() - 0.001, "max": ratios.mean() + 0.001})
    assert out.status == PASS and f"ratio {ratios.mean():.2f}" in out.checks[0].text
    with pytest.raises(CardError, match="a gap claim needs min and/or max"):
        evaluate(base)


def test_within_tolerance_and_pooled_std():
    a, b = ("random", "global"), ("random", "uniform")
    base = {"kind": "within", "a": {"criterion": "random", "allocation": "global"},
            "b": {"criterion": "random", "allocation": "uniform"}, "at": [4]}
    va = np.array([acc(*a, 4.0, s) for s in SEEDS]) * 100
    vb = np.array([acc(*b, 4.0, s) for s in SEEDS]) * 100
    diff = abs((va - vb).mean())
    pooled = math.sqrt((va.var(ddof=1) + vb.var(ddof=1)) / 2)
    assert evaluate({**base, "tolerance": diff + 0.01}).status == PASS
    assert evaluate({**base, "tolerance": diff - 0.01}).status == FAIL
    assert evaluate({**base, "k_std": diff / pooled + 0.01}).status == PASS
    assert evaluate({**base, "k_std": diff / pooled - 0.01}).status == FAIL


def test_threshold_bounds_and_spread():
    frames = {"runs": runs_frame()}
    mean8 = np.mean([acc("magnitude", "global", 8.0, s) for s in SEEDS]) * 100
    thr = {"kind": "threshold", "a": {"criterion": "magnitude", "allocation": "global"}, "at": [8]}
    assert evaluate({**thr, "min": mean8 - 0.01}, frames).status == PASS
    assert evaluate({**thr, "min": mean8 + 0.01}, frames).status == FAIL
    # every row: uniform speedup / compression is 1 + 0.01·seed
    bounds = {"kind": "bounds", "a": {"allocation": "uniform"}, "metric": "theoretical_speedup / compression_ratio",
              "scale": 1}
    assert evaluate({**bounds, "min": 1.0, "max": 1.02}, frames).status == PASS
    out = evaluate({**bounds, "min": 1.0, "max": 1.015}, frames)
    assert out.status == FAIL and "6 outside" in out.checks[0].text  # seed 2: 2 criteria × 3 compressions
    sd = np.std([acc("random", "global", 2.0, s) for s in SEEDS], ddof=1) * 100
    spread = {"kind": "spread", "a": {"criterion": "random", "allocation": "global"}, "at": [2]}
    assert evaluate({**spread, "min": sd - 0.01}, frames).status == PASS
    assert evaluate({**spread, "max": sd - 0.01}, frames).status == FAIL


def test_best_names_the_winner_at_every_point():
    out = evaluate({"kind": "best", "among": ["criterion", "allocation"], "expect": {"criterion": "magnitude"},
                    "at": [2, 4, 8]})
    assert out.status == PASS and {c.short for c in out.checks} == {"magnitude · global"}
    assert evaluate({"kind": "best", "among": ["criterion", "allocation"], "expect": {"allocation": "uniform"},
                     "at": [8]}).status == FAIL
    lowest = evaluate({"kind": "best", "among": ["criterion"], "expect": {"criterion": "random"}, "lowest": True,
                       "where": {"allocation": "global"}, "at": [8]})
    assert lowest.status == PASS


def test_interpolation_in_log2_x_per_seed():
    """Global vs uniform at equal theoretical speedup: each seed's curve interpolated with np.interp in log2 x."""
    frame = runs_frame()
    out = evaluate({"kind": "ordering", "a": {"criterion": "magnitude", "allocation": "uniform"},
                    "b": {"criterion": "magnitude", "allocation": "global"}, "x": "theoretical_speedup",
                    "interpolate": True, "at": [2.5]})
    expected = []
    for s in SEEDS:
        ys = {}
        for alloc in ("uniform", "global"):
            rows = frame[(frame.criterion == "magnitude") & (frame.allocation == alloc) & (frame.seed == s)]
            rows = rows.sort_values("theoretical_speedup")
            ys[alloc] = np.interp(np.log2(2.5), np.log2(rows.theoretical_speedup), rows.test_acc1) * 100
        expected.append(ys["uniform"] - ys["global"])
    assert f"{np.mean(expected):+.2f} pp" in out.checks[0].text
    beyond = evaluate({"kind": "ordering", "a": {"criterion": "magnitude", "allocation": "uniform"},
                       "b": {"criterion": "magnitude", "allocation": "global"}, "x": "theoretical_speedup",
                       "interpolate": True, "at": [5.0]})
    assert beyond.status == ERROR and "outside the range" in beyond.error  # global reaches ~2.9× only


def test_nearest_point_and_ambiguous_sides():
    near = evaluate({"kind": "threshold", "a": {"criterion": "magnitude", "allocation": "global"}, "at": [8.3],
                     "min": 0})
    assert near.status == PASS and near.checks[0].point == "8.3× (at 8×)"
    far = evaluate({"kind": "threshold", "a": {"criterion": "magnitude", "allocation": "global"}, "at": [10],
                    "min": 0})
    assert far.status == ERROR and "no compression near 10" in far.error
    ambiguous = evaluate({"kind": "threshold", "a": {"criterion": "magnitude"}, "at": [8], "min": 0})
    assert ambiguous.status == ERROR and "allocation" in ambiguous.error and "reduce: mean" in ambiguous.error
    mean = evaluate({"kind": "threshold", "a": {"criterion": "magnitude"}, "at": [8], "min": 0, "reduce": "mean"})
    both = np.mean([acc("magnitude", al, 8.0, s) for al in ("global", "uniform") for s in SEEDS]) * 100
    assert mean.status == PASS and f"{both:.2f}%" in mean.checks[0].text


def test_a_side_with_a_point_of_its_own_and_a_categorical_axis():
    """Each level against level 0 (the dense network), and x naming a category."""
    rows = [{"level": lv, "percent_remaining": 100 * 0.8 ** lv, "branch": "ticket", "seed": s,
             "test_acc1": 0.9 + 0.002 * lv - 0.0003 * lv * lv + 0.001 * s} for lv in range(6) for s in SEEDS]
    frames = {"levels": pd.DataFrame(rows)}
    out = evaluate({"kind": "gap", "source": "levels", "x": "percent_remaining", "x_unit": "%",
                    "a": {"branch": "ticket"}, "b": {"branch": "ticket", "at": 100, "label": "dense"},
                    "at": [51.2], "min": 0.3}, frames)
    level3 = (0.002 * 3 - 0.0003 * 9) * 100
    assert out.status == PASS and f"{level3:+.2f} pp" in out.checks[0].text
    cat = evaluate({"kind": "ordering", "x": "criterion", "a": {"allocation": "global"},
                    "b": {"allocation": "uniform"}, "at": ["magnitude"], "where": {"compression": 8}})
    assert cat.status == PASS and cat.checks[0].point == "magnitude"


def test_crossing_and_trend_along_x():
    # a − b along decreasing % remaining: +0.5, +0.3, +0.1, −0.1, −0.3 (pp): below from 41% on
    xs = [100.0, 80.0, 64.0, 51.2, 41.0]
    rows = [{"percent_remaining": x, "branch": br, "seed": s,
             "test_acc1": 0.9 + (0.005 - 0.002 * i if br == "a" else 0.0) + 0.001 * s}
            for i, x in enumerate(xs) for br in ("a", "b") for s in SEEDS]
    frames = {"levels": pd.DataFrame(rows)}
    base = {"kind": "crossing", "source": "levels", "x": "percent_remaining", "x_unit": "%",
            "a": {"branch": "a"}, "b": {"branch": "b"}, "direction": "decreasing"}
    out = evaluate({**base, "between": [45, 55]}, frames)
    assert out.status == PASS and out.checks[0].short == "below from 51.2%"
    assert evaluate({**base, "between": [60, 100]}, frames).status == FAIL
    never = evaluate({**base, "a": {"branch": "b"}, "b": {"branch": "a"}, "between": [0, 100]}, frames)
    assert never.status == FAIL and never.checks[0].short == "no crossing"
    trend = {"kind": "trend", "source": "levels", "x": "percent_remaining", "a": {"branch": "a"}, "b": {"branch": "b"}}
    assert evaluate({**trend, "direction": "increasing"}, frames).status == PASS  # a − b grows with % remaining
    assert evaluate({**trend, "direction": "decreasing"}, frames).status == FAIL
    assert evaluate({**trend, "direction": "decreasing", "tolerance": 0.25}, frames).status == PASS


# --------------------------------------------------------------------------------------------- cards
def write(tmp_path, text: str):
    path = tmp_path / "x.card.yaml"
    path.write_text(text)
    return path


CARD = """experiment: fake
title: t
paper: p
defaults: {metric: test_acc1, scale: 100, unit: "%"}
claims:
"""


@pytest.mark.parametrize("claims, message", [
    ("  - {id: a, says: s, kind: ordering, a: {}, b: {}, nonsense: 1}", "unknown key 'nonsense'"),
    ("  - {id: a, says: s, kind: orderin, a: {}, b: {}}", "unknown claim kind 'orderin'"),
    ("  - {id: a, says: s, kind: ordering, a: {}, b: {}, marign: 1}", "did you mean 'margin'"),
    ("  - {id: a, says: s, kind: ordering, a: {}, b: {}, known_difference: ' '}", "needs its reason"),
    ("  - {id: a, says: s, kind: ordering}\n  - {id: a, says: t, kind: ordering}", "two claims have the id 'a'"),
    ("  - {id: a, kind: ordering}", "'says' is missing"),
    ("  - {id: a, says: s, kind: ordering, margin: high}", "margin must be float"),
    ("  - {id: a, says: s, kind: ordering, reduce: median}", "reduce is 'mean'"),
    ("  - {id: a, says: s, kind: crossing, between: [1]}", "needs between"),
    ("  - {id: a, says: s, kind: trend, direction: up}", "direction must be increasing or decreasing"),
    ("  - {id: a, says: s, kind: within}", "needs tolerance and/or k_std"),
])
def test_bad_cards_are_refused_with_the_problem_named(tmp_path, claims, message):
    with pytest.raises(CardError, match=message):
        load_card(write(tmp_path, CARD + claims))


def test_card_defaults_and_where_merge(tmp_path):
    card = load_card(write(tmp_path, CARD.replace('unit: "%"}', 'unit: "%", where: {allocation: global}}')
                           + "  - {id: a, says: s, kind: threshold, where: {criterion: magnitude}, min: 0}\n"))
    claim = card.claims[0]
    assert claim.where == {"allocation": "global", "criterion": "magnitude"} and claim.scale == 100
    assert card.name == "x" and card.store_uri() is None


def test_markdown_blocks_are_written_between_markers(tmp_path):
    card = load_card(write(tmp_path, CARD + "  - {id: a, says: Global beats uniform, kind: ordering, "
                                            "a: {criterion: magnitude, allocation: global}, "
                                            "b: {criterion: magnitude, allocation: uniform}, at: [8]}\n"
                                            "  - {id: b, says: Random beats magnitude, kind: ordering, "
                                            "a: {criterion: random, allocation: global}, "
                                            "b: {criterion: magnitude, allocation: global}, at: [8], "
                                            "known_difference: it does not}\n"))
    result = verify_card(card, study=study(runs=runs_frame()))
    block = markdown(result)
    assert "Agrees:\n- Global beats uniform — 8×: +" in block
    assert "Differs:\n- Random beats magnitude — measured 8×: " in block and "Why: it does not." in block
    text = "intro\n<!-- verify:x -->\nold text\n<!-- /verify:x -->\nrest\n"
    new = write_blocks(text, {"x": block})
    assert new.startswith("intro\n<!-- verify:x -->\n**Against the paper**") and new.endswith("rest\n")
    assert read_blocks(new) == {"x": block}
    with pytest.raises(Exception, match="no marker pair for y"):
        write_blocks(text, {"y": block})
