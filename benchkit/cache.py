"""Dense models are trained once and reused: a post-training sweep over 30 pruning configs shares
one dense network.

An entry is keyed by a hash of everything that determines the trained weights (data, model and
training configs, seed, determinism, device type, and :data:`TRAINER_VERSION`). The key material
is stored inside the entry and compared on load, so a hash collision or a stale entry is retrained,
never served. Writers hold a per-key file lock (a second run with the same key waits, then hits)
and write to a temporary file that :func:`os.replace` moves into place atomically.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from benchkit.config import NON_SEMANTIC_KEYS, ExperimentConfig, stable_hash

# Bump when training or evaluation code changes the numbers it produces: old entries become misses.
TRAINER_VERSION = 1
CACHE_FORMAT = 1


def cache_root(cfg: ExperimentConfig) -> Path:
    """``cfg.cache_dir``, else ``$BENCHKIT_CACHE``, else ``~/.cache/benchkit``."""
    root = cfg.cache_dir or os.environ.get("BENCHKIT_CACHE") or Path.home() / ".cache" / "benchkit"
    return Path(root).expanduser()


def dense_key_material(cfg: ExperimentConfig, device_type: str) -> dict[str, Any]:
    """Everything that determines a dense model's weights (and nothing that does not)."""

    def section(name: str) -> dict[str, Any]:
        values = dataclasses.asdict(getattr(cfg, name))
        return {k: v for k, v in values.items() if f"{name}.{k}" not in NON_SEMANTIC_KEYS}

    return {
        "data": section("data"),
        "model": section("model"),
        "train": section("train"),
        "seed": cfg.seed,
        "deterministic": cfg.deterministic,
        "device_type": device_type,
        "trainer_version": TRAINER_VERSION,
        "training_module_version": _training_module_version(),
        "format": CACHE_FORMAT,
    }


def _training_module_version() -> Any:
    """``benchkit.training.TRAINER_VERSION`` if the trainer declares one (bumped by its owner)."""
    from benchkit import training

    return getattr(training, "TRAINER_VERSION", None)


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
