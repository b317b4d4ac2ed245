"""MLflow tracking: batching within MLflow's limits, retries on sqlite locks, result → metrics with
steps, and real digits sweeps read back from MLflow (params, metrics, artifacts, failures, levels)."""

from __future__ import annotations

import math
import sqlite3
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
import torch
import yaml

from benchkit.cli import main
from benchkit.config import ExperimentConfig
from benchkit.tracking import (
    MAX_PARAM_VAL_LENGTH,
    TAG_HASH,
    Tracker,
    level_rows,
    result_metric_rows,
    with_retry,
)
from benchkit.validation import load_config


# --------------------------------------------------------------------------------------------- units
def test_params_are_batched_by_100_and_long_values_truncated(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracker.ensure_experiment("limits")
    run_id = tracker.client.create_run(exp).info.run_id
    calls = []
    real = tracker.client.log_batch
    tracker.client.log_batch = lambda *a, **k: (calls.append(k), real(*a, **k))[1]
    params = {f"p{i:03d}": i for i in range(250)} | {"long": "x" * (MAX_PARAM_VAL_LENGTH + 500)}
    tracker.log_params(run_id, params)
    assert [len(c["params"]) for c in calls] == [100, 100, 51]
    logged = tracker.client.get_run(run_id).data.params
    assert len(logged) == 251 and logged["p249"] == "249"
    assert len(logged["long"]) == MAX_PARAM_VAL_LENGTH and logged["long"].endswith("...")

    calls.clear()
    n = tracker.log_metrics(run_id, [("m", float(i), i) for i in range(2500)] + [("skip", "text", 0)])
    assert n == 2500 and [len(c["metrics"]) for c in calls] == [1000, 1000, 500]
    hist = tracker.client.get_metric_history(run_id, "m")
    assert sorted((m.step, m.value) for m in hist) == [(i, float(i)) for i in range(2500)]


def test_retry_on_database_is_locked_then_give_up_on_other_errors():
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise sqlite3.OperationalError("database is locked")
        return "ok"

    assert with_retry(flaky, base_delay=0.001) == "ok" and len(attempts) == 3
    with pytest.raises(KeyError):  # not transient: raised at once
        with_retry(lambda: {}["x"], base_delay=0.001)
    with pytest.raises(sqlite3.OperationalError):
        with_retry(lambda: (_ for _ in ()).throw(sqlite3.OperationalError("database is locked")),
                   attempts=3, base_delay=0.001)


def test_lock_errors_that_are_retried_print_no_traceback_and_other_store_errors_still_do(tmp_path, caplog):
    """MLflow logs each sqlite OperationalError with its traceback before raising it; a lock error is
    retried (``with_retry``), so under a sweep's contention that traceback read like a crash (CI saw
    one when a SIGTERM'd worker and the driver both marked runs KILLED)."""
    import logging

    import sqlalchemy
    from mlflow.exceptions import MlflowException
    from mlflow.store.db.utils import _get_managed_session_maker
    from sqlalchemy.orm import sessionmaker

    import benchkit.tracking  # noqa: F401 - installs the filter

    maker = _get_managed_session_maker(sessionmaker(bind=sqlalchemy.create_engine(
        f"sqlite:///{tmp_path / 'x.db'}")), "sqlite")

    def fail(message):
        with pytest.raises(MlflowException, match=message), maker(read_only=False):
            raise sqlalchemy.exc.OperationalError("INSERT INTO tags", {}, sqlite3.OperationalError(message))

    with caplog.at_level(logging.ERROR, logger="mlflow.store.db.utils"):
        fail("database is locked")
        assert not caplog.records
        fail("attempt to write a readonly database")  # not retried: MLflow's report stays
        assert len(caplog.records) == 1 and caplog.records[0].exc_info is not None


def test_result_rows_history_by_phase_and_levels_by_branch():
    result = SimpleNamespace(
        metrics={"compression_ratio": 4.0, "test_acc1": 0.9, "time_total_s": 3.0},
        timings={"total": 3.0},
        history=[{"phase": "dense", "epoch": 1, "step": 30, "val_acc1": 0.8},
                 {"phase": "dense", "epoch": 2, "step": 60, "val_acc1": 0.85},
                 {"phase": "level_1", "epoch": 1, "step": 30, "val_acc1": 0.7}],
        levels=[{"level": 0, "branch": "ticket", "percent_remaining": 100.0, "test_acc1": 0.9},
                {"level": 1, "branch": "ticket", "percent_remaining": 50.0, "test_acc1": 0.91},
                {"level": 1, "branch": "reinit", "percent_remaining": 50.0, "test_acc1": 0.6}],
    )
    rows = result_metric_rows(result)
    assert ("compression_ratio", 4.0, 0) in rows and ("time_total_s", 3.0, 0) in rows
    assert not any(k == "time_total" for k, _, _ in rows)  # timings already in metrics: not twice
    assert [(s, v) for k, v, s in rows if k == "dense/val_acc1"] == [(30, 0.8), (60, 0.85)]
    assert [(s, v) for k, v, s in rows if k == "level_1/val_acc1"] == [(30, 0.7)]
    assert [(s, v) for k, v, s in rows if k == "level_test_acc1"] == [(0, 0.9), (1, 0.91)]
    assert [(s, v) for k, v, s in rows if k == "level_percent_remaining"] == [(0, 100.0), (1, 50.0)]
    assert [(s, v) for k, v, s in rows if k == "reinit_level_test_acc1"] == [(1, 0.6)]
    # post rounds and gradual updates are indexed by their own counter
    assert level_rows([{"round": 2, "compression": 4.0}]) == [("level_compression", 4.0, 2)]
    assert ("level_sparsity", 0.5, 3) in level_rows([{"update": 3, "step": 90, "sparsity": 0.5}])


def test_deleted_experiment_is_moved_aside_not_restored_even_by_two_sweeps_at_once(tmp_path):
    """ensure_experiment on a deleted experiment: a new one takes the name; the old one stays in the bin with
    its runs, renamed. Two trackers doing it at once agree on the new experiment."""
    import threading

    from benchkit.tracking import retired_name

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    old = tracker.ensure_experiment("gone")
    run_id = tracker.client.create_run(old).info.run_id
    tracker.client.delete_experiment(old)
    trackers = [Tracker(uri), Tracker(uri)]
    for t in trackers:
        _ = t.client  # open the store first: the threads race on the experiment, not on the migration
        restore = t.client.restore_experiment

        def slow_restore(experiment_id, restore=restore):  # widen the moment the old experiment is active
            restore(experiment_id)           # again under its name (CI once saw the other thread take it)
            time.sleep(0.3)

        t.client.restore_experiment = slow_restore
    got: list[str] = []
    barrier = threading.Barrier(2)

    def ensure(t: Tracker, delay: float) -> None:
        barrier.wait()
        time.sleep(delay)  # the second looks the name up while the first has the old experiment restored
        got.append(t.ensure_experiment("gone"))

    threads = [threading.Thread(target=ensure, args=(t, d)) for t, d in zip(trackers, (0.0, 0.15))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(got) == 2 and got[0] == got[1] != old
    assert tracker.client.get_experiment(got[0]).lifecycle_stage == "active" and tracker.runs(got[0]) == []
    binned = tracker.client.get_experiment(old)
    assert binned.name == retired_name("gone", old) and binned.lifecycle_stage == "deleted"
    assert [r.info.run_id for r in tracker.runs(old, deleted=True)] == [run_id]
    assert tracker.ensure_experiment("gone") == got[0]  # live now: used as it is


# --------------------------------------------------------------------------------------------- end to end
SWEEP = """\
experiment: e2e
base:
  data: {name: digits}
  model: {name: lenet300}
  train: {epochs: 1, batch_size: 64, lr: 0.05}
  prune: {timing: post, finetune: {epochs: 1, lr: 0.005}}
  output_dir: OUT
grid:
  prune.criterion: [magnitude, random]
  prune.compression: [2, 4]
exclude:
  - match: {prune.criterion: random, prune.compression: 4}
    reason: a baseline at one compression is enough
"""


def sweep_file(tmp_path: Path, body: str = SWEEP) -> Path:
    p = tmp_path / "sweep.yaml"
    p.write_text(textwrap.dedent(body).replace("OUT", str(tmp_path / "runs")))
    return p


def runs_of(uri: str, experiment: str) -> pd.DataFrame:
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[experiment])


def test_sweep_on_digits_is_tracked_as_planned(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = sweep_file(tmp_path)
    assert main(["sweep", str(p), "--tracking-uri", uri]) == 0
    df = runs_of(uri, "e2e")
    base = load_config(p)
    planned = {base.replace(prune__criterion=c, prune__compression=k).config_hash(): (c, k)
               for c, k in [("magnitude", 2), ("magnitude", 4), ("random", 2)]}
    assert sorted(df["tags.benchkit.config_hash"]) == sorted(planned)  # one run per planned config, no more
    assert set(df["status"]) == {"FINISHED"}
    client = mlflow.MlflowClient(uri)
    for _, row in df.iterrows():
        crit, comp = planned[row["tags.benchkit.config_hash"]]
        cfg = base.replace(prune__criterion=crit, prune__compression=comp)
        run = client.get_run(row["run_id"])
        # every config value that applied is a param, under its dotted key; the synthetic dataset's own keys
        # are not (digits is not synthetic): what the run resolved is logged instead. scikit-learn's digits:
        # 1,797 images, 20% (360) held out as test, 10% of the other 1,437 (144) for validation; 1,293
        # training images in batches of 64 for one epoch = 21 steps.
        not_applied = ("data.num_samples", "data.num_classes", "data.input_shape", "data.image_size", "data.mean",
                       "data.std", "data.tokenizer", "data.context", "data.stride", "data.val_works",
                       "data.test_works", "data.eval_subset")  # other datasets' keys
        expected = {k: str(v) for k, v in cfg.flat().items() if k not in not_applied
                    and not k.startswith("prune.calibration.")}  # no calibrated criterion or allocation here
        expected |= {"data.num_classes": "10", "data.input_shape": "[1, 8, 8]", "data.train_samples": "1293",
                     "data.val_samples": "144", "data.test_samples": "360", "train.steps": str(math.ceil(1293 / 64)),
                     "resolved.prune.normalize": "none"}  # auto: element magnitude under global needs none
        assert run.data.params == expected
        tags = run.data.tags
        assert tags["benchkit.sweep"] == "e2e" and tags["benchkit.torch_version"] == torch.__version__
        assert tags["benchkit.device"] == "cpu" and tags["benchkit.hostname"] and tags["benchkit.version"]
        assert tags["benchkit.cpu"]  # the CPU generation behind its timings (cpu_description, tested below)
        assert "mlflow.source.git.commit" in tags or "benchkit.git.commit" in tags
        m = run.data.metrics
        # the engine prunes round(s·n) weights: the achieved compression matches the request closely
        assert m["compression_ratio"] == pytest.approx(comp, rel=1e-3)
        assert m["sparsity"] == pytest.approx(1 - 1 / comp, abs=1e-3)
        for k in ("val_acc1", "test_acc1", "val_acc5", "test_acc5", "val_loss", "test_loss", "flops_dense",
                  "theoretical_speedup", "time_total_s"):
            assert k in m, k
        assert 0.0 <= m["test_acc1"] <= 1.0 and m["theoretical_speedup"] > 1.0
        # per-epoch curves with steps, equal to the history artifact
        arts = Path(client.download_artifacts(row["run_id"], "", str(tmp_path / "dl" / row["run_id"])))
        hist = pd.read_csv(arts / "history.csv")
        for phase, g in hist.groupby("phase"):
            logged = client.get_metric_history(row["run_id"], f"{phase}/val_acc1")
            assert sorted((x.step, round(x.value, 6)) for x in logged) == \
                sorted(zip(g["step"], g["val_acc1"].round(6)))
        assert {"dense", "finetune_r1"} <= set(hist["phase"])
        assert [x.step for x in client.get_metric_history(row["run_id"], "level_compression")] == [1]
        # artifacts: resolved config (same hash), per-layer table, plots, pruned model with masks
        assert load_config(yaml.safe_load((arts / "config.yaml").read_text())).config_hash() == \
            cfg.config_hash()
        layers = pd.read_csv(arts / "layers.csv")
        assert list(layers["layer"]) == ["fc1", "fc2", "fc3"] and (layers["density"] < 1).any()
        curve = ET.parse(arts / "training_curve.svg").getroot()  # well-formed SVG, one line per phase
        assert curve.tag.endswith("svg") and len(curve.findall(".//{http://www.w3.org/2000/svg}polyline")) == 2
        bars = ET.parse(arts / "layer_density.svg").getroot().findall(".//{http://www.w3.org/2000/svg}rect")
        assert len(bars) == 2 + 3  # background, frame, one bar per layer
        sd = torch.load(arts / "model.pt", weights_only=True)
        masks = {k: v for k, v in sd.items() if k.endswith("_mask")}
        kept = sum(int(v.sum()) for v in masks.values())
        assert masks and sum(v.numel() for v in masks.values()) / kept == pytest.approx(comp, rel=1e-3)


def test_failing_run_is_failed_with_traceback_and_the_sweep_goes_on(tmp_path, monkeypatch):
    import benchkit.experiment as experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = sweep_file(tmp_path)
    real_run = experiment.PruningExperiment.run

    def run(self):
        if self.cfg.prune.criterion == "random":
            raise RuntimeError("synthetic failure for the test")
        return real_run(self)

    monkeypatch.setattr(experiment.PruningExperiment, "run", run)
    assert main(["sweep", str(p), "--tracking-uri", uri]) == 1  # failures → non-zero exit, after all runs
    df = runs_of(uri, "e2e")
    status = dict(zip(df["params.prune.criterion"] + "/" + df["params.prune.compression"], df["status"]))
    assert status == {"magnitude/2.0": "FINISHED", "magnitude/4.0": "FINISHED", "random/2.0": "FAILED"}
    failed = df[df["status"] == "FAILED"].iloc[0]
    tb = mlflow.MlflowClient(uri).download_artifacts(failed["run_id"], "traceback.txt", str(tmp_path))
    text = Path(tb).read_text()
    assert "RuntimeError: synthetic failure for the test" in text and "Traceback" in text

    # fixed, the re-run redoes only the failed config; the store keeps one FINISHED run per hash
    monkeypatch.setattr(experiment.PruningExperiment, "run", real_run)
    assert main(["sweep", str(p), "--tracking-uri", uri]) == 0
    df2 = runs_of(uri, "e2e")
    assert len(df2) == 3 and set(df2["status"]) == {"FINISHED"}
    assert df2["tags.benchkit.config_hash"].is_unique
    redone = df2[df2["params.prune.criterion"] == "random"].iloc[0]
    assert redone["tags.benchkit.replaces"] == failed["run_id"]
    assert set(df[df["status"] == "FINISHED"]["run_id"]) <= set(df2["run_id"])  # finished ones were not rerun


def test_lottery_levels_are_logged_against_the_level(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = sweep_file(tmp_path, """\
    experiment: lth
    base:
      data: {name: digits}
      model: {name: lenet300}
      train: {epochs: 1, batch_size: 64, lr: 0.05}
      prune: {timing: lottery, lottery: {levels: 2, rate: 0.5, controls: [reinit]}}
      output_dir: OUT
    grid:
      seed: [0]
    """)
    assert main(["sweep", str(p), "--tracking-uri", uri]) == 0
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lth").experiment_id])
    rid = run.info.run_id

    def curve(key):
        return sorted((m.step, m.value) for m in client.get_metric_history(rid, key))

    remaining = curve("level_percent_remaining")
    assert [s for s, _ in remaining] == [0, 1, 2]
    assert [v for _, v in remaining] == pytest.approx([100.0, 50.0, 25.0], abs=0.2)  # rate 0.5 per level
    assert [s for s, _ in curve("level_test_acc1")] == [0, 1, 2]
    assert [s for s, _ in curve("level_val_acc1")] == [0, 1, 2]
    assert [s for s, _ in curve("reinit_level_test_acc1")] == [1, 2]
    assert run.data.tags[TAG_HASH] == load_config(p).config_hash()


def test_benchkit_stores_use_wal_and_other_sqlite_files_are_left_alone(tmp_path, monkeypatch):
    import sqlalchemy

    monkeypatch.delenv("BENCHKIT_SQLITE_WAL", raising=False)
    store = tmp_path / "mlflow.db"
    Tracker(f"sqlite:///{store}").ensure_experiment("wal")
    other = tmp_path / "other.db"
    with sqlalchemy.create_engine(f"sqlite:///{other}").connect() as conn:  # opened after the listener exists
        conn.execute(sqlalchemy.text("CREATE TABLE t (x INTEGER)"))
    modes = {p.name: sqlite3.connect(p).execute("PRAGMA journal_mode").fetchone()[0] for p in (store, other)}
    assert modes == {"mlflow.db": "wal", "other.db": "delete"}


def test_params_are_what_the_run_resolved_not_config_defaults(tmp_path):
    """An image folder of 3 classes trained for 3 iterations: the run logs its 3 classes, the input shape
    its batches had, its split sizes and the 3 steps, and none of the synthetic dataset's keys (10
    classes, [1, 8, 8], 512 samples: defaults that never applied) nor the epoch count iterations overrode."""
    from PIL import Image

    from benchkit.data import load_data
    from benchkit.models import MODELS

    MODELS.register("test_pooled_linear", lambda input_shape, num_classes: torch.nn.Sequential(
        torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(input_shape[0] * 4, num_classes)))
    root = tmp_path / "folder"
    for split, per_class in (("train", 5), ("val", 2)):
        for c, colour in enumerate(("red", "green", "blue")):
            (root / split / colour).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (32, 32), (40 * i, 80 * c, 20)).save(root / split / colour / f"{i}.png")
    cfg = tmp_path / "folder.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        experiment: folder
        data: {{name: imagefolder, root: {root}, augment: false, val_fraction: 0.2}}
        model: {{name: test_pooled_linear}}
        train: {{iterations: 3, batch_size: 4}}
        prune: {{timing: pre, compression: 2}}
        output_dir: {tmp_path / 'runs'}
        """))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["run", str(cfg), "--tracking-uri", uri, "--no-plots"]) == 0
    (row,) = runs_of(uri, "folder").to_dict("records")
    params = {k[len("params."):]: v for k, v in row.items() if k.startswith("params.") and v is not None}
    loaded = load_data(ExperimentConfig.from_yaml(cfg).data, batch_size=4)
    shape = list(next(iter(loaded.train))[0].shape[1:])  # what the model was fed
    assert params["data.num_classes"] == "3" and params["data.input_shape"] == str(shape)
    # 15 training images, 20% (3) held out for validation; val/ (6 images) is the test split
    assert (params["data.train_samples"], params["data.val_samples"], params["data.test_samples"]) == ("12", "3", "6")
    assert params["train.steps"] == "3" and params["train.iterations"] == "3"
    assert "train.epochs" not in params and "data.num_samples" not in params


def test_cpu_description_names_the_cpu_generation_and_its_vector_units(tmp_path):
    """Two VMs both called "AMD EPYC" ran the same dense 512x512 matmul 1.8x apart (AVX2 vs AVX-512):
    every recorded timing names family, model and the widest vector unit, read from /proc/cpuinfo."""
    from benchkit.latency import cpu_description

    info = tmp_path / "cpuinfo"
    core = "processor\t: {i}\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
    info.write_text("".join(core.format(i=i) + "flags\t\t: fpu sse2 avx avx2 avx512f avx512bw\n\n" for i in range(2)))
    assert cpu_description(str(info)) == "AMD EPYC (family 26, model 2; AVX-512)"
    info.write_text(core.format(i=0) + "flags\t\t: fpu sse2 avx avx2 fma\n")
    assert cpu_description(str(info)) == "AMD EPYC (family 26, model 2; AVX2)"
    info.write_text("model name\t: Some CPU\n")
    assert cpu_description(str(info)) == "Some CPU"
    assert cpu_description(str(tmp_path / "missing"))  # no /proc: platform's name, never an error


def test_a_stop_inside_a_query_prints_no_cursor_traceback_but_other_cursor_errors_do(tmp_path, caplog):
    """Seen under Ctrl-C stress: SQLAlchemy, after a stop landed inside a query, logged "Error closing
    cursor" with a traceback for a cursor whose connection it had itself closed. Only that is dropped."""
    import logging

    _ = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}").client  # opening a sqlite store installs the filter
    logger = logging.getLogger("sqlalchemy.pool.impl.QueuePool")
    connection = sqlite3.connect(":memory:")
    cursor = connection.cursor()
    connection.close()

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == logger.name]

    with caplog.at_level(logging.ERROR, logger=logger.name):
        try:
            cursor.execute("select 1")  # sqlite3.ProgrammingError: Cannot operate on a closed database
        except sqlite3.ProgrammingError:
            logger.error("Error closing cursor", exc_info=True)
        assert logged() == []
        try:
            raise sqlite3.OperationalError("disk I/O error")
        except sqlite3.OperationalError:
            logger.error("Error closing cursor", exc_info=True)
        assert logged() == ["Error closing cursor"]
