"""Datasets: a registry of sources and one entry point, :func:`load_data`, that splits them the
way a pruning study needs.

Three splits, three roles:

* **train** — what the optimiser sees (shuffled by a generator seeded from the run's seed, so the
  data order is part of the seed);
* **val** — carved from the *official training set* with ``data.split_seed`` (fixed across runs and
  seeds), used for every selection: best epoch, early stopping, pruning decisions;
* **test** — the official test set, reported only. :func:`benchkit.training.train` never receives it.

Small image datasets are loaded into memory once as normalised tensors (a TensorDataset: one tensor
index per example instead of a PIL conversion per image); on a 2-core machine this is the difference
between data loading and training dominating an epoch. They are served by torch's own DataLoader.

Augmentation randomness is a function of (the training loader's generator, epoch, example), never of
``data.num_workers``: the training sampler (:class:`EpochSeededSampler`) draws one seed per epoch from
the loader's generator and hands it to the dataset with every index, and :class:`SeededAugmentation`
seeds each example's random transforms from (that epoch seed, the example's row). The generator is
seeded from the run seed, and reseeded per training phase, so the same seed gives the same pixels
with 0 or N workers, in the main process or in forked or spawned workers.

``text`` (a language-model corpus, :mod:`benchkit.textdata`) differs: its validation and test
splits are held-out whole works named in the config (``data.val_works``, ``data.test_works``), its
training batches are random windows of ``data.context`` tokens, and its evaluation loaders slide
over each held-out split with ``data.stride``. Its bundle has ``task="language_model"``,
``input_shape=(context,)`` and ``num_classes`` = the vocabulary size.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset

from benchkit import textdata
from benchkit.config import ConfigError, DataConfig
from benchkit.registry import Registry
from benchkit.seeding import make_generator


class DataNotFoundError(FileNotFoundError):
    """A dataset is not on disk (and could not be downloaded). Raised before any training."""

    repeats_for_every_run = True  # not the config's fault: a sweep stops rather than fail each run (benchkit.jobs)


# --------------------------------------------------------------------------------------------- containers
@dataclass
class Source:
    """A dataset's official training and test sets, before the validation split.

    ``train`` and ``train_eval`` hold the *same examples in the same order*; ``train`` carries the
    training augmentation, ``train_eval`` the evaluation transform (the validation split is drawn
    from ``train_eval`` so it is never augmented). Without augmentation they are the same object.

    ``augmented``: ``train`` applies random transforms (drawn from torch's global generator, as
    torchvision's do, or Python's ``random``); its loader then seeds them per example (see
    :class:`SeededAugmentation`). ``None``: augmented exactly when ``train`` is not ``train_eval``.
    """

    train: Dataset
    train_eval: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]
    augmented: bool | None = None

    @property
    def is_augmented(self) -> bool:
        return self.train is not self.train_eval if self.augmented is None else bool(self.augmented)


@dataclass
class DataBundle:
    """Loaders and facts about the data that models and metrics need."""

    train: Loader
    val: Loader | None  # None: no validation split (selection and early stopping are off)
    test: Loader
    num_classes: int  # language models: the vocabulary size
    in_channels: int  # text: 1 (token ids have no channels)
    input_shape: tuple[int, ...]  # (C, H, W) of one example; text: (context,)
    name: str
    sizes: dict[str, int] = field(default_factory=dict)  # examples per split (text: tokens)
    indices: dict[str, Tensor] = field(default_factory=dict)  # train/val rows of the official training set
    batch_size: int = 0
    task: str = "classification"  # benchkit.tasks: how a batch's loss and an evaluation are computed
    tokenizer: textdata.Tokenizer | None = None  # text only
    meta: dict[str, Any] = field(default_factory=dict)  # text: works per split, tokenizer, context, stride


DATASETS: Registry[Callable[[DataConfig], Source]] = Registry("dataset")

# (mean, std) per channel, computed on each official training set.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

SYNTHETIC_SEED = 0  # the synthetic dataset (inputs and teacher) is fixed; run seeds vary only the order


# --------------------------------------------------------------------------------------------- data roots
def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/benchkit/data``, else ``~/.cache/benchkit/data``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "benchkit" / "data"


def data_roots(cfg: DataConfig) -> list[Path]:
    """Where datasets are looked for, in order: ``data.root``, ``$BENCHKIT_DATA``, the user cache."""
    roots = [cfg.root, os.environ.get("BENCHKIT_DATA"), default_cache_dir()]
    out: list[Path] = []
    for r in roots:
        if r:
            p = Path(r).expanduser()
            if p not in out:
                out.append(p)
    return out


def _not_found(name: str, looked: Sequence[str], layout: str, download_error: str | None) -> str:
    lines = [f"dataset {name!r} not found. Looked in:"]
    lines += [f"  - {p}" for p in looked]
    lines.append(f"Expected layout under a data root: {layout}.")
    if download_error:
        lines.append(f"Download was attempted and failed: {download_error.strip()}")
    lines.append(
        "Fix: set the environment variable BENCHKIT_DATA (or data.root in the config) to the folder that "
        "contains it" + ("" if download_error else ", or set data.download: true when online") + "."
    )
    return "\n".join(lines)


def _torchvision_dataset(name: str, cls: type, cfg: DataConfig, layout: str) -> tuple[Dataset, Dataset]:
    """(train, test) of a torchvision dataset from the first data root that has it; download into the
    first root only when ``data.download`` is set. Every failure becomes one clear DataNotFoundError."""
    roots = data_roots(cfg)
    for root in roots:
        try:
            return cls(str(root), train=True, download=False), cls(str(root), train=False, download=False)
        except RuntimeError:  # torchvision: "Dataset not found [or corrupted]. You can use download=True"
            continue
    looked = [str(r) for r in roots]
    if not cfg.download:
        raise DataNotFoundError(_not_found(name, looked, layout, None))
    target = roots[0]
    try:
        target.mkdir(parents=True, exist_ok=True)
        return cls(str(target), train=True, download=True), cls(str(target), train=False, download=True)
    except (RuntimeError, OSError) as e:  # URLError is an OSError; torchvision wraps mirror failures
        raise DataNotFoundError(_not_found(name, looked, layout, f"{type(e).__name__}: {e}")) from e


# --------------------------------------------------------------------------------------------- datasets
def _normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 or [0, 1] images (N, C, H, W) → float32 standardised per channel."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x - m) / s


class AugmentedImages(Dataset):
    """uint8 images held in memory, augmented per example, then normalised: padding happens in pixel
    space (black borders, as torchvision's PIL pipeline does) before standardisation."""

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable[[Tensor], Tensor],
                 mean: Sequence[float], std: Sequence[float]):
        self.images, self.labels, self.transform = images, labels, transform
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.transform(self.images[i]).float() / 255.0
        return (x - self.mean) / self.std, self.labels[i]


