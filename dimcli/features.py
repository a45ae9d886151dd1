"""Feature files: one row of floats per image, with the image's path.

Three formats, chosen by the file's extension:

- ``.npy``: a float32 (N, D) array, plus a sidecar ``<stem>.index.csv`` with header
  ``row,path`` that names the image of each row. The array is read memory-mapped, so a
  large file costs no RAM until rows are touched.
- ``.npz``: an uncompressed zip with two arrays, ``features`` (float32, (N, D)) and
  ``paths`` (unicode, (N,)). Self-contained, but read fully into memory.
- ``.csv``: header ``path,f0,f1,...`` and one row per image. Portable and slow.

Paths are relative to the encoded folder, with forward slashes. They may hold commas,
quotes, spaces, newlines and undecodable bytes (as the surrogate escapes `os.fsdecode`
produces): every text file here is written and read as UTF-8 with
``errors="surrogateescape"`` through the csv module, so a path comes back exactly as it went in.

`FeatureWriter` streams rows to temporary files next to the output and moves them into
place only when its ``with`` block ends without an exception, so a reader never sees a
half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import csv
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np

from dimcli.errors import DimError

SUPPORTED_SUFFIXES: tuple[str, ...] = (".npy", ".npz", ".csv")

# Text files are UTF-8; bytes that are not UTF-8 travel as surrogate escapes (os.fsdecode).
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"
# Copies between files go in pieces of about this many bytes, so memory stays flat.
_CHUNK_BYTES = 16 << 20
_NPY_MAGIC_LEN = 8  # b"\x93NUMPY" + major + minor


def feature_format(path: Path) -> str:
    """Return the feature format of `path` ("npy", "npz" or "csv"), from its extension.

    Raises:
        DimError: the extension is not one of the supported ones.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        supported = ", ".join(SUPPORTED_SUFFIXES)
        raise DimError(
            f"cannot tell the feature format of {path} from its extension {suffix or '(none)'!r};"
            f" use one of {supported}"
        )
    return suffix[1:]


def index_path(npy_path: Path) -> Path:
    """Return the sidecar index of a .npy feature file: ``feats.npy`` -> ``feats.index.csv``."""
    npy_path = Path(npy_path)
    return npy_path.with_name(npy_path.stem + ".index.csv")


def _partial_path(final: Path, tag: str = "") -> Path:
    """A temporary name next to `final`, hidden and marked with this process's id."""
    return final.with_name(f".{final.name}{tag}.partial-{os.getpid()}")


def _open_text(path: Path, mode: str) -> IO[str]:
    # newline="" lets the csv module own line endings (quoted newlines survive).
    encoding = "utf-8-sig" if mode == "r" else _ENCODING
    return open(path, mode, encoding=encoding, errors=_ERRORS, newline="")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make renames in `folder` durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _npy_header_text(shape: tuple[int, ...], descr: str) -> str:
    # The dictionary literal of the NPY format (numpy's documented layout), without padding.
    shape_text = "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
    return f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {shape_text}, }}"


def _shrink_npy(path: Path, n_rows: int) -> None:
    """Cut a 2-D .npy file down to its first `n_rows` rows, in place.

    The header is rewritten with the new shape, padded with spaces to its old length so the
    data does not move, and the file is truncated after the last kept row. No data is copied.
    """
    with open(path, "r+b") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            len_size = 2
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            len_size = 4
        else:
            raise AssertionError(f"unexpected .npy version {version} in {path}")
        data_offset = f.tell()
        assert len(shape) == 2 and n_rows <= shape[0], f"cannot shrink {shape} to {n_rows} rows"

        # Header region = dict text + space padding + "\n", between the length field and data.
        region = data_offset - _NPY_MAGIC_LEN - len_size
        text = _npy_header_text((n_rows, shape[1]), dtype.str)
        assert len(text) < region, "a shape with fewer rows never needs a longer header"
        f.seek(_NPY_MAGIC_LEN + len_size)
        f.write((text.ljust(region - 1) + "\n").encode("latin1"))
        f.truncate(data_offset + n_rows * shape[1] * dtype.itemsize)
        f.flush()
        os.fsync(f.fileno())


