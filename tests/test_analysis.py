"""benchkit.analysis against a small tracking store written by the real Tracker (see fake_runs.py).

Expectations come from the closed formulas that generated the runs and from Python's
``statistics`` module, never from the code under test.
"""

from __future__ import annotations

import math
import statistics
import warnings

import numpy as np
import pandas as pd
import pytest
from fake_runs import (
    COMPRESSIONS,
    CONTROLS,
    LAYERS,
    LEVELS,
    LOTTERY,
    SEEDS,
    STRATEGIES,
    SWEEP,
    achieved,
    build_store,
    curve,
    dense_acc1,
    density,
    final_acc,
    lottery_acc,
    lottery_best_step,
    lottery_percent,
    speedup,
)
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from mlflow import MlflowClient
from pandas.testing import assert_frame_equal

from benchkit import analysis as ba

# The fake store logs today's config, whose `prune.scope` (global | layer) reads back as `allocation`
# (global | uniform): the name of the fake's strategy for an allocation.
SCOPE = {"global": "global", "uniform": "layer"}
ALLOCATION = {v: k for k, v in SCOPE.items()}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def runs(store):
    return ba.load_runs(SWEEP, tracking_uri=store.uri)


def _mean_std(values):
    return statistics.mean(values), statistics.stdev(values)


# --------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("text, value", [
    ("8.0", 8.0), ("3", 3), ("True", True), ("False", False), ("None", None), ("[]", []),
    ("['fc3']", ["fc3"]), ("{'conv1': 2.0}", {"conv1": 2.0}), ("magnitude", "magnitude"), ("2:4", "2:4"),
    ("1e-3", 1e-3), ("sqlite:///x.db", "sqlite:///x.db"),
])
def test_parse_param_restores_logged_python_values(text, value):
    parsed = ba.parse_param(text)
    assert parsed == value and type(parsed) is type(value)


def test_load_runs_one_row_per_finished_run(store, runs):
    assert len(runs) == len(STRATEGIES) * len(COMPRESSIONS) * len(SEEDS)
    assert runs["run_id"].is_unique
    assert set(runs["run_id"]) == set(store.run_ids.values())
    assert set(runs["status"]) == {"FINISHED"}
    assert set(runs["experiment"]) == {SWEEP} and set(runs["sweep"]) == {SWEEP}

    everything = ba.load_runs(SWEEP, tracking_uri=store.uri, status=None)
    assert len(everything) == len(runs) + 2
    assert set(everything["run_id"]) - set(runs["run_id"]) == {store.failed_id, store.running_id}
    failed = ba.load_runs(SWEEP, tracking_uri=store.uri, status="FAILED")
    assert list(failed["run_id"]) == [store.failed_id]


def test_load_runs_types_and_values(store, runs):
    assert runs["compression"].dtype == np.float64
    assert runs["seed"].dtype == np.int64
    assert runs["prune.post.finetune.epochs"].dtype == np.int64
    assert runs["data.augment"].dtype == bool
    assert runs["test_acc1"].dtype == np.float64
    assert runs["granularity"].tolist() == ["element"] * len(runs)
    assert all(v == [] for v in runs["prune.exclude"])  # a list, not the string "[]"
    assert all(v is None for v in runs["data.train_subset"])
    for row in runs.itertuples(index=False):
        key = (row.criterion, SCOPE[row.allocation], row.compression, row.seed)
        assert store.run_ids[key] == row.run_id
        assert row.test_acc1 == pytest.approx(final_acc(*key))
        assert row.compression_ratio == pytest.approx(achieved(row.compression, row.seed))
        assert row.config_hash and row.run_name