def _grayscale_source(name: str, cls_name: str, cfg: DataConfig) -> Source:
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    layout = f"<root>/{cls_name}/raw/train-images-idx3-ubyte (torchvision layout)"
    train, test = _torchvision_dataset(name, cls, cfg, layout)
    mean, std = NORMALIZATION[name]
    tr = TensorDataset(_normalize(train.data.unsqueeze(1), mean, std), train.targets.long())
    te = TensorDataset(_normalize(test.data.unsqueeze(1), mean, std), test.targets.long())
    return Source(tr, tr, te, 10, (1, 28, 28))


@DATASETS.register("mnist")
def mnist(cfg: DataConfig) -> Source:
    """MNIST (LeCun et al. 1998), 60K/10K 28×28 grayscale."""
    return _grayscale_source("mnist", "MNIST", cfg)


@DATASETS.register("fashion-mnist")
def fashion_mnist(cfg: DataConfig) -> Source:
    """Fashion-MNIST (Xiao et al. 2017): MNIST's format and protocol, harder images."""
    return _grayscale_source("fashion-mnist", "FashionMNIST", cfg)


def _cifar_source(name: str, cls_name: str, folder: str, num_classes: int, cfg: DataConfig) -> Source:
    import torchvision
    from torchvision.transforms import v2

    cls = getattr(torchvision.datasets, cls_name)
    train, test = _torchvision_dataset(name, cls, cfg, f"<root>/{folder}/ (torchvision layout)")
    mean, std = NORMALIZATION[name]

    def images(ds) -> Tensor:
        return torch.as_tensor(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # NHWC → NCHW uint8

    x_train, y_train = images(train), torch.as_tensor(train.targets, dtype=torch.long)
    train_eval = TensorDataset(_normalize(x_train, mean, std), y_train)
    test_ds = TensorDataset(_normalize(images(test), mean, std), torch.as_tensor(test.targets, dtype=torch.long))
    if cfg.augment:  # the standard CIFAR augmentation (He et al. 2016): 4-pixel padded crop + flip
        augment = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])
        train_ds: Dataset = AugmentedImages(x_train, y_train, augment, mean, std)
    else:
        train_ds = train_eval
    return Source(train_ds, train_eval, test_ds, num_classes, (3, 32, 32))


