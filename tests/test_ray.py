"""`--executor ray` on a local Ray cluster, tracking into an `mlflow server` on 127.0.0.1 (sqlite
backend and artifact store in tmp), as a real cluster would with a shared tracking server."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

ray = pytest.importorskip("ray")
import mlflow  # noqa: E402

from benchkit.cli import main  # noqa: E402
from benchkit.validation import load_config  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server_and_ray(tmp_path):
    """An `mlflow server` on 127.0.0.1 and a 2-CPU local Ray, started side by side (both take a while)."""
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        for _ in range(240):
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail("mlflow server exited:\n" + (tmp_path / "server.log").read_text())
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not come up:\n" + (tmp_path / "server.log").read_text())
        yield url
    finally:
        ray.shutdown()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_ray_sweep_tracks_every_run_on_the_server(tmp_path, server_and_ray):
    """... and a plugin criterion named by the sweep file works in the Ray tasks, which import it themselves."""
    mlflow_server = server_and_ray
    (tmp_path / "ray_plugin.py").write_text(textwrap.dedent("""\
        from benchkit.pruning.criteria import CRITERIA, Magnitude

        @CRITERIA.register("ray_magnitude")
        class RayMagnitude(Magnitude):
            name = "ray_magnitude"
        """))
    p = tmp_path / "ray.yaml"
    p.write_text(textwrap.dedent(f"""\
        experiment: on-ray
        plugins: [./ray_plugin.py]
        base:
          data: {{name: digits}}
          model: {{name: lenet300}}
          train: {{epochs: 1, batch_size: 64, lr: 0.05}}
          prune: {{timing: post, finetune: {{epochs: 1, lr: 0.005}}}}
          output_dir: {tmp_path / 'runs'}
        grid:
          prune.criterion: [magnitude, ray_magnitude]
          prune.compression: [2, 4]
        """))
    args = ["sweep", str(p), "--executor", "ray", "--num-cpus", "1", "--tracking-uri", mlflow_server]
    assert main(args) == 0
    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("on-ray")
    runs = client.search_runs([exp.experiment_id])
    base = load_config(p)
    planned = {base.replace(prune__criterion=c, prune__compression=k).config_hash()
               for c in ("magnitude", "ray_magnitude") for k in (2, 4)}
    assert sorted(r.data.tags["benchkit.config_hash"] for r in runs) == sorted(planned)
    assert {r.info.status for r in runs} == {"FINISHED"}
    for r in runs:
        assert r.data.tags["benchkit.threads"] == "1"  # torch threads = the task's num_cpus
        assert r.data.metrics["compression_ratio"] == pytest.approx(float(r.data.params["prune.compression"]),
                                                                    rel=1e-3)
        # artifacts went through the server's proxy into its --artifacts-destination
        assert r.info.artifact_uri.startswith("mlflow-artifacts:")
        names = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"config.yaml", "layers.csv", "model.pt", "training_curve.svg"} <= names
    assert any((tmp_path / "server-artifacts").rglob("layers.csv"))
    # Ray tasks ran in worker processes, not in this driver
    assert len({r.data.tags["benchkit.pid"] for r in runs}) >= 1
    assert str(__import__("os").getpid()) not in {r.data.tags["benchkit.pid"] for r in runs}

    # resuming on Ray skips what is finished
    assert main(args) == 0
    assert len(client.search_runs([exp.experiment_id])) == 4
