"""The dense-cache key covers the source the dense path runs, and nothing else: edits to the training loop,
data, models or the dense methods of the run context change it; edits to masked training, pruning or other
timings do not (they would otherwise retrain every cached dense model)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from benchkit import cache
from benchkit.config import ExperimentConfig
from benchkit.data import load_data
from benchkit.seeding import resolve_device
from benchkit.timing.base import RunContext

# What the dense path calls that is deliberately outside the key, with the reason.
EXEMPT = {
    "masked_training.py": "acts only on masks: a no-op without them (tests/test_training.py checks it)",
    "pruning/masks.py:get_masks": "acts only on masks: {} without them",
    "registry.py": "name lookup; what it returns (optimisers in training.py, models/) is hashed",
    "progress.py": "terminal display",
    "timing/base.py:RunContext.clock": "wall-clock accounting",
}


@pytest.fixture
def package(tmp_path) -> Path:
    """A copy of the benchkit package to edit."""
    root = tmp_path / "benchkit"
    shutil.copytree(cache.PACKAGE_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def edit(root: Path, relative: str, old: str, new: str) -> None:
    path = root / relative
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} not found once in {relative}"
    path.write_text(text.replace(old, new))


def key(root: Path) -> str:
    return cache.source_hash(cache.dense_sources(root))


def test_a_copy_of_the_package_hashes_like_the_package(package):
    assert key(package) == cache.dense_source_hash()


@pytest.mark.parametrize("relative, old, new", [
    ("masked_training.py", "        orig.mul_(mask)", "        orig.mul_(mask)  # edited"),
    ("masked_training.py", "def zero_pruned(", "def helper():\n    pass\n\n\ndef zero_pruned("),
    ("pruning/masks.py", "def apply_masks(", "def apply_masks(  # edited\n"),
    ("pruning/engine.py", "from __future__ import annotations", "from __future__ import annotations  # edited"),
    ("timing/base.py", "    def prune(self, model", "    def prune(self,  model"),  # a method the dense path skips
    ("timing/during.py", "from __future__ import annotations", "from __future__ import annotations  # edited"),
    ("metrics.py", "from __future__ import annotations", "from __future__ import annotations  # edited"),
])
def test_editing_code_off_the_dense_path_keeps_the_key(package, relative, old, new):
    before = key(package)
    edit(package, relative, old, new)
    assert key(package) == before


@pytest.mark.parametrize("relative, old, new", [
    ("training.py", "                opt.step()\n", "                opt.step()  # edited\n"),
    ("training.py", "def default_loss(", "def default_loss(  # edited\n"),
    ("data.py", "from __future__ import annotations", "from __future__ import annotations  # edited"),
    ("models/lenet.py", "from __future__ import annotations", "from __future__ import annotations  # edited"),
    ("timing/base.py", "        self.reseed(phase)\n", "        self.reseed(phase)  # edited\n"),
    ("timing/base.py", "class CaptureWeights:", "@dataclass\nclass CaptureWeights:"),  # decorators count
    ("pruning/masks.py", "        if key.endswith(\"_mask\"):\n            continue\n",
     "        if key.endswith(\"_mask\"):\n            continue  # edited\n"),
])
def test_editing_the_dense_path_changes_the_key(package, relative, old, new):
    before = key(package)
    edit(package, relative, old, new)
    assert key(package) != before


def test_a_dense_source_entry_that_no_longer_exists_is_named(package, monkeypatch):
    monkeypatch.setattr(cache, "DENSE_SOURCE", (*cache.DENSE_SOURCE, "timing/base.py:RunContext.gone"))
    with pytest.raises(LookupError, match=r"'timing/base.py:RunContext.gone'.*update the list"):
        cache.dense_sources(package)


def covered(file: str, qualname: str) -> bool:
    """Whether ``qualname`` in ``file`` is hashed (its module, folder, or it or an enclosing definition) or
    exempt."""
    for entry in (*cache.DENSE_SOURCE, *EXEMPT):
        path, _, name = entry.partition(":")
        if path.endswith("/") and file.startswith(path) or path == file and (
                not name or qualname == name or qualname.startswith(name + ".")):
            return True
    return False


@pytest.mark.parametrize("overrides", [
    {},
    {"train.iterations": 12, "train.eval_every": 4, "train.optimizer": "adam", "train.schedule": "cosine"},
])
def test_every_benchkit_function_a_dense_training_runs_is_hashed_or_exempt(overrides):
    """Trace a dense training (RunContext.dense with a rewind checkpoint, no cache): each benchkit function it
    calls must be in DENSE_SOURCE or in EXEMPT here, so code that joins the dense path joins the key."""
    d = {"data": {"name": "digits"}, "model": {"name": "lenet300", "kwargs": {"hidden": [32, 16]}},
         "train": {"epochs": 1, "lr": 0.05, "batch_size": 64}, "progress": False}
    cfg = ExperimentConfig.from_dict(d, overrides)
    data = load_data(cfg.data, cfg.train.batch_size, cfg.train.eval_batch_size, cfg.seed)
    ctx = RunContext(cfg=cfg, data=data, device=resolve_device("cpu"), cache=None)
    root = str(cache.PACKAGE_ROOT) + "/"
    seen: set[tuple[str, str]] = set()

    def profile(frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_filename.startswith(root):
            seen.add((code.co_filename[len(root):], code.co_qualname))

    sys.setprofile(profile)
    try:
        ctx.dense(capture_steps=[3])
    finally:
        sys.setprofile(None)
    assert ("training.py", "train") in seen and ("timing/base.py", "RunContext.fit") in seen
    assert [f"{file}:{name}" for file, name in sorted(seen) if not covered(file, name)] == []