@DATASETS.register("cifar10")
def cifar10(cfg: DataConfig) -> Source:
    """CIFAR-10 (Krizhevsky 2009), 50K/10K 32×32 colour; crop+flip augmentation when ``augment``."""
    return _cifar_source("cifar10", "CIFAR10", "cifar-10-batches-py", 10, cfg)


@DATASETS.register("cifar100")
def cifar100(cfg: DataConfig) -> Source:
    """CIFAR-100, 100 classes, same images and augmentation as CIFAR-10."""
    return _cifar_source("cifar100", "CIFAR100", "cifar-100-python", 100, cfg)


def imagefolder_candidates(cfg: DataConfig) -> list[Path]:
    """Where ``imagefolder`` looks, in order: ``data.root`` itself, then ``<BENCHKIT_DATA or cache>/imagenet``."""
    candidates = [Path(cfg.root).expanduser()] if cfg.root else []
    return candidates + [r / "imagenet" for r in data_roots(DataConfig(root=None))]


def imagefolder_root(cfg: DataConfig, candidates: list[Path] | None = None) -> Path | None:
    """The folder ``imagefolder`` reads (the first of ``candidates``, default :func:`imagefolder_candidates`,
    with ``train/`` and ``val/``), or None. The dense-model cache keys on it too: it *is* the dataset."""
    candidates = imagefolder_candidates(cfg) if candidates is None else candidates
    return next((c for c in candidates if (c / "train").is_dir() and (c / "val").is_dir()), None)


def folder_fingerprint(root: Path) -> str:
    """sha256 over every file under ``root/train`` and ``root/val``: relative path, size and mtime (ns).

    The dense-model cache keys on it, so adding, removing, renaming, resizing or rewriting an image
    retrains instead of serving a model trained on the old folder. It stats each file (ImageFolder
    lists them all anyway; a few seconds for ImageNet's 1.3M on a local disk) and reads none: a file
    rewritten with the same size *and* its old mtime restored (``cp -p``, ``touch -r``) goes unnoticed.
    Whatever ImageFolder tolerates is hashed, not fatal: names that are not UTF-8 (hashed as bytes),
    broken links (their error number is hashed), and linked folders seen before (a link cycle: the link's
    name is hashed, its contents once)."""
    h = hashlib.sha256()
    seen: set[tuple[int, int]] = set()
    for split in ("train", "val"):
        for folder, dirs, files in os.walk(root / split, followlinks=True):  # ImageFolder follows links too
            here = os.stat(folder)
            if (here.st_dev, here.st_ino) in seen:
                dirs.clear()
                continue
            seen.add((here.st_dev, here.st_ino))
            dirs.sort()
            rel = os.fsencode(Path(folder).relative_to(root).as_posix())
            for name in sorted(files):
                try:
                    st = os.stat(os.path.join(folder, name))
                    entry = f"{st.st_size}\0{st.st_mtime_ns}"
                except OSError as e:
                    entry = f"error {e.errno}"
                h.update(rel + b"/" + os.fsencode(name) + b"\0" + entry.encode() + b"\n")
            h.update(rel + b"/\0" + b"\0".join(os.fsencode(d) for d in dirs) + b"\n")  # a loop's link names count
    return h.hexdigest()[:16]


