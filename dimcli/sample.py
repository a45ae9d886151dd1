"""The bundled demo sample: a small, real slice of CIFAR-10 shipped inside the package.

The package holds one archive, `dimcli/sample/cifar10-sample.tar.gz`, with the original JPEG
bytes of the first 200 training and 100 test images of each CIFAR-10 class (file names in
sorted order), laid out as an image folder:

    train/<class>/NNNN.jpg      10 classes x 200
    test/<class>/NNNN.jpg       10 classes x 100

`sample_dir()` unpacks it once into the user's cache folder and returns that folder; later
calls reuse it. The cache folder is `$DIM_CACHE_DIR`, else `$XDG_CACHE_HOME/dimcli`, else
`~/.cache/dimcli`. The unpacked folder is named after a hash of the archive, so a new sample
in a new release unpacks next to the old one instead of mixing with it. Unpacking goes to a
temporary folder that is renamed into place at the end, so an interrupted unpack never leaves
a half sample behind.

`build_sample_archive` made the archive from the full CIFAR-10 image-folder archive; it is kept
here so the subset can be rebuilt and checked (see docs/sample.md).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

from dimcli.errors import DimError

SAMPLE_ARCHIVE = Path(__file__).parent / "sample" / "cifar10-sample.tar.gz"
SAMPLE_NAME = "cifar10"
SPLITS: tuple[str, ...] = ("train", "test")
CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
PER_CLASS: dict[str, int] = {"train": 200, "test": 100}
CACHE_ENV = "DIM_CACHE_DIR"

# Members are written with these fixed attributes so that the same input gives a
# byte-identical archive (and so the same cache folder name).
_FIXED_MTIME = 0
_FILE_MODE = 0o644


# ==== cache location ====


def cache_dir() -> Path:
    """The cache folder: $DIM_CACHE_DIR, else $XDG_CACHE_HOME/dimcli, else ~/.cache/dimcli."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "dimcli"
    return Path.home() / ".cache" / "dimcli"


def archive_hash(archive: Path = SAMPLE_ARCHIVE) -> str:
    """The first 12 hex digits of the archive's SHA-256 (names the unpacked folder)."""
    digest = hashlib.sha256()
    with open(archive, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


# ==== reading the archive ====


def _check_member(member: tarfile.TarInfo, archive: Path) -> tuple[str, str, str] | None:
    """(split, class, file) of a sample image member; None for a folder entry.

    Raises:
        DimError: any other member (a link, an absolute path, '..', an unexpected layout),
            which a genuine sample archive never holds.
    """
    if member.isdir():
        return None
    parts = member.name.split("/")
    ok = (
        member.isfile()
        and len(parts) == 3
        and parts[0] in SPLITS
        and parts[1] in CLASSES
        and parts[2].endswith(".jpg")
        and not parts[2].startswith(".")
        and "\\" not in member.name
    )
    if not ok:
        raise DimError(
            f"unexpected member {member.name!r} in sample archive {archive}; the file is "
            "damaged, reinstall dimcli"
        )
    return parts[0], parts[1], parts[2]


def sample_counts(archive: Path = SAMPLE_ARCHIVE) -> dict[tuple[str, str], int]:
    """Images per (split, class) in the archive, from its listing alone (nothing unpacked)."""
    counts: Counter[tuple[str, str]] = Counter()
    with _open_archive(archive) as tar:
        for member in tar.getmembers():
            where = _check_member(member, archive)
            if where is not None:
                counts[where[0], where[1]] += 1
    return dict(counts)


def _open_archive(archive: Path) -> tarfile.TarFile:
    if not archive.is_file():
        raise DimError(
            f"the bundled sample {archive} is missing; reinstall dimcli "
            "(pip install --force-reinstall dimcli)"
        )
    try:
        return tarfile.open(archive, "r:gz")
    except (tarfile.TarError, OSError) as err:
        raise DimError(
            f"cannot read the bundled sample {archive} ({err}); reinstall dimcli"
        ) from None


# ==== unpacking ====


def sample_dir(archive: Path = SAMPLE_ARCHIVE, cache: Path | None = None) -> Path:
    """The unpacked sample folder (train/ and test/ inside), unpacking it on first use.

    Args:
        archive: the sample archive (the bundled one by default).
        cache: the cache folder (default `cache_dir()`).

    Returns:
        `<cache>/sample/cifar10-<hash>`, holding train/<class>/*.jpg and test/<class>/*.jpg.

    Raises:
        DimError: the archive is missing or damaged, or the cache folder is not writable.
    """
    root = (cache if cache is not None else cache_dir()) / "sample"
    target = root / f"{SAMPLE_NAME}-{archive_hash(archive)}"
    if target.is_dir():
        return target  # only ever created by the rename below, so it is complete

    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=root))
    except OSError as err:
        raise DimError(
            f"cannot create the sample cache folder {root} ({err.strerror or err}); set "
            f"{CACHE_ENV} to a writable folder"
        ) from None
    try:
        _unpack(archive, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first: its folder is as good as ours.
            if not target.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def subset_dir(
    per_class_train: int,
    per_class_test: int,
    archive: Path = SAMPLE_ARCHIVE,
    cache: Path | None = None,
) -> Path:
    """A smaller copy of the sample: the first N images (by name) of each class and split.

    Built once next to the full sample (`cifar10-<hash>-<train>x<test>`), atomically like it.

    Raises:
        DimError: counts outside 1..the sample's own, or the errors of `sample_dir`.
    """
    quota = {"train": per_class_train, "test": per_class_test}
    for split, n in quota.items():
        if not 1 <= n <= PER_CLASS[split]:
            raise DimError(
                f"a sample subset takes 1 to {PER_CLASS[split]} {split} images per class, got {n}"
            )
    full = sample_dir(archive, cache)
    target = full.with_name(f"{full.name}-{per_class_train}x{per_class_test}")
    if target.is_dir():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=full.parent))
    try:
        for split, n in quota.items():
            for label in CLASSES:
                folder = tmp / split / label
                folder.mkdir(parents=True)
                for path in sorted((full / split / label).iterdir())[:n]:
                    shutil.copyfile(path, folder / path.name)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _unpack(archive: Path, out: Path) -> None:
    """Write every image of the archive under `out`, checking each member's name first."""
    with _open_archive(archive) as tar:
        for member in tar:
            where = _check_member(member, archive)
            if where is None:
                continue
            source = tar.extractfile(member)
            assert source is not None, f"regular member {member.name} has no data"
            path = out.joinpath(*where)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(source.read())


