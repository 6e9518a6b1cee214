"""The data layer: every registered data set honours the same contract (uint8 (N, C, H, W), labels,
seeded stratified subsets, defender split, on-device batches), plus caching, layouts and errors.

Synthetic trees (GTSRB, Tiny-ImageNet, ImageFolder, CIFAR-10 batches) are written into tmp_path:
every class has its own colour with per-pixel noise on top, so labels can be checked against
the pixels and crops can be located exactly.
"""
from __future__ import annotations

import os
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import trainables  # noqa: F401  (fills the registries)
from trainables.config import ConfigError
from trainables.data import (DataConfig, DataNotFoundError, ImageSet, batches, defender_split, load_dataset,
                             random_crop, stratified_subset)
from trainables.data.base import Dataset
from trainables.data.cache import read_cache, write_cache
from trainables.registry import DATASETS

COLORS = np.array([[220, 30, 30], [30, 200, 40], [40, 50, 210], [200, 200, 40]], dtype=np.int16)


def _image(label: int, index: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(1000 * label + index)
    noise = rng.integers(-35, 36, size=(size[1], size[0], 3))
    return Image.fromarray(np.clip(COLORS[label] + noise, 0, 255).astype(np.uint8))


def _colour_labels(x: torch.Tensor) -> torch.Tensor:
    """The class whose colour is nearest to each image's mean colour."""
    mean = x.float().mean(dim=(2, 3))
    return torch.cdist(mean, torch.tensor(COLORS, dtype=torch.float32)).argmin(1)


# --- synthetic trees in the usual layouts ------------------------------------------------------
def make_imagefolder(root: Path, n_train: int = 10, n_test: int = 4, classes=("cat", "dog", "eel"),
                     sizes=((16, 16),)) -> Path:
    for split, n in (("train", n_train), ("test", n_test)):
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                _image(label, i + (0 if split == "train" else 500), sizes[i % len(sizes)]).save(
                    root / split / name / f"{i:03d}.png")
    return root


def make_gtsrb(root: Path, n_train: int = 10, n_test: int = 12) -> Path:
    """The official layout: Final_Training/Images/<class>/*.ppm (+ GT csv), Final_Test/Images + GT-final_test.csv."""
    sizes = [(30, 35), (41, 41), (52, 47)]
    for label in range(3):
        folder = root / "GTSRB" / "Final_Training" / "Images" / f"{label:05d}"
        folder.mkdir(parents=True)
        rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        for i in range(n_train):
            w, h = sizes[i % 3]
            _image(label, i, (w, h)).save(folder / f"00000_{i:05d}.ppm")
            rows.append(f"00000_{i:05d}.ppm;{w};{h};5;5;{w - 5};{h - 5};{label}")
        (folder / f"GT-{label:05d}.csv").write_text("\n".join(rows) + "\n")
    test = root / "GTSRB" / "Final_Test" / "Images"
    test.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i in range(n_test):
        label = (2 * i + 1) % 3  # not the file order: labels must come from the csv
        w, h = sizes[i % 3]
        _image(label, 500 + i, (w, h)).save(test / f"{i:05d}.ppm")
        rows.append(f"{i:05d}.ppm;{w};{h};5;5;{w - 5};{h - 5};{label}")
    (root / "GT-final_test.csv").write_text("\n".join(rows) + "\n")  # where the GT zip unpacks
    return root


def make_tiny(root: Path, n_train: int = 10, n_val: int = 12) -> Path:
    base = root / "tiny-imagenet-200"
    wnids = ["n02124075", "n01443537", "n09999999"]  # sorted: n01443537, n02124075, n09999999
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in wnids:
        label = sorted(wnids).index(wnid)
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(n_train):
            _image(label, i, (64, 64)).save(folder / f"{wnid}_{i}.JPEG", quality=95)
    lines = []
    for i in range(n_val):
        wnid = wnids[i % 3]
        _image(sorted(wnids).index(wnid), 500 + i, (64, 64)).save(base / "val" / "images" / f"val_{i}.JPEG", quality=95)
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def make_cifar_batches(root: Path, binary: bool, per_batch: int = 4) -> tuple[Path, np.ndarray]:
    """A torchvision-style root with tiny CIFAR batches; returns the root and all images written."""
    folder = root / ("cifar-10-batches-bin" if binary else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = (np.arange(per_batch) + len(written)) % 10
        written.append(data)
        if binary:
            (folder / f"{name}.bin").write_bytes(np.concatenate([labels[:, None].astype(np.uint8), data], 1).tobytes())
        else:
            with open(folder / name, "wb") as fh:
                pickle.dump({b"batch_label": b"x", b"labels": labels.tolist(), b"data": data, b"filenames": []}, fh)
    return root, np.concatenate(written)


# --- one builder per registered data set ----------------------------------------------------
# Each returns (DataConfig, expected image side, balanced classes?). A new data set must add one.
def _cifar10(tmp_path: Path, archive) -> DataConfig:
    return DataConfig(name="cifar10", root=str(archive()), train_size=300, test_size=100)


BUILDERS = {
    "digits": lambda tmp, archive: DataConfig(name="digits", train_size=300, test_size=100),
    "cifar10": _cifar10,
    "gtsrb": lambda tmp, archive: DataConfig(name="gtsrb", root=str(make_gtsrb(tmp / "src")),
                                             cache_dir=str(tmp / "cache"), train_size=15, test_size=6),
    "tiny-imagenet": lambda tmp, archive: DataConfig(name="tiny-imagenet", root=str(make_tiny(tmp / "src")),
                                                     cache_dir=str(tmp / "cache"), train_size=15, test_size=6),
    "imagefolder": lambda tmp, archive: DataConfig(name="imagefolder", root=str(make_imagefolder(tmp / "src")),
                                                   cache_dir=str(tmp / "cache"), train_size=15, test_size=6),
}
SIDE = {"digits": 32, "cifar10": 32, "gtsrb": 32, "tiny-imagenet": 64, "imagefolder": 16}
FLIP = {"digits": False, "cifar10": True, "gtsrb": False, "tiny-imagenet": True, "imagefolder": True}
SYNTHETIC = ("gtsrb", "tiny-imagenet", "imagefolder")


@pytest.fixture
def archive(request):
    return lambda: request.getfixturevalue("cifar10_archive")


def test_every_registered_dataset_has_a_builder():
    assert set(DATASETS.names()) <= set(BUILDERS), "add a builder for the new data set to BUILDERS"


@pytest.fixture(params=sorted(BUILDERS))
def case(request, tmp_path, archive):
    cfg = BUILDERS[request.param](tmp_path, archive)
    return request.param, cfg


# --- the contract ------------------------------------------------------------------------------
def test_contract(case):
    name, cfg = case
    ds = load_dataset(cfg)
    assert ds.name == name and ds.hflip is FLIP[name]
    for split, n in ((ds.train, cfg.train_size), (ds.test, cfg.test_size)):
        assert split.x.dtype == torch.uint8 and split.x.device.type == "cpu"
        assert tuple(split.x.shape) == (n, 3, SIDE[name], SIDE[name])
        assert split.y.dtype == torch.int64 and split.y.shape == (n,)
        assert 0 <= int(split.y.min()) and int(split.y.max()) < ds.num_classes
        assert split.x.float().std() > 5  # real pictures, not a blank buffer
    assert ds.image_shape == (3, SIDE[name], SIDE[name])
    assert len(ds.classes) == ds.num_classes == len(set(ds.classes))
    assert len(ds.mean) == len(ds.std) == 3 and all(0 < s < 1 for s in ds.std) and all(0 <= m <= 1 for m in ds.mean)
    if name in SYNTHETIC:  # labels agree with the pixels: class folders / csv / annotations were read right
        assert torch.equal(_colour_labels(ds.train.x), ds.train.y)
        assert torch.equal(_colour_labels(ds.test.x), ds.test.y)


def test_subsets_are_seeded_and_stratified(case):
    name, cfg = case
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert a.fingerprint() == b.fingerprint()
    other = load_dataset(cfg.replace(seed=1))
    assert other.train.fingerprint() != a.train.fingerprint()
    full = load_dataset(cfg.replace(train_size=None, test_size=None))
    for sub, whole in ((a.train, full.train), (a.test, full.test)):
        counts = torch.bincount(sub.y, minlength=full.num_classes).double()
        expected = torch.bincount(whole.y, minlength=full.num_classes).double() * len(sub) / len(whole)
        assert (counts - expected).abs().max() < 1, (counts, expected)
    # every subset image is an image of the full split, with its label
    keys = {(bytes(x.numpy().tobytes()), int(y)) for x, y in zip(full.train.x, full.train.y)}
    assert all((bytes(x.numpy().tobytes()), int(y)) in keys for x, y in zip(a.train.x, a.train.y))


def test_defender_split(case):
    name, cfg = case
    train = load_dataset(cfg).train
    fraction = 0.05 if len(train) >= 200 else 0.2
    rest, clean = defender_split(train, fraction, seed=3)
    assert len(clean) == round(fraction * len(train)) and len(rest) + len(clean) == len(train)
    assert not set(rest.tolist()) & set(clean.tolist())
    assert sorted(rest.tolist() + clean.tolist()) == list(range(len(train)))
    counts = torch.bincount(train.y[clean], minlength=int(train.y.max()) + 1).double()
    expected = torch.bincount(train.y).double() * len(clean) / len(train)
    assert (counts - expected).abs().max() < 1
    again = defender_split(train, fraction, seed=3)
    assert torch.equal(again[1], clean) and torch.equal(again[0], rest)
    if len(train) >= 200:
        assert not torch.equal(defender_split(train, fraction, seed=4)[1], clean)


def test_batches(case):
    name, cfg = case
    ds = load_dataset(cfg)
    images = ds.train
    seen = []
    for x, y in batches(images, 8, device="cpu", generator=torch.Generator().manual_seed(0), crop_padding=4,
                        hflip=ds.hflip):
        assert x.dtype == torch.float32 and x.dim() == 4 and x.shape[1:] == images.x.shape[1:] and len(x) <= 8
        assert y.dtype == torch.int64 and len(y) == len(x)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        seen.append(y)
    assert torch.equal(torch.cat(seen).sort().values, images.y.sort().values)  # each sample once

    def run(seed):
        return list(batches(images, 8, device="cpu", generator=torch.Generator().manual_seed(seed), crop_padding=4,
                            hflip=ds.hflip))

    # in order: same labels, images really changed
    plain = torch.cat([x for x, _ in batches(images, 8, device="cpu", shuffle=False)])
    got = list(batches(images, 8, device="cpu", shuffle=False, generator=torch.Generator().manual_seed(0),
                       crop_padding=4, hflip=ds.hflip))
    assert torch.equal(torch.cat([y for _, y in got]), images.y)
    changed = (torch.cat([x for x, _ in got]) != plain).flatten(1).any(1)
    assert changed.float().mean() > 0.8
    first, second, third = run(1), run(1), run(2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, third))


# --- augmentation --------------------------------------------------------------------------
def _explain(aug: torch.Tensor, orig: torch.Tensor, p: int, flips: bool) -> tuple[int, int, bool] | None:
    """The (dy, dx, flipped) for which ``aug`` is the zero-padded crop of ``orig``, if any."""
    padded = torch.nn.functional.pad(orig, (p, p, p, p))
    h, w = orig.shape[-2:]
    for flipped in (False, True) if flips else (False,):
        source = padded.flip(-1) if flipped else padded
        for dy in range(2 * p + 1):
            for dx in range(2 * p + 1):
                if torch.equal(source[:, dy:dy + h, dx:dx + w], aug):
                    return dy, dx, flipped
    return None


@pytest.mark.parametrize("hflip", [True, False])
def test_augmentation_is_crop_and_flip_and_keeps_labels(digits, hflip):
    images = digits.train.subset(torch.arange(64))
    plain = torch.cat([x for x, _ in batches(images, 16, device="cpu", shuffle=False)])
    assert torch.equal(plain, images.x.float() / 255)
    got = list(batches(images, 16, device="cpu", shuffle=False, generator=torch.Generator().manual_seed(0),
                       crop_padding=3, hflip=hflip))
    aug, labels = torch.cat([x for x, _ in got]), torch.cat([y for _, y in got])
    assert torch.equal(labels, images.y)
    explained = [_explain(a, o, 3, flips=True) for a, o in zip(aug, plain)]
    assert all(e is not None for e in explained)
    assert sum((dy, dx) != (3, 3) for dy, dx, _ in explained) > 40  # most images really moved
    # _explain prefers the unflipped reading, and digits are not mirror-symmetric, so an image
    # counts as flipped only when no plain crop gives it
    flipped = sum(f for _, _, f in explained)
    if hflip:
        assert 15 <= flipped <= 49
    else:
        assert flipped == 0


def test_no_flip_without_hflip_and_flip_probability():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.uint8).view(2, 3, 4, 5).repeat(200, 1, 1, 1)
    images = ImageSet(x, torch.zeros(len(x), dtype=torch.long))
    out = torch.cat([b for b, _ in batches(images, 64, device="cpu", shuffle=False, hflip=False)])
    assert torch.equal(out, x.float() / 255)
    out = torch.cat([b for b, _ in batches(images, 64, device="cpu", shuffle=False, hflip=True,
                                           generator=torch.Generator().manual_seed(0))])
    mirrored = (out == x.flip(3).float() / 255).flatten(1).all(1)
    unchanged = (out == x.float() / 255).flatten(1).all(1)
    assert torch.all(mirrored ^ unchanged) and 150 < int(mirrored.sum()) < 250


