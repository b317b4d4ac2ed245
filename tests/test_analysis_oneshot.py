"""benchkit.analysis.oneshot: one-shot runs named and tabulated as Wanda's Table 2 (methods × patterns), checked
against hand-written labels and Python's ``statistics`` on a hand-built runs frame."""

from __future__ import annotations

import math
import statistics

import pandas as pd
import pytest

from benchkit import analysis as ba
from benchkit.analysis.oneshot import DENSE, METHOD_ORDER


@pytest.mark.parametrize("row, method, pattern", [
    ({"criterion": "magnitude", "prune.comparison": "layer", "granularity": "element", "prune.sparsity": 0.0},
     "dense", "dense"),
    ({"criterion": "magnitude", "prune.comparison": "layer", "granularity": "element", "prune.sparsity": 0.5},
     "magnitude (per layer)", "50%"),
    ({"criterion": "magnitude", "prune.comparison": "row", "granularity": "element", "prune.sparsity": 0.7},
     "magnitude (per row)", "70%"),
    ({"criterion": "wanda", "prune.comparison": "row", "granularity": "2:4", "prune.sparsity": None},
     "Wanda", "2:4"),
    ({"criterion": "sparsegpt", "prune.comparison": "row", "granularity": "4:8", "prune.sparsity": math.nan},
     "SparseGPT", "4:8"),
    # a run that asked for a compression instead of a sparsity: 8x = 87.5%
    ({"criterion": "taylor", "prune.comparison": "auto", "granularity": "element", "compression": 8.0},
     "taylor (per auto)", "87.5%"),
    ({"criterion": "magnitude", "granularity": "element", "compression": 1.0}, "dense", "dense"),
    ({"criterion": "magnitude", "granularity": "channel", "prune.sparsity": 0.25}, "magnitude (per auto)",
     "25% channel"),
])
def test_a_run_is_named_by_method_and_pattern(row, method, pattern):
    assert ba.method_label(row) == method
    assert ba.pattern_label(row) == pattern


def test_a_run_without_sparsity_or_compression_is_refused():
    with pytest.raises(ValueError, match="run r1: neither prune.sparsity nor compression is set"):
        ba.pattern_label({"run_id": "r1", "granularity": "element", "criterion": "wanda"})


def test_patterns_in_wandas_column_order_and_their_sparsity():
    assert ba.pattern_order(["80%", "2:4", "dense", "60%", "50%", "4:8", "70%"]) == [
        "50%", "4:8", "2:4", "60%", "70%", "80%"]
    assert ba.pattern_order(["2:4", "1:4", "4:8"]) == ["4:8", "2:4", "1:4"]  # no unstructured: N:M by sparsity
    assert [ba.pattern_sparsity(p) for p in ("dense", "50%", "87.5%", "2:4", "1:4", "25% channel")] == [
        0.0, 0.5, 0.875, 0.5, 0.75, 0.25]
    assert ba.method_order(["SparseGPT", "zeta", "Wanda", "dense", "alpha"]) == [
        "dense", "Wanda", "SparseGPT", "alpha", "zeta"]


def runs_frame() -> pd.DataFrame:
    """Dense and three methods at 50% and 2:4, three seeds; perplexity = 5 + method offset + pattern offset + seed/10."""
    rows = []
    offsets = {("magnitude", "layer"): 4.0, ("wanda", "row"): 1.0, ("sparsegpt", "row"): 0.5}
    for seed in (0, 1, 2):
        rows.append({"criterion": "magnitude", "prune.comparison": "layer", "granularity": "element",
                     "prune.sparsity": 0.0, "seed": seed, "test_perplexity": 5 + seed / 10})
        for (crit, comp), off in offsets.items():
            for g, s, extra in (("element", 0.5, 0.0), ("2:4", None, 2.0)):
                rows.append({"criterion": crit, "prune.comparison": comp, "granularity": g, "prune.sparsity": s,
                             "seed": seed, "test_perplexity": 5 + off + extra + seed ** 2 / 10})
    return ba.label_runs(pd.DataFrame(rows))


