"""Tests for dimcli.sample: the bundled archive, its atomic unpacking and the cache folder."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from dimcli import sample
from dimcli.errors import DimError

CIFAR_ARCHIVE = (Path(__file__).parents[1] / ".." / "shared" / "data" / "cifar10.tar.gz").resolve()


def _tiny_source(path: Path, per_class: int = 3) -> Path:
    """A CIFAR-like source archive: per_class JPEGs in each split/class, stored unsorted."""
    with tarfile.open(path, "w:gz") as tar:
        for split in sample.SPLITS:
            for c, label in enumerate(sample.CLASSES):
                for i in reversed(range(per_class)):
                    buffer = io.BytesIO()
                    Image.new("RGB", (4, 4), (c * 20, i * 50, 0)).save(buffer, format="JPEG")
                    info = tarfile.TarInfo(f"{split}/{label}/{i:04d}.jpg")
                    info.size = buffer.tell()
                    buffer.seek(0)
                    tar.addfile(info, buffer)
    return path


# ==== the bundled archive ====


def test_bundled_archive_is_package_data_and_small() -> None:
    assert sample.SAMPLE_ARCHIVE.is_file()
    assert sample.SAMPLE_ARCHIVE.parent.name == "sample"
    assert sample.SAMPLE_ARCHIVE.parent.parent.name == "dimcli"
    assert sample.SAMPLE_ARCHIVE.stat().st_size < 5_000_000
    assert (sample.SAMPLE_ARCHIVE.parent / "PROVENANCE.md").is_file()


def test_bundled_archive_has_10_classes_of_200_train_and_100_test() -> None:
    counts = sample.sample_counts()
    expected = {(s, c): sample.PER_CLASS[s] for s in sample.SPLITS for c in sample.CLASSES}
    assert counts == expected
    assert sample.PER_CLASS == {"train": 200, "test": 100}


def test_bundled_archive_holds_the_first_files_by_name() -> None:
    with tarfile.open(sample.SAMPLE_ARCHIVE) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    assert names == sorted(names)
    cats = [n.rsplit("/", 1)[1] for n in names if n.startswith("train/cat/")]
    assert cats == [f"{i:04d}.jpg" for i in range(200)]


@pytest.mark.slow
def test_bundled_archive_rebuilds_byte_identical(tmp_path: Path) -> None:
    if not CIFAR_ARCHIVE.is_file():
        pytest.skip(f"CIFAR-10 archive not found at {CIFAR_ARCHIVE} (only in the dimcli workspace)")
    rebuilt = sample.build_sample_archive(CIFAR_ARCHIVE, tmp_path / "s.tar.gz")
    assert rebuilt.read_bytes() == sample.SAMPLE_ARCHIVE.read_bytes()


# ==== building ====


def test_build_takes_first_n_sorted_and_is_deterministic(tmp_path: Path) -> None:
    source = _tiny_source(tmp_path / "src.tar.gz")
    a = sample.build_sample_archive(source, tmp_path / "a.tar.gz", 2, 1)
    b = sample.build_sample_archive(source, tmp_path / "b.tar.gz", 2, 1)
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:
        names = tar.getnames()
        assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())
    assert "train/bird/0000.jpg" in names and "train/bird/0001.jpg" in names
    assert "train/bird/0002.jpg" not in names
    assert "test/bird/0000.jpg" in names and "test/bird/0001.jpg" not in names
    assert len(names) == 10 * 3


def test_build_refuses_too_few_images(tmp_path: Path) -> None:
    source = _tiny_source(tmp_path / "src.tar.gz", per_class=2)
    with pytest.raises(DimError, match="fewer than the 3 asked for; lower the per-class count"):
        sample.build_sample_archive(source, tmp_path / "a.tar.gz", 3, 1)


# ==== unpacking and the cache ====


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DIM_CACHE_DIR", str(tmp_path / "dim"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert sample.cache_dir() == tmp_path / "dim"
    monkeypatch.delenv("DIM_CACHE_DIR")
    assert sample.cache_dir() == tmp_path / "xdg" / "dimcli"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert sample.cache_dir() == tmp_path / "home" / ".cache" / "dimcli"


def test_sample_dir_unpacks_bundled_sample_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DIM_CACHE_DIR", str(tmp_path / "cache"))
    root = sample.sample_dir()

    assert root == tmp_path / "cache" / "sample" / f"cifar10-{sample.archive_hash()}"
    for split in sample.SPLITS:
        assert sorted(p.name for p in (root / split).iterdir()) == list(sample.CLASSES)
        for label in sample.CLASSES:
            assert len(list((root / split / label).glob("*.jpg"))) == sample.PER_CLASS[split]
    with Image.open(root / "train" / "cat" / "0000.jpg") as img:
        assert img.size == (32, 32)

    # The second call reuses the folder: nothing is written again.
    probe = root / "test" / "ship" / "0000.jpg"
    before = (probe.stat().st_mtime_ns, root.stat().st_mtime_ns)
    os.utime(probe, ns=(1, 1))  # a re-extract would reset this time
    assert sample.sample_dir() == root
    assert probe.stat().st_mtime_ns == 1
    assert root.stat().st_mtime_ns == before[1]
    assert [p.name for p in root.parent.iterdir()] == [root.name]  # no partial folders left


def test_interrupted_unpack_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    archive = sample.build_sample_archive(
        _tiny_source(tmp_path / "src.tar.gz"), tmp_path / "a.tar.gz", 2, 1
    )
    real_unpack = sample._unpack

    def crash(src: Path, out: Path) -> None:
        real_unpack(src, out)  # every file written, then the process "dies" before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(sample, "_unpack", crash)
    with pytest.raises(KeyboardInterrupt):
        sample.sample_dir(archive, cache=tmp_path / "cache")
    assert list((tmp_path / "cache" / "sample").iterdir()) == []

    monkeypatch.setattr(sample, "_unpack", real_unpack)
    root = sample.sample_dir(archive, cache=tmp_path / "cache")
    assert len(list(root.rglob("*.jpg"))) == 30


def test_unpack_rejects_unexpected_members(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("train/cat/../../../escape.jpg")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DimError, match="unexpected member .* reinstall dimcli"):
        sample.sample_dir(evil, cache=tmp_path / "cache")
    assert not (tmp_path / "escape.jpg").exists()
    assert list((tmp_path / "cache" / "sample").iterdir()) == []


def test_missing_or_damaged_archive(tmp_path: Path) -> None:
    with pytest.raises(DimError, match="is missing; reinstall dimcli"):
        sample.sample_counts(tmp_path / "nope.tar.gz")
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not a tar file")
    with pytest.raises(DimError, match="cannot read the bundled sample .* reinstall dimcli"):
        sample.sample_counts(bad)


def test_unwritable_cache_names_the_variable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(DimError, match="set DIM_CACHE_DIR to a writable folder"):
        sample.sample_dir(cache=blocker)


def test_subset_dir(tmp_path: Path) -> None:
    archive = sample.build_sample_archive(
        _tiny_source(tmp_path / "src.tar.gz"), tmp_path / "a.tar.gz", 3, 2
    )
    sub = sample.subset_dir(2, 1, archive, cache=tmp_path / "cache")
    assert sorted(p.name for p in (sub / "train" / "dog").iterdir()) == ["0000.jpg", "0001.jpg"]
    assert [p.name for p in (sub / "test" / "dog").iterdir()] == ["0000.jpg"]
    assert sample.subset_dir(2, 1, archive, cache=tmp_path / "cache") == sub
    with pytest.raises(DimError, match="1 to 200 train images per class, got 0"):
        sample.subset_dir(0, 1, archive, cache=tmp_path / "cache")
