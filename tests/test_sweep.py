"""Sweep files → plans: grid/zip expansion, exclusions with reasons, bad files refused with key and
line before anything runs, the dry-run plan, and resume statuses read from MLflow."""

from __future__ import annotations

import itertools
import os
import textwrap
from pathlib import Path

import pytest

from benchkit.cli import main
from benchkit.config import ConfigError, ExperimentConfig
from benchkit.sweep import HashState, combinations, expand, load_sweep, plan_sweep
from benchkit.tracking import TAG_HASH, TAG_HOST, TAG_PID, TAG_PID_START, Owner, Tracker, run_is_alive
from benchkit.validation import load_config

BASE = """\
experiment: unit
base:
  data: {name: digits}
  model: {name: lenet300}
  train: {epochs: 1}
  prune: {timing: post, compression: 2}
"""


def write(tmp_path: Path, body: str, name: str = "sweep.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


# --------------------------------------------------------------------------------------------- expansion
def test_grid_is_the_cartesian_product_and_zip_moves_together(tmp_path):
    p = write(tmp_path, BASE + """\
grid:
  prune.criterion: [magnitude, random]
  prune.allocation: [global, uniform]
  seed: [0, 1, 2]
zip:
  prune.compression: [2, 8]
  prune.post.finetune.epochs: [1, 3]
""")
    spec = load_sweep(p)
    combos = combinations(spec)
    expected = [
        {"prune.criterion": c, "prune.allocation": s, "seed": seed, "prune.compression": comp,
         "prune.post.finetune.epochs": ep}
        for c, s, seed in itertools.product(["magnitude", "random"], ["global", "uniform"], [0, 1, 2])
        for comp, ep in [(2, 1), (8, 3)]
    ]
    assert combos == expected  # 2 × 2 × 3 × 2 (zip), file order
    entries = expand(spec)
    assert len(entries) == 24 and all(e.status == "new" for e in entries)
    for e in entries:  # every config carries its combination, on top of the base
        flat = e.config.flat()
        assert all(flat[k] == v for k, v in e.overrides.items())
        assert flat["data.name"] == "digits" and flat["train.epochs"] == 1 and flat["experiment"] == "unit"
        assert e.config_hash == load_config(e.config.to_dict()).config_hash()
    assert len({e.config_hash for e in entries}) == 24


def test_exclusions_are_listed_with_their_reason(tmp_path):
    p = write(tmp_path, BASE + """\
grid:
  prune.criterion: [magnitude, random]
  prune.compression: [2, 4, 8]
exclude:
  - match: {prune.criterion: random, prune.compression: [4, 8]}
    reason: random pruning is only a baseline at low compression
""")
    entries = expand(load_sweep(p))
    excluded = [(e.overrides["prune.criterion"], e.overrides["prune.compression"]) for e in entries
                if e.status == "excluded"]
    assert excluded == [("random", 4), ("random", 8)]
    assert all("random pruning is only a baseline" in e.reason for e in entries if e.status == "excluded")
    assert sum(e.status == "new" for e in entries) == 4


def test_an_exclusion_that_can_match_nothing_is_refused_like_a_typo(tmp_path):
    """A rule value that is not among its axis's values excludes nothing, silently; so does one of a list
    of alternatives. The values of the file count, before a command-line override pins an axis."""
    rule = "exclude:\n  - match: {prune.criterion: %s, prune.compression: %s}\n    reason: x\n"
    grid = "grid:\n  prune.criterion: [magnitude, random]\nzip:\n  prune.compression: [2, 4]\n  seed: [0, 1]\n"
    with pytest.raises(ConfigError) as err:
        load_sweep(write(tmp_path, BASE + grid + rule % ("[random, magnitdue]", 4)))
    msg = str(err.value)
    assert msg.startswith("exclude[0].match (line 12): prune.criterion: 'magnitdue' is not a value of the grid axis "
                          "prune.criterion ('magnitude', 'random')") and "did you mean 'magnitude'?" in msg, msg
    with pytest.raises(ConfigError,
                       match=r"compression: 8 is not a value of the zip axis prune.compression \(2, 4\)"):
        load_sweep(write(tmp_path, BASE + grid + rule % ("random", 8)))
    ok = write(tmp_path, BASE + grid + rule % ("[random]", "4.0"))  # 4.0 is the axis's 4
    entries = expand(load_sweep(ok, ["prune.criterion=magnitude"]))  # pinned away: the rule is still no typo
    assert [e.status for e in entries] == ["new", "new"]
    assert [e.status for e in expand(load_sweep(ok))] == ["new", "new", "new", "excluded"]


def test_combinations_validation_refuses_are_excluded_with_its_reason(tmp_path):
    # validation: lottery prunes by magnitude (IMP) or random only; taylor is fine with post
    p = write(tmp_path, BASE + """\
grid:
  prune.timing: [post, lottery]
  prune.criterion: [magnitude, taylor]
""")
    entries = {(e.overrides["prune.timing"], e.overrides["prune.criterion"]): e for e in expand(load_sweep(p))}
    bad = entries[("lottery", "taylor")]
    assert bad.status == "excluded" and bad.reason.startswith("invalid:") and "criterion" in bad.reason
    assert all(e.status == "new" for k, e in entries.items() if k != ("lottery", "taylor"))


def test_duplicate_configs_run_once(tmp_path):
    # `name` is not part of the config hash: two names, one config
    p = write(tmp_path, BASE + "grid:\n  name: [a, b]\n")
    entries = expand(load_sweep(p))
    assert [e.status for e in entries] == ["new", "duplicate"]


def test_cli_override_pins_a_grid_axis(tmp_path):
    p = write(tmp_path, BASE + "grid:\n  seed: [0, 1, 2]\n  prune.compression: [2, 4]\n")
    entries = expand(load_sweep(p, ["seed=5", "train.lr=0.01"]))
    assert len(entries) == 2
    assert {e.config.seed for e in entries} == {5} and {e.config.train.lr for e in entries} == {0.01}


def test_cli_override_pins_a_zip_axis_and_labels_show_the_values_run(tmp_path, capsys):
    """The plan label, run name and overrides tag come from PlanEntry.overrides: they must say what runs."""
    from benchkit.sweep import run_name

    p = write(tmp_path, BASE + "zip:\n  prune.criterion: [magnitude, random]\n  seed: [0, 1]\n")
    entries = expand(load_sweep(p, ["seed=5"]))
    assert [e.overrides for e in entries] == [{"prune.criterion": "magnitude", "seed": 5},
                                              {"prune.criterion": "random", "seed": 5}]
    for e in entries:
        assert e.status == "new" and e.config.seed == 5 and e.config.prune.criterion == e.overrides["prune.criterion"]
        assert "seed=5" in e.label() and "seed=5" in run_name(e.config, e.overrides)
    # pinning the only column that differs makes the rows one config: the second is a duplicate
    assert [e.status for e in expand(load_sweep(p, ["prune.criterion=random", "seed=5"]))] == ["new", "duplicate"]
    store = tmp_path / "mlflow.db"
    assert main(["sweep", str(p), "--dry-run", "--tracking-uri", f"sqlite:///{store}", "seed=5"]) == 0
    plan = capsys.readouterr().out.splitlines()[1:]
    assert len(plan) == 2 and all("seed=5" in line and "seed=0" not in line and "seed=1" not in line
                                  for line in plan), plan


def test_only_runs_part_of_the_plan(tmp_path, capsys):
    """--only selects grid values and zip rows (the other zip columns moving with the row), and refuses a
    key that is no axis or a value the axis does not have, before anything runs."""
    p = write(tmp_path, BASE + "zip:\n  prune.criterion: [magnitude, random]\n  prune.compression: [2, 4]\n"
                               "grid:\n  seed: [0, 1, 2]\n")
    picked = expand(load_sweep(p, only=["prune.criterion=random", "seed=[0, 2]"]))
    assert [e.overrides for e in picked] == [{"seed": 0, "prune.criterion": "random", "prune.compression": 4},
                                             {"seed": 2, "prune.criterion": "random", "prune.compression": 4}]
    with pytest.raises(ConfigError, match=r"--only train.lr: not a grid or zip axis.*axes: seed, prune.criterion"):
        load_sweep(p, only=["train.lr=0.1"])
    with pytest.raises(ConfigError, match=r"--only prune.criterion=taylor: no such value.*magnitude, random"):
        load_sweep(p, only=["prune.criterion=taylor"])
    store = tmp_path / "mlflow.db"
    assert main(["sweep", str(p), "--dry-run", "--tracking-uri", f"sqlite:///{store}", "--only", "seed=1",
                 "--only", "prune.compression=2"]) == 0
    plan = capsys.readouterr().out.splitlines()[1:]
    assert len(plan) == 1 and "seed=1" in plan[0] and "prune.criterion=magnitude" in plan[0], plan


# --------------------------------------------------------------------------------------------- bad files
BAD = {
    "unknown top-level key": ("grdi:\n  seed: [0]\n", "'grdi'", 7),
    "grid key not in the config": ("grid:\n  seed: [0]\n  prune.critrion: [magnitude]\n", "'prune.critrion'", 9),
    "wrong type": ("grid:\n  prune.compression: [2, lots]\n", "prune.compression", 8),
    "empty grid": ("grid: {}\n", "grid", 7),
    "value list empty": ("grid:\n  seed: []\n", "grid.seed", 8),
    "value not a list": ("grid:\n  seed: 3\n", "grid.seed", 8),
    "zip lengths differ": ("zip:\n  seed: [0, 1]\n  prune.compression: [2]\n", "same length", 8),
    "exclude without reason": ("grid:\n  seed: [0]\nexclude:\n  - match: {seed: 0}\n", "reason", 9),
    "exclude matching everything": ("grid:\n  seed: [0]\nexclude:\n  - match: {}\n    reason: x\n", "empty `match:`", 9),
    "exclude key unknown": ("grid:\n  seed: [0]\nexclude:\n  - match: {sed: 0}\n    reason: x\n", "'sed'", 9),
    "typo in a grid value": ("grid:\n  prune.criterion: [magnitude, magnitud]\n", "magnitud", 8),
    "unknown key in base": ("grid:\n  seed: [0]\n", "'train.epoch'", 5),
    "exclude value in no combination": ("grid:\n  prune.criterion: [magnitude, random]\nexclude:\n  - match: "
                                        "{prune.criterion: randon}\n    reason: x\n", "did you mean 'random'?", 9),
    "exclude value no axis varies": ("grid:\n  seed: [0]\nexclude:\n  - match: {prune.timing: lotery}\n    "
                                     "reason: x\n", "no grid or zip axis varies prune.timing", 9),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sweep_files_name_key_and_line(tmp_path, case, capsys):
    tail, key, line = BAD[case]
    base = BASE.replace("train: {epochs: 1}", "train: {epoch: 1}") if case == "unknown key in base" else BASE
    p = write(tmp_path, base + tail)
    with pytest.raises(ConfigError) as err:
        expand(load_sweep(p))
    msg = str(err.value)
    assert key in msg and f"line {line}" in msg, msg
    # through the CLI: exit code 2, the same message, and nothing written to the store
    store = tmp_path / "store.db"
    assert main(["sweep", str(p), "--tracking-uri", f"sqlite:///{store}"]) == 2
    assert key in capsys.readouterr().err
    assert not store.exists()


def test_malformed_yaml_names_the_line(tmp_path):
    p = write(tmp_path, BASE + "grid:\n  seed: [0, 1\n  prune.scope: [global]\n")
    with pytest.raises(ConfigError, match=r"malformed YAML at line \d+"):
        load_sweep(p)


# --------------------------------------------------------------------------------------------- plan
def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    p = write(tmp_path, BASE + """\
grid:
  prune.criterion: [magnitude, random]
  prune.compression: [2, 4]
exclude:
  - match: {prune.criterion: random, prune.compression: 4}
    reason: not interesting
""")
    store = tmp_path / "mlflow.db"
    assert main(["sweep", str(p), "--dry-run", "--tracking-uri", f"sqlite:///{store}", "train.epochs=2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "4 combinations" in out[0] and "3 new" in out[0] and "1 excluded" in out[0]
    base = load_config(p, ["train.epochs=2"])
    for line, (crit, comp) in zip(out[1:], itertools.product(["magnitude", "random"], [2, 4])):
        h = base.replace(prune__criterion=crit, prune__compression=comp).config_hash()
        assert h in line and f"prune.criterion={crit} prune.compression={comp}" in line
        assert ("excluded" in line and "not interesting" in line) if (crit, comp) == ("random", 4) else " new " in line
    assert not store.exists()


class FakeInfo:
    def __init__(self, run_id, status, start_time=0):
        self.run_id, self.status, self.start_time = run_id, status, start_time


class FakeRun:
    def __init__(self, run_id, status, tags=None, start_time=0):
        self.info = FakeInfo(run_id, status, start_time)
        self.data = type("D", (), {"tags": tags or {}})()


def test_liveness_of_running_runs():
    me = Owner.me()
    assert run_is_alive(FakeRun("a", "RUNNING", me.tags()))
    dead = {**me.tags(), TAG_PID: str(2**22 + 12345)}  # beyond Linux's pid_max default: never alive
    assert not run_is_alive(FakeRun("b", "RUNNING", dead))
    reused = {**me.tags(), TAG_PID_START: f"{me.start - 3600:.3f}"}  # our pid, but a different process
    assert not run_is_alive(FakeRun("c", "RUNNING", reused))
    remote = {TAG_HOST: "elsewhere", TAG_PID: "1", TAG_PID_START: "0", "benchkit.heartbeat": "0"}
    assert not run_is_alive(FakeRun("d", "RUNNING", remote))
    assert run_is_alive(FakeRun("e", "RUNNING", {**remote, "benchkit.heartbeat": str(int(__import__("time").time()))}))
    assert not run_is_alive(FakeRun("f", "FINISHED", me.tags()))
    state = HashState.of([FakeRun("g", "FAILED"), FakeRun("h", "RUNNING", dead), FakeRun("i", "FINISHED")])
    assert [r.info.run_id for r in state.finished] == ["i"] and [r.info.run_id for r in state.stale] == ["g", "h"]


def test_plan_reads_statuses_from_the_store(tmp_path):
    p = write(tmp_path, BASE + "grid:\n  seed: [0, 1, 2, 3, 4]\n")
    spec = load_sweep(p)
    entries = expand(spec)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracker.ensure_experiment(spec.experiment)
    me = Owner.me().tags()
    dead = {**me, TAG_PID: str(2**22 + 12345)}
    for e, status, tags in [(entries[0], "FINISHED", {}), (entries[1], "FAILED", {}), (entries[2], "KILLED", {}),
                            (entries[3], "RUNNING", dead), (entries[4], "RUNNING", me)]:
        run_id = tracker.client.create_run(exp, tags={TAG_HASH: e.config_hash, **tags}).info.run_id
        if status != "RUNNING":
            tracker.client.set_terminated(run_id, status)
    plan_sweep(entries, tracker, spec.experiment)
    assert [e.status for e in entries] == ["finished-skip", "redo", "redo", "redo", "running"]
    assert "FAILED" in entries[1].reason and "KILLED" in entries[2].reason and "interrupted" in entries[3].reason
    assert os.path.exists(tmp_path / "mlflow.db")


def test_a_deleted_experiment_starts_over_and_the_plan_says_so(tmp_path, capsys):
    """Deleting the experiment means starting over: the plan says new (and why), every config runs again
    once, into a new experiment; the deleted one keeps its runs in the bin instead of being restored."""
    from mlflow import MlflowClient

    from benchkit.tracking import retired_name

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = write(tmp_path, BASE + f"  output_dir: {tmp_path / 'runs'}\ngrid:\n  seed: [0, 1]\n")
    assert main(["sweep", str(p), "--tracking-uri", uri]) == 0
    tracker = Tracker(uri)
    old = tracker.client.get_experiment_by_name("unit").experiment_id
    old_runs = {r.info.run_id for r in tracker.runs(old)}
    assert len(old_runs) == 2
    MlflowClient(uri).delete_experiment(old)
    capsys.readouterr()

    assert main(["sweep", str(p), "--dry-run", "--tracking-uri", uri]) == 0
    dry = capsys.readouterr().out.splitlines()
    assert "2 combinations; 2 new" in dry[0]
    assert "experiment 'unit' was deleted: starting over, 2 old runs ignored" in dry[1]
    assert sum(" new " in line for line in dry[2:]) == 2
    assert tracker.client.get_experiment(old).lifecycle_stage == "deleted"  # the dry run changed nothing

    assert main(["sweep", str(p), "--tracking-uri", uri]) == 0
    assert "2 finished" in capsys.readouterr().out
    new = tracker.client.get_experiment_by_name("unit")
    assert new.lifecycle_stage == "active" and new.experiment_id != old
    runs = tracker.runs(new.experiment_id)
    planned = {e.config_hash for e in expand(load_sweep(p))}
    assert sorted(r.data.tags[TAG_HASH] for r in runs) == sorted(planned)  # each config exactly once
    assert {r.info.status for r in runs} == {"FINISHED"} and not old_runs & {r.info.run_id for r in runs}
    binned = tracker.client.get_experiment(old)
    assert binned.lifecycle_stage == "deleted" and binned.name == retired_name("unit", old)
    assert {r.info.run_id for r in tracker.runs(old, deleted=True)} == old_runs

    assert main(["sweep", str(p), "--dry-run", "--tracking-uri", uri]) == 0  # resumes as usual from here
    dry = capsys.readouterr().out.splitlines()
    assert "2 finished-skip" in dry[0] and not any("note:" in line for line in dry)


# --------------------------------------------------------------------------------------------- model-dependent checks
def test_plan_refuses_layer_patterns_and_model_kwargs_that_fit_no_model(tmp_path, capsys, monkeypatch):
    """What the experiment's preflight would refuse (a glob matching no layer, an unknown model kwarg, N:M
    on a layer M does not divide) is refused in the plan, without loading data: per combination where
    only some combinations are affected, and the whole file when a value fits no combination."""
    import benchkit.data

    def no_data(*args, **kwargs):
        raise AssertionError("planning loaded data")

    for name in ("digits", "synthetic"):
        monkeypatch.setitem(benchkit.data.DATASETS._items, name, no_data)
    p = write(tmp_path, BASE + """\
grid:
  model.name: [lenet300, lenet5]
  prune.exclude: [[], [conv1]]
""")
    entries = {(e.overrides["model.name"], tuple(e.overrides["prune.exclude"])): e for e in expand(load_sweep(p))}
    bad = entries[("lenet300", ("conv1",))]
    assert bad.status == "excluded" and bad.reason.startswith("invalid:"), bad.reason
    assert "prune.exclude" in bad.reason and "'conv1'" in bad.reason and "fc1" in bad.reason
    assert all(e.status == "new" and not e.reason for k, e in entries.items() if k != ("lenet300", ("conv1",)))

    nm = write(tmp_path, BASE.replace("data: {name: digits}", "data: {name: synthetic, input_shape: [1, 3, 3]}")
               + "grid:\n  prune.granularity: [element, '2:4']\n  prune.timing: [post, pre]\n", "nm.yaml")
    with pytest.raises(ConfigError) as err:
        expand(load_sweep(nm))
    assert "grid.prune.granularity" in str(err.value) and "line 8" in str(err.value)
    assert "'2:4'" in str(err.value) and "fc1" in str(err.value)

    for tail, key, line, fragment in [
        ("grid:\n  seed: [0, 1]\n  prune.overrides: [{fc3: 2}, {fc4: 2}]\n", "grid.prune.overrides", 9, "'fc4'"),
        ("grid:\n  seed: [0, 1]\n  model.kwargs: [{hidden: [16, 8]}, {hiden: [16, 8]}]\n", "grid.model.kwargs", 9, "hiden"),
    ]:
        f = write(tmp_path, BASE + tail, "bad.yaml")
        with pytest.raises(ConfigError) as err:
            expand(load_sweep(f))
        msg = str(err.value)
        assert key in msg and f"line {line}" in msg and fragment in msg, msg
        store = tmp_path / "store.db"
        assert main(["sweep", str(f), "--dry-run", "--tracking-uri", f"sqlite:///{store}"]) == 2
        assert fragment in capsys.readouterr().err and not store.exists()


def test_threads_tag_is_the_runs_thread_count(tmp_path, monkeypatch):
    """benchkit.threads records the threads the run used: cfg.threads when set, else the process's."""
    import torch

    import benchkit.experiment
    from benchkit.sweep import RunTask, run_tracked
    from benchkit.tracking import Tracker as RealTracker

    seen: list[int] = []

    class FakeExperiment:
        def __init__(self, cfg):
            self.cfg = cfg

        def run(self):
            if self.cfg.threads:
                torch.set_num_threads(self.cfg.threads)
            seen.append(torch.get_num_threads())
            return type("R", (), {"metrics": {}})()

    monkeypatch.setattr(benchkit.experiment, "PruningExperiment", FakeExperiment)
    monkeypatch.setattr(RealTracker, "log_result", lambda self, run_id, result, **kw: None)
    before = torch.get_num_threads()
    try:
        tracker = RealTracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
        exp = tracker.ensure_experiment("threads")
        for threads in (before + 1, None):
            cfg = load_config({"threads": threads, "seed": len(seen)})
            task = RunTask(len(seen), cfg.to_dict(), cfg.config_hash(), "r", {}, exp, tracker.uri, "threads")
            out = run_tracked(task)
            assert out.status == "finished", out.error
            tag = tracker.client.get_run(out.run_id).data.tags["benchkit.threads"]
            assert tag == str(seen[-1]) == str(threads or torch.get_num_threads())
    finally:
        torch.set_num_threads(before)


def test_run_names_show_an_image_folder_root_and_hide_other_roots():
    from benchkit.sweep import run_name

    folder = ExperimentConfig.from_dict({"data": {"name": "imagefolder", "root": "/d/dogs"}})
    mnist = ExperimentConfig.from_dict({"data": {"name": "mnist", "root": "/d/mnist"}})
    assert run_name(folder, {"data.root": "/d/dogs", "seed": 0}) == "root=/d/dogs seed=0"  # it names the dataset
    assert run_name(mnist, {"data.root": "/d/mnist", "seed": 0}) == "seed=0"  # only where the files are


@pytest.mark.parametrize("moment", ["creating", "closing"])
def test_ctrl_c_while_a_serial_run_is_created_or_closed_leaves_no_running_run(tmp_path, monkeypatch, moment):
    """A Ctrl-C landing inside the calls that create or close a run (a few ms each) is held until
    they return: the run created is marked KILLED, the run being closed ends FINISHED, and the
    sweep stops there (exit 130) with no run left RUNNING and no further run started."""
    import signal

    from benchkit import tracking

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    p = write(tmp_path, BASE + "grid:\n  seed: [0, 1, 2]\n")
    real_start, real_end = tracking.Tracker.start_run, tracking.Tracker.end_run

    def start_run(self, *args, **kwargs):
        if moment == "creating":
            os.kill(os.getpid(), signal.SIGINT)  # lands between the run's creation and our return
        return real_start(self, *args, **kwargs)

    def end_run(self, run_id, status="FINISHED"):
        if moment == "closing" and status == "FINISHED":
            os.kill(os.getpid(), signal.SIGINT)
        return real_end(self, run_id, status)

    monkeypatch.setattr(tracking.Tracker, "start_run", start_run)
    monkeypatch.setattr(tracking.Tracker, "end_run", end_run)
    assert main(["sweep", str(p), "--tracking-uri", uri]) == 130
    monkeypatch.setattr(tracking.Tracker, "start_run", real_start)
    monkeypatch.setattr(tracking.Tracker, "end_run", real_end)
    client = Tracker(uri).client
    runs = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED" if moment == "creating" else "FINISHED"]


@pytest.mark.parametrize("study", ["sparse_training", "at_init_sanity", "timing"])
def test_a_fresh_process_reads_axes_of_any_timing_section(study):
    """The CLI reads a sweep before anything imported the timings: keys of their sections (prune.dynamic.method,
    prune.pre.controls, prune.post.rounds) must still be known, and every combination of the studies valid."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    code = (f"from benchkit.sweep import load_sweep, expand; spec = load_sweep('experiments/{study}.yaml'); "
            "plan = expand(spec); print(len(plan), sum(e.status == 'excluded' for e in plan))")
    r = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(repo)})
    assert r.returncode == 0, r.stderr
    total, excluded = map(int, r.stdout.split())
    assert total == {"sparse_training": 240, "at_init_sanity": 36, "timing": 21}[study] and excluded == 0


def test_a_run_reported_finished_but_left_running_in_the_store_fails_the_sweep(tmp_path, capsys):
    """Seen once: a run printed "finished" while the store kept it RUNNING. The sweep re-reads the
    store after its loop, so such a run counts as failed (exit code non-zero), with the reason, and
    the next sweep redoes it; runs the store shows FINISHED stay finished."""
    from benchkit.jobs import RunOutcome
    from benchkit.sweep import run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = write(tmp_path, BASE.replace("experiment: unit", "experiment: confirm") + "grid:\n  seed: [0, 1]\n")
    tracker = Tracker(uri)

    def run_fn(task):  # finishes seed 0 properly; leaves seed 1 RUNNING but says "finished"
        run_id = tracker.client.create_run(task.experiment_id, tags={TAG_HASH: task.config_hash}).info.run_id
        if task.index == 0:
            tracker.end_run(run_id, "FINISHED")
        return RunOutcome(task.index, task.config_hash, "finished", run_id)

    summary = run_sweep(plan_sweep(expand(load_sweep(p)), tracker, "confirm"), experiment="confirm",
                        tracker=tracker, verbose=False, run_fn=run_fn)
    assert [o.status for o in sorted(summary.outcomes, key=lambda o: o.index)] == ["finished", "failed"]
    assert not summary.ok
    err = capsys.readouterr().err
    assert "reported finished but the store shows it RUNNING" in err
    statuses = [e.status for e in plan_sweep(expand(load_sweep(p)), tracker, "confirm")]
    assert statuses[0] == "finished-skip" and statuses[1] != "finished-skip"
    # the CLI names the run itself: a store query for FAILED runs would not find it (it is RUNNING there)
    from benchkit.cli import failure_lines

    lines = failure_lines(summary, "confirm")
    bad = next(o for o in summary.outcomes if o.status == "failed")
    assert lines[0].startswith(f"failed: #1 {bad.config_hash[:8]} run {bad.run_id}: the run reported finished")
    assert len(lines) == 2 and "traceback.txt" in lines[-1]


def test_failure_lines_name_at_most_ten_runs_then_count_the_rest():
    from benchkit.cli import failure_lines
    from benchkit.jobs import RunOutcome
    from benchkit.sweep import SweepSummary

    outcomes = [RunOutcome(i, f"{i:032x}", "failed", f"r{i}", error=f"boom {i}\ntraceback line") for i in range(12)]
    outcomes.append(RunOutcome(12, "f" * 32, "finished", "r12"))
    lines = failure_lines(SweepSummary(outcomes, skipped=0, excluded=0), "exp")
    assert lines[0] == f"failed: #0 {0:08x} run r0: boom 0"  # first line of the error only
    assert len(lines) == 12 and lines[10] == "... and 2 more" and "exp" in lines[11]
