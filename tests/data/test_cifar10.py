from __future__ import annotations

import time
import zipfile

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lightning_compress import CIFAR10DataModule
from lightning_compress.data import cifar10_source
from lightning_compress.data.cifar10 import CIFAR10_MEAN, CIFAR10_STD
from lightning_compress.data.cifar10_source import CLASSES, find_source, load_cifar10, prepare_cifar10
from lightning_compress.data.tensor_dataset import TensorBatchDataset, keep_batch

from ..conftest import TEST_PER_CLASS, TRAIN_PER_CLASS, write_tiny_cifar_zip


def _check_tiny(data) -> None:
    assert data.train_images.shape == (10 * TRAIN_PER_CLASS, 3, 32, 32)
    assert data.test_images.shape == (10 * TEST_PER_CLASS, 3, 32, 32)
    assert data.train_images.dtype == torch.uint8
    assert torch.equal(data.train_labels.bincount(), torch.full((10,), TRAIN_PER_CLASS))
    # Each image's colour encodes its class: the label order is CIFAR-10's, not the zip's.
    centre = data.train_images[:, 0, 16, 16].float()
    assert torch.allclose(centre, 20 + data.train_labels.float() * 25, atol=4)


def test_reads_zip(tiny_cifar_dir, cache_dir):
    _check_tiny(load_cifar10(tiny_cifar_dir, cache_dir))


def test_reads_zip_path_with_top_folder(tmp_path, cache_dir):
    archive = write_tiny_cifar_zip(tmp_path / "other-name.zip", prefix="CIFAR-10-images/")
    assert find_source(archive) == ("zip", archive)
    _check_tiny(load_cifar10(archive, cache_dir))


def test_reads_unpacked_folder(tiny_cifar_dir, tmp_path, cache_dir):
    with zipfile.ZipFile(tiny_cifar_dir / "cifar10-jpeg.zip") as zf:
        zf.extractall(tmp_path / "unpacked")
    assert find_source(tmp_path / "unpacked")[0] == "folder"
    _check_tiny(load_cifar10(tmp_path / "unpacked", cache_dir))


def test_reads_torchvision_batches(tmp_path, cache_dir, monkeypatch):
    import pickle

    import numpy as np
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 3)]:
        batch = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": list(range(n))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(CLASSES)}))
    # torchvision checks the md5 of the real files; these are stand-ins with the same layout.
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    data = load_cifar10(tmp_path, cache_dir)
    assert data.train_images.shape == (20, 3, 32, 32) and data.test_images.shape == (3, 3, 32, 32)
    assert data.train_labels.tolist()[:4] == [0, 1, 2, 3]


def test_cache_is_reused_without_decoding(tiny_cifar_dir, cache_dir, monkeypatch):
    first = prepare_cifar10(tiny_cifar_dir, cache_dir)
    assert first.is_file() and first.parent == cache_dir

    def fail(*args, **kwargs):
        raise AssertionError("decoded again although a cache exists")

    monkeypatch.setattr(cifar10_source, "_read_zip", fail)
    assert prepare_cifar10(tiny_cifar_dir, cache_dir) == first
    _check_tiny(load_cifar10(tiny_cifar_dir, cache_dir))


def test_cache_is_invalidated_when_source_changes(tmp_path, cache_dir):
    archive = write_tiny_cifar_zip(tmp_path / "cifar10-jpeg.zip")
    first = prepare_cifar10(tmp_path, cache_dir)
    time.sleep(0.01)
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("README.txt", "changed")
    assert prepare_cifar10(tmp_path, cache_dir) != first


def test_offline_without_data_names_places_and_fix(tmp_path, cache_dir):
    with pytest.raises(FileNotFoundError) as err:
        prepare_cifar10(tmp_path / "empty", cache_dir)
    message = str(err.value)
    for expected in ("data_dir=", "cifar-10-batches-py", "cifar10-jpeg.zip", "download=True", "LIGHTNING_COMPRESS_DATA"):
        assert expected in message


def test_failed_download_gives_the_same_advice(tmp_path, cache_dir, monkeypatch):
    from torchvision.datasets import CIFAR10

    def offline(self, *args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(CIFAR10, "download", offline)
    with pytest.raises(FileNotFoundError, match="download failed too.*name resolution"):
        prepare_cifar10(tmp_path / "nothing", cache_dir, download=True)


def test_split_is_deterministic_disjoint_and_subsettable(tiny_cifar_dir, cache_dir):
    def split(seed):
        dm = CIFAR10DataModule(str(tiny_cifar_dir), val_size=10, train_subset=30, split_seed=seed, cache_dir=str(cache_dir))
        dm.prepare_data()
        dm.setup("fit")
        return dm

    a, b, c = split(0), split(0), split(1)
    assert len(a.train_set) == 30 and len(a.val_set) == 10 and len(a.test_set) == 20
    assert torch.equal(a.train_set.images, b.train_set.images)
    assert not torch.equal(a.val_set.images, c.val_set.images)
    # no image is in both train and validation (their top-left pixels are unique per image)
    train_keys = {tuple(x[:, 0, 0].tolist()) for x in a.train_set.images}
    assert not train_keys & {tuple(x[:, 0, 0].tolist()) for x in a.val_set.images}


def test_val_size_zero_validates_on_test_set(tiny_cifar_dir, cache_dir):
    dm = CIFAR10DataModule(str(tiny_cifar_dir), val_size=0, cache_dir=str(cache_dir))
    dm.prepare_data()
    dm.setup()
    assert dm.val_set is dm.test_set and len(dm.train_set) == 60


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"val_size": -1}, {"train_subset": 0}])
def test_bad_arguments_name_the_argument(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        CIFAR10DataModule(**kwargs)


def test_batches_are_stacked_uint8_and_normalised_after_transfer(tiny_cifar_dir, cache_dir):
    dm = CIFAR10DataModule(str(tiny_cifar_dir), batch_size=8, val_size=0, cache_dir=str(cache_dir))
    dm.prepare_data()
    dm.setup()
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8 and labels.shape == (8,)
    out, out_labels = dm.on_after_batch_transfer((images, labels), 0)  # no trainer: no augmentation
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    assert torch.allclose(out, (images.float() / 255 - mean) / std, atol=1e-6)
    assert out_labels is labels


def test_dataset_works_with_distributed_sampler():
    ds = TensorBatchDataset(torch.arange(20).view(20, 1), torch.arange(20))
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        loader = DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=keep_batch)
        for images, labels in loader:
            assert torch.equal(images[:, 0], labels)
            seen += labels.tolist()
    assert sorted(seen) == list(range(20))


def test_full_cifar10_from_shared_zip(real_cifar_dir, tmp_path):
    dm = CIFAR10DataModule(str(real_cifar_dir), val_size=5000, cache_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_set) == 45_000 and len(dm.val_set) == 5_000 and len(dm.test_set) == 10_000
    counts = dm.test_set.labels.bincount()
    assert torch.equal(counts, torch.full((10,), 1000))
