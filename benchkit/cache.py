"""Dense models are trained once and reused: a post-training sweep over 30 pruning configs shares
one dense network.

An entry is keyed by a hash of everything that determines the trained weights (data, model and
training configs, seed, determinism, device type, torch threads, a hash of the source the dense path
runs (:data:`DENSE_SOURCE`, :func:`dense_source_hash`) and :data:`TRAINER_VERSION`). The key material
is stored inside the entry and compared on load, so a hash collision or a stale entry is retrained,
never served. Writers hold a per-key file lock (a second run with the same key waits, then hits)
and write to a temporary file that :func:`os.replace` moves into place atomically.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from benchkit.config import ExperimentConfig, non_semantic_keys, root_is_dataset, stable_hash

# Code changes in DENSE_SOURCE invalidate entries by themselves (their source is hashed into the key).
# Bump this for changes elsewhere that alter a dense model's numbers.
TRAINER_VERSION = 1
CACHE_FORMAT = 1

# The source the dense path runs (experiment -> RunContext.dense -> build_model / fit / train / evaluate, the
# data pipeline, seeding, plain_state_dict), as paths relative to the package: a module or package folder is
# hashed whole, ``file:Qual.name`` hashes one function or class of a module that holds more. Left out on
# purpose: code that acts only on masks (benchkit/masked_training.py, get_masks), which the dense path calls
# but which does nothing without masks (tests/test_training.py checks it), so editing masked training or
# pruning never retrains cached dense models. tests/test_cache.py traces a dense training and fails on any
# benchkit function it runs that is neither listed here nor exempt.
DENSE_SOURCE = (
    "training.py", "tasks.py", "data.py", "textdata.py", "seeding.py", "models/",
    "timing/base.py:RunContext.build_model", "timing/base.py:RunContext.fit", "timing/base.py:RunContext.reseed",
    "timing/base.py:RunContext.evaluate", "timing/base.py:RunContext.evaluate_splits",
    "timing/base.py:RunContext.dense", "timing/base.py:phase_seed", "timing/base.py:CaptureWeights",
    "timing/base.py:_state_fingerprint",
    "pruning/masks.py:plain_state_dict", "config.py:stable_hash",
)
PACKAGE_ROOT = Path(__file__).resolve().parent


def cache_root(cfg: ExperimentConfig) -> Path:
    """``cfg.cache_dir``, else ``$BENCHKIT_CACHE``, else ``~/.cache/benchkit``."""
    root = cfg.cache_dir or os.environ.get("BENCHKIT_CACHE") or Path.home() / ".cache" / "benchkit"
    return Path(root).expanduser()


def dense_key_material(cfg: ExperimentConfig, device_type: str) -> dict[str, Any]:
    """Everything that determines a dense model's weights (and nothing that does not)."""

    skip = non_semantic_keys(cfg)

    def section(name: str) -> dict[str, Any]:
        values = dataclasses.asdict(getattr(cfg, name))
        return {k: v for k, v in values.items() if f"{name}.{k}" not in skip}

    data = section("data")
    if root_is_dataset(cfg.data.name):
        # The folder is the dataset: with data.root unset it comes from $BENCHKIT_DATA or the user cache,
        # so the written root alone would let a model trained on one folder be served for another; and
        # files changed inside it make another dataset under the same path.
        from benchkit.data import folder_identity

        data.update(folder_identity(cfg.data))
    return {
        "data": data,
        "model": section("model"),
        "train": section("train"),
        "seed": cfg.seed,
        "deterministic": cfg.deterministic,
        "device_type": device_type,
        # CPU numerics (reductions, matmuls) may depend on the thread count; None: torch's current count
        "threads": cfg.threads or torch.get_num_threads(),
        "trainer_version": TRAINER_VERSION,
        "source": dense_source_hash(),
        "torch": torch.__version__,  # kernels and initialisers change between releases
        # the data itself: torchvision's readers and transforms, scikit-learn's digits and its split
        "data_packages": {name: _version(name) for name in ("torchvision", "scikit-learn")},
        "format": CACHE_FORMAT,
    }


