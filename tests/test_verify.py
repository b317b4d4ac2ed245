"""Reproduction cards against the committed study store (what CI re-checks): every claim of every card holds or is
a known difference with its reason, and results/README.md's agree/differ text is what the cards generate. Then the
command itself on fake stores: exit status, KNOWN, pending studies, and the levels/layers sources."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_runs import LOTTERY, SWEEP, build_store, log_fake_runs

from benchkit.cli import main
from benchkit.verify import (
    ERROR,
    FAIL,
    KNOWN,
    PASS,
    XPASS,
    StudyData,
    find_cards,
    load_card,
    read_blocks,
    verify_card,
)
from benchkit.verify.report import WAIT, markdown

REPO = Path(__file__).resolve().parents[1]
STORE = REPO / "results" / "studies" / "mlflow.db"
CARDS = find_cards(REPO / "experiments")


@pytest.fixture(scope="module")
def committed():
    """Every card evaluated once on the committed store (reading it takes seconds)."""
    if not STORE.exists():
        pytest.skip("no committed study store")
    return {p.name: verify_card(load_card(p), f"sqlite:///{STORE}") for p in CARDS}


def test_every_study_has_a_card():
    studies = {p.stem for p in (REPO / "experiments").glob("*.yaml") if not p.name.endswith(".card.yaml")}
    cards = {p.name.removesuffix(".card.yaml") for p in CARDS}
    assert studies - {"quickstart"} <= cards, f"studies without a card: {sorted(studies - {'quickstart'} - cards)}"
    for path in CARDS:
        card = load_card(path)
        assert card.sweep and (path.parent / card.sweep).exists(), f"{path.name}: sweep {card.sweep!r} not found"


@pytest.mark.parametrize("path", CARDS, ids=lambda p: p.name.removesuffix(".card.yaml"))
def test_every_claim_holds_or_is_a_known_difference(committed, path):
    result = committed[path.name]
    if result.pending:
        assert result.card.pending, f"{path.name}: experiment {result.card.experiment!r} not in the store"
        return
    bad = [f"{o.status} {o.claim.id}: {o.error or '; '.join(c.text for c in o.checks if not c.ok)}"
           for o in result.outcomes if o.status in (FAIL, ERROR, XPASS)]
    assert not bad, f"{path.name} against {STORE}:\n  " + "\n  ".join(bad)
    # a study still running (its card pending, some runs in) may have claims waiting for their runs
    allowed = (PASS, KNOWN, WAIT) if result.in_progress else (PASS, KNOWN)
    assert all(o.status in allowed for o in result.outcomes)
    assert all(o.claim.known_difference for o in result.outcomes if o.status == KNOWN)


def test_the_readme_text_is_what_the_cards_generate(committed):
    readme = REPO / "results" / "README.md"
    blocks = read_blocks(readme.read_text())
    for result in committed.values():
        card = result.card.name
        assert card in blocks, f"results/README.md has no <!-- verify:{card} --> block"
        assert blocks[card] == markdown(result, readme.parent), (
            f"results/README.md's block for {card} is not what its card generates: run "
            "`benchkit verify --all --markdown --write results/README.md`")


# --------------------------------------------------------------------------------------------- on fake stores
CARD = """experiment: {experiment}
title: fake
paper: nobody
sweep: fake.yaml
defaults: {{metric: test_acc1, scale: 100, unit: "%"}}
claims:
{claims}
"""


def write_card(folder: Path, name: str, experiment: str, claims: str, **extra: str) -> Path:
    text = CARD.format(experiment=experiment, claims=claims)
    text += "".join(f"{k}: {v}\n" for k, v in extra.items())
    path = folder / f"{name}.card.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake")
    return build_store(root)


def test_exit_status_follows_the_claims(fake, tmp_path, capsys):
    write_card(tmp_path, "good", SWEEP, "  - {id: g, says: Global magnitude beats random, kind: ordering, "
                                        "a: {criterion: magnitude, allocation: global}, "
                                        "b: {criterion: random, allocation: global}, at: [2, 4, 8]}")
    # magnitude·uniform is behind magnitude·global in the fake runs (DROP 0.02 vs 0.01): this claim fails
    bad = ("  - {id: b, says: Uniform beats global, kind: ordering, a: {criterion: magnitude, allocation: uniform}, "
           "b: {criterion: magnitude, allocation: global}, at: [8]")
    write_card(tmp_path, "bad", SWEEP, bad + "}")
    write_card(tmp_path, "known", SWEEP, bad + ", known_difference: short fine-tuning}")
    args = ["verify", "--cards", str(tmp_path), "--tracking-uri", fake.uri]
    assert main([*args, "good"]) == 0
    assert "PASS   g: Global magnitude beats random" in capsys.readouterr().out
    assert main([*args, "bad"]) == 1
    out = capsys.readouterr().out
    assert "FAIL   b: Uniform beats global" in out and "NO  8×: magnitude · uniform" in out
    assert main([*args, "known"]) == 0
    out = capsys.readouterr().out
    assert "KNOWN  b: Uniform beats global" in out and "known difference: short fine-tuning" in out
    assert main([*args, "--all"]) == 1  # bad fails
    assert main([*args, "nonexistent"]) == 2
    assert "no card for 'nonexistent'" in capsys.readouterr().err


def test_markdown_write_refuses_a_failing_card(fake, tmp_path, capsys):
    write_card(tmp_path, "bad", SWEEP, "  - {id: b, says: Uniform beats global, kind: ordering, "
                                       "a: {criterion: magnitude, allocation: uniform}, "
                                       "b: {criterion: magnitude, allocation: global}, at: [8]}")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- verify:bad -->\n<!-- /verify:bad -->\n")
    assert main(["verify", "bad", "--cards", str(tmp_path), "--tracking-uri", fake.uri, "--markdown",
                 "--write", str(readme)]) == 2
    assert "is FAIL" in capsys.readouterr().err and readme.read_text().count("\n") == 2


def test_a_pending_card_is_reported_until_its_runs_exist(fake, tmp_path, capsys):
    claims = "  - {id: p, says: Something holds, kind: threshold, min: 0, at: [2]}"
    path = write_card(tmp_path, "later", "not-yet", claims, pending="set up, not run")
    assert main(["verify", "later", "--cards", str(tmp_path), "--tracking-uri", fake.uri]) == 0
    out = capsys.readouterr().out
    assert "PENDING  no finished run of 'not-yet'" in out and "to check: p: Something holds" in out
    assert "Not run yet: set up, not run." in markdown(verify_card(load_card(path), fake.uri))
    # once some runs are there, the study is in progress: the claims whose runs exist are checked, the others
    # wait (not failed), and the README text says which and why
    waits = claims + "\n  - {id: w, says: Later holds, kind: threshold, min: 0, at: [8]}"
    path = write_card(tmp_path, "later", "not-yet", waits, pending="set up, 4 runs planned")
    log_fake_runs(fake.uri, "not-yet", [({"prune.compression": 2.0, "seed": s}, {"test_acc1": 0.5}) for s in (0, 1)])
    assert main(["verify", "later", "--cards", str(tmp_path), "--tracking-uri", fake.uri]) == 0
    out = capsys.readouterr().out
    assert "IN PROGRESS  2 finished runs so far" in out and "PASS   p: Something holds" in out
    assert "WAIT   w: Later holds" in out and "no compression near 8" in out
    text = markdown(verify_card(load_card(path), fake.uri))
    assert "In progress: 2 runs have finished so far (set up, 4 runs planned)" in text
    assert "Waiting for runs:\n- Later holds — " in text and "- Something holds — " in text
    # a card no longer pending: a missing point is an error again
    path.write_text(path.read_text().replace("pending:", "# pending:"))
    assert main(["verify", "later", "--cards", str(tmp_path), "--tracking-uri", fake.uri]) == 1
    assert "ERROR  w: Later holds" in capsys.readouterr().out
    # without `pending`, a missing experiment is an error
    write_card(tmp_path, "missing", "never", claims)
    assert main(["verify", "missing", "--cards", str(tmp_path), "--tracking-uri", fake.uri]) == 1
    assert "no MLflow experiment named 'never'" in capsys.readouterr().out


def test_levels_and_layers_come_from_the_runs_artifacts(fake):
    from fake_runs import LAYERS, density, lottery_acc, lottery_percent

    levels = StudyData(LOTTERY, fake.uri).frame("levels")
    ticket = levels[(levels.branch == "ticket") & (levels.seed == 1)].sort_values("level")
    assert ticket["percent_remaining"].tolist() == pytest.approx([lottery_percent(k) for k in range(4)])
    assert ticket["test_acc1"].tolist() == pytest.approx([lottery_acc("ticket", k, 1) for k in range(4)])
    assert set(levels["branch"]) == {"ticket", "reinit", "random"}
    layers = StudyData(SWEEP, fake.uri).frame("layers")
    rows = layers[(layers.criterion == "magnitude") & (layers.allocation == "uniform") & (layers.compression == 4.0)
                  & (layers.seed == 0)]
    assert rows["layer"].tolist() == [n for n, _ in LAYERS]
    assert rows["density"].tolist() == pytest.approx([density(i, 4.0) for i in range(len(LAYERS))])
    assert set(StudyData(SWEEP, fake.uri).runs["allocation"]) == {"global", "uniform"}


def test_runs_logged_under_the_old_names_read_as_todays():
    """The committed store's runs say prune.scope = layer, prune.finetune.epochs, prune.schedule.start."""
    import pandas as pd

    from benchkit.verify import current_names

    old = pd.DataFrame({"scope": ["global", "layer"], "prune.scope": ["global", "layer"],
                        "prune.finetune.epochs": [3, 3], "prune.schedule.start": [0.0, 0.1], "prune.rounds": [1, 2],
                        "prune.criterion": ["magnitude", "random"]})
    new = current_names(old)
    assert new["allocation"].tolist() == ["global", "uniform"]
    assert new["prune.allocation"].tolist() == ["global", "uniform"]
    assert new["prune.post.finetune.epochs"].tolist() == [3, 3] and new["prune.post.rounds"].tolist() == [1, 2]
    assert new["prune.during.start"].tolist() == [0.0, 0.1] and new["prune.criterion"].tolist() == ["magnitude", "random"]
    assert not {"scope", "prune.scope", "prune.finetune.epochs", "prune.schedule.start", "prune.rounds"} & set(new)