@pytest.mark.parametrize("old, value, new, new_value", [
    ("prune.scope", "layer", "prune.allocation", "uniform"),
    ("prune.scope", "global", "prune.allocation", "global"),
    ("prune.rounds", 3, "prune.post.rounds", 3),
    ("prune.lr_rewind", True, "prune.post.lr_rewind", True),
    ("prune.finetune.epochs", 2, "prune.post.finetune.epochs", 2),
    ("prune.distill.temperature", 4.0, "prune.post.distill.temperature", 4.0),
    ("prune.schedule.every", 5, "prune.during.every", 5),
    ("prune.schedule.soft", False, "prune.during.soft", False),
    ("prune.criterion", "taylor", "prune.criterion", "taylor"),  # not renamed
    ("prune.finetuned", 1, "prune.finetuned", 1),  # a prefix match needs the dot
    ("prune.allocation", "layer", "prune.allocation", "layer"),  # the value map belongs to the old key
])
def test_current_param_translates_old_names_and_scope_values(old, value, new, new_value):
    assert ba.current_param(old, value) == (new, new_value)


# Params as the committed results store logged them, before the config rework renamed them.
OLD_PARAMS = {"prune.scope": "layer", "prune.rounds": "3", "prune.lr_rewind": "True", "prune.finetune.epochs": "2",
              "prune.finetune.lr": "0.01", "prune.distill.temperature": "4.0", "prune.schedule.every": "5",
              "prune.schedule.soft": "False", "prune.criterion": "magnitude", "prune.granularity": "element",
              "prune.timing": "post", "prune.compression": "4.0", "model.name": "lenet300", "data.name": "digits",
              "seed": "0"}
NEW_NAMES = {"prune.scope": "prune.allocation", "prune.rounds": "prune.post.rounds",
             "prune.lr_rewind": "prune.post.lr_rewind", "prune.finetune.epochs": "prune.post.finetune.epochs",
             "prune.finetune.lr": "prune.post.finetune.lr", "prune.distill.temperature": "prune.post.distill.temperature",
             "prune.schedule.every": "prune.during.every", "prune.schedule.soft": "prune.during.soft"}


