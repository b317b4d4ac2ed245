"""MLflow → pandas → figures and tables: read a sweep's runs back and compare strategies.

>>> from benchkit import analysis as ba
>>> runs = ba.load_runs("quickstart")                   # one row per FINISHED run, typed params
>>> agg = ba.aggregate(runs)                             # mean / std / n over seeds per strategy
>>> fig = ba.plot_tradeoffs(runs, y="test_acc1")        # vs compression ratio and speedup
>>> ba.save_table(ba.summary_table(agg, ["test_acc1"], scale={"test_acc1": 100}), "results/q.md")

The study notebooks (notebooks/NN_name.py) write their tables, figures and findings through :class:`Study`;
the one-shot studies (Wanda, SparseGPT) name their runs' methods and patterns with :mod:`benchkit.analysis.oneshot`.
"""

from benchkit.analysis.aggregate import STRATEGY_COLUMNS, aggregate, strategy_columns
from benchkit.analysis.figures import (
    axis_label,
    describe_strategy,
    log_figure,
    plot_layer_density,
    plot_lottery,
    plot_tradeoff,
    plot_tradeoffs,
    plot_training_curves,
)
from benchkit.analysis.oneshot import (
    format_mean_std,
    label_runs,
    mean_std,
    method_label,
    method_order,
    method_table,
    pattern_label,
    pattern_order,
    pattern_sparsity,
)
from benchkit.analysis.references import (
    HAN2015_LENET5,
    HAN2015_LENET300,
    WANDA2024_LLAMA7B,
    lth_lenet300_percent_remaining,
)
from benchkit.analysis.runs import (
    RENAMED_PARAMS,
    RENAMED_VALUES,
    current_param,
    load_artifact_table,
    load_history,
    load_layers,
    load_levels,
    load_runs,
    metric_columns,
    param_columns,
    parse_param,
    runs_frame,
    shared_setting,
)
from benchkit.analysis.studies import Study
from benchkit.analysis.tables import save_table, summary_table, to_markdown

__all__ = [
    "HAN2015_LENET300",
    "RENAMED_PARAMS",
    "RENAMED_VALUES",
    "HAN2015_LENET5",
    "STRATEGY_COLUMNS",
    "Study",
    "WANDA2024_LLAMA7B",
    "aggregate",
    "axis_label",
    "current_param",
    "describe_strategy",
    "load_artifact_table",
    "load_history",
    "load_layers",
    "load_levels",
    "format_mean_std",
    "label_runs",
    "mean_std",
    "load_runs",
    "log_figure",
    "lth_lenet300_percent_remaining",
    "method_label",
    "method_order",
    "method_table",
    "metric_columns",
    "param_columns",
    "parse_param",
    "pattern_label",
    "pattern_order",
    "pattern_sparsity",
    "plot_layer_density",
    "plot_lottery",
    "plot_tradeoff",
    "plot_tradeoffs",
    "plot_training_curves",
    "runs_frame",
    "save_table",
    "shared_setting",
    "strategy_columns",
    "summary_table",
    "to_markdown",
]