def _write_npy_member(
    zf: zipfile.ZipFile,
    name: str,
    shape: tuple[int, ...],
    dtype: np.dtype[Any],
    chunks: Iterator[np.ndarray],
) -> None:
    """Stream an array into `zf` as the .npy member `name`, one chunk at a time."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    with zf.open(name, "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, header)
        for chunk in chunks:
            member.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())


def _format_row(values: np.ndarray) -> list[str]:
    # 9 significant digits bring every float32 back bit-exactly.
    return [format(v, ".9g") for v in values.tolist()]


class FeatureWriter:
    """Stream feature rows to a .npy/.npz/.csv file, committed atomically when the block ends.

    Use as a context manager::

        with FeatureWriter(Path("feats.npy"), dim=64, capacity=len(files)) as w:
            w.write(batch_features, batch_paths)

    `capacity` is an upper bound on the rows (the images scanned; unreadable ones may be
    skipped). Rows go straight to disk: for .npy and .npz into a memory-mapped temporary .npy
    of `capacity` rows (sparse on most file systems), for .csv as text, so memory does not grow
    with the number of images. When the block ends without an exception the files are
    shrunk to the rows written, flushed, fsync'ed and renamed to their final names; an
    existing output is replaced only then. On any exception, KeyboardInterrupt included,
    the temporary files are removed and nothing appears under (or is taken from) the final name.

    For .npy the old .npy (if any) is removed first, then the new index is moved in, then the
    new .npy: a reader that finds a .npy therefore always finds its own index next to it.
    (An interruption between those renames leaves an index and no .npy, never a mismatch.)
    """

    # Limitation: a process killed with SIGKILL (no exception to clean up on) leaves its
    # hidden ".<name>.partial-<pid>" files behind; see docs/limitations.md

    def __init__(self, out: Path, dim: int, capacity: int) -> None:
        self.out = Path(out)
        self.format = feature_format(self.out)
        if dim < 1:
            raise ValueError(f"feature dimension must be at least 1, got {dim}")
        if capacity < 0:
            raise ValueError(f"capacity must be at least 0, got {capacity}")
        self.dim = dim
        self.capacity = capacity
        self._n_rows = 0
        self._longest_path = 0
        self._active = False
        self._temps: list[Path] = []
        self._data_tmp: Path | None = None  # the capacity-row .npy (npy, npz)
        self._paths_tmp: Path | None = None  # row,path csv (npy index, npz paths) or the .csv
        self._memmap: np.memmap[Any, np.dtype[np.float32]] | None = None
        self._text: IO[str] | None = None
        self._csv: Any = None  # csv writer; typeshed has no public type for it

    @property
    def n_rows(self) -> int:
        """Rows written so far."""
        return self._n_rows

    # ---- opening -------------------------------------------------------------------------

    def __enter__(self) -> FeatureWriter:
        if self._active or self._temps:
            raise RuntimeError("a FeatureWriter can be entered only once")
        folder = self.out.parent
        if not folder.is_dir():
            raise DimError(
                f"output folder {folder} does not exist; create it or choose another path"
            )
        if self.out.is_dir():
            raise DimError(
                f"output path {self.out} is a folder; give a file name ending in .{self.format}"
            )
        try:
            self._open_temps()
        except BaseException:
            self._discard()
            raise
        self._active = True
        return self

    def _open_temps(self) -> None:
        if self.format in ("npy", "npz"):
            self._data_tmp = _partial_path(self.out, ".features" if self.format == "npz" else "")
            self._temps.append(self._data_tmp)
            self._memmap = np.lib.format.open_memmap(
                self._data_tmp, mode="w+", dtype=np.float32, shape=(self.capacity, self.dim)
            )
            target = index_path(self.out) if self.format == "npy" else self.out
            self._paths_tmp = _partial_path(target, ".paths" if self.format == "npz" else "")
            header = ["row", "path"]
        else:
            self._paths_tmp = _partial_path(self.out)
            header = ["path", *(f"f{j}" for j in range(self.dim))]
        self._temps.append(self._paths_tmp)
        self._text = _open_text(self._paths_tmp, "w")
        self._csv = csv.writer(self._text)
        self._csv.writerow(header)

    # ---- writing -------------------------------------------------------------------------

    def write(self, rows: np.ndarray, paths: Sequence[str]) -> None:
        """Append `rows` (B, D) with their image `paths` (B of them)."""
        if not self._active:
            raise RuntimeError("FeatureWriter.write must be called inside its with-block")
        rows = np.asarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"rows must have shape (B, {self.dim}), got {rows.shape}")
        b, _ = rows.shape
        if len(paths) != b:
            raise ValueError(f"got {b} rows but {len(paths)} paths")
        if self._n_rows + b > self.capacity:
            raise ValueError(
                f"writing {b} more rows would exceed the capacity of {self.capacity} rows"
            )
        start = self._n_rows

        if self._memmap is not None:
            self._memmap[start : start + b] = rows
            self._csv.writerows((start + i, p) for i, p in enumerate(paths))
        else:
            self._csv.writerows([p, *_format_row(r)] for p, r in zip(paths, rows, strict=True))
        self._longest_path = max([self._longest_path, *(len(p) for p in paths)])
        self._n_rows += b

    # ---- closing -------------------------------------------------------------------------

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._active = False
        if exc_type is not None:
            self._discard()
            return
        try:
            self._commit()
        except BaseException:
            self._discard()
            raise

    def _close_handles(self) -> None:
        if self._memmap is not None:
            self._memmap.flush()
            # Dropping the last reference unmaps the file.
            self._memmap = None
        if self._text is not None:
            self._text.close()
            self._text = None
        self._csv = None

    def _discard(self) -> None:
        """Close and delete every temporary file; the final name is never touched."""
        with contextlib.suppress(Exception):  # the files are about to be deleted anyway
            self._close_handles()
        for tmp in self._temps:
            tmp.unlink(missing_ok=True)
        self._temps.clear()

    def _commit(self) -> None:
        assert self._text is not None, "commit without open files"
        self._text.flush()
        os.fsync(self._text.fileno())
        self._close_handles()
        folder = self.out.parent

        if self.format == "npy":
            assert self._data_tmp is not None and self._paths_tmp is not None
            if self._n_rows < self.capacity:
                _shrink_npy(self._data_tmp, self._n_rows)
            else:
                _fsync_file(self._data_tmp)
            # Old .npy out first, index in, new .npy last: a visible .npy has its own index.
            self.out.unlink(missing_ok=True)
            os.replace(self._paths_tmp, index_path(self.out))
            os.replace(self._data_tmp, self.out)
        elif self.format == "npz":
            zip_tmp = _partial_path(self.out)
            self._temps.append(zip_tmp)
            self._write_npz(zip_tmp)
            os.replace(zip_tmp, self.out)
        else:
            assert self._paths_tmp is not None
            os.replace(self._paths_tmp, self.out)

        _fsync_dir(folder)
        for tmp in self._temps:  # the npz's intermediate files
            tmp.unlink(missing_ok=True)
        self._temps.clear()

    def _write_npz(self, zip_tmp: Path) -> None:
        assert self._data_tmp is not None and self._paths_tmp is not None
        n, d = self._n_rows, self.dim
        features = np.load(self._data_tmp, mmap_mode="r")
        step = max(1, _CHUNK_BYTES // (4 * d))
        path_dtype = np.dtype(f"<U{max(1, self._longest_path)}")

        def feature_chunks() -> Iterator[np.ndarray]:
            for start in range(0, n, step):
                yield features[start : start + step]

        def path_chunks() -> Iterator[np.ndarray]:
            with _open_text(self._paths_tmp, "r") as f:  # type: ignore[arg-type]
                reader = csv.reader(f)
                next(reader)  # header
                chunk: list[str] = []
                for _, p in reader:
                    chunk.append(p)
                    if len(chunk) == 4096:
                        yield np.array(chunk, dtype=path_dtype)
                        chunk = []
                if chunk:
                    yield np.array(chunk, dtype=path_dtype)

        with open(zip_tmp, "wb") as raw:
            with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                _write_npy_member(zf, "features.npy", (n, d), np.dtype("<f4"), feature_chunks())
                _write_npy_member(zf, "paths.npy", (n,), path_dtype, path_chunks())
            raw.flush()
            os.fsync(raw.fileno())


# ---- reading -----------------------------------------------------------------------------


def read_features(path: Path) -> tuple[np.ndarray, list[str]]:
    """Read a feature file written by `FeatureWriter` (or by hand in the same layout).

    Returns:
        (features, paths): features is (N, D) float32 (memory-mapped and read-only for .npy);
        paths[i] names the image of row i.

    Raises:
        DimError: unknown extension, missing file or index, corrupt file, wrong shape or dtype,
            or an index whose row count differs from the array's.
    """
    path = Path(path)
    fmt = feature_format(path)
    if not path.is_file():
        raise DimError(
            f"feature file {path} does not exist; check the path or create it with `dim encode`"
        )
    if fmt == "npy":
        return _read_npy(path)
    if fmt == "npz":
        return _read_npz(path)
    return _read_csv(path)


def _corrupt(path: Path, why: object) -> DimError:
    return DimError(
        f"{path} is not a readable feature file ({why}); re-create it with `dim encode`"
    )


def _as_feature_matrix(arr: np.ndarray, path: Path) -> np.ndarray:
    """Check (N, D) with D >= 1 and a float dtype; non-float32 floats are converted (a copy)."""
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise DimError(
            f"features in {path} have shape {arr.shape}, expected (rows, dims) with dims >= 1;"
            " save a 2-D array"
        )
    if arr.dtype == np.float32:
        return arr
    if arr.dtype.kind == "f":
        return np.asarray(arr, dtype=np.float32)
    raise DimError(
        f"features in {path} have dtype {arr.dtype}, expected float32; save them as float32"
    )


def _read_npy(path: Path) -> tuple[np.ndarray, list[str]]:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise _corrupt(path, e) from None
    arr = _as_feature_matrix(arr, path)
    idx = index_path(path)
    if not idx.is_file():
        raise DimError(
            f"index file {idx} for {path} is missing; it names the image of each row and must sit"
            " next to the .npy (re-run `dim encode` to create both)"
        )
    return arr, _read_index(idx, arr.shape[0], path)


def _read_index(idx: Path, n_rows: int, data_path: Path) -> list[str]:
    paths: list[str | None] = [None] * n_rows
    count = 0
    try:
        with _open_text(idx, "r") as f:
            reader = csv.reader(f, strict=True)
            header = next(reader, None)
            if header is None or [h.strip().lower() for h in header] != ["row", "path"]:
                raise DimError(
                    f"index file {idx} must start with the header 'row,path', got {header}"
                )
            for rec in reader:
                if not rec:
                    continue
                if len(rec) != 2:
                    raise DimError(
                        f"index file {idx} line {reader.line_num}: expected 'row,path', got {rec}"
                    )
                try:
                    row = int(rec[0])
                except ValueError:
                    raise DimError(
                        f"index file {idx} line {reader.line_num}: row {rec[0]!r} is not an integer"
                    ) from None
                count += 1
                if 0 <= row < n_rows and paths[row] is None:
                    paths[row] = rec[1]
    except csv.Error as e:
        raise _corrupt(idx, e) from None
    if count != n_rows:
        raise DimError(
            f"index file {idx} lists {count} rows but {data_path} has {n_rows}; the two files are"
            " out of step, re-run `dim encode` to write both"
        )
    if any(p is None for p in paths):
        raise DimError(
            f"index file {idx} does not list each row 0..{n_rows - 1} exactly once;"
            " re-run `dim encode` to write it again"
        )
    return [p for p in paths if p is not None]


def _read_npz(path: Path) -> tuple[np.ndarray, list[str]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise _corrupt(path, "not a zip of arrays")
            missing = {"features", "paths"} - set(z.files)
            if missing:
                raise DimError(
                    f"{path} lacks the array(s) {sorted(missing)} (found {sorted(z.files)});"
                    " a .npz feature file needs 'features' and 'paths'"
                )
            features = z["features"]
            paths_arr = z["paths"]
            if not isinstance(features, np.ndarray) or not isinstance(paths_arr, np.ndarray):
                raise _corrupt(path, "its members are not .npy arrays")
    except DimError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise _corrupt(path, e) from None
    features = _as_feature_matrix(features, path)
    if paths_arr.ndim != 1 or paths_arr.dtype.kind != "U":
        raise DimError(
            f"'paths' in {path} must be a 1-D unicode array, got shape {paths_arr.shape} dtype"
            f" {paths_arr.dtype}; save it with np.array(list_of_str)"
        )
    if paths_arr.shape[0] != features.shape[0]:
        raise DimError(
            f"{path} has {features.shape[0]} feature rows but {paths_arr.shape[0]} paths;"
            " re-create it with `dim encode`"
        )
    return features, [str(p) for p in paths_arr.tolist()]


def _read_csv(path: Path) -> tuple[np.ndarray, list[str]]:
    paths: list[str] = []
    rows: list[np.ndarray] = []
    try:
        with _open_text(path, "r") as f:
            reader = csv.reader(f, strict=True)
            header = next(reader, None)
            if header is None or len(header) < 2 or header[0].strip().lower() != "path":
                raise DimError(
                    f"{path} must start with the header 'path,f0,f1,...', got {header}; write one"
                    " column of paths then one column per feature"
                )
            d = len(header) - 1
            for rec in reader:
                if not rec:
                    continue
                if len(rec) != d + 1:
                    raise DimError(
                        f"{path} line {reader.line_num} has {len(rec)} fields, expected {d + 1}"
                        " (path plus one per feature); fix or re-create the file"
                    )
                try:
                    rows.append(np.array(rec[1:], dtype=np.float32))
                except ValueError:
                    raise DimError(
                        f"{path} line {reader.line_num} has a value that is not a number;"
                        " fix or re-create the file"
                    ) from None
                paths.append(rec[0])
    except csv.Error as e:
        raise _corrupt(path, e) from None
    features = np.stack(rows) if rows else np.empty((0, d), dtype=np.float32)
    return features, paths
