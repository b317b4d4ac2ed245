"""Datasets and splits: shapes, disjoint deterministic splits, validation from the training set,
clear errors for missing data, Fashion-MNIST from ../shared/data, CIFAR-style augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import benchkit.data as bkdata
from benchkit.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from benchkit.data import DATASETS, DataNotFoundError, load_data
from benchkit.models import build_model
from benchkit.registry import UnknownNameError
from benchkit.seeding import seed_everything
from benchkit.training import train

torch.set_num_threads(1)


def rows(t: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in t.flatten(1)}


# --------------------------------------------------------------------------------------------- digits
def test_digits_shapes_and_split_sizes():
    data = load_data(DataConfig(), batch_size=32)
    # scikit-learn's 1,797 digits: a fixed stratified 20% test split (360), then 10% of the rest for validation
    assert (data.name, data.num_classes, data.in_channels, data.input_shape) == ("digits", 10, 1, (1, 8, 8))
    assert data.sizes == {"train": 1293, "val": 144, "test": 360}
    x, y = next(iter(data.train))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    assert len(data.train) == -(-1293 // 32)
    assert sum(len(y) for _, y in data.val) == 144 and sum(len(y) for _, y in data.test) == 360
    test_labels = torch.cat([y for _, y in data.test])
    assert test_labels.bincount().tolist() == pytest.approx([36] * 10, abs=1)  # stratified


def test_splits_are_disjoint_and_fixed_by_split_seed_not_run_seed():
    a = load_data(DataConfig(), 32, seed=0)
    b = load_data(DataConfig(), 32, seed=1)
    c = load_data(DataConfig(split_seed=1), 32, seed=0)
    tr, va = a.indices["train"], a.indices["val"]
    assert set(tr.tolist()).isdisjoint(va.tolist())
    assert sorted(tr.tolist() + va.tolist()) == list(range(1437))  # val carved from the training set
    assert torch.equal(b.indices["val"], va)  # the run seed changes the data order only
    assert not torch.equal(c.indices["val"], va)
    first = lambda d: next(iter(d.train))[1]  # noqa: E731
    assert torch.equal(first(a), first(load_data(DataConfig(), 32, seed=0)))  # same seed → same order
    assert not torch.equal(first(a), first(b))
    # no test image is in train or val (the 1,797 digits are all distinct)
    test_x = torch.cat([x for x, _ in a.test])
    assert rows(test_x).isdisjoint(rows(a.train.dataset.tensors[0]) | rows(a.val.dataset.tensors[0]))


def test_val_rows_come_from_the_official_training_set():
    cfg = DataConfig(val_size=100)
    source = DATASETS.get("digits")(cfg)
    data = load_data(cfg, 50)
    assert data.sizes["val"] == 100
    assert torch.equal(data.val.dataset.tensors[0], source.train_eval.tensors[0][data.indices["val"]])
    assert torch.equal(data.train.dataset.tensors[0], source.train.tensors[0][data.indices["train"]])


def test_train_subset_and_bad_split_settings():
    data = load_data(DataConfig(train_subset=50), 16)
    assert data.sizes["train"] == 50 and sum(len(y) for _, y in data.train) == 50
    with pytest.raises(ConfigError, match="val_fraction"):
        load_data(DataConfig(val_fraction=1.5), 16)
    with pytest.raises(ConfigError, match="val_size"):
        load_data(DataConfig(val_size=5000), 16)
    with pytest.raises(UnknownNameError, match="fashion-mnist"):
        load_data(DataConfig(name="mnist2"), 16)


def test_digits_are_standardised_on_the_training_split():
    x = DATASETS.get("digits")(DataConfig()).train.tensors[0]
    assert x.mean().item() == pytest.approx(0.0, abs=1e-5) and x.std().item() == pytest.approx(1.0, abs=1e-4)


# --------------------------------------------------------------------------------------------- synthetic
def test_synthetic_is_fixed_and_learnable():
    cfg = DataConfig(name="synthetic", num_samples=512, input_shape=[1, 8, 8])
    a, b = load_data(cfg, 32), load_data(cfg, 32, seed=4)
    assert a.input_shape == (1, 8, 8) and a.sizes == {"train": 461, "val": 51, "test": 102}
    assert torch.equal(a.val.dataset.tensors[0], b.val.dataset.tensors[0])
    seed_everything(0)
    model = build_model(ModelConfig(name="lenet300"), a.input_shape, a.num_classes)
    h = train(model, a, TrainConfig(lr=0.05, epochs=10), device="cpu")
    assert h.best_val_acc1 > 0.4  # chance is 0.1: the teacher's labels are learnable


# --------------------------------------------------------------------------------------------- missing data
@pytest.fixture
def no_data_roots(tmp_path, monkeypatch):
    monkeypatch.delenv("BENCHKIT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def test_missing_fashion_mnist_names_every_place_it_looked(no_data_roots, monkeypatch):
    root = no_data_roots / "nowhere"
    monkeypatch.setenv("BENCHKIT_DATA", str(no_data_roots / "env"))
    with pytest.raises(DataNotFoundError) as err:
        load_data(DataConfig(name="fashion-mnist", root=str(root), download=False), 60)
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    for place in (root, no_data_roots / "env", no_data_roots / "cache" / "benchkit" / "data"):
        assert str(place) in msg
    assert "fashion-mnist" in msg and "BENCHKIT_DATA" in msg and "download" in msg


def test_failed_download_becomes_the_same_clear_error(no_data_roots, monkeypatch):
    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: Name or service not known")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    with pytest.raises(DataNotFoundError, match="Name or service not known") as err:
        load_data(DataConfig(name="mnist", root=str(no_data_roots / "m"), download=True), 60)
    assert "Download was attempted" in str(err.value) and str(no_data_roots / "m") in str(err.value)


def test_missing_imagefolder_is_a_clear_error(no_data_roots):
    with pytest.raises(DataNotFoundError, match="train/<class>"):
        load_data(DataConfig(name="imagefolder", root=str(no_data_roots / "imagenet")), 8)


# --------------------------------------------------------------------------------------------- real files
def test_fashion_mnist_from_shared_data(fashion_root):
    data = load_data(DataConfig(name="fashion-mnist", root=str(fashion_root), download=False), 60)
    assert data.sizes == {"train": 54000, "val": 6000, "test": 10000}
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    x = data.train.dataset.tensors[0]
    # the published normalisation (0.2860, 0.3530) standardises the training images
    assert x.mean().item() == pytest.approx(0.0, abs=0.01) and x.std().item() == pytest.approx(1.0, abs=0.01)
    xb, yb = next(iter(data.train))
    assert xb.shape == (60, 1, 28, 28) and yb.max() < 10


def test_imagefolder_train_val_layout(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    data = load_data(DataConfig(name="imagefolder", root=str(tmp_path), val_size=2), 4, eval_batch_size=4)
    assert data.num_classes == 2 and data.input_shape == (3, 224, 224)
    assert data.sizes == {"train": 10, "val": 2, "test": 4}
    x, y = next(iter(data.train))
    assert x.shape == (4, 3, 224, 224)
    # a folder of small images at its own size and statistics (issue 16.4)
    small = load_data(DataConfig(name="imagefolder", root=str(tmp_path), val_size=2, image_size=32,
                                 mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], augment=False), 4, eval_batch_size=4)
    assert small.input_shape == (3, 32, 32)
    x, _ = next(iter(small.test))
    assert x.shape == (4, 3, 32, 32)
    from torchvision import transforms as T

    img = Image.open(sorted((tmp_path / "val" / "cat").iterdir())[0]).convert("RGB")
    ref = T.Normalize([0.5] * 3, [0.25] * 3)(T.ToTensor()(T.CenterCrop(32)(T.Resize(37)(img))))
    assert torch.allclose(x[0], ref)


class FakeCIFAR10:
    """Stands in for torchvision's CIFAR10 (not on these machines): same attributes."""

    def __init__(self, root, train=True, download=False):
        n = 40 if train else 10
        g = np.random.default_rng(0 if train else 1)
        self.data = g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.targets = list(g.integers(0, 10, n))


