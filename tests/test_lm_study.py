"""The language-model studies (issue 18.5): best-checkpoint selection by validation loss for a language model,
the study sweep files (what they expand to, and that the pruning and head studies share their dense models),
and the character LM in the deploy study."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from benchkit.cache import dense_key_material
from benchkit.config import DataConfig, ModelConfig, TrainConfig
from benchkit.data import load_data
from benchkit.deployment.study import STUDY_MODELS, run_study
from benchkit.models import build_model
from benchkit.sweep import expand, load_sweep
from benchkit.tasks import Classification, LanguageModel
from benchkit.timing.base import BestAfter
from benchkit.training import train
from benchkit.validation import load_config

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def lm_data(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for stem, text in {"a": "To be or not to be, that is the question.\n" * 40, "b": "Now is the winter.\n" * 20,
                       "c": "Friends, Romans, countrymen.\n" * 20}.items():
        (folder / f"{stem}.txt").write_text(text)
    cfg = DataConfig(name="text", root=str(folder), val_works=["b"], test_works=["c"], context=16)
    return load_data(cfg, batch_size=4, eval_batch_size=8, seed=0)


def test_a_language_model_keeps_the_checkpoint_with_the_lowest_validation_loss(lm_data, monkeypatch):
    # scripted validations: loss is lowest at the second, top-1 highest at the third (the last)
    script = iter([{"loss": 2.0, "acc1": 0.2}, {"loss": 1.5, "acc1": 0.1}, {"loss": 1.8, "acc1": 0.3}])
    monkeypatch.setattr(LanguageModel, "evaluate", lambda self, model, loader, device="auto": {**next(script),
                                                                                               "acc5": 0.5})
    states = {}

    class Snapshot:
        def on_eval(self, step, record):
            states[step] = copy.deepcopy(model.state_dict())

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="gpt", kwargs={"n_layer": 1, "n_embd": 16, "n_head": 2}), lm_data)
    h = train(model, lm_data, TrainConfig(optimizer="adamw", lr=1e-2, iterations=9, eval_every=3), device="cpu",
              callbacks=[Snapshot()])
    assert h.selected_by == "val_loss" and h.best_step == 6 and h.best_selection == 1.5 and h.best_val_acc1 == 0.1
    assert h.restored_best and all(torch.equal(v, states[6][k]) for k, v in model.state_dict().items())


def test_best_after_follows_the_task_selection():
    records = [(10, {"val_loss": 2.0, "val_acc1": 0.2}), (20, {"val_loss": 1.5, "val_acc1": 0.1}),
               (30, {"val_loss": 1.8, "val_acc1": 0.3})]
    model = torch.nn.Linear(2, 2)
    for task, expected in ((LanguageModel(), 20), (Classification(), 30), (None, 30)):
        best = BestAfter(model, 0, task)
        for step, record in records:
            best.on_eval(step, record)
        assert best.best_step == expected
    best = BestAfter(model, 25, LanguageModel())  # only evaluations at or after step 25 count
    for step, record in records:
        best.on_eval(step, record)
    assert best.best_step == 30


# ------------------------------------------------------------------------------------------- the sweep files
def plan(name: str, *overrides: str) -> list:
    return [e for e in expand(load_sweep(REPO / "experiments" / name, list(overrides))) if e.status == "new"]


def test_lm_pruning_sweep_expands_to_the_study():
    runs = plan("lm_pruning.yaml", "seed=0")  # the seed axis pinned: one of the three seeds
    assert len(runs) == 49  # dense, 4 methods x (4 unstructured x 2 allocations + 2 N:M) + 8 fine-tuned
    cfgs = [e.config for e in runs]
    dense = [c for c in cfgs if c.prune.sparsity == 0.0]
    assert len(dense) == 1
    methods = {(c.prune.criterion, c.prune.comparison) for c in cfgs}
    assert methods == {("magnitude", "layer"), ("magnitude", "row"), ("wanda", "row"), ("sparsegpt", "row")}
    tuned = [c for c in cfgs if c.prune.post.finetune.iterations]
    assert {(c.prune.granularity, c.prune.sparsity) for c in tuned} == {("element", 0.5), ("2:4", None)}
    assert all(c.prune.allocation == "uniform" for c in cfgs if c.prune.granularity != "element")
    assert all(c.prune.exclude == ["lm_head"] for c in cfgs)
    assert {c.train.iterations for c in cfgs} == {2500} and cfgs[0].model.kwargs["n_embd"] == 128


def test_lm_heads_sweep_times_heads_and_neurons_and_shares_the_dense_models():
    runs = plan("lm_heads.yaml")
    assert len(runs) == 39
    assert all(e.config.latency.enabled for e in runs)
    assert {e.config.prune.granularity for e in runs} == {"element", "head", "neuron"}
    pruning = {s: load_config(REPO / "experiments" / "lm_pruning.yaml", [f"seed={s}"]) for s in (0, 1, 2)}
    for e in runs:  # the same dense model per seed: trained once for both studies
        assert dense_key_material(e.config, "cpu") == dense_key_material(pruning[e.config.seed], "cpu")


def test_vit_pruning_sweep_expands_to_the_study():
    runs = plan("vit_pruning.yaml")
    assert len(runs) == 39  # 13 per seed: dense, 4 methods x (50%, 70%, 2:4)
    assert {e.config.model.name for e in runs} == {"vit"}
    assert all(e.config.prune.exclude == ["patch_embed", "head"] for e in runs)


# ------------------------------------------------------------------------------------------- deploy study
def test_the_character_lm_is_in_the_deploy_study_with_heads_and_neurons():
    assert "charlm" in STUDY_MODELS
    df = run_study(["charlm"], granularities=["head", "neuron"], sparsities=[0.5, 0.9], batches=[1],
                   kernels=("csr",), warmup=0, repeats=1, progress=None)
    assert sorted(zip(df["granularity"], df["target_sparsity"])) == [("head", 0.5), ("neuron", 0.5), ("neuron", 0.9)]
    # 90% of 4 heads would leave an attention without any: no row. Compaction removes what the masks kill:
    # head 50% -> q/k/v/out halve (a third of the blocks' weights); neuron 50% -> fc/proj halve (two thirds)
    by = df.set_index(["granularity", "target_sparsity"])["theoretical_compacted"]
    assert by[("head", 0.5)] > 1 and by[("neuron", 0.5)] > by[("head", 0.5)]


def test_a_model_without_heads_says_so_once_not_once_per_sparsity():
    said: list[str] = []
    df = run_study(["lenet300"], granularities=["head"], sparsities=[0.5, 0.7, 0.9], batches=[1],
                   kernels=("csr",), warmup=0, repeats=1, progress=said.append)
    assert df.empty
    assert len(said) == 1 and "lenet300 head 0.5: not measured" in said[0]