def test_old_and_new_param_names_read_back_under_the_new_names(tmp_path):
    """The committed results store logged `prune.scope`, `prune.finetune.*`, ...; stores written after the
    config rework log `prune.allocation`, `prune.post.finetune.*`, ... One experiment holding a run of
    each reads back as one frame with the new names only, values as logged (scope's mapped)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("mixed")
    new = {NEW_NAMES.get(k, k): v for k, v in OLD_PARAMS.items()} | {"prune.allocation": "uniform"}
    for params in (OLD_PARAMS, new):
        run_id = client.create_run(exp).info.run_id
        for k, v in params.items():
            client.log_param(run_id, k, v)
        client.log_metric(run_id, "test_acc1", 0.5)
        client.set_terminated(run_id)
    runs = ba.load_runs("mixed", tracking_uri=uri)
    assert len(runs) == 2 and not set(NEW_NAMES) & set(runs.columns)
    assert runs["allocation"].tolist() == runs["prune.allocation"].tolist() == ["uniform", "uniform"]
    for old, key in NEW_NAMES.items():
        if old != "prune.scope":
            assert runs[key].tolist() == [ba.parse_param(OLD_PARAMS[old])] * 2, key
    assert ba.strategy_columns(runs) == ["model", "data", "timing", "criterion", "granularity", "allocation",
                                         "compression"]  # the two runs are one strategy


def test_load_runs_filter_and_several_experiments(store):
    rnd = ba.load_runs(SWEEP, tracking_uri=store.uri, filter_string="params.`prune.criterion` = 'random'")
    assert len(rnd) == len(COMPRESSIONS) * len(SEEDS) and set(rnd["criterion"]) == {"random"}
    both = ba.load_runs([SWEEP, LOTTERY], tracking_uri=store.uri)
    assert both.groupby("experiment").size().to_dict() == {SWEEP: 18, LOTTERY: len(SEEDS)}
    assert "experiment" in ba.strategy_columns(both)  # two sweeps are never averaged together


def test_an_image_folder_root_tells_strategies_apart_other_roots_do_not():
    frame = pd.DataFrame({"data": ["imagefolder", "imagefolder"], "data.root": ["/d/dogs", "/d/cats"],
                          "seed": [0, 0], "test_acc1": [0.5, 0.6]})
    assert "data.root" in ba.strategy_columns(frame)  # two datasets are never averaged together
    frame["data"] = "mnist"  # a torchvision root is only where the files are
    assert "data.root" not in ba.strategy_columns(frame)


def test_load_runs_refuses_bad_input_naming_the_fix(store):
    with pytest.raises(ValueError, match=r"no MLflow experiment named 'nope'.*'fake-strategies'"):
        ba.load_runs("nope", tracking_uri=store.uri)
    with pytest.raises(ValueError, match="status must be one of .*FINISHED"):
        ba.load_runs(SWEEP, tracking_uri=store.uri, status="DONE")


# --------------------------------------------------------------------------------------------- aggregation
def test_aggregate_matches_hand_computed_mean_std_n(runs):
    agg = ba.aggregate(runs, metrics=["test_acc1", "compression_ratio"])
    assert len(agg) == len(STRATEGIES) * len(COMPRESSIONS)
    assert "seed" not in agg and set(agg["n"]) == {len(SEEDS)}
    for row in agg.itertuples(index=False):
        accs = [final_acc(row.criterion, SCOPE[row.allocation], row.compression, s) for s in SEEDS]
        mean, std = _mean_std(accs)
        assert row.test_acc1_mean == pytest.approx(mean)
        assert row.test_acc1_std == pytest.approx(std)  # sample std (ddof=1): 0.01/sqrt(2)
        assert row.test_acc1_std == pytest.approx(0.01 / math.sqrt(2))
        assert row.compression_ratio_mean == pytest.approx(statistics.mean(achieved(row.compression, s) for s in SEEDS))


def test_aggregate_warns_when_a_varying_axis_is_left_out(runs):
    with pytest.warns(UserWarning, match="same seed more than once"):
        ba.aggregate(runs, by=["criterion", "compression"], metrics=["test_acc1"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ba.aggregate(runs, metrics=["test_acc1"])
    with pytest.raises(KeyError, match="not in the runs frame"):
        ba.aggregate(runs, by=["criterion"], metrics=["top1"])


# --------------------------------------------------------------------------------------------- figures
def _strategy_lines(ax):
    return {ln.get_label(): ln for ln in ax.get_lines() if ln.get_label() != "dense"}


def test_tradeoff_figure_draws_aggregated_means_with_bands_and_baseline(runs):
    fig = ba.plot_tradeoff(runs, "compression_ratio", "test_acc1")
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
    assert ax.get_xlabel().startswith("Compression ratio") and "log₂" in ax.get_xlabel()
    assert ax.get_ylabel() == "Test top-1 accuracy (%)"
    assert ax.get_title()
    lines = _strategy_lines(ax)
    assert set(lines) == {f"{c} · {ALLOCATION[s]}" for c, s in STRATEGIES}
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == len(STRATEGIES)
    for (criterion, scope), line in zip(STRATEGIES, (lines[f"{c} · {ALLOCATION[s]}"] for c, s in STRATEGIES)):
        xs = [statistics.mean(achieved(r, s) for s in SEEDS) for r in COMPRESSIONS]
        ys = [100 * statistics.mean(final_acc(criterion, scope, r, s) for s in SEEDS) for r in COMPRESSIONS]
        np.testing.assert_allclose(line.get_xdata(), xs)
        np.testing.assert_allclose(line.get_ydata(), ys)
    # each band spans mean ± std in y
    band_y = bands[0].get_paths()[0].vertices[:, 1]
    half = 100 * 0.01 / math.sqrt(2)
    first = lines[f"{STRATEGIES[0][0]} · {ALLOCATION[STRATEGIES[0][1]]}"].get_ydata()
    assert band_y.max() == pytest.approx(first.max() + half) and band_y.min() == pytest.approx(first.min() - half)
    (dense,) = [ln for ln in ax.get_lines() if ln.get_label() == "dense"]
    assert dense.get_ydata()[0] == pytest.approx(100 * statistics.mean(dense_acc1(s) for s in SEEDS))
    assert {t.get_text() for t in ax.get_legend().get_texts()} == set(lines) | {"dense"}


def test_tradeoffs_speedup_panel_uses_theoretical_speedup(runs):
    fig = ba.plot_tradeoffs(runs, "test_acc1", title="fake")
    assert len(fig.axes) == 2
    ax = fig.axes[1]
    assert ax.get_xlabel().startswith("Theoretical speedup") and ax.xaxis.get_transform().base == 2
    line = _strategy_lines(ax)["magnitude · uniform"]
    np.testing.assert_allclose(line.get_xdata(),
                               [statistics.mean(speedup("layer", r, s) for s in SEEDS) for r in COMPRESSIONS])


def test_layer_density_bars_from_artifact_beside_reference(store):
    run_id = store.run_ids[("magnitude", "global", 8.0, 0)]
    layers = ba.load_layers(run_id, tracking_uri=store.uri)
    assert list(layers["layer"]) == [n for n, _ in LAYERS]
    assert {"layer", "type", "shape", "params", "nonzero", "density", "flops", "flops_nonzero", "speedup"} <= set(layers)
    fig = ba.plot_layer_density({"global 8×": layers}, ba.HAN2015_LENET300, reference_label="Han et al. 2015")
    (ax,) = fig.axes
    assert ax.get_xlabel() == "Density (% of weights kept)" and ax.get_ylabel() == "Layer"
    ours, ref = ax.containers
    assert [b.get_width() for b in ours] == pytest.approx([100 * density(i, 8.0) for i in range(len(LAYERS))])
    assert [b.get_width() for b in ref] == pytest.approx([8, 9, 26])
    assert [t.get_text() for t in ax.get_yticklabels()] == [n for n, _ in LAYERS]
    assert ours[0].get_y() < ours[-1].get_y() and ax.yaxis_inverted()  # first layer on top
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["global 8×", "Han et al. 2015"]
    with pytest.raises(KeyError, match=r"reference layers \['conv1', 'conv2'\] are not among"):
        ba.plot_layer_density(layers, ba.HAN2015_LENET5)
    with pytest.raises(FileNotFoundError, match="no artifact 'nope.csv'.*layers.csv"):
        ba.load_artifact_table(run_id, "nope.csv", tracking_uri=store.uri)


def _draw(fig) -> None:
    """Lay the figure out as saving it would (figures are built without pyplot: give them a canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()


def _extents(fig, artists):
    renderer = fig.canvas.get_renderer()
    return [a.get_window_extent(renderer) for a in artists]


def _overlaps(boxes) -> list[tuple[int, int]]:
    return [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]


@pytest.mark.parametrize("series", [1, 3])
def test_layer_density_of_a_54_layer_model_grows_with_the_layers_and_no_label_overlaps(series):
    """A ResNet-sized table: the figure is BAR_INCHES tall per bar, so when drawn no two layer names and no
    two value labels overlap, and every bar is thicker than its value label is tall."""
    names = [f"layer{i // 10}.{i % 10}.conv{i % 3 + 1}" for i in range(54)]
    g = np.random.default_rng(0)
    tables = {f"run {k}": pd.DataFrame({"layer": names, "density": g.uniform(0.01, 1, 54)}) for k in range(series)}
    fig = ba.plot_layer_density(tables, log=True)
    assert fig.get_figheight() >= 54 * series * ba.figures.BAR_INCHES / 0.8
    small = ba.plot_layer_density(pd.DataFrame({"layer": names[:3], "density": [1.0, 0.5, 0.1]}))
    assert small.get_figheight() < fig.get_figheight() / 3  # a 3-layer model stays small
    _draw(fig)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    ticks = [t for t in ax.get_yticklabels() if t.get_text()]
    assert [t.get_text() for t in ticks] == names
    assert _overlaps(_extents(fig, ticks)) == []
    values = [t for t in ax.texts if t.get_text()]
    assert len(values) == 54 * series and _overlaps(_extents(fig, values)) == []
    bar_px = min(b.get_window_extent().height for c in ax.containers for b in c)
    assert bar_px >= max(box.height for box in _extents(fig, values))
    if series > 1:
        assert len(fig.legends[0].get_texts()) == series
        axes_box, legend_box = ax.get_window_extent(), fig.legends[0].get_window_extent()
        assert legend_box.y0 >= axes_box.y1  # above the bars, hiding none of them


def _eighteen_strategies() -> pd.DataFrame:
    rows = []
    criteria, allocations = ["magnitude", "taylor", "random", "snip", "grasp", "synflow"], ["global", "uniform", "erk"]
    for i, (c, a) in enumerate((c, a) for c in criteria for a in allocations):
        for compression in (2.0, 4.0, 8.0, 16.0):
            for seed in SEEDS:
                rows.append({"model": "lenet300", "data": "digits", "criterion": c, "allocation": a,
                             "compression": compression, "seed": seed, "compression_ratio": compression,
                             "theoretical_speedup": compression * (1 + 0.05 * i), "dense_test_acc1": 0.96,
                             "test_acc1": 0.95 - 0.004 * i * math.log2(compression) + 0.01 * seed})
    return pd.DataFrame(rows)


def test_tradeoff_of_18_strategies_has_distinct_styles_and_one_legend_beside_the_panels():
    """6 criteria × 3 allocations: colour by criterion, marker and dash by allocation, so every strategy is
    its own line; one legend for both panels, outside them, fully inside the figure."""
    runs = _eighteen_strategies()
    fig = ba.plot_tradeoffs(runs, "test_acc1")
    narrow = ba.plot_tradeoffs(runs[runs["criterion"] == "magnitude"], "test_acc1")
    assert fig.get_figwidth() > narrow.get_figwidth()  # the legend gets room, the panels keep theirs
    panels = fig.axes
    assert len(panels) == 2 and all(ax.get_legend() is None for ax in panels)
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert len(labels) == 19 and labels[-1] == "dense" and len(set(labels)) == 19
    for ax in panels:
        lines = [ln for ln in ax.get_lines() if ln.get_label() != "dense"]
        assert len(lines) == 18
        styles = {(ln.get_color(), ln.get_marker(), ln.get_linestyle()) for ln in lines}
        assert len(styles) == 18
        by_criterion = {}
        for ln in lines:
            criterion, allocation = ln.get_label().split(" · ")
            by_criterion.setdefault(criterion, set()).add(ln.get_color())
            assert ln.get_marker() == {ln2.get_label().split(" · ")[1]: ln2.get_marker()
                                       for ln2 in lines if ln2.get_label().startswith("magnitude")}[allocation]
        assert all(len(colors) == 1 for colors in by_criterion.values())
        assert len({next(iter(c)) for c in by_criterion.values()}) == 6
    _draw(fig)
    box, figure_box = legend.get_window_extent(), fig.bbox
    assert all(not box.overlaps(ax.get_window_extent()) for ax in panels)
    assert figure_box.x0 <= box.x0 and box.x1 <= figure_box.x1 + 1 and box.y0 >= figure_box.y0 - 1


def test_line_styles_are_unique_for_many_strategies_of_one_column():
    keys = [(f"s{i}",) for i in range(25)]
    styles = ba.figures.line_styles(keys)
    assert len({(str(s["color"]), s["marker"], s["linestyle"]) for s in styles.values()}) == 25


def test_an_empty_csv_artifact_reads_as_an_empty_table(tmp_path):
    """What runs without rounds or levels (pre, a dense baseline) once logged as levels.csv."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("empty-levels")).info.run_id
    (tmp_path / "levels.csv").write_text("\n")
    client.log_artifact(run_id, str(tmp_path / "levels.csv"))
    assert ba.load_artifact_table(run_id, "levels.csv", tracking_uri=uri).empty


def test_artifacts_are_found_when_the_store_folder_moves(tmp_path):
    """A committed results store is read from wherever it is cloned: MLflow recorded absolute artifact
    paths, benchkit keeps them in mlartifacts/ beside the database, so the folder can move whole."""
    import shutil

    built = build_store(tmp_path / "here", with_lottery=False)
    run_id = built.run_ids[("magnitude", "global", 8.0, 0)]
    expected = ba.load_layers(run_id, tracking_uri=built.uri)
    shutil.move(tmp_path / "here", tmp_path / "there")
    moved_uri = f"sqlite:///{tmp_path / 'there' / 'mlflow.db'}"
    assert_frame_equal(ba.load_layers(run_id, tracking_uri=moved_uri), expected)
    with pytest.raises(FileNotFoundError, match="no artifact 'nope.csv'"):
        ba.load_artifact_table(run_id, "nope.csv", tracking_uri=moved_uri)


def test_lottery_levels_and_figure(store):
    runs = ba.load_runs(LOTTERY, tracking_uri=store.uri)
    # the ticket's level metrics are `level_*` or `ticket_level_*` (tracking names the branch or not)
    assert {"level_percent_remaining", "ticket_level_percent_remaining"} & set(runs)
    assert {"reinit_level_test_acc1", "random_level_best_step"} <= set(runs)
    levels = ba.load_levels(runs, tracking_uri=store.uri)
    per_seed = (LEVELS + 1) + len(CONTROLS) * LEVELS
    assert len(levels) == per_seed * len(SEEDS)
    assert set(levels["branch"]) == {"ticket", *CONTROLS}
    for row in levels.itertuples(index=False):
        assert row.percent_remaining == pytest.approx(lottery_percent(row.level))
        assert row.test_acc1 == pytest.approx(lottery_acc(row.branch, row.level, row.seed))
        assert row.best_step == lottery_best_step(row.branch, row.level, row.seed)

    fig = ba.plot_lottery(levels)
    acc_ax, stop_ax = fig.axes
    for ax in (acc_ax, stop_ax):
        assert ax.get_xscale() == "log" and ax.xaxis_inverted()  # 100 % on the left, sparsest on the right
        assert ax.get_xlabel().startswith("Weights remaining (%)")
        assert len(ax.get_lines()) == 1 + len(CONTROLS)
    assert acc_ax.get_ylabel() == "Test top-1 accuracy (%)" and stop_ax.get_ylabel() == "Early-stopping iteration"
    lines = {ln.get_label(): ln for ln in acc_ax.get_lines()}
    ticket = lines["winning ticket"]
    np.testing.assert_allclose(ticket.get_xdata(), [lottery_percent(lv) for lv in range(LEVELS + 1)])
    np.testing.assert_allclose(ticket.get_ydata(), [100 * statistics.mean(lottery_acc("ticket", lv, s) for s in SEEDS)
                                                    for lv in range(LEVELS + 1)])
    reinit = {ln.get_label(): ln for ln in stop_ax.get_lines()}["random reinitialisation"]
    np.testing.assert_allclose(reinit.get_ydata(), [statistics.mean(lottery_best_step("reinit", lv, s) for s in SEEDS)
                                                    for lv in range(1, LEVELS + 1)])
    with pytest.raises(ValueError, match="no level_\\* metrics"):
        ba.load_levels(runs.drop(columns=[c for c in runs if "level_" in c]), tracking_uri=store.uri)


def test_training_curves_from_metric_history(store, runs):
    chosen = runs[(runs.criterion == "magnitude") & (runs.allocation == "global") & (runs.compression == 4.0)]
    hist = ba.load_history(chosen, "val_acc1", tracking_uri=store.uri)
    assert set(hist["phase"]) == {"dense", "finetune_r1"} and set(hist["metric"]) == {"val_acc1"}
    assert len(hist) == len(SEEDS) * 2 * 3
    for row in hist.itertuples(index=False):
        assert row.value == pytest.approx(curve(row.phase, row.step, row.seed))
    fig = ba.plot_training_curves(hist)
    (ax,) = fig.axes
    assert ax.get_ylabel() == "Validation top-1 accuracy (%)" and ax.get_xlabel().startswith("Iteration")
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"dense", "finetune_r1"}
    np.testing.assert_allclose(lines["finetune_r1"].get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(lines["finetune_r1"].get_ydata(),
                               [100 * statistics.mean(curve("finetune_r1", st, s) for s in SEEDS) for st in (1, 2, 3)])
    with pytest.raises(ValueError, match="none of the runs logged a history"):
        ba.load_history(chosen, "val_acc9", tracking_uri=store.uri)


def test_log_figure_stores_a_png_artifact(store, runs):
    run_id = store.run_ids[("random", "global", 2.0, 1)]
    path = ba.log_figure(ba.plot_tradeoff(runs), run_id, "figures/tradeoff", tracking_uri=store.uri)
    assert path == "figures/tradeoff.png"
    client = MlflowClient(store.uri)
    assert [f.path for f in client.list_artifacts(run_id, "figures")] == ["figures/tradeoff.png"]
    local = client.download_artifacts(run_id, path, str(store.root / "dl"))
    with open(local, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------- tables
def _parse_markdown(text):
    lines = text.strip().splitlines()
    split = [[c.strip().replace("\\|", "|") for c in ln.strip()[1:-1].split(" | ")] for ln in lines]
    return split[0], lines[1], split[2:]


def test_markdown_table_round_trip():
    df = pd.DataFrame({"strategy": ["magnitude | global", "random"], "n": [2, 3],
                       "acc": [94.12345, float("nan")], "ok": [True, False]})
    header, rule, rows = _parse_markdown(ba.to_markdown(df, floatfmt=".3f"))
    assert header == ["strategy", "n", "acc", "ok"]
    assert rule.count("|") == 5 and rule.count(":") == 4 and "-:|" in rule  # numbers right-aligned
    assert rows == [["magnitude | global", "2", "94.123", "True"], ["random", "3", "", "False"]]


def test_csv_and_markdown_files_round_trip(runs, tmp_path):
    agg = ba.aggregate(runs, metrics=["test_acc1", "theoretical_speedup"])
    back = pd.read_csv(ba.save_table(agg, tmp_path / "t.csv"))
    pd.testing.assert_frame_equal(back, agg, check_dtype=False, check_exact=False, rtol=1e-12)
    md = ba.save_table(agg, tmp_path / "t.md", floatfmt=".6g").read_text()
    header, _, rows = _parse_markdown(md)
    assert header == list(agg.columns) and len(rows) == len(agg)
    col = header.index("test_acc1_mean")
    assert [float(r[col]) for r in rows] == pytest.approx(agg["test_acc1_mean"].tolist(), rel=1e-5)
    with pytest.raises(ValueError, match=r"\.csv or \.md"):
        ba.save_table(agg, tmp_path / "t.xlsx")


def test_summary_table_prints_mean_pm_std(runs):
    agg = ba.aggregate(runs, metrics=["test_acc1"])
    table = ba.summary_table(agg, ["test_acc1"], scale={"test_acc1": 100}, labels={"test_acc1": "top-1 (%)"})
    row = table[(table.criterion == "magnitude") & (table.allocation == "uniform") & (table.compression == 4.0)].iloc[0]
    mean, std = _mean_std([100 * final_acc("magnitude", "layer", 4.0, s) for s in SEEDS])
    assert row["top-1 (%)"] == f"{mean:.2f} ± {std:.2f}" and row["n"] == 2
    with pytest.raises(KeyError, match="aggregate"):
        ba.summary_table(agg, ["val_acc5"])


# --------------------------------------------------------------------------------------------- study helpers
def test_study_provenance_counts_statuses_and_turns_partial_and_failed_runs_into_findings(store, tmp_path, capsys):
    study = ba.Study(SWEEP, store.uri, tmp_path / "out", notebook="01_strategies.py")
    row = study.provenance().iloc[0]
    # build_store: 18 finished, one FAILED (seed 7) and one still RUNNING (seed 8)
    assert (row["finished"], row["failed"], row["unfinished"]) == (18, 1, 1)
    assert row["seeds"] == " ".join(map(str, SEEDS)) and row["span (min)"] >= 0
    partial, failed = study.findings
    assert partial.startswith("PARTIAL: 1 run(s) of 'fake-strategies' were not finished")
    # the failed run's values where they are not the finished runs' (3 criteria × scopes × compressions);
    # seed left out, names as today's config spells them
    assert failed == ("1 FAILED run(s) of 'fake-strategies' are in the store and left out of every table (tracebacks: "
                      "their traceback.txt artifact); their settings: prune.allocation = global; prune.compression = "
                      "2.0; prune.criterion = magnitude.")
    assert partial in capsys.readouterr().out  # a finding is printed where it is made
    empty = ba.Study(SWEEP, store.uri, tmp_path / "x")
    empty.runs = lambda status=None: ba.load_runs(SWEEP, tracking_uri=store.uri, status="FAILED")
    with pytest.raises(RuntimeError, match=r"no FINISHED runs of 'fake-strategies'.*run the sweep first"):
        empty.provenance()


def test_study_writes_tables_figures_and_findings_into_its_output(store, runs, tmp_path):
    repo = tmp_path / "repo"
    (repo / "results").mkdir(parents=True)
    uri = f"sqlite:///{repo / 'results' / 'mlflow.db'}"
    study = ba.Study("strategies", uri, repo / "results" / "strategies", notebook="01_strategies.py", repo=repo)
    assert study.output.is_dir()  # made on creation
    table = pd.DataFrame({"strategy": ["a", "b"], "acc": [0.123456789, 0.5]})
    study.publish(table, "accuracy", floatfmt=".3f")
    assert_frame_equal(pd.read_csv(study.output / "accuracy.csv"), table)  # full precision
    assert [r.split() for r in (study.output / "accuracy.md").read_text().splitlines()[2:]] == [
        ["|", "a", "|", "0.123", "|"], ["|", "b", "|", "0.500", "|"]]
    study.show(ba.plot_tradeoff(runs), "tradeoff")
    assert (study.output / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    study.finding("First sentence.")
    study.finding("Second sentence.")
    text = study.write_findings().read_text().splitlines()
    assert text == ["# Findings: strategies", "",
                    "Computed by `notebooks/01_strategies.py` from `sqlite:///results/mlflow.db` (experiment "
                    "`strategies`; store path relative to the repository root).", "",
                    "- First sentence.", "- Second sentence."]
    elsewhere = ba.Study("strategies", store.uri, tmp_path / "o", notebook="n.py", repo=repo)
    assert elsewhere.store_label() == store.uri  # a store outside the repository keeps its full URI


def test_study_layer_tables_names_runs_without_artifacts(store, runs, tmp_path, capsys):
    study = ba.Study(SWEEP, store.uri, tmp_path / "out")
    chosen = runs[(runs.compression == 8.0) & (runs.seed == 0)]
    failed = ba.load_runs(SWEEP, tracking_uri=store.uri, status="FAILED")  # logged no layers.csv
    tables = study.layer_tables(pd.concat([chosen, failed]), lambda r: f"{r['criterion']} {r['allocation']}")
    assert set(tables) == {f"{c} {ALLOCATION[s]}" for c, s in STRATEGIES}
    for t in tables.values():
        assert list(t["layer"]) == [n for n, _ in LAYERS] and t["run_id"].nunique() == 1
    assert f"no layers.csv for run {store.failed_id}" in capsys.readouterr().out