def test_method_table_is_wandas_table_2_with_mean_and_std_over_seeds():
    table = ba.method_table(runs_frame(), "test_perplexity")
    assert list(table.columns) == ["method", "50%", "2:4", "n"]
    assert list(table["method"]) == ["dense", "magnitude (per layer)", "Wanda", "SparseGPT"]

    def cell(values):
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"

    dense = table.iloc[0]
    assert (dense["50%"], dense["2:4"], dense["n"]) == (cell([5.0, 5.1, 5.2]), "", 3)  # dense in the first column
    wanda = table.set_index("method").loc["Wanda"]
    assert wanda["50%"] == cell([6 + s ** 2 / 10 for s in (0, 1, 2)])
    assert wanda["2:4"] == cell([8 + s ** 2 / 10 for s in (0, 1, 2)])
    scaled = ba.method_table(runs_frame(), "test_perplexity", scale=10, decimals=1).set_index("method")
    assert scaled.loc["SparseGPT", "2:4"] == f"{statistics.mean([75, 76, 79]):.1f} ± {statistics.stdev([75, 76, 79]):.1f}"


def test_method_table_takes_its_dense_row_from_elsewhere_and_shows_one_seed_without_std():
    runs = runs_frame()
    pruned, dense = runs[runs["method"] != DENSE], runs[runs["method"] == DENSE]
    table = ba.method_table(pruned[pruned["seed"] == 0], "test_perplexity", dense=dense[dense["seed"] == 0])
    assert table.iloc[0]["method"] == "dense" and table.iloc[0]["50%"] == "5.00"
    assert table.set_index("method").loc["magnitude (per layer)", "2:4"] == "11.00"
    assert (table["n"] == 1).all()


def test_mean_std_is_the_sample_std_over_seeds_and_drops_what_it_cannot_show():
    values = [5.31, 5.10, 4.82]
    expected = f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
    assert ba.mean_std(pd.Series(values), 3) == expected == "5.077 ± 0.246"
    assert ba.mean_std([5.0, float("nan")]) == "5.00"  # one seed left: no std
    assert ba.mean_std([]) == "" and ba.format_mean_std(math.nan, 1.0) == ""


def test_method_table_refuses_two_runs_in_one_cell_and_a_missing_metric():
    runs = runs_frame()
    twice = pd.concat([runs, runs[runs["method"] == "Wanda"].assign(allocation="owl")])
    with pytest.raises(ValueError, match="2 runs for method 'Wanda', pattern '2:4', seed 0: filter the runs"):
        ba.method_table(twice, "test_perplexity")
    with pytest.raises(KeyError, match="no column 'test_bpc'"):
        ba.method_table(runs, "test_bpc")


def test_the_wanda_reference_uses_the_names_the_runs_get():
    paper = ba.WANDA2024_LLAMA7B
    assert set(paper) <= set(METHOD_ORDER)
    patterns = {p for cells in paper.values() for p in cells}
    labelled = {ba.pattern_label({"granularity": g, "prune.sparsity": s})
                for g, s in (("element", 0.0), ("element", 0.5), ("4:8", None), ("2:4", None))}
    assert patterns == labelled
    # Wanda's Table 2 shape, as the notebook quotes it: magnitude worst at every pattern, Wanda ~ SparseGPT at 50%
    for p in ("50%", "4:8", "2:4"):
        assert paper["magnitude (per layer)"][p] > max(paper["Wanda"][p], paper["SparseGPT"][p])
    assert abs(paper["Wanda"]["50%"] - paper["SparseGPT"]["50%"]) < 0.1


def test_shared_setting_reads_the_first_logged_value_for_a_sentence():
    from benchkit.analysis import shared_setting

    runs = pd.DataFrame({"samples": [None, 128.0, 128.0], "works": [None, ["Macbeth", "Hamlet"], None],
                         "lr": [0.002, 0.002, 0.002]})
    assert shared_setting(runs, "samples") == 128 and isinstance(shared_setting(runs, "samples"), int)
    assert shared_setting(runs, "works") == "Macbeth, Hamlet"  # the dense run (first row) logged none
    assert shared_setting(runs, "lr") == 0.002
    assert shared_setting(runs, "missing") is None