def test_levels_skip_runs_that_have_none(fake):
    """A static sparse run makes no mask update, so it writes no levels.csv: the levels rows of its study are the
    other runs', not an error; a study where no run has levels still is one."""
    from fake_runs import _layers, _result, _start, log_fake_runs

    from benchkit.config import ExperimentConfig
    from benchkit.tracking import Tracker

    experiment = "fake-dynamic"
    base = {"experiment": experiment, "data": {"name": "digits"}, "model": {"name": "lenet300"}, "progress": False,
            "prune": {"timing": "dynamic", "sparsity": 0.9}}
    (static,) = log_fake_runs(fake.uri, experiment, [({"prune.dynamic.method": "static", "seed": 0},
                                                      {"test_acc1": 0.5})], base={"prune": base["prune"]})
    with pytest.raises(ValueError, match="no run of 'fake-dynamic' has a levels.csv"):
        StudyData(experiment, fake.uri).frame("levels")
    tracker = Tracker(fake.uri)
    cfg = ExperimentConfig.from_dict(base, {"prune.dynamic.method": "rigl", "seed": 0})
    rows = [{"update": k, "step": 100 * k, "drop_fraction": 0.3 / k, "sparsity": 0.9} for k in (1, 2)]
    run_id = _start(tracker, tracker.ensure_experiment(experiment), cfg, experiment)
    tracker.log_result(run_id, _result(cfg, {"test_acc1": 0.6}, [], _layers(10.0), rows), plots=False, model=False)
    tracker.end_run(run_id)
    levels = StudyData(experiment, fake.uri).frame("levels")
    assert levels["run_id"].tolist() == [run_id, run_id] and static not in set(levels["run_id"])
    assert levels["step"].tolist() == [100, 200] and set(levels["branch"]) == {"main"}
    assert set(levels["prune.dynamic.method"]) == {"rigl"}
