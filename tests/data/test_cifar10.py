from __future__ import annotations

import errno
import random
import re
import time
import warnings
import zipfile

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lightning_compress import CIFAR10DataModule
from lightning_compress.data import cifar10_source
from lightning_compress.data.cifar10 import CIFAR10_MEAN, CIFAR10_STD
from lightning_compress.data.cifar10_source import (
    CLASSES,
    DamagedDataError,
    cache_path,
    find_source,
    load_cifar10,
    prepare_cifar10,
)
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


def _assert_same(a, b) -> None:
    for key, tensor in a.as_dict().items():
        assert torch.equal(tensor, getattr(b, key)), key


def _load_without_warnings(data_dir, cache_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a sound cache must load silently
        return load_cifar10(data_dir, cache_dir)


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _garbage(data: bytes) -> bytes:
    return random.Random(0).randbytes(len(data))


def _flip_middle_byte(data: bytes) -> bytes:  # inside the train images: torch.load itself does not notice
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


@pytest.mark.parametrize(
    "damage, problem",
    [(_truncate, "torch.load fails"), (_garbage, "torch.load fails"), (_flip_middle_byte, "CRC-32")],
    ids=["truncated", "garbage", "flipped-byte"],
)
def test_damaged_cache_is_rebuilt_by_setup_with_a_warning(tiny_cifar_dir, cache_dir, tmp_path, damage, problem):
    fresh_dm = CIFAR10DataModule(str(tiny_cifar_dir), val_size=10, cache_dir=str(tmp_path / "fresh-cache"))
    fresh_dm.setup()
    target = prepare_cifar10(tiny_cifar_dir, cache_dir)
    target.write_bytes(damage(target.read_bytes()))
    dm = CIFAR10DataModule(str(tiny_cifar_dir), val_size=10, cache_dir=str(cache_dir))
    with pytest.warns(UserWarning, match=rf"{re.escape(str(target))} is damaged.*{problem}.*rebuilt"):
        dm.setup()
    for name in ("train_set", "val_set", "test_set"):
        ours, theirs = getattr(dm, name), getattr(fresh_dm, name)
        assert torch.equal(ours.images, theirs.images) and torch.equal(ours.labels, theirs.labels), name
    fresh = load_cifar10(tiny_cifar_dir, tmp_path / "fresh-cache")
    _assert_same(_load_without_warnings(tiny_cifar_dir, cache_dir), fresh)


def _drop_key(payload):
    del payload["test_labels"]


def _float_images(payload):
    payload["train_images"] = payload["train_images"].float()


def _one_label_short(payload):
    payload["train_labels"] = payload["train_labels"][:-1]


def _bad_label(payload):
    payload["test_labels"] = payload["test_labels"] + 10


@pytest.mark.parametrize(
    "edit, problem",
    [
        (_drop_key, "not the keys"),
        (_float_images, "train_images is not a uint8"),
        (_one_label_short, "not an int64 tensor of 60 labels"),
        (_bad_label, "outside 0..9"),
    ],
    ids=["missing-key", "wrong-dtype", "wrong-count", "bad-label"],
)
def test_cache_with_wrong_contents_is_rebuilt(tiny_cifar_dir, cache_dir, edit, problem):
    target = prepare_cifar10(tiny_cifar_dir, cache_dir)
    payload = torch.load(target, weights_only=True)
    fresh = load_cifar10(tiny_cifar_dir, cache_dir)
    edit(payload)
    torch.save(payload, target)
    with pytest.warns(UserWarning, match=rf"{re.escape(str(target))}.*{problem}"):
        assert prepare_cifar10(tiny_cifar_dir, cache_dir) == target
    _assert_same(_load_without_warnings(tiny_cifar_dir, cache_dir), fresh)


def test_interrupted_cache_write_leaves_no_file_at_the_cache_path(tiny_cifar_dir, cache_dir, monkeypatch):
    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 the first half of a cache")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cifar10_source.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        prepare_cifar10(tiny_cifar_dir, cache_dir)
    target = cache_path(cache_dir, *find_source(tiny_cifar_dir))
    assert not target.exists()
    assert list(cache_dir.iterdir()) == []  # the temporary file went too
    monkeypatch.undo()
    _check_tiny(load_cifar10(tiny_cifar_dir, cache_dir))
    assert [p.name for p in cache_dir.iterdir()] == [target.name]


def _assert_damaged_message(err: pytest.ExceptionInfo, path, *more: str) -> None:
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    fix = ("re-download or re-copy", "data_dir", "LIGHTNING_COMPRESS_DATA")
    for expected in (str(path), "damaged or incomplete", *fix, *more):
        assert expected in message, expected


@pytest.mark.parametrize("as_data_dir", [False, True], ids=["in-data-dir", "zip-as-data-dir"])
def test_truncated_source_zip_names_the_file_and_the_fix(tmp_path, cache_dir, as_data_dir):
    archive = write_tiny_cifar_zip(tmp_path / "cifar10-jpeg.zip")
    archive.write_bytes(_truncate(archive.read_bytes()))
    with pytest.raises(DamagedDataError) as err:
        prepare_cifar10(archive if as_data_dir else tmp_path, cache_dir)
    _assert_damaged_message(err, archive, "zip archive")
    assert not cache_dir.exists()


def test_overwritten_zip_member_is_named(tmp_path, cache_dir):
    archive = write_tiny_cifar_zip(tmp_path / "cifar10-jpeg.zip")
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo("train/bird/0003.jpg")
    data = bytearray(archive.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + 100  # past the local header, inside the JPEG
    data[start : start + 16] = bytes(16)
    archive.write_bytes(bytes(data))
    with pytest.raises(DamagedDataError) as err:
        prepare_cifar10(tmp_path, cache_dir)
    _assert_damaged_message(err, archive, "'train/bird/0003.jpg'")


def test_undecodable_jpeg_in_zip_is_named(tmp_path, cache_dir):
    archive = write_tiny_cifar_zip(tmp_path / "cifar10-jpeg.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("test/ship/9999.jpg", b"not a jpeg at all")
    with pytest.raises(DamagedDataError) as err:
        prepare_cifar10(tmp_path, cache_dir)
    _assert_damaged_message(err, archive, "'test/ship/9999.jpg'", "does not decode as a JPEG")


def test_undecodable_jpeg_in_folder_is_named(tiny_cifar_dir, tmp_path, cache_dir):
    with zipfile.ZipFile(tiny_cifar_dir / "cifar10-jpeg.zip") as zf:
        zf.extractall(tmp_path / "unpacked")
    broken = tmp_path / "unpacked" / "train" / "frog" / "0001.jpg"
    broken.write_bytes(_truncate(broken.read_bytes()))
    with pytest.raises(DamagedDataError) as err:
        prepare_cifar10(tmp_path / "unpacked", cache_dir)
    _assert_damaged_message(err, broken, "does not decode as a JPEG")


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


class _RecordBatches(__import__("lightning.pytorch", fromlist=["Callback"]).Callback):
    def __init__(self) -> None:
        self.batches = {"train": [], "val": [], "test": []}

    def _keep(self, stage, batch):
        self.batches[stage].append(tuple(t.clone() for t in batch))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._keep("train", batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._keep("val", batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._keep("test", batch)


def test_device_resident_data_gives_the_same_batches(tiny_cifar_dir, cache_dir):
    """The DataLoader hands out indices only; crops, flips, order and the eval splits are unchanged."""
    import lightning.pytorch as pl

    from lightning_compress import ImageClassifier

    seen = {}
    for resident in (False, True):
        pl.seed_everything(3)
        record = _RecordBatches()
        dm = CIFAR10DataModule(str(tiny_cifar_dir), batch_size=8, val_size=10, cache_dir=str(cache_dir),
                               device_resident=resident)
        trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[record])
        module = ImageClassifier("vgg11_bn", model_kwargs={"width": 0.125}, lr=0.01)
        trainer.fit(module, datamodule=dm)
        trainer.test(module, datamodule=dm, verbose=False)
        seen[resident] = record.batches
        if resident:
            assert isinstance(next(iter(dm.train_dataloader()))[0], str)  # (split, indices): no images on the host side
    for stage in ("train", "val", "test"):
        assert len(seen[True][stage]) == len(seen[False][stage]) > 0
        for a, b in zip(seen[True][stage], seen[False][stage]):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_device_resident_indices_work_with_distributed_sampler():
    from lightning_compress.data.tensor_dataset import IndexBatchDataset

    seen = []
    for rank in range(2):
        sampler = DistributedSampler(IndexBatchDataset("train", 20), num_replicas=2, rank=rank, shuffle=True, seed=3)
        for split, indices in DataLoader(IndexBatchDataset("train", 20), batch_size=4, sampler=sampler, collate_fn=keep_batch):
            assert split == "train"
            seen += indices.tolist()
    assert sorted(seen) == list(range(20))