def test_random_crop_pads_with_zeros():
    x = torch.ones(500, 1, 6, 6)
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    zero_rows = (out == 0).all(dim=3).sum(dim=(1, 2))  # rows shifted in from the padding
    assert set(zero_rows.tolist()) == {0, 1, 2} and (out == 1).any()


def test_drop_last_and_batch_count(digits):
    images = digits.test.subset(torch.arange(50))
    assert [len(x) for x, _ in batches(images, 16, device="cpu")] == [16, 16, 16, 2]
    assert [len(x) for x, _ in batches(images, 16, device="cpu", drop_last=True)] == [16, 16, 16]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_on_cuda_match_cpu(digits):
    images = digits.train.subset(torch.arange(100))
    kw = dict(shuffle=True, crop_padding=4, hflip=True)
    cpu = list(batches(images, 32, device="cpu", generator=torch.Generator().manual_seed(5), **kw))
    gpu = list(batches(images.to("cuda"), 32, device="cuda", generator=torch.Generator().manual_seed(5), **kw))
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert xg.is_cuda and xg.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(xc, xg.cpu()) and torch.equal(yc, yg.cpu())


# --- stratified_subset --------------------------------------------------------------------------
def test_stratified_subset_proportions_and_edges():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    idx = stratified_subset(labels, 10, g())
    assert torch.bincount(labels[idx]).tolist() == [5, 3, 2]
    assert torch.equal(idx, idx.sort().values) and len(set(idx.tolist())) == 10
    assert torch.equal(stratified_subset(labels, 10, g()), idx)
    assert not torch.equal(stratified_subset(labels, 10, torch.Generator().manual_seed(8)), idx)
    counts = torch.bincount(labels[stratified_subset(labels, 7, g())], minlength=3)  # 3.5/2.1/1.4 -> 4/2/1
    assert counts.tolist() == [4, 2, 1]
    assert len(stratified_subset(labels, 0, g())) == 0
    assert torch.equal(stratified_subset(labels, 100, g()), torch.arange(100))
    with pytest.raises(ValueError):
        stratified_subset(labels, 101, g())


