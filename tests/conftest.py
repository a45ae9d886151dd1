"""Fixtures shared by the dimcli test suite."""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# ==== CIFAR-10 subset ====

# The CIFAR-10 image-folder archive lives next to the repository in the dimcli workspace.
CIFAR_ARCHIVE = (Path(__file__).parents[1] / ".." / "shared" / "data" / "cifar10.tar.gz").resolve()
CIFAR_CLASSES = (
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
# Images per class unpacked by `cifar_subset`; raise them for tests that need more data.
CIFAR_TRAIN_PER_CLASS = 40
CIFAR_TEST_PER_CLASS = 20


@pytest.fixture(scope="session")
def cifar_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real CIFAR-10 folder: train/<class>/*.jpg and test/<class>/*.jpg (32x32).

    CIFAR_TRAIN_PER_CLASS and CIFAR_TEST_PER_CLASS images per class, the first ones met in
    the archive. Unpacked once per session; skipped where the archive is absent.
    """
    if not CIFAR_ARCHIVE.is_file():
        pytest.skip(f"CIFAR-10 archive not found at {CIFAR_ARCHIVE} (only in the dimcli workspace)")

    out = tmp_path_factory.mktemp("cifar10")
    quota = {"train": CIFAR_TRAIN_PER_CLASS, "test": CIFAR_TEST_PER_CLASS}
    counts = {(split, name): 0 for split in quota for name in CIFAR_CLASSES}
    missing = sum(quota[split] for split, _ in counts)

    # Stream the archive once (60k members) and pick files, instead of unpacking all of it;
    # stop as soon as every (split, class) has its quota.
    with tarfile.open(CIFAR_ARCHIVE, "r|gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or not parts[2].endswith(".jpg"):
                continue
            split, label, file_name = parts
            bucket = (split, label)
            if bucket not in counts or counts[bucket] >= quota[split]:
                continue
            source = tar.extractfile(member)
            assert source is not None, f"archive member {member.name} has no data"
            target = out / split / label / file_name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read())
            counts[bucket] += 1
            missing -= 1
            if missing == 0:
                break

    short = {f"{s}/{c}": quota[s] - n for (s, c), n in counts.items() if n < quota[s]}
    assert not short, f"CIFAR-10 archive lacks images for {short}"
    return out


# ==== synthetic image folders ====


@pytest.fixture
def make_image_folder() -> Callable[..., Path]:
    """Return `make(root, n, size)`: write n random-noise RGB PNGs into root and return it.

    Images alternate between the class folders root/class0 and root/class1 and are named
    0000.png, 0001.png, ...; `size` is an int (square) or (width, height). Pixels are seeded
    by the image number, so the same call gives the same files.
    """

    def make(root: Path, n: int, size: int | tuple[int, int] = 16) -> Path:
        width, height = (size, size) if isinstance(size, int) else size
        for i in range(n):
            folder = root / f"class{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:04d}.png")
        return root

    return make