@DATASETS.register("imagefolder")
def imagefolder(cfg: DataConfig) -> Source:
    """An ImageNet-style folder: ``<root>/train/<class>/*.jpg`` and ``<root>/val/<class>/*.jpg``.

    ``data.root`` is the folder itself; otherwise ``<BENCHKIT_DATA or cache>/imagenet``. ``val/``
    (ImageNet's validation set) is this framework's *test* split; validation is carved from ``train/``.
    Preprocessing at ``data.image_size`` (default 224, ImageNet's): RandomResizedCrop + flip for training,
    Resize(size·8/7) + CenterCrop(size) for evaluation, normalised with ``data.mean``/``data.std`` (default
    ImageNet's statistics). A folder of 32-px images wants ``image_size: 32`` and its own statistics: at 224 px
    a resnet18 costs ~50x the compute for the same information.
    """
    from torchvision import datasets
    from torchvision import transforms as T

    candidates = imagefolder_candidates(cfg)
    root = imagefolder_root(cfg, candidates)
    if root is None:
        raise DataNotFoundError(
            "dataset 'imagefolder' not found. Looked in:\n" + "\n".join(f"  - {c}" for c in candidates)
            + "\nExpected layout: <root>/train/<class>/<images> and <root>/val/<class>/<images>."
            "\nFix: set data.root to that folder (or put it at $BENCHKIT_DATA/imagenet). It is never downloaded."
        )
    size = cfg.image_size
    mean, std = NORMALIZATION["imagenet"]
    mean, std = cfg.mean or mean, cfg.std or std
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    eval_tf = T.Compose([T.Resize(round(size * 8 / 7)), T.CenterCrop(size), *norm])
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *norm]) if cfg.augment else eval_tf
    train = datasets.ImageFolder(str(root / "train"), transform=train_tf)
    train_eval = datasets.ImageFolder(str(root / "train"), transform=eval_tf)
    test = datasets.ImageFolder(str(root / "val"), transform=eval_tf)
    if test.classes != train.classes:
        raise ValueError(f"{root}: train/ and val/ have different class folders; they must match")
    return Source(train, train_eval, test, len(train.classes), (3, size, size), augmented=cfg.augment)


@DATASETS.register("digits")
def digits(cfg: DataConfig) -> Source:
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images): works anywhere with no download.

    The test split is fixed: a stratified 20% drawn with ``random_state=0`` (360 images). Pixels
    (0..16) are scaled to [0, 1] and standardised with the training split's mean and std.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=d.target, random_state=0)
    idx_train, idx_test = torch.as_tensor(np.sort(idx_train)), torch.as_tensor(np.sort(idx_test))
    mean, std = x[idx_train].mean().item(), x[idx_train].std().item()
    x = (x - mean) / std
    train = TensorDataset(x[idx_train], y[idx_train])
    return Source(train, train, TensorDataset(x[idx_test], y[idx_test]), 10, (1, 8, 8))