def test_train_size_too_large_names_the_field(digits):
    with pytest.raises(ConfigError, match=r"data\.train_size: 5000 .* 1438"):
        load_dataset(DataConfig(name="digits", train_size=5000))
    with pytest.raises(ConfigError, match=r"data\.test_size"):
        load_dataset(DataConfig(name="digits", test_size=360))


# --- digits ------------------------------------------------------------------------------------
def test_digits_split_is_fixed_and_resizable(digits):
    assert (len(digits.train), len(digits.test)) == (1438, 359)
    assert load_dataset(DataConfig(name="digits", seed=5)).fingerprint() == digits.fingerprint()
    # the three channels are the same grey picture
    assert torch.equal(digits.train.x[:, 0], digits.train.x[:, 1]) and torch.equal(digits.train.x[:, 0], digits.train.x[:, 2])
    small = load_dataset(DataConfig(name="digits", image_size=16))
    assert small.image_shape == (3, 16, 16) and torch.equal(small.train.y, digits.train.y)


# --- caching -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SYNTHETIC)
def test_second_load_hits_the_cache(name, tmp_path, archive):
    cfg = BUILDERS[name](tmp_path, archive)
    first = load_dataset(cfg)
    assert first.info["cache_hit"] is False and Path(first.info["cache"]).is_file()
    second = load_dataset(cfg)
    assert second.info["cache_hit"] is True and second.info["cache"] == first.info["cache"]
    assert second.fingerprint() == first.fingerprint()
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")] == []


