"""Plugins: modules outside benchkit register criteria, models and timings, and `benchkit sweep` uses them
in the driver and in every worker; clashes are refused naming both origins; installed entry points load
by themselves. The plugin code is docs/plugins.md's own examples, so the documentation cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchkit.plugins import load_plugins
from benchkit.pruning.criteria import CRITERIA, ScoringData
from benchkit.registry import NameClashError, Registry

REPO = Path(__file__).resolve().parents[1]


def doc_examples() -> list[str]:
    """The ```python blocks of docs/plugins.md, in order: the Fisher criterion, then a model and a timing."""
    return re.findall(r"```python\n(.*?)```", (REPO / "docs" / "plugins.md").read_text(), flags=re.S)


def cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "benchkit.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": path, "CI": "true", **(env or {})}, timeout=timeout)


# --------------------------------------------------------------------------------------------- the worked example
@pytest.fixture(scope="module")
def fisher_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("plugin") / "my_criterion.py"
    p.write_text(doc_examples()[0])
    return p


@pytest.fixture
def criteria_restored():
    """Loading a plugin in this process registers its names for good: take them out again afterwards, so
    later tests see only the built-ins (their error messages list the allowed names)."""
    items, origins = dict(CRITERIA._items), dict(CRITERIA._origins)
    yield
    CRITERIA._items.clear(), CRITERIA._items.update(items)
    CRITERIA._origins.clear(), CRITERIA._origins.update(origins)


def test_the_documented_fisher_criterion_computes_half_fisher_times_w_squared(fisher_file, criteria_restored):
    """Against the closed form for a linear softmax classifier: the per-example gradient of the cross-
    entropy with respect to W is (softmax(Wx + b) - onehot(y)) x^T, so F = mean_n of its square and the
    saliency is F * W**2 / 2 (no autograd in the expectation)."""
    load_plugins([str(fisher_file)])
    assert CRITERIA.origin("fisher").file == str(fisher_file)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    got = CRITERIA.get("fisher")().scores(model, {"0": model[0]}, ScoringData(batch=(x, y)))["0"]
    w, b = model[0].weight.detach(), model[0].bias.detach()
    err = torch.softmax(x @ w.T + b, dim=1) - F.one_hot(y, 3).float()  # dloss_n/dlogits, per example
    per_example = err[:, :, None] * x[:, None, :]  # [n, out, in]
    expected = 0.5 * per_example.square().mean(0) * w.square()
    torch.testing.assert_close(got, expected)


def test_a_plugin_criterion_model_and_timing_run_in_a_two_worker_sweep(tmp_path):
    """The documented Fisher criterion (from the YAML's `plugins:`, a path relative to the YAML), model and
    timing (from `--plugin my_models`, a module in the working directory) run through `benchkit sweep
    --workers 2`: every worker imports them itself, since it builds the configs it receives."""
    study = tmp_path / "study"
    study.mkdir()
    (study / "my_criterion.py").write_text(doc_examples()[0])
    (tmp_path / "my_models.py").write_text(doc_examples()[1] + textwrap.dedent("""\


        import os

        _run = TrainThenPrune.run


        def _run_and_say_where(self, ctx):  # which process ran the plugin timing
            model = _run(self, ctx)
            ctx.metrics["plugin_timing_pid"] = os.getpid()
            return model


        TrainThenPrune.run = _run_and_say_where
        """))
    sweep = study / "sweep.yaml"
    sweep.write_text(textwrap.dedent(f"""\
        experiment: plugins
        plugins: [./my_criterion.py]
        base:
          data: {{name: digits}}
          model: {{name: my_mlp, kwargs: {{hidden: 16}}}}
          train: {{epochs: 1, batch_size: 64, lr: 0.05}}
          prune: {{timing: train_then_prune, compression: 4, score_batch_size: 20}}
          output_dir: {tmp_path / 'runs'}
        grid:
          prune.criterion: [fisher, magnitude]
        """))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = cli("sweep", str(sweep), "--workers", "2", "--plugin", "my_models", "--tracking-uri", uri,
              "--no-plots", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 finished" in out.stdout
    mlflow.set_tracking_uri(uri)
    df = mlflow.search_runs(experiment_names=["plugins"])
    assert sorted(df["params.prune.criterion"]) == ["fisher", "magnitude"] and set(df["status"]) == {"FINISHED"}
    assert set(df["params.prune.timing"]) == {"train_then_prune"} and set(df["params.model.name"]) == {"my_mlp"}
    assert set(df["params.plugins"]) == {str([str(study / "my_criterion.py"), "my_models"])}
    assert (df["metrics.compression_ratio"] - 4).abs().max() < 1e-2
    pids = set(df["metrics.plugin_timing_pid"].astype(int))
    assert pids == set(df["tags.benchkit.pid"].astype(int)) and len(pids) == 2  # two workers, not the sweep
    assert df["metrics.test_acc1"].notna().all()


# --------------------------------------------------------------------------------------------- clashes
def test_a_name_defined_twice_is_refused_naming_both_origins(tmp_path):
    reg: Registry[int] = Registry("thing")
    reg.register("a", 1)
    assert reg.origin("a").module == __name__ and reg.origin("a").file == __file__
    reg.register("a", 2)  # the same code again (a re-run cell, a reload): not a clash
    assert reg.get("a") == 2
    other = tmp_path / "other_plugin.py"
    other.write_text("def register(reg):\n    reg.register('a', 3)\n")
    ns: dict = {"__name__": "other_plugin", "__file__": str(other)}
    exec(compile(other.read_text(), str(other), "exec"), ns)
    with pytest.raises(NameClashError) as e:
        ns["register"](reg)
    msg = str(e.value)
    assert f"other_plugin ({other})" in msg and f"{__name__} ({__file__})" in msg and reg.get("a") == 2


def test_a_plugin_reusing_a_built_in_name_or_another_plugins_is_refused_before_any_run(tmp_path):
    (tmp_path / "clash.py").write_text(textwrap.dedent("""\
        from benchkit.pruning.criteria import CRITERIA, Magnitude

        @CRITERIA.register("magnitude")
        class MyMagnitude(Magnitude):
            pass
        """))
    for name in ("one.py", "two.py"):
        (tmp_path / name).write_text("from benchkit.models import MODELS\nfrom benchkit.models.lenet import LeNet300\n"
                                     "MODELS.register('mine', LeNet300)\n")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("experiment: clash\nbase: {data: {name: digits}}\ngrid:\n  seed: [0]\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = cli("sweep", str(sweep), "--plugin", "./clash.py", "--tracking-uri", uri, "--dry-run", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "criterion 'magnitude' is defined twice" in out.stderr
    assert str(tmp_path / "clash.py") in out.stderr and "built-in, benchkit.pruning.criteria" in out.stderr
    out = cli("sweep", str(sweep), "--plugin", "one.py", "--plugin", "two.py", "--tracking-uri", uri, "--dry-run",
              cwd=tmp_path)
    assert out.returncode == 2 and "model 'mine' is defined twice" in out.stderr, out.stderr
    assert str(tmp_path / "one.py") in out.stderr and str(tmp_path / "two.py") in out.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_missing_or_broken_plugins_are_named(tmp_path):
    (tmp_path / "broken.py").write_text("x = 1\nraise RuntimeError('bad plugin')\n")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("experiment: broken\nplugins: [./broken.py]\nbase: {data: {name: digits}}\ngrid:\n  seed: [0]\n")
    out = cli("sweep", str(sweep), "--dry-run", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "plugins (line 2)" in out.stderr and f"{tmp_path / 'broken.py'} failed to import" in out.stderr
    assert "RuntimeError: bad plugin" in out.stderr and "broken.py:2" in out.stderr
    out = cli("sweep", str(sweep), "--dry-run", "--plugin", "no_such_plugin_module", cwd=tmp_path)
    assert out.returncode == 2 and "plugin module 'no_such_plugin_module' not found" in out.stderr, out.stderr


# --------------------------------------------------------------------------------------------- entry points
def test_an_installed_packages_entry_point_is_loaded_without_being_named(tmp_path):
    """A package declaring a `benchkit.plugins` entry point (here a dist-info folder on sys.path, as pip
    installs one) needs no `plugins:` line: its criterion is there in a sweep and in plain Python."""
    site = tmp_path / "site"
    (site / "fancy_pruning-1.0.dist-info").mkdir(parents=True)
    (site / "fancy_pruning-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: fancy-pruning\n"
                                                                   "Version: 1.0\n")
    (site / "fancy_pruning-1.0.dist-info" / "entry_points.txt").write_text(
        "[benchkit.plugins]\nfancy = fancy_pruning\n")
    (site / "fancy_pruning.py").write_text(textwrap.dedent("""\
        from benchkit.pruning.criteria import CRITERIA, Magnitude

        @CRITERIA.register("fancy")
        class Fancy(Magnitude):
            pass
        """))
    env = {"PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    code = ("from benchkit.pruning.criteria import CRITERIA\n"
            "print('fancy' in CRITERIA, CRITERIA.origin('fancy').module)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    assert out.stdout.split() == ["True", "fancy_pruning"], out.stderr
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("experiment: ep\nbase: {data: {name: digits}}\ngrid:\n  prune.criterion: [fancy, magnitude]\n")
    out = cli("sweep", str(sweep), "--dry-run", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", cwd=tmp_path,
              env=env)
    assert out.returncode == 0, out.stderr
    assert "2 new" in out.stdout and "prune.criterion=fancy" in out.stdout