@DATASETS.register("synthetic")
def synthetic(cfg: DataConfig) -> Source:
    """Gaussian inputs of ``data.input_shape`` labelled by a fixed random linear teacher
    (``argmax(W x)``), so a model can learn it. ``num_samples`` training examples plus
    ``num_samples // 5`` test examples; inputs and teacher are fixed (seed 0), independent of the run seed."""
    shape = tuple(int(s) for s in cfg.input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"data.input_shape must be [C, H, W] with positive sizes, got {list(cfg.input_shape)}")
    if cfg.num_classes < 2:
        raise ConfigError(f"data.num_classes must be at least 2, got {cfg.num_classes}")
    if cfg.num_samples < 2:
        raise ConfigError(f"data.num_samples must be at least 2, got {cfg.num_samples}")
    g = make_generator(SYNTHETIC_SEED)
    n_test = max(1, cfg.num_samples // 5)
    dim = int(np.prod(shape))
    teacher = torch.randn(dim, cfg.num_classes, generator=g)
    x = torch.randn(cfg.num_samples + n_test, *shape, generator=g)
    y = (x.flatten(1) @ teacher).argmax(1)
    train = TensorDataset(x[: cfg.num_samples], y[: cfg.num_samples])
    return Source(train, train, TensorDataset(x[cfg.num_samples:], y[cfg.num_samples:]), cfg.num_classes, shape)


# --------------------------------------------------------------------------------------------- text
SHAKESPEARE = Path("shakespeare") / "texts"  # under a data root: the default corpus (../shared/data README)


@dataclass
class TextSource:
    """A corpus split into works: training text and the held-out validation and test works."""

    folder: Path
    train: str
    val: str
    test: str
    works: dict[str, list[str]]  # split -> titles
    tokenizer: textdata.Tokenizer


def text_candidates(cfg: DataConfig) -> list[Path]:
    """Where ``text`` looks: ``data.root`` itself (a folder of .txt files) when set, else
    ``<BENCHKIT_DATA or cache>/shakespeare/texts``."""
    if cfg.root:
        return [Path(cfg.root).expanduser()]
    return [r / SHAKESPEARE for r in data_roots(cfg)]


def text_folder(cfg: DataConfig) -> Path | None:
    """The corpus folder (the first candidate holding .txt files), or None."""
    return next((c for c in text_candidates(cfg) if c.is_dir() and any(c.glob("*.txt"))), None)


@DATASETS.register("text")
def text(cfg: DataConfig) -> TextSource:
    """A folder of ``.txt`` files, one work each (default: Shakespeare's 42 works, see the data README).
    ``data.val_works`` / ``data.test_works`` are held out whole; the rest is training text, of which
    ``data.train_subset`` keeps the first N characters (``data.eval_subset`` likewise for each held-out
    split). The ``char`` vocabulary comes from all training works, whatever the subsets."""
    candidates = text_candidates(cfg)
    folder = text_folder(cfg)
    if folder is None:
        raise DataNotFoundError(
            "dataset 'text' not found. Looked in:\n" + "\n".join(f"  - {c}" for c in candidates)
            + "\nExpected: a folder of .txt files, one work each (Shakespeare: <data root>/shakespeare/texts)."
            "\nFix: set BENCHKIT_DATA to the folder holding shakespeare/, or data.root to your folder of .txt files. "
            "It is never downloaded.")
    works = textdata.list_works(folder)
    try:
        val = textdata.select_works(works, cfg.val_works, "data.val_works")
        test = textdata.select_works(works, cfg.test_works, "data.test_works")
    except textdata.TextError as e:
        raise ConfigError(str(e)) from None
    overlap = [w.title for w in val if w in test]
    if overlap:
        raise ConfigError(f"data.val_works and data.test_works share {overlap}; a work belongs to one split")
    train = [w for w in works if w not in val and w not in test]
    if not train or not val or not test:
        raise ConfigError(f"text at {folder}: every split needs at least one work (train {len(train)}, "
                          f"val {len(val)}, test {len(test)}); name val_works and test_works and leave the rest")
    train_text = textdata.read_text(train)
    tokenizer = textdata.TOKENIZERS.get(cfg.tokenizer)(train_text)
    if cfg.train_subset is not None:
        train_text = train_text[: cfg.train_subset]
    val_text, test_text = textdata.read_text(val), textdata.read_text(test)
    if cfg.eval_subset is not None:
        val_text, test_text = val_text[: cfg.eval_subset], test_text[: cfg.eval_subset]
    titles = {"train": [w.title for w in train], "val": [w.title for w in val], "test": [w.title for w in test]}
    return TextSource(folder, train_text, val_text, test_text, titles, tokenizer)


def text_bundle(source: TextSource, cfg: DataConfig, batch_size: int, eval_batch_size: int, seed: int) -> DataBundle:
    """Loaders of a :class:`TextSource`: random training windows drawn with a generator seeded from
    ``seed``, and the sliding-window evaluation of each held-out split."""
    context = cfg.context
    stride = cfg.stride if cfg.stride is not None else max(1, context // 2)
    tok = source.tokenizer
    ids = {split: tok.encode(getattr(source, split)) for split in ("train", "val", "test")}
    try:
        train = textdata.RandomWindows(ids["train"], context, batch_size, make_generator(seed))
        evals = {split: textdata.SlidingWindows(
            ids[split], context, stride, eval_batch_size, characters=tok.characters(ids[split][1:]), split=split,
            works=source.works[split], tokenizer=tok.name) for split in ("val", "test")}
    except textdata.TextError as e:
        raise ConfigError(f"data (text): {e}") from None
    meta = {"folder": str(source.folder), "works": source.works, "tokenizer": tok.name, "vocab_size": tok.vocab_size,
            "context": context, "stride": stride}
    return DataBundle(
        train=train, val=evals["val"], test=evals["test"], num_classes=tok.vocab_size, in_channels=1,
        input_shape=(context,), name="text", sizes={k: len(v) for k, v in ids.items()}, batch_size=batch_size,
        task="language_model", tokenizer=tok, meta=meta,
    )


# dataset -> (where its folder is, fingerprint of the folder's contents)
FOLDER_DATASETS: dict[str, tuple[Callable[[DataConfig], Path | None], Callable[[Path], str]]] = {
    "imagefolder": (imagefolder_root, folder_fingerprint),
    "text": (text_folder, textdata.folder_digest),
}


def folder_identity(cfg: DataConfig) -> dict[str, str | None]:
    """What a dataset whose folder *is* the data (``config.ROOT_IS_DATASET``) is made of: the folder
    found and a fingerprint of its contents, for the dense-model cache key."""
    find, fingerprint = FOLDER_DATASETS[cfg.name]
    folder = find(cfg)
    return {"folder": str(folder.resolve()) if folder is not None else None,
            "folder_contents": fingerprint(folder) if folder is not None else None}


# --------------------------------------------------------------------------------------------- splits and loaders
def split_train_val(n: int, cfg: DataConfig) -> tuple[Tensor, Tensor]:
    """Disjoint (train, val) row indices of an n-example training set, from ``data.split_seed`` only."""
    if cfg.val_size is not None:
        if not 0 <= cfg.val_size < n:
            raise ConfigError(f"data.val_size must be in [0, {n - 1}] for {cfg.name!r} ({n} training examples), "
                              f"got {cfg.val_size}")
        n_val = cfg.val_size
    else:
        if not 0.0 <= cfg.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
        n_val = int(round(cfg.val_fraction * n))
    perm = torch.randperm(n, generator=make_generator(cfg.split_seed))
    val, train = perm[:n_val].sort().values, perm[n_val:].sort().values
    if cfg.train_subset is not None:
        if cfg.train_subset < 1:
            raise ConfigError(f"data.train_subset must be a positive number of examples, got {cfg.train_subset}")
        train = train[: cfg.train_subset]
    return train, val


def subset(ds: Dataset, idx: Tensor) -> Dataset:
    """Rows ``idx`` of a dataset; in-memory tensors are sliced (so batches stay one index op)."""
    if isinstance(ds, TensorDataset):
        return TensorDataset(*(t[idx] for t in ds.tensors))
    return Subset(ds, idx.tolist())


# (C, H, W) and class count of the built-in datasets, known without loading them. imagefolder's
# class count comes from its folders: its models are checked with a stand-in count (the layer
# names and the input dimensions the checks look at do not depend on it).
KNOWN_SHAPES: dict[str, tuple[tuple[int, int, int], int | None]] = {
    "digits": ((1, 8, 8), 10), "mnist": ((1, 28, 28), 10), "fashion-mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100), "imagefolder": ((3, 224, 224), None),
}


#: A file each torchvision dataset has under a data root once downloaded (what torchvision checks for),
#: so that a sweep can tell the data is missing before any run, without loading it.
ON_DISK = {"mnist": "MNIST/raw/train-images-idx3-ubyte", "fashion-mnist": "FashionMNIST/raw/train-images-idx3-ubyte",
           "cifar10": "cifar-10-batches-py/data_batch_1", "cifar100": "cifar-100-python/train"}


def on_disk(cfg: DataConfig) -> bool | None:
    """Is the dataset where :func:`load_data` will look? True / False without loading it; None for a
    dataset this table does not know (a plugin's): only loading tells. digits and synthetic need no files."""
    name = cfg.name.lower()
    if name in ("digits", "synthetic"):
        return True
    if name == "imagefolder":
        return imagefolder_root(cfg) is not None
    if name in ON_DISK:
        return any((root / ON_DISK[name]).is_file() for root in data_roots(cfg))
    return None


def known_shape(data: DataConfig) -> tuple[tuple[int, ...], int | None] | None:
    """``(input_shape, num_classes)`` of the data without loading it; None when only loading tells."""
    name = data.name.lower()
    if name == "text":  # the vocabulary size is known before loading only for bytes
        return (int(data.context),), (256 if data.tokenizer == "byte" else None)
    if name == "synthetic":
        shape = tuple(int(s) for s in data.input_shape)
        ok = len(shape) == 3 and min(shape) >= 1 and data.num_classes >= 2
        return (shape, data.num_classes) if ok else None  # a bad shape is refused when the data loads
    if name == "imagefolder":
        return (3, data.image_size, data.image_size), None
    return KNOWN_SHAPES.get(name)



def example_seed(epoch_seed: int, row: int) -> int:
    """The seed of one example's augmentation in one epoch: a hash of (epoch seed, row), so
    neighbouring rows and epochs get unrelated random streams."""
    digest = hashlib.blake2b(f"{int(epoch_seed)}:{int(row)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # < 2**63


class EpochSeededSampler(Sampler[tuple[int, int]]):
    """Shuffles ``range(n)`` like :class:`RandomSampler` and yields ``(epoch_seed, index)`` pairs.

    Each pass (epoch) first draws an epoch seed from ``generator``, then the permutation, both lazily
    when the first index is requested (the DataLoader may call ``iter`` more than once per epoch). The
    sampler runs in the main process, so the seeds do not depend on the number of workers; they follow
    the generator, which the run seeds (and reseeds per training phase), so an epoch's augmentation
    never depends on how many epochs ran before in this process.
    """

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator = n, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch_seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator).item())
        for i in torch.randperm(self.n, generator=self.generator).tolist():
            yield epoch_seed, i


class SeededAugmentation(Subset):
    """Rows ``indices`` of an augmented dataset whose random transforms are seeded per example.

    Indexed with ``(epoch_seed, i)`` (from :class:`EpochSeededSampler`), it seeds torch's CPU
    generator and Python's ``random`` from :func:`example_seed` of (epoch seed, the example's row in
    the official training set), fetches the example, and restores both generators: the pixels are a
    function of (epoch seed, row) alone, whichever process fetches them, and the main process's random
    streams (dropout, with ``num_workers=0``) are left untouched. CUDA generators are never touched.
    A plain integer index behaves as in :class:`Subset` (unseeded, from the current global state).
    """

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return super().__getitem__(key)
        epoch_seed, i = key
        row = self.indices[i]
        seed = example_seed(epoch_seed, row)
        torch_state, py_state = torch.default_generator.get_state(), random.getstate()
        try:
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            return self.dataset[row]
        finally:
            torch.default_generator.set_state(torch_state)
            random.setstate(py_state)

    def __getitems__(self, keys: list) -> list:
        return [self[k] for k in keys]


Loader = DataLoader  # what DataBundle's splits are (text: its own window loaders, with len and .dataset too)


def make_loader(ds: Dataset, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
                num_workers: int = 0) -> Loader:
    """torch's DataLoader. Shuffling draws from ``generator``, so the order is reproducible and independent of
    other RNG use. In-memory tensors are indexed in the main process (``num_workers`` only applies to datasets
    read from files: worker processes would only copy the tensors)."""
    workers = 0 if isinstance(ds, TensorDataset) else num_workers
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=workers)