def test_cache_file_is_what_gets_loaded_and_source_changes_invalidate_it(tmp_path):
    root = make_imagefolder(tmp_path / "src")
    cfg = DataConfig(name="imagefolder", root=str(root), cache_dir=str(tmp_path / "cache"))
    ds = load_dataset(cfg)
    path = Path(ds.info["cache"])
    stored = read_cache(path)
    forged = Dataset(name=stored.name, train=ImageSet(torch.zeros_like(stored.train.x), stored.train.y),
                     test=stored.test, classes=stored.classes, hflip=stored.hflip, mean=stored.mean,
                     std=stored.std, info=stored.info)
    write_cache(path, forged)
    assert int(load_dataset(cfg).train.x.max()) == 0  # read from the cache, not decoded again
    _image(0, 99, (16, 16)).save(root / "train" / "cat" / "new.png")
    fresh = load_dataset(cfg)
    assert fresh.info["cache_hit"] is False and len(fresh.train) == len(ds.train) + 1
    assert int(fresh.train.x.max()) > 0


def test_concurrent_loads_decode_once(tmp_path):
    cfg = DataConfig(name="imagefolder", root=str(make_imagefolder(tmp_path / "src")), cache_dir=str(tmp_path / "cache"))
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(load_dataset(cfg))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len({r.fingerprint() for r in results}) == 1
    assert sorted(r.info["cache_hit"] for r in results) == [False, True, True]


