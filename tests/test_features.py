"""Tests for dimcli.features: feature files in .npy/.npz/.csv, streamed and atomic."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dimcli.errors import DimError
from dimcli.features import FeatureWriter, feature_format, index_path, read_features

FORMATS = ["npy", "npz", "csv"]

# Paths that break naive CSV or text handling: commas, quotes, spaces, line breaks,
# non-ASCII, and an undecodable byte as os.fsdecode presents it (a surrogate escape).
TRICKY_PATHS = [
    "cat/plain.jpg",
    "dog/with,comma.jpg",
    'dog/"quoted".png',
    "bird/ leading and trailing space .jpg ",
    "bird/line\nbreak.jpg",
    "bird/carriage\rreturn.jpg",
    "caf\u00e9/\u00fcml\u00e4ut.jpg",
    os.fsdecode(b"raw/bad\xff\xfebytes.jpg"),
    "deep/er/and/deeper.webp",
]


def _features(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    # Values that test text formatting: extremes, a subnormal, signed zero, infinities.
    special = [3.4028235e38, -1.1754944e-38, 1e-45, -0.0, np.inf, -np.inf, 1 / 3]
    x.flat[: len(special)] = special
    return x


def _write(out: Path, x: np.ndarray, paths: list[str], capacity: int | None = None) -> None:
    n, d = x.shape
    with FeatureWriter(out, dim=d, capacity=n if capacity is None else capacity) as w:
        for start in range(0, n, 4):  # several batches, the last one short
            w.write(x[start : start + 4], paths[start : start + 4])


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ---- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_is_exact(tmp_path: Path, fmt: str) -> None:
    x = _features(len(TRICKY_PATHS), 6)
    out = tmp_path / f"feats.{fmt}"
    _write(out, x, TRICKY_PATHS)

    feats, paths = read_features(out)
    assert feats.dtype == np.float32
    assert _same_bits(np.asarray(feats), x)
    assert paths == TRICKY_PATHS


def test_formats_agree(tmp_path: Path) -> None:
    x = _features(len(TRICKY_PATHS), 5, seed=1)
    read = {}
    for fmt in FORMATS:
        _write(tmp_path / f"f.{fmt}", x, TRICKY_PATHS)
        read[fmt] = read_features(tmp_path / f"f.{fmt}")
    for fmt in ("npz", "csv"):
        assert _same_bits(np.asarray(read[fmt][0]), np.asarray(read["npy"][0]))
        assert read[fmt][1] == read["npy"][1]


def test_npy_is_memory_mapped_and_has_sidecar_index(tmp_path: Path) -> None:
    x = _features(3, 2)
    out = tmp_path / "f.npy"
    _write(out, x, ["a/1.jpg", "a/2.jpg", "b/3.jpg"])
    feats, _ = read_features(out)
    assert isinstance(feats, np.memmap)
    assert index_path(out) == tmp_path / "f.index.csv"
    text = index_path(out).read_text(encoding="utf-8")
    assert text.splitlines() == ["row,path", "0,a/1.jpg", "1,a/2.jpg", "2,b/3.jpg"]


def test_csv_layout(tmp_path: Path) -> None:
    out = tmp_path / "f.csv"
    _write(out, np.array([[1.5, -2.0]], dtype=np.float32), ["x,y.jpg"])
    assert out.read_text(encoding="utf-8").splitlines() == ["path,f0,f1", '"x,y.jpg",1.5,-2']


def test_npz_layout(tmp_path: Path) -> None:
    out = tmp_path / "f.npz"
    _write(out, np.ones((2, 3), dtype=np.float32), ["a.jpg", "bb.jpg"])
    with np.load(out) as z:
        assert sorted(z.files) == ["features", "paths"]
        assert z["features"].dtype == np.float32 and z["features"].shape == (2, 3)
        assert z["paths"].dtype.kind == "U" and z["paths"].tolist() == ["a.jpg", "bb.jpg"]


# ---- capacity ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n_rows", [0, 1, 7])
def test_fewer_rows_than_capacity(tmp_path: Path, fmt: str, n_rows: int) -> None:
    x = _features(n_rows, 3) if n_rows else np.empty((0, 3), dtype=np.float32)
    out = tmp_path / f"f.{fmt}"
    _write(out, x, TRICKY_PATHS[:n_rows], capacity=1000)

    feats, paths = read_features(out)
    assert feats.shape == (n_rows, 3)
    assert _same_bits(np.asarray(feats), x)
    assert paths == TRICKY_PATHS[:n_rows]
    assert sorted(os.listdir(tmp_path)) == sorted(
        [out.name] + ([index_path(out).name] if fmt == "npy" else [])
    )


def test_shrunk_npy_is_a_plain_npy_of_the_right_size(tmp_path: Path) -> None:
    x = _features(5, 4)
    out = tmp_path / "f.npy"
    _write(out, x, [f"{i}.jpg" for i in range(5)], capacity=123456)
    loaded = np.load(out)  # not memory-mapped: checks the header against the file size
    assert _same_bits(loaded, x)
    with open(out, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        header_len = f.tell()
    assert out.stat().st_size == header_len + 5 * 4 * 4
    assert header_len % 64 == 0  # the data stays aligned


def test_write_checks_its_arguments(tmp_path: Path) -> None:
    with FeatureWriter(tmp_path / "f.npy", dim=3, capacity=2) as w:
        with pytest.raises(ValueError, match=r"shape \(B, 3\)"):
            w.write(np.zeros((1, 4), dtype=np.float32), ["a"])
        with pytest.raises(ValueError, match="1 rows but 2 paths"):
            w.write(np.zeros((1, 3), dtype=np.float32), ["a", "b"])
        w.write(np.zeros((2, 3), dtype=np.float32), ["a", "b"])
        with pytest.raises(ValueError, match="exceed the capacity of 2"):
            w.write(np.zeros((1, 3), dtype=np.float32), ["c"])
    assert read_features(tmp_path / "f.npy")[1] == ["a", "b"]
    with pytest.raises(RuntimeError, match="inside its with-block"):
        w.write(np.zeros((1, 3), dtype=np.float32), ["c"])


# ---- streaming and atomicity -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["npy", "npz"])
def test_rows_reach_the_disk_before_close(tmp_path: Path, fmt: str) -> None:
    x = _features(4, 3)
    out = tmp_path / f"f.{fmt}"
    with FeatureWriter(out, dim=3, capacity=100) as w:
        w.write(x, ["a", "b", "c", "d"])
        tag = ".features" if fmt == "npz" else ""
        partial = tmp_path / f".f.{fmt}{tag}.partial-{os.getpid()}"
        # A second, independent mapping of the temporary file already sees the rows.
        on_disk = np.load(partial, mmap_mode="r")
        assert on_disk.shape == (100, 3)
        assert _same_bits(np.array(on_disk[:4]), x)
        assert not out.exists()
    assert out.exists()


class _Boom(Exception):
    pass


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("error", [_Boom, KeyboardInterrupt])
def test_exception_leaves_nothing(tmp_path: Path, fmt: str, error: type[BaseException]) -> None:
    out = tmp_path / f"f.{fmt}"
    with pytest.raises(error), FeatureWriter(out, dim=3, capacity=10) as w:
        w.write(np.ones((2, 3), dtype=np.float32), ["a", "b"])
        raise error()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_existing_output_is_kept_on_failure_and_replaced_on_success(
    tmp_path: Path, fmt: str
) -> None:
    out = tmp_path / f"f.{fmt}"
    old = _features(3, 2, seed=5)
    _write(out, old, ["old/1", "old/2", "old/3"])
    before = sorted(os.listdir(tmp_path))

    with pytest.raises(_Boom), FeatureWriter(out, dim=2, capacity=5) as w:
        w.write(np.zeros((5, 2), dtype=np.float32), ["n1", "n2", "n3", "n4", "n5"])
        raise _Boom()
    feats, paths = read_features(out)
    assert _same_bits(np.asarray(feats), old) and paths == ["old/1", "old/2", "old/3"]
    assert sorted(os.listdir(tmp_path)) == before

    new = _features(1, 2, seed=6)
    _write(out, new, ["new/1"])
    feats, paths = read_features(out)
    assert _same_bits(np.asarray(feats), new) and paths == ["new/1"]
    assert sorted(os.listdir(tmp_path)) == before


def test_npy_commit_order_never_pairs_a_final_npy_with_a_foreign_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "f.npy"
    _write(out, _features(2, 2), ["a", "b"])
    events: list[tuple[str, str]] = []
    real_replace, real_unlink = os.replace, Path.unlink

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("replace", Path(dst).name))
        real_replace(src, dst)

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self == out:
            events.append(("unlink", self.name))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "unlink", unlink)
    _write(out, _features(3, 2), ["c", "d", "e"])
    assert events == [("unlink", "f.npy"), ("replace", "f.index.csv"), ("replace", "f.npy")]


def test_writer_errors(tmp_path: Path) -> None:
    with pytest.raises(DimError, match=r"\.npy, \.npz, \.csv"):
        FeatureWriter(tmp_path / "f.parquet", dim=2, capacity=1)
    with (
        pytest.raises(DimError, match="does not exist; create it"),
        FeatureWriter(tmp_path / "missing" / "f.npy", dim=2, capacity=1),
    ):
        pass
    (tmp_path / "d.npy").mkdir()
    with (
        pytest.raises(DimError, match="is a folder"),
        FeatureWriter(tmp_path / "d.npy", dim=2, capacity=1),
    ):
        pass


# ---- reading errors ----------------------------------------------------------------------------


def test_feature_format_by_extension() -> None:
    assert feature_format(Path("a/b.NPY")) == "npy"
    assert feature_format(Path("b.npz")) == "npz"
    with pytest.raises(DimError, match=r"extension '.txt'; use one of \.npy, \.npz, \.csv"):
        feature_format(Path("b.txt"))
    with pytest.raises(DimError, match=r"extension '\(none\)'"):
        read_features(Path("features"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_file(tmp_path: Path, fmt: str) -> None:
    with pytest.raises(DimError, match=r"f\.\w+ does not exist"):
        read_features(tmp_path / f"f.{fmt}")


def test_missing_index(tmp_path: Path) -> None:
    out = tmp_path / "f.npy"
    np.save(out, np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(DimError, match=r"index file .*f\.index\.csv for .*f\.npy is missing"):
        read_features(out)


def test_index_row_count_mismatch(tmp_path: Path) -> None:
    out = tmp_path / "f.npy"
    _write(out, _features(3, 2), ["a", "b", "c"])
    np.save(out, np.zeros((4, 2), dtype=np.float32))
    with pytest.raises(DimError, match=r"lists 3 rows but .*f\.npy has 4; .*re-run"):
        read_features(out)


def test_index_with_bad_rows(tmp_path: Path) -> None:
    out = tmp_path / "f.npy"
    np.save(out, np.zeros((2, 2), dtype=np.float32))
    idx = index_path(out)
    idx.write_text("row,path\n0,a\n0,b\n", encoding="utf-8")
    with pytest.raises(DimError, match=r"each row 0\.\.1 exactly once"):
        read_features(out)
    idx.write_text("row,path\n0,a\nx,b\n", encoding="utf-8")
    with pytest.raises(DimError, match="line 3: row 'x' is not an integer"):
        read_features(out)
    idx.write_text("id,file\n0,a\n1,b\n", encoding="utf-8")
    with pytest.raises(DimError, match="header 'row,path'"):
        read_features(out)
    # Rows may come in any order.
    idx.write_text("row,path\n1,b\n0,a\n", encoding="utf-8")
    assert read_features(out)[1] == ["a", "b"]


def test_corrupt_npy(tmp_path: Path) -> None:
    out = tmp_path / "f.npy"
    _write(out, _features(3, 2), ["a", "b", "c"])
    data = out.read_bytes()
    out.write_bytes(data[:-5])  # truncated
    with pytest.raises(DimError, match=r"f\.npy is not a readable feature file"):
        read_features(out)
    out.write_bytes(b"this is not numpy at all")
    with pytest.raises(DimError, match="not a readable feature file"):
        read_features(out)


def test_wrong_shape_or_dtype(tmp_path: Path) -> None:
    out = tmp_path / "f.npy"
    index_path(out).write_text("row,path\n0,a\n1,b\n", encoding="utf-8")
    np.save(out, np.zeros(2, dtype=np.float32))
    with pytest.raises(DimError, match=r"shape \(2,\), expected \(rows, dims\)"):
        read_features(out)
    np.save(out, np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(DimError, match="dtype int64, expected float32"):
        read_features(out)
    # Other float widths are accepted and converted.
    np.save(out, np.full((2, 3), 0.5, dtype=np.float64))
    feats, _ = read_features(out)
    assert feats.dtype == np.float32 and float(feats[1, 2]) == 0.5


def test_bad_npz(tmp_path: Path) -> None:
    out = tmp_path / "f.npz"
    np.savez(out, features=np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(DimError, match=r"lacks the array\(s\) \['paths'\]"):
        read_features(out)
    np.savez(out, features=np.zeros((2, 3), dtype=np.float32), paths=np.array(["a"]))
    with pytest.raises(DimError, match="2 feature rows but 1 paths"):
        read_features(out)
    np.savez(out, features=np.zeros((1, 3), dtype=np.float32), paths=np.array([1]))
    with pytest.raises(DimError, match="1-D unicode array"):
        read_features(out)
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("features.npy", b"garbage")
        zf.writestr("paths.npy", b"garbage")
    with pytest.raises(DimError, match="not a readable feature file"):
        read_features(out)
    out.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(DimError, match="not a readable feature file"):
        read_features(out)


def test_bad_csv(tmp_path: Path) -> None:
    out = tmp_path / "f.csv"
    out.write_text("", encoding="utf-8")
    with pytest.raises(DimError, match="header 'path,f0,f1,...'"):
        read_features(out)
    out.write_text("name,f0\na,1\n", encoding="utf-8")
    with pytest.raises(DimError, match="header 'path,f0,f1,...'"):
        read_features(out)
    out.write_text("path,f0,f1\na,1,2\nb,3\n", encoding="utf-8")
    with pytest.raises(DimError, match="line 3 has 2 fields, expected 3"):
        read_features(out)
    out.write_text("path,f0\na,one\n", encoding="utf-8")
    with pytest.raises(DimError, match="line 2 has a value that is not a number"):
        read_features(out)
    # A hand-written file with a BOM and CRLF line ends reads fine.
    out.write_bytes(b"\xef\xbb\xbfpath,f0\r\na.jpg,0.25\r\n")
    feats, paths = read_features(out)
    assert paths == ["a.jpg"] and feats.tolist() == [[0.25]]