def load_data(data_cfg: DataConfig, batch_size: int, eval_batch_size: int = 1000, seed: int = 0) -> DataBundle:
    """Load ``data_cfg.name``, carve the validation split, and build the three loaders.

    Raises :class:`DataNotFoundError` (offline and missing) or :class:`ConfigError` (bad split
    sizes) before anything trains.
    """
    if batch_size < 1 or eval_batch_size < 1:
        raise ConfigError(f"batch sizes must be positive, got batch_size={batch_size}, eval_batch_size={eval_batch_size}")
    source = DATASETS.get(data_cfg.name)(data_cfg)
    if isinstance(source, TextSource):
        return text_bundle(source, data_cfg, batch_size, eval_batch_size, seed)
    train_idx, val_idx = split_train_val(len(source.train_eval), data_cfg)
    if len(train_idx) == 0:
        raise ConfigError(f"no training examples left for {data_cfg.name!r} after the validation split; "
                          "lower data.val_size / data.val_fraction")
    workers = data_cfg.num_workers
    generator = make_generator(seed)
    if source.is_augmented:  # augmentation seeded per (epoch, example): independent of num_workers
        augmented = SeededAugmentation(source.train, train_idx.tolist())
        train = DataLoader(augmented, batch_size=batch_size, sampler=EpochSeededSampler(len(augmented), generator),
                           generator=generator, num_workers=workers)
    else:
        train = make_loader(subset(source.train, train_idx), batch_size, shuffle=True, generator=generator,
                            num_workers=workers)
    val = make_loader(subset(source.train_eval, val_idx), eval_batch_size, shuffle=False,
                      num_workers=workers) if len(val_idx) else None
    test = make_loader(source.test, eval_batch_size, shuffle=False, num_workers=workers)
    shape = tuple(int(s) for s in source.input_shape)
    return DataBundle(
        train=train, val=val, test=test, num_classes=source.num_classes, in_channels=shape[0], input_shape=shape,
        name=data_cfg.name.lower(),
        sizes={"train": len(train_idx), "val": len(val_idx), "test": len(source.test)},
        indices={"train": train_idx, "val": val_idx}, batch_size=batch_size,
    )