def test_cifar10_cache_is_fast(cifar10_archive):
    import time

    cfg = DataConfig(name="cifar10", root=str(cifar10_archive))
    load_dataset(cfg)  # decodes at most once per machine
    start = time.perf_counter()
    ds = load_dataset(cfg)
    seconds = time.perf_counter() - start
    assert ds.info["cache_hit"] is True and Path(ds.info["cache"]).is_file()
    assert (len(ds.train), len(ds.test)) == (50000, 10000)
    assert seconds < ds.info["decode_seconds"] / 5, (seconds, ds.info["decode_seconds"])


# --- layouts, sizes and sources ----------------------------------------------------------------
def test_small_cifar_fixture(small_cifar):
    assert (len(small_cifar.train), len(small_cifar.test)) == (2000, 500)
    assert small_cifar.classes[0] == "airplane" and small_cifar.classes[9] == "truck"
    assert torch.bincount(small_cifar.train.y).tolist() == [200] * 10
    assert small_cifar.mean == (0.4914, 0.4822, 0.4465)
    # the class order is mixed in storage, so any prefix holds several classes
    assert len(set(small_cifar.train.y[:30].tolist())) >= 5


def test_cifar10_default_root_is_the_shared_archive(cifar10_archive, monkeypatch, tmp_path):
    cache = Path(load_dataset(DataConfig(name="cifar10", root=str(cifar10_archive))).info["cache"]).parent
    monkeypatch.delenv("BIBAU_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # nothing in ~/.cache/bibau/datasets
    ds = load_dataset(DataConfig(name="cifar10", train_size=100, test_size=50, cache_dir=str(cache)))
    assert Path(ds.info["source"]) == cifar10_archive.resolve() and ds.info["cache_hit"] is True


@pytest.mark.parametrize("binary", [False, True])
def test_cifar10_torchvision_roots(tmp_path, binary):
    root, written = make_cifar_batches(tmp_path / "tv", binary)
    with pytest.warns(UserWarning, match="train split has 20 images"):
        ds = load_dataset(DataConfig(name="cifar10", root=str(root), cache_dir=str(tmp_path / "cache")))
    assert (len(ds.train), len(ds.test)) == (20, 4)
    got = {bytes(x.flatten().numpy()) for x in torch.cat([ds.train.x, ds.test.x])}
    assert got == {bytes(row) for row in written}
    # labels travel with their images
    first = torch.from_numpy(written[0].reshape(3, 32, 32))
    assert int(ds.train.y[(ds.train.x == first).flatten(1).all(1)]) == 0


def test_cifar10_batches_that_need_more_than_arrays_are_refused(tmp_path):
    root, _ = make_cifar_batches(tmp_path / "tv", binary=False)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    with open(root / "cifar-10-batches-py" / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": [0]}, fh)
    with pytest.raises(ConfigError, match=r"data\.root: .*refusing"):
        load_dataset(DataConfig(name="cifar10", root=str(root), cache_dir=str(tmp_path / "cache")))
    assert not marker.exists()


def test_download_only_when_asked(tmp_path, monkeypatch):
    import trainables.data.cifar10 as cifar

    calls = []

    def fake_download(dest: Path) -> None:
        calls.append(dest)
        make_cifar_batches(dest, binary=True)

    monkeypatch.setattr(cifar, "_download", fake_download)
    cfg = DataConfig(name="cifar10", root=str(tmp_path / "dl"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataNotFoundError):
        load_dataset(cfg)
    assert calls == []
    with pytest.warns(UserWarning):
        ds = load_dataset(cfg.replace(download=True))
    assert calls == [tmp_path / "dl"] and len(ds.train) == 20


@pytest.mark.parametrize("name", ["cifar10", "gtsrb", "tiny-imagenet", "imagefolder"])
def test_missing_root_is_a_clear_error(name, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=r"^data\.root: ") as err:
        load_dataset(DataConfig(name=name, root=str(missing), cache_dir=str(tmp_path / "cache")))
    assert str(missing) in str(err.value) and "Accepted" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match=r"^data\.root: no .* data found"):
        load_dataset(DataConfig(name=name, root=str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache")))


def test_imagefolder_needs_a_root():
    with pytest.raises(ConfigError, match=r"data\.root: required for imagefolder"):
        load_dataset(DataConfig(name="imagefolder"))


def test_imagefolder_mixed_sizes_need_image_size(tmp_path):
    root = make_imagefolder(tmp_path / "src", sizes=((16, 16), (20, 18)))
    cfg = DataConfig(name="imagefolder", root=str(root), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"data\.image_size"):
        load_dataset(cfg)
    ds = load_dataset(cfg.replace(image_size=24))
    assert ds.image_shape == (3, 24, 24)
    assert torch.equal(_colour_labels(ds.train.x), ds.train.y)


def test_imagefolder_from_a_tar_archive(tmp_path):
    import tarfile

    root = make_imagefolder(tmp_path / "src")
    tree = load_dataset(DataConfig(name="imagefolder", root=str(root), cache_dir=str(tmp_path / "c1")))
    archive = tmp_path / "tree.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(root, arcname="mydata")  # a leading folder is fine
    packed = load_dataset(DataConfig(name="imagefolder", root=str(archive), cache_dir=str(tmp_path / "c2")))
    assert packed.classes == tree.classes == ["cat", "dog", "eel"]
    assert packed.fingerprint() == tree.fingerprint()


def test_gtsrb_imagefolder_variant(tmp_path):
    root = tmp_path / "gt"
    for split, n in (("train", 6), ("test", 3)):
        for label in (0, 2):
            (root / split / str(label)).mkdir(parents=True)
            for i in range(n):
                _image(label, i + 100 * (split == "test"), (28 + i, 30)).save(root / split / str(label) / f"{i}.png")
    ds = load_dataset(DataConfig(name="gtsrb", root=str(root), cache_dir=str(tmp_path / "cache")))
    assert ds.num_classes == 43 and ds.classes[14] == "stop" and not ds.hflip
    assert ds.image_shape == (3, 32, 32) and sorted(set(ds.train.y.tolist())) == [0, 2]
    assert torch.equal(_colour_labels(ds.train.x), ds.train.y) and torch.equal(_colour_labels(ds.test.x), ds.test.y)


def test_tiny_imagenet_resized_from_the_native_cache(tmp_path):
    root = make_tiny(tmp_path / "src")
    cfg = DataConfig(name="tiny-imagenet", root=str(root), cache_dir=str(tmp_path / "cache"))
    native = load_dataset(cfg)
    assert native.classes == ["n01443537", "n02124075", "n09999999"] and native.mean == (0.4802, 0.4481, 0.3975)
    small = load_dataset(cfg.replace(image_size=32))
    assert small.image_shape == (3, 32, 32) and torch.equal(small.train.y, native.train.y)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