def test_cifar_is_normalised_and_augmented_on_train_only(monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    data = load_data(DataConfig(name="cifar10", val_size=8), 8, eval_batch_size=8)
    assert data.input_shape == (3, 32, 32) and data.sizes == {"train": 32, "val": 8, "test": 10}
    mean, std = bkdata.NORMALIZATION["cifar10"]
    raw = torch.as_tensor(FakeCIFAR10(None).data).permute(0, 3, 1, 2).float() / 255
    expected_val = (raw[data.indices["val"]] - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(data.val.dataset.tensors[0], expected_val, atol=1e-6)  # val: never augmented
    aug = data.train.dataset.dataset  # Subset → AugmentedImages
    assert isinstance(aug, bkdata.AugmentedImages)
    norm = lambda img: (img - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)  # noqa: E731
    src = int(data.indices["train"][0])  # the first training row of the official training set
    padded = torch.nn.functional.pad(raw[src], (4, 4, 4, 4))  # black borders, in pixel space
    candidates = [norm(c) for i in range(9) for j in range(9)
                  for c in (padded[:, i:i + 32, j:j + 32], padded[:, i:i + 32, j:j + 32].flip(-1))]
    torch.manual_seed(0)
    draws = [data.train.dataset[0][0] for _ in range(20)]
    # every draw is a 32x32 crop of the 4-padded image, possibly flipped; and they are not all the same
    assert all(any(torch.allclose(d, c, atol=1e-5) for c in candidates) for d in draws)
    assert len({d.numpy().tobytes() for d in draws}) > 1
    plain = load_data(DataConfig(name="cifar10", val_size=8, augment=False), 8)
    assert isinstance(plain.train.dataset, torch.utils.data.TensorDataset)


def test_model_can_train_on_every_in_memory_dataset_shape():
    data = load_data(DataConfig(name="synthetic", num_samples=64, input_shape=[3, 8, 8]), 16)
    seed_everything(0)
    model = build_model(ModelConfig(name="conv2"), data)  # DataBundle accepted directly
    assert isinstance(model, nn.Module)
    h = train(model, data, TrainConfig(lr=0.01, epochs=1), device="cpu")
    assert h.steps == len(data.train)


# --------------------------------------------------------------------------------------------- workers and roots
def _epochs(loader, n: int = 2) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    return [[(x.clone(), y.clone()) for x, y in loader] for _ in range(n)]


def _same_batches(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_augmentation_does_not_depend_on_num_workers(monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)

    def augmented_epochs(workers: int, seed: int = 0):
        data = load_data(DataConfig(name="cifar10", val_size=8, num_workers=workers), 8, eval_batch_size=8, seed=seed)
        assert isinstance(data.train.dataset, bkdata.SeededAugmentation)
        return _epochs(data.train)

    torch.manual_seed(123)
    before = torch.get_rng_state()
    serial = augmented_epochs(0)
    assert torch.equal(torch.get_rng_state(), before)  # augmenting in the main process leaves dropout's RNG alone
    parallel = augmented_epochs(2)
    assert all(_same_batches(a, b) for a, b in zip(serial, parallel))  # same pixels, labels and order
    assert _same_batches(serial[0], augmented_epochs(0)[0])  # reproducible
    # epochs and seeds draw different crops/flips (and orders)
    first, second = serial
    assert not torch.equal(first[0][0], second[0][0])
    assert not torch.equal(first[0][0], augmented_epochs(0, seed=1)[0][0][0])
    # each epoch still visits every training example once
    labels = [sorted(torch.cat([y for _, y in ep]).tolist()) for ep in serial]
    assert labels[0] == labels[1] and len(labels[0]) == 32


def test_per_example_seed_depends_on_epoch_seed_and_row_only():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    from torchvision.transforms import v2

    aug = bkdata.AugmentedImages(images, torch.arange(6), v2.Compose([v2.RandomCrop(32, padding=4),
                                                                       v2.RandomHorizontalFlip()]),
                                 (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    a = bkdata.SeededAugmentation(aug, [4, 5])
    b = bkdata.SeededAugmentation(aug, [5])
    torch.manual_seed(0)
    x_a = a[(7, 1)][0]
    torch.manual_seed(99)  # the global state does not matter
    assert torch.equal(x_a, b[(7, 0)][0])  # row 5 in both subsets: same example seed
    assert len({bkdata.example_seed(e, r) for e in range(3) for r in range(50)}) == 150


def test_imagefolder_without_augmentation_keeps_the_plain_loader(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    plain = load_data(DataConfig(name="imagefolder", root=str(tmp_path), val_size=1, augment=False), 2)
    augmented = load_data(DataConfig(name="imagefolder", root=str(tmp_path), val_size=1), 2)
    assert type(plain.train.dataset) is torch.utils.data.Subset
    assert isinstance(augmented.train.dataset, bkdata.SeededAugmentation)


def _write_idx(path, array: np.ndarray) -> None:
    """An idx (LeCun) file of uint8 values, as torchvision's MNIST readers expect."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_fashion_root(root, value: int, n_train: int = 20, n_test: int = 5):
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", np.full((n, 28, 28), value))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return root


def test_data_root_takes_precedence_over_benchkit_data(no_data_roots, monkeypatch):
    cfg_root = _fake_fashion_root(no_data_roots / "cfg", value=200)
    env_root = _fake_fashion_root(no_data_roots / "env", value=10)
    monkeypatch.setenv("BENCHKIT_DATA", str(env_root))
    mean, std = bkdata.NORMALIZATION["fashion-mnist"]

    def pixel(cfg: DataConfig) -> float:
        data = load_data(cfg, 4, eval_batch_size=4)
        assert data.sizes == {"train": 18, "val": 2, "test": 5}
        return next(iter(data.test))[0][0, 0, 0, 0].item() * std[0] + mean[0]

    cfg = DataConfig(name="fashion-mnist", root=str(cfg_root), download=False)
    assert bkdata.data_roots(cfg)[:2] == [cfg_root, env_root]
    assert pixel(cfg) == pytest.approx(200 / 255, abs=1e-5)
    # without data.root (or with one that lacks the dataset), $BENCHKIT_DATA is used
    assert pixel(DataConfig(name="fashion-mnist", download=False)) == pytest.approx(10 / 255, abs=1e-5)
    empty = DataConfig(name="fashion-mnist", root=str(no_data_roots / "empty"), download=False)
    assert pixel(empty) == pytest.approx(10 / 255, abs=1e-5)


def test_digits_with_two_loader_workers_match_in_process_loading():
    """In-memory tensors are indexed in the main process (a DataLoader without workers): data.num_workers,
    which only matters for datasets read from files, changes nothing."""
    serial = load_data(DataConfig(), 128, eval_batch_size=100, seed=5)
    parallel = load_data(DataConfig(num_workers=2), 128, eval_batch_size=100, seed=5)
    assert all(getattr(parallel, s).num_workers == 0 for s in ("train", "val", "test"))
    for split in ("train", "val", "test"):
        assert _same_batches(_epochs(getattr(serial, split), 1)[0], _epochs(getattr(parallel, split), 1)[0]), split
    # and training through the worker processes gives the same model
    states = []
    for data in (load_data(DataConfig(), 128, seed=5), load_data(DataConfig(num_workers=2), 128, seed=5)):
        seed_everything(0)
        model = build_model(ModelConfig(name="lenet300", kwargs={"hidden": [32, 16]}), data)
        train(model, data, TrainConfig(lr=0.05, epochs=1), device="cpu")
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


