"""One-off migration of the committed store (run once in round 2): give the runs of round 1's studies the
config hash today's code computes for their configs, keeping the old one in the tag
``benchkit.config_hash_round1``. Round 2 moved keys (prune.scope -> prune.allocation, prune.finetune ->
prune.post.finetune, ...) and hashes only the active timing's section, so every hash changed although the
runs' numbers did not (same masks, same training); without this, re-running a study's sweep would redo all its
runs. Each config is read from the run's own config.yaml artifact (old keys translated).

    .venv/bin/python experiments/migrate_round1_hashes.py sqlite:///results/studies/mlflow.db \
        fashion-lenet300 strategies strategies-lenet5 lottery iterative timing

Not for the granularity studies: channel pruning now keeps the output layer's classes and global group
ranking is normalised per layer, so today's code would not reproduce their runs; their committed results stay
round 1's, and re-running their sweeps redoes them (the difference then explained in results/README.md)."""
import sys
import warnings
from pathlib import Path

import yaml
from mlflow import MlflowClient

import benchkit.timing  # noqa: F401
from benchkit.config import ExperimentConfig

warnings.simplefilter("ignore", FutureWarning)
uri = sys.argv[1]
experiments = sys.argv[2:]
client = MlflowClient(uri)
store_dir = Path(uri.removeprefix("sqlite:///")).parent
for name in experiments:
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=10000)
    changed = same = 0
    for run in runs:
        art = Path(run.info.artifact_uri.removeprefix("file://"))
        cand = [art / "config.yaml"] + list(store_dir.glob(f"mlartifacts/*/{run.info.run_id}/artifacts/config.yaml"))
        path = next((p for p in cand if p.exists()), None)
        if path is None:
            print("no config for", name, run.info.run_id)
            continue
        cfg = ExperimentConfig.from_dict(yaml.safe_load(path.read_text()))
        new = cfg.config_hash()
        old = run.data.tags.get("benchkit.config_hash")
        if old != new:
            client.set_tag(run.info.run_id, "benchkit.config_hash", new)
            client.set_tag(run.info.run_id, "benchkit.config_hash_round1", old)
            changed += 1
        else:
            same += 1
    print(f"{name}: {len(runs)} runs, {changed} re-hashed, {same} unchanged")