# ==== building the archive (run once by the maintainers) ====


def build_sample_archive(
    src_tar: Path,
    out: Path,
    per_class_train: int = PER_CLASS["train"],
    per_class_test: int = PER_CLASS["test"],
) -> Path:
    """Write the sample archive: the first N images per class and split, by sorted file name.

    Args:
        src_tar: the CIFAR-10 image-folder archive (train/<class>/*.jpg, test/<class>/*.jpg).
        out: the .tar.gz to write.
        per_class_train, per_class_test: images per class taken from each split.

    Returns:
        `out`. The same input always gives byte-identical output (sorted members, fixed
        times, owners and modes, gzip header without a time stamp).

    Raises:
        DimError: the source lacks a class or holds fewer images than asked for.
    """
    quota = {"train": per_class_train, "test": per_class_test}

    # Pass 1: list the file names, to choose the first N of each folder in sorted order.
    names: dict[tuple[str, str], list[str]] = {(s, c): [] for s in SPLITS for c in CLASSES}
    with tarfile.open(src_tar, "r|gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and (parts[0], parts[1]) in names:
                names[parts[0], parts[1]].append(member.name)
    chosen: set[str] = set()
    for (split, label), found in names.items():
        if len(found) < quota[split]:
            raise DimError(
                f"{src_tar} holds {len(found)} images in {split}/{label}, fewer than the "
                f"{quota[split]} asked for; lower the per-class count"
            )
        chosen.update(sorted(found)[: quota[split]])

    # Pass 2: read the chosen files' bytes.
    data: dict[str, bytes] = {}
    with tarfile.open(src_tar, "r|gz") as tar:
        for member in tar:
            if member.name in chosen:
                source = tar.extractfile(member)
                assert source is not None, f"regular member {member.name} has no data"
                data[member.name] = source.read()
    assert len(data) == len(chosen), "every chosen file was listed in pass 1"

    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=_FIXED_MTIME) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for name in sorted(data):
            info = tarfile.TarInfo(name)
            info.size = len(data[name])
            info.mtime = _FIXED_MTIME
            info.mode = _FILE_MODE
            tar.addfile(info, io.BytesIO(data[name]))
    out.write_bytes(buffer.getvalue())
    return out
