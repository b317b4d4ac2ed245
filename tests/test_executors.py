"""Executors: a pool worker killed in the middle of a run fails that run alone (the sweep goes on, and
a re-run finishes it); `--executor ray` refuses a remote cluster with a store that is a local file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from benchkit.cli import main
from benchkit.executors import RayStoreError, check_ray_tracking, ray_address_is_local
from benchkit.models import MODELS
from benchkit.models.lenet import LeNet300
from benchkit.sweep import expand, load_sweep, plan_sweep, run_sweep, run_tracked
from benchkit.tracking import Tracker

KILL_ENV = "BENCHKIT_TEST_KILL_WORKER"


class DyingLeNet300(LeNet300):
    """LeNet-300-100 that SIGKILLs its own process on its first training step (as the OOM killer would),
    when built with ``die=True`` and ``$BENCHKIT_TEST_KILL_WORKER`` is set, outside the test process."""

    def __init__(self, input_shape, num_classes, die: bool = False):
        super().__init__(input_shape, num_classes)
        self.die = die

    def forward(self, x):
        if self.die and self.training and os.environ.get(KILL_ENV, str(os.getpid())) != str(os.getpid()):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x)


MODELS.register("dying_lenet300", DyingLeNet300, overwrite=True)


def run_in_worker(task):
    """``run_tracked`` by way of this module: a spawned worker unpickling it imports the model above."""
    return run_tracked(task)


def search(uri: str, experiment: str, view=mlflow.entities.ViewType.ACTIVE_ONLY) -> pd.DataFrame:
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[experiment], run_view_type=view)


# --------------------------------------------------------------------------------------------- a worker dies
def test_a_killed_worker_fails_only_its_run_and_the_sweep_goes_on(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = tmp_path / "dying.yaml"
    p.write_text(textwrap.dedent(f"""\
        experiment: dying
        base:
          data: {{name: digits}}
          model: {{name: dying_lenet300}}
          train: {{epochs: 1, batch_size: 64, lr: 0.05}}
          prune: {{timing: post, compression: 2, finetune: {{epochs: 1, lr: 0.005}}}}
          output_dir: {tmp_path / 'runs'}
        zip:
          seed: [0, 1, 2, 3]
          model.kwargs.die: [false, true, false, false]
        """))
    tracker = Tracker(uri)

    def sweep(workers=2):
        entries = plan_sweep(expand(load_sweep(p)), tracker, "dying")
        summary = run_sweep(entries, experiment="dying", tracker=tracker, workers=workers, run_fn=run_in_worker,
                            verbose=False, plots=False)
        return entries, summary

    monkeypatch.setenv(KILL_ENV, str(os.getpid()))  # inherited by the spawned workers, which it kills
    entries, summary = sweep()
    doomed = next(e.config_hash for e in entries if e.config.model.kwargs["die"])
    # #0 was in flight on the other worker and #2, #3 still queued when #1's worker died: all finish
    assert sorted((o.index, o.status) for o in summary.outcomes) == [(0, "finished"), (1, "failed"),
                                                                     (2, "finished"), (3, "finished")]
    failed = next(o for o in summary.outcomes if o.status == "failed")
    assert "worker process" in failed.error and "SIGKILL" in failed.error

    df = search(uri, "dying")
    assert len(df) == 4 and df["tags.benchkit.config_hash"].is_unique
    status = dict(zip(df["tags.benchkit.config_hash"], df["status"]))
    assert status.pop(doomed) == "FAILED" and set(status.values()) == {"FINISHED"}
    # nothing was interrupted and redone: exactly one run per config, deleted ones included
    assert len(search(uri, "dying", mlflow.entities.ViewType.ALL)) == 4
    dead = df[df["tags.benchkit.config_hash"] == doomed].iloc[0]
    assert dead["run_id"] == failed.run_id
    assert dead["tags.benchkit.pid"] not in set(df[df["status"] == "FINISHED"]["tags.benchkit.pid"])
    text = Path(tracker.client.download_artifacts(dead["run_id"], "traceback.txt", str(tmp_path))).read_text()
    assert "WorkerDied" in text and "SIGKILL" in text and doomed in text

    # the same sweep again (no kill this time, in-process): the finished runs are kept, the failed one redone
    monkeypatch.delenv(KILL_ENV)
    entries, summary = sweep(workers=1)
    assert sorted(e.status for e in entries) == ["finished-skip"] * 3 + ["redo"]
    assert [o.status for o in summary.outcomes] == ["finished"]
    after = search(uri, "dying")
    assert len(after) == 4 and after["tags.benchkit.config_hash"].is_unique and set(after["status"]) == {"FINISHED"}
    assert set(df[df["status"] == "FINISHED"]["run_id"]) <= set(after["run_id"])
    assert after[after["tags.benchkit.config_hash"] == doomed]["tags.benchkit.replaces"].iloc[0] == dead["run_id"]


# --------------------------------------------------------------------------------------------- ray + local store
@pytest.mark.parametrize("address", [None, "", "local", "auto", "127.0.0.1:6379", "localhost:6379",
                                     "ray://127.0.0.1:10001", "ray://localhost:10001", "[::1]:6379"])
def test_a_local_ray_may_use_the_local_sqlite_file(address, monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # "auto": no cluster recorded here
    assert ray_address_is_local(address)
    check_ray_tracking(address, f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_a_remote_ray_needs_a_tracking_server(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for address in ("ray://10.1.2.3:10001", "head.example.org:6379", "203.0.113.7:6379"):
        assert not ray_address_is_local(address)
        for uri in (f"sqlite:///{tmp_path / 'mlflow.db'}", (tmp_path / "mlruns").as_uri()):
            with pytest.raises(RayStoreError, match="remote workers would write to their own local files"):
                check_ray_tracking(address, uri)
        check_ray_tracking(address, "http://tracking.example.org:5000")  # a shared server: fine
    monkeypatch.setenv("RAY_ADDRESS", "ray://10.1.2.3:10001")  # the address may come from the environment
    with pytest.raises(RayStoreError):
        check_ray_tracking(None, f"sqlite:///{tmp_path / 'mlflow.db'}")
    # "auto" goes where `ray start` on this machine pointed: a worker node of a remote head is remote
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.1.2.3:6379\n")
    assert not ray_address_is_local("auto")
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:6379\n")
    assert ray_address_is_local("auto")


@pytest.mark.parametrize("how", ["flag", "env"])
def test_sweep_refuses_a_remote_ray_with_a_sqlite_store_before_anything_runs(how, tmp_path, monkeypatch, capsys):
    db = tmp_path / "mlflow.db"
    p = tmp_path / "remote.yaml"
    p.write_text("experiment: remote\nbase: {data: {name: digits}}\ngrid:\n  seed: [0, 1]\n")
    args = ["sweep", str(p), "--executor", "ray", "--tracking-uri", f"sqlite:///{db}"]
    if how == "flag":
        args += ["--ray-address", "ray://10.1.2.3:10001"]
    else:
        monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "remote workers would write to their own local files" in err
    assert "mlflow server" in err and "--tracking-uri http://HOST:5000" in err
    assert not db.exists()  # refused before the store was even opened


# --------------------------------------------------------------------------------------------- the worker server
def test_the_worker_server_imports_with_the_collector_off_and_leaves_a_first_run_nothing_heavy(tmp_path):
    """Workers fork from a server whose only preload is benchkit.worker_server: it must import what a
    run would import lazily on first use (torch imports torch._dynamo, ~1.5 s, when the first
    optimiser is built) without a single full collection (a quarter of the import time), freeze those
    objects (gc.freeze) and leave the collector on for the workers it forks."""
    code = textwrap.dedent("""\
        import gc, json, sys
        import benchkit.worker_server
        full_collections, enabled, frozen = gc.get_stats()[2]["collections"], gc.isenabled(), gc.get_freeze_count()
        before = set(sys.modules)
        from benchkit.experiment import PruningExperiment
        from benchkit.validation import load_config
        cfg = load_config({"data": {"name": "synthetic", "num_samples": 64, "input_shape": [1, 8, 8]},
                                          "model": {"name": "lenet300"}, "train": {"epochs": 1, "batch_size": 32},
                                          "prune": {"timing": "pre", "compression": 2}, "output_dir": sys.argv[1]})
        PruningExperiment(cfg).run()
        new = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in ("torch", "mlflow", "sklearn"))
        print(json.dumps({"full_collections": full_collections, "enabled": enabled, "frozen": frozen, "new": new}))
        sys.exit(3)  # only the server itself skips its teardown: any other importer keeps its exit code
        """)
    env = {**os.environ, "BENCHKIT_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "runs")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 3, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["full_collections"] == 0, got["full_collections"]  # the collector was off for the imports
    assert got["enabled"], "the workers would run without a garbage collector"
    assert got["frozen"] > 100_000, got["frozen"]  # torch + MLflow: millions of objects
    heavy = [m for m in got["new"] if m.startswith(("torch._dynamo", "torch._inductor", "sklearn.", "mlflow.store"))]
    assert not heavy, heavy


def test_the_benchkit_command_turns_the_collector_off_for_its_imports_and_on_for_its_runs(tmp_path):
    """``benchkit run`` (the console entry) imports and plans with the cyclic collector off, and runs
    with it on again and the long-lived heap frozen: a run must never go without garbage collection."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        experiment: gc
        data: {{name: synthetic, num_samples: 64, input_shape: [1, 8, 8]}}
        model: {{name: lenet300}}
        train: {{epochs: 1, batch_size: 32}}
        prune: {{timing: pre, compression: 2}}
        output_dir: {tmp_path / 'runs'}
        """))
    code = textwrap.dedent("""\
        import gc, json, sys
        import benchkit.experiment as ex
        seen, run = [], ex.PruningExperiment.run
        def spy(self, *args, **kwargs):
            seen.append({"enabled": gc.isenabled(), "frozen": gc.get_freeze_count()})
            return run(self, *args, **kwargs)
        ex.PruningExperiment.run = spy
        from benchkit import cli
        sys.argv = ["benchkit", "run", sys.argv[1], "--tracking-uri", sys.argv[2], "--no-plots"]
        try:
            cli.entry()
        except SystemExit as e:
            print(json.dumps({"code": e.code, "seen": seen}))
        """)
    env = {**os.environ, "BENCHKIT_CACHE": str(tmp_path / "cache"), "CI": "true"}
    out = subprocess.run([sys.executable, "-c", code, str(cfg), f"sqlite:///{tmp_path / 'mlflow.db'}"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["code"] == 0 and len(got["seen"]) == 1, got
    assert got["seen"][0]["enabled"], "the run went without a garbage collector"
    assert got["seen"][0]["frozen"] > 100_000, got