def _version(distribution: str) -> str | None:
    """Installed version of a distribution (read from its metadata: nothing is imported), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def dense_sources(root: Path = PACKAGE_ROOT) -> dict[str, str]:
    """``{label: source text}`` of every :data:`DENSE_SOURCE` entry under the package folder ``root`` (files
    are parsed, not imported, so a copy of the package can be hashed too)."""
    out: dict[str, str] = {}
    for entry in DENSE_SOURCE:
        path, _, qualname = entry.partition(":")
        target = root / path
        if target.is_dir():
            for file in sorted(target.glob("*.py")):
                out[file.relative_to(root).as_posix()] = file.read_text()
        elif qualname:
            out[entry] = _definition(target, qualname, entry)
        else:
            out[path] = target.read_text()
    return out


def _definition(file: Path, qualname: str, entry: str) -> str:
    """The source lines of ``qualname`` (decorators included) in ``file``."""
    text = file.read_text()
    body: list[ast.stmt] = ast.parse(text).body
    node: ast.AST | None = None
    for part in qualname.split("."):
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            raise LookupError(f"benchkit/cache.py DENSE_SOURCE names {entry!r}, which {file.name} does not define: "
                              "update the list to what the dense path runs now")
        body = node.body
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    return "\n".join(text.splitlines()[first - 1: node.end_lineno])


def source_hash(sources: dict[str, str]) -> str:
    h = hashlib.sha256()
    for label in sorted(sources):
        h.update(label.encode() + b"\0" + sources[label].encode() + b"\0")
    return h.hexdigest()[:16]


@functools.cache
def dense_source_hash() -> str:
    """:func:`source_hash` of the installed package's :func:`dense_sources`, read once per process: editing
    any of them makes every earlier entry a miss."""
    return source_hash(dense_sources())


@dataclass
class DenseEntry:
    """A trained dense model: plain state dict, its History (as a dict), its val/test metrics, and
    optional weight checkpoints after given training steps (lottery rewind points)."""

    state_dict: dict[str, torch.Tensor]
    history: dict[str, Any]
    metrics: dict[str, float]
    checkpoints: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    hit: bool = False
    key: str = ""


class DenseCache:
    """A folder of ``<key>.pt`` entries with ``<key>.lock`` file locks."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"dense-{key}.pt"

    def load(self, material: dict[str, Any]) -> DenseEntry | None:
        """The entry for ``material``, or None when missing, unreadable or built from other inputs."""
        key = stable_hash(material)
        path = self.path(key)
        if not path.exists():
            return None
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a truncated or foreign file is a miss, never an error
            return None
        if blob.get("material") != _normalise(material):
            return None
        return DenseEntry(state_dict=blob["state_dict"], history=blob["history"], metrics=blob["metrics"],
                          checkpoints={int(k): v for k, v in blob.get("checkpoints", {}).items()},
                          hit=True, key=key)

    def store(self, material: dict[str, Any], entry: DenseEntry) -> Path:
        key = stable_hash(material)
        self.root.mkdir(parents=True, exist_ok=True)
        blob = {
            "material": _normalise(material),
            "state_dict": {k: v.detach().cpu() for k, v in entry.state_dict.items()},
            "history": entry.history,
            "metrics": {k: float(v) for k, v in entry.metrics.items()},
            "checkpoints": {int(s): {k: v.detach().cpu() for k, v in sd.items()}
                            for s, sd in entry.checkpoints.items()},
        }
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".dense-{key}-", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(blob, tmp)
            os.replace(tmp, self.path(key))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return self.path(key)

    def get_or_create(self, material: dict[str, Any], create: Callable[[], DenseEntry],
                      usable: Callable[[DenseEntry], bool] = lambda e: True) -> DenseEntry:
        """Load the entry, or (under the key's lock, so concurrent runs train once) create and store
        it. An entry that is not ``usable`` (e.g. lacks a rewind checkpoint) is re-created; old
        checkpoints are kept (training is deterministic, so they remain valid)."""
        key = stable_hash(material)
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / f"dense-{key}.lock")):
            old = self.load(material)
            if old is not None and usable(old):
                return old
            entry = create()
            if old is not None:
                entry.checkpoints = {**old.checkpoints, **entry.checkpoints}
            entry.key, entry.hit = key, False
            self.store(material, entry)
            return entry


def _normalise(material: dict[str, Any]) -> Any:
    """The material as it reads back from disk (tuples → lists, keys → str), for comparison."""
    import json

    return json.loads(json.dumps(material, sort_keys=True, default=str))
