"""Probes: how well frozen features predict labels.

The encoder stays fixed; a small classifier is trained on its features and scored on
held-out images. Three probes:

- ``linear``: multinomial logistic regression on standardised features, full-batch L-BFGS,
  with its L2 strength picked on a validation split of the training rows.
- ``knn``: cosine-similarity k-nearest neighbours with similarity-weighted votes,
  weights ``exp(sim / T)`` (the kNN monitor common in self-supervised learning).
- ``mlp``: the Deep InfoMax paper's non-linear probe, Linear(D, 200) - BatchNorm - Dropout(0.1)
  - ReLU - Linear(200, C), Adam lr 1e-4, batch 64.

The paper's linear probe is a hinge-loss SVM (averaged over 5 runs); ours is logistic
regression, a smooth loss that full-batch L-BFGS fits quickly and whose class scores give
top-5. Its accuracies are comparable in kind to the paper's linear numbers, not identical.

Labels come from a CSV (`read_labels_csv`) or from the first folder of each path
(`labels_from_keys`); `align` matches them to feature rows by path. `run_probes` ties it
together. Every result depends only on the data and the seed.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dimcli._constants import DEFAULT_K, DEFAULT_MLP_EPOCHS, PROBE_METHODS
from dimcli.errors import DimError

# PROBE_METHODS, DEFAULT_MLP_EPOCHS (the paper fixes lr and batch but not the epochs) and
# DEFAULT_K live in dimcli._constants, so that `dim probe --help` needs no torch.
DEFAULT_L2_GRID: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
DEFAULT_TEMPERATURE = 0.07
_VALIDATION_FRACTION = 0.2
_MAX_NAMED = 3  # how many offending items an error message lists


# ---- labels --------------------------------------------------------------------------------


def normalise_path(path: str) -> str:
    """Normalise an image path for matching: backslashes to '/', leading './' removed."""
    path = path.replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return path


def _lines(numbers: Sequence[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:_MAX_NAMED])
    return shown + (", ..." if len(numbers) > _MAX_NAMED else "")


def read_labels_csv(path: Path) -> dict[str, str]:
    """Read a labels CSV with (at least) a ``path`` and a ``label`` column.

    Column names are case-insensitive and may come in any order; other columns are ignored.
    UTF-8 with or without BOM, CRLF or LF line ends. Bytes that are not UTF-8 are kept as
    surrogate escapes, so paths match names from `os.fsdecode`. Paths and labels are stripped
    of surrounding spaces, and paths normalised with `normalise_path`.

    Returns:
        {normalised path: label}

    Raises:
        DimError: missing or empty file, missing column, empty paths or labels,
            duplicate paths, or no data rows.
    """
    path = Path(path)
    if not path.is_file():
        raise DimError(f"labels file {path} does not exist; check the path")
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    text = raw.decode("utf-8", errors="surrogateescape")
    if not text.strip():
        raise DimError(
            f"labels file {path} is empty; write a header 'path,label' and one row per image"
        )

    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
        names = [h.strip().lower() for h in header]
        for wanted in ("path", "label"):
            if wanted not in names:
                found = ", ".join(repr(h) for h in header)
                raise DimError(
                    f"labels file {path} has no {wanted!r} column (found {found});"
                    " the header needs 'path' and 'label' columns"
                )
        i_path, i_label = names.index("path"), names.index("label")

        labels: dict[str, str] = {}
        no_path: list[int] = []
        no_label: list[int] = []
        duplicates: list[str] = []
        for rec in reader:
            if not any(cell.strip() for cell in rec):
                continue  # blank line
            # Limitation: surrounding spaces are stripped from label paths (hand-typed CSVs
            # put them after commas), so a file whose name starts or ends with a space
            # cannot be labelled; see docs/limitations.md
            key = normalise_path(rec[i_path].strip()) if i_path < len(rec) else ""
            label = rec[i_label].strip() if i_label < len(rec) else ""
            if not key:
                no_path.append(reader.line_num)
            elif not label:
                no_label.append(reader.line_num)
            elif key in labels:
                duplicates.append(key)
            else:
                labels[key] = label
    except csv.Error as e:
        raise DimError(f"labels file {path} is not valid CSV ({e}); fix the quoting") from None

    if no_path:
        raise DimError(
            f"labels file {path} has {len(no_path)} rows with an empty path (lines"
            f" {_lines(no_path)}); give every row a path"
        )
    if no_label:
        raise DimError(
            f"labels file {path} has {len(no_label)} rows without a label (lines"
            f" {_lines(no_label)}); label them or remove them"
        )
    if duplicates:
        unique = list(dict.fromkeys(duplicates))
        named = ", ".join(repr(d) for d in unique[:_MAX_NAMED])
        raise DimError(
            f"labels file {path} lists {len(unique)} paths more than once ({named}"
            f"{', ...' if len(unique) > _MAX_NAMED else ''}); keep one row per image"
        )
    if not labels:
        raise DimError(f"labels file {path} has a header but no rows; add one row per image")
    return labels


def labels_from_keys(keys: Sequence[str]) -> dict[str, str]:
    """Label each path inside a subfolder by its first folder: ``cat/001.jpg`` -> ``cat``.

    Paths not inside a subfolder get no label.

    Raises:
        DimError: none of the paths is inside a subfolder.
    """
    labels: dict[str, str] = {}
    for key in keys:
        key = normalise_path(key)
        folder, sep, _ = key.partition("/")
        if sep and folder:
            labels[key] = folder
    if not labels:
        example = f" (e.g. {keys[0]!r})" if keys else ""
        raise DimError(
            f"none of the {len(keys)} feature paths is inside a subfolder{example}, so folder"
            " names give no labels; arrange images as <class>/<image> or pass a labels CSV"
        )
    return labels


def check_disjoint_labels(
    train_labels: Mapping[str, str],
    test_labels: Mapping[str, str],
    *,
    names: tuple[str, str] = ("the training labels", "the test labels"),
) -> None:
    """Refuse a path labelled both for training and for testing (train/test leakage).

    Paths are compared after `normalise_path`. Needed when the test rows are picked from the
    same features as the training rows; a separate test set may reuse relative paths.

    Args:
        train_labels, test_labels: {path: label}, e.g. from `read_labels_csv`.
        names: how the message names the two label sets (e.g. their files).

    Raises:
        DimError: a path is in both, naming how many and the first few.
    """
    test_paths = {normalise_path(k) for k in test_labels}
    both = list(dict.fromkeys(p for k in train_labels if (p := normalise_path(k)) in test_paths))
    if both:
        named = ", ".join(repr(p) for p in both[:_MAX_NAMED])
        raise DimError(
            f"{len(both)} paths are labelled in both {names[0]} and {names[1]} ({named}"
            f"{', ...' if len(both) > _MAX_NAMED else ''}); a row cannot both train and test"
            " the probes, so remove those paths from one of the files"
        )


def _class_order(label: str) -> tuple[int, int, str]:
    # Integer-like labels sort numerically ("2" before "10"), ahead of the others.
    if re.fullmatch(r"[+-]?\d+", label):
        return (0, int(label), label)
    return (1, 0, label)


@dataclass(frozen=True)
class Aligned:
    """Feature rows matched to labels.

    Attributes:
        rows: (M,) int64 indices into the feature rows that have a label.
        y: (M,) int64 class id of each matched row, an index into `classes`.
        classes: class names, sorted (integer-like names numerically).
        n_labels: entries in the labels mapping.
        n_matched: feature rows with a label (M).
        n_unmatched_labels: labels whose path is not among the feature rows.
        n_unlabelled_rows: feature rows without a label.
    """

    rows: np.ndarray
    y: np.ndarray
    classes: list[str]
    n_labels: int
    n_matched: int
    n_unmatched_labels: int
    n_unlabelled_rows: int


def align(
    keys: Sequence[str], labels: Mapping[str, str], *, classes: Sequence[str] | None = None
) -> Aligned:
    """Match feature rows (by their paths `keys`) to `labels` (by path).

    Args:
        keys: the path of each feature row.
        labels: {path: label}, e.g. from `read_labels_csv`.
        classes: a fixed class list to number the labels by (e.g. the training set's);
            by default, the sorted labels of the matched rows.

    Raises:
        DimError: duplicate feature paths, no row matches, or (with `classes`) a label
            that is not among `classes`.
    """
    norm = [normalise_path(k) for k in keys]
    dups = [k for k, n in Counter(norm).items() if n > 1]
    if dups:
        named = ", ".join(repr(d) for d in dups[:_MAX_NAMED])
        raise DimError(
            f"the feature file lists {len(dups)} paths more than once ({named}); encode each"
            " image once"
        )
    labels = {normalise_path(k): v for k, v in labels.items()}
    rows = [i for i, k in enumerate(norm) if k in labels]
    if not rows:
        label_example = next(iter(labels), "(none)")
        key_example = norm[0] if norm else "(none)"
        raise DimError(
            f"none of the {len(labels)} labelled paths matches one of the {len(norm)} feature"
            f" paths (e.g. label path {label_example!r}, feature path {key_example!r});"
            " write label paths relative to the encoded folder"
        )
    row_labels = [labels[norm[i]] for i in rows]

    if classes is None:
        classes = sorted(set(row_labels), key=_class_order)
    class_id = {c: j for j, c in enumerate(classes)}
    unknown = sorted(set(row_labels) - class_id.keys(), key=_class_order)
    if unknown:
        named = ", ".join(repr(u) for u in unknown[:_MAX_NAMED])
        raise DimError(
            f"{len(unknown)} labels are not among the {len(classes)} training classes ({named});"
            " a probe cannot predict them, so drop those rows or add training images"
        )
    return Aligned(
        rows=np.asarray(rows, dtype=np.int64),
        y=np.asarray([class_id[lab] for lab in row_labels], dtype=np.int64),
        classes=list(classes),
        n_labels=len(labels),
        n_matched=len(rows),
        n_unmatched_labels=len(labels) - len(rows),
        n_unlabelled_rows=len(norm) - len(rows),
    )


# ---- splits --------------------------------------------------------------------------------


def _split(
    y: np.ndarray, test_fraction: float, seed: int, *, singletons_to_train: bool
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        n = len(members)
        if n < 2:
            assert singletons_to_train, "callers check class sizes first"
            train.append(members)
            continue
        # Every class lands on both sides: at least one row each.
        n_test = min(max(round(n * test_fraction), 1), n - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    empty = np.empty(0, dtype=np.int64)
    return (
        np.sort(np.concatenate(train or [empty])).astype(np.int64),
        np.sort(np.concatenate(test or [empty])).astype(np.int64),
    )


def stratified_split(
    y: np.ndarray,
    test_fraction: float,
    seed: int,
    *,
    class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into train and test, class by class.

    Each class puts round(n_c * test_fraction) rows (at least 1, at most n_c - 1) into test.

    Args:
        y: (N,) int class ids.
        test_fraction: share of each class for the test side, in (0, 1).
        seed: the permutation seed; the same seed gives the same split.
        class_names: names for error messages (by default the class ids).

    Returns:
        (train_idx, test_idx): sorted, disjoint int64 index arrays covering range(N).

    Raises:
        DimError: test_fraction outside (0, 1), or a class with fewer than 2 rows.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DimError(f"test fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    y = np.asarray(y)
    ids, counts = np.unique(y, return_counts=True)
    small = [int(c) for c, n in zip(ids, counts, strict=True) if n < 2]
    if small:
        names = [class_names[c] if class_names is not None else str(c) for c in small]
        named = ", ".join(repr(n) for n in names[:_MAX_NAMED])
        raise DimError(
            f"{len(small)} classes have a single labelled image ({named}), which cannot be in"
            " both train and test; label more images of them or remove them"
        )
    return _split(y, test_fraction, seed, singletons_to_train=False)


# ---- results -------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """Scores of one probe on the test rows.

    Attributes:
        method: "linear", "knn" or "mlp".
        top1: accuracy.
        top5: share of test rows whose class is among the 5 best scores; None when there
            are 5 classes or fewer (it would be trivially 1).
        macro_f1: mean F1 over the classes that occur in the test labels or predictions.
        per_class: class -> accuracy on that class's test rows (classes with test rows only).
        confusion: confusion[true][predicted] counts, in `classes` order.
        n_train, n_test: rows used to fit and to score.
        classes: class names, the order of `confusion`.
        extra: method settings actually used (chosen L2, k, epochs, ...).
    """

    method: str
    top1: float
    top5: float | None
    macro_f1: float
    per_class: dict[str, float]
    confusion: list[list[int]]
    n_train: int
    n_test: int
    classes: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict with the attributes above as keys."""
        return asdict(self)


def result_from_scores(
    method: str,
    scores: np.ndarray,
    y_test: np.ndarray,
    *,
    n_train: int,
    class_names: Sequence[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> ProbeResult:
    """Score a probe from its (N_test, C) class scores: the prediction is the argmax
    (the first class on ties), top-5 ranks by score with ties in class order."""
    n_test, c = scores.shape
    assert n_test > 0, "no test rows to score"
    y_test = np.asarray(y_test, dtype=np.int64)
    pred = scores.argmax(axis=1)

    confusion = np.zeros((c, c), dtype=np.int64)
    np.add.at(confusion, (y_test, pred), 1)  # rows: true class, cols: predicted

    top5: float | None = None
    if c > 5:
        best5 = np.argsort(-scores, axis=1, kind="stable")[:, :5]  # (N_test, 5)
        top5 = float((best5 == y_test[:, None]).any(axis=1).mean())

    tp = np.diag(confusion)
    fp = confusion.sum(axis=0) - tp
    fn = confusion.sum(axis=1) - tp
    denom = 2 * tp + fp + fn
    present = denom > 0
    macro_f1 = float((2 * tp[present] / denom[present]).mean())

    names = list(class_names) if class_names is not None else [str(j) for j in range(c)]
    support = confusion.sum(axis=1)
    per_class = {names[j]: float(tp[j] / support[j]) for j in range(c) if support[j] > 0}
    return ProbeResult(
        method=method,
        top1=float((pred == y_test).mean()),
        top5=top5,
        macro_f1=macro_f1,
        per_class=per_class,
        confusion=confusion.tolist(),
        n_train=n_train,
        n_test=n_test,
        classes=names,
        extra=extra if extra is not None else {},
    )


def _check_inputs(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, n_classes: int
) -> None:
    """Shapes and class ids a probe needs; a mismatch is a caller's bug, hence ValueError."""
    if x_train.ndim != 2 or x_test.ndim != 2 or x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"features must be (N, D) alike, got {x_train.shape} and {x_test.shape}")
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ValueError("need one label per feature row")
    if len(x_train) == 0 or len(x_test) == 0:
        raise ValueError("need at least one training row and one test row")
    lo = int(min(y_train.min(), y_test.min()))
    hi = int(max(y_train.max(), y_test.max()))
    if lo < 0 or hi >= n_classes:
        raise ValueError(f"class ids must lie in [0, {n_classes}), got {lo}..{hi}")


def _standardise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zero mean, unit variance per feature, with statistics from the training rows only."""
    x_train = np.asarray(x_train, dtype=np.float32)
    x_test = np.asarray(x_test, dtype=np.float32)
    mean = x_train.mean(axis=0, dtype=np.float64)
    std = x_train.std(axis=0, dtype=np.float64)
    std[std < 1e-8] = 1.0  # constant features stay constant instead of exploding
    scale = (1.0 / std).astype(np.float32)
    shift = mean.astype(np.float32)
    return (x_train - shift) * scale, (x_test - shift) * scale


# ---- linear --------------------------------------------------------------------------------


def _fit_logistic(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS from zero weights.

    Minimises mean cross-entropy + l2/2 * ||W||^2 (the bias is not penalised). The problem
    is convex and starts from zeros, so the result does not depend on any seed.
    """
    _, d = x.shape
    w = torch.zeros(d, n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=10,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = x @ w + b  # (N, D) x (D, C) -> (N, C)
        loss = F.cross_entropy(logits, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    n_classes: int,
    seed: int,
    *,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    max_iter: int = 100,
    class_names: Sequence[str] | None = None,
) -> ProbeResult:
    """Multinomial logistic regression on standardised features.

    The L2 strength is the value of `l2_grid` with the best accuracy on a stratified 20%
    validation split of the training rows (ties go to the stronger penalty); the model is
    then refit on all training rows with it. `seed` only drives that validation split.
    """
    _check_inputs(x_train, y_train, x_test, y_test, n_classes)
    if not l2_grid:
        raise ValueError("l2_grid must hold at least one value")
    x_train, x_test = _standardise(x_train, x_test)
    xt = torch.from_numpy(np.ascontiguousarray(x_train))
    yt = torch.from_numpy(np.asarray(y_train, dtype=np.int64))

    # ---- choose the L2 strength on a validation split of the training rows ----
    fit_idx, val_idx = _split(
        np.asarray(y_train), _VALIDATION_FRACTION, seed, singletons_to_train=True
    )
    grid = sorted(l2_grid, reverse=True)
    val_acc: dict[float, float] = {}
    if len(grid) > 1 and len(val_idx) > 0:
        fit_i, val_i = torch.from_numpy(fit_idx), torch.from_numpy(val_idx)
        for l2 in grid:
            w, b = _fit_logistic(xt[fit_i], yt[fit_i], n_classes, l2, max_iter)
            pred = (xt[val_i] @ w + b).argmax(dim=1)
            val_acc[l2] = float((pred == yt[val_i]).float().mean())
        chosen = max(grid, key=lambda l2: val_acc[l2])  # first max = strongest penalty
    else:
        chosen = grid[len(grid) // 2]

    # ---- refit on all training rows and score the test rows ----
    w, b = _fit_logistic(xt, yt, n_classes, chosen, max_iter)
    with torch.no_grad():
        scores = (torch.from_numpy(np.ascontiguousarray(x_test)) @ w + b).numpy()
    extra = {
        "l2": chosen,
        "l2_grid": sorted(grid),
        "validation_accuracy": {str(k): v for k, v in val_acc.items()},
        "max_iter": max_iter,
    }
    return result_from_scores(
        "linear", scores, y_test, n_train=len(x_train), class_names=class_names, extra=extra
    )


# ---- kNN -----------------------------------------------------------------------------------


def _float_tensor(x: np.ndarray) -> torch.Tensor:
    """float32 tensor of `x`, copied only when `x` is read-only (a memory-mapped feature file)."""
    a = np.ascontiguousarray(x, dtype=np.float32)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def knn_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    n_classes: int,
    seed: int,
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    max_chunk_elements: int = 1 << 24,
    class_names: Sequence[str] | None = None,
) -> ProbeResult:
    """Weighted k-nearest-neighbour vote by cosine similarity.

    Each test row takes its k most similar training rows (k capped at the number of training
    rows); neighbour i votes for its class with weight exp(sim_i / temperature). Test rows go
    in chunks so that the (chunk, N_train) similarity block holds at most
    `max_chunk_elements` floats. `seed` is unused (the vote is deterministic); it is accepted
    so that every probe has the same signature.
    """
    _check_inputs(x_train, y_train, x_test, y_test, n_classes)
    if k < 1:
        raise DimError(f"k for the kNN probe must be at least 1, got {k}")
    if temperature <= 0:
        raise DimError(f"kNN temperature must be positive, got {temperature}")
    n_train, _ = x_train.shape
    n_test, _ = x_test.shape
    k_used = min(k, n_train)

    train = F.normalize(_float_tensor(x_train), dim=1)
    test = F.normalize(_float_tensor(x_test), dim=1)
    train_y = torch.from_numpy(np.asarray(y_train, dtype=np.int64))
    chunk = max(1, max_chunk_elements // n_train)
    scores = torch.empty(n_test, n_classes)
    with torch.no_grad():
        for start in range(0, n_test, chunk):
            q = test[start : start + chunk]  # (B, D)
            sim = q @ train.T  # (B, D) x (D, N_train) -> (B, N_train)
            top_sim, top_idx = sim.topk(k_used, dim=1)  # (B, k)
            # exp((s - 1) / T) instead of exp(s / T): same ratios, no overflow (s <= 1).
            weight = torch.exp((top_sim - 1.0) / temperature)
            votes = torch.zeros(len(q), n_classes)
            votes.scatter_add_(1, train_y[top_idx], weight)  # (B, k) -> (B, C)
            scores[start : start + len(q)] = votes
    extra = {"k": k_used, "temperature": temperature}
    return result_from_scores(
        "knn", scores.numpy(), y_test, n_train=n_train, class_names=class_names, extra=extra
    )


# ---- MLP -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch ops on one CPU thread, then restore the thread count.

    Mini-batch steps of the MLP probe are too small to gain from intra-op threads; with them,
    each step pays thread hand-off costs (ruinous when other processes share the cores), and
    the numbers could change with the machine's core count.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def mlp_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    n_classes: int,
    seed: int,
    *,
    epochs: int = DEFAULT_MLP_EPOCHS,
    batch_size: int = 64,
    lr: float = 1e-4,
    hidden: int = 200,
    dropout: float = 0.1,
    class_names: Sequence[str] | None = None,
) -> ProbeResult:
    """The paper's non-linear probe on standardised features.

    Linear(D, hidden) - BatchNorm1d - Dropout - ReLU - Linear(hidden, C), trained with Adam
    for a fixed number of epochs over shuffled mini-batches, on one CPU thread. A final batch
    of a single row is skipped (BatchNorm needs two). Initialisation, shuffling and dropout
    all come from `seed`; torch's global RNG state is restored afterwards.
    """
    _check_inputs(x_train, y_train, x_test, y_test, n_classes)
    if epochs < 1 or batch_size < 2:
        raise DimError(
            f"the MLP probe needs epochs >= 1 and batch size >= 2, got {epochs} and {batch_size}"
        )
    x_train, x_test = _standardise(x_train, x_test)
    xt = torch.from_numpy(np.ascontiguousarray(x_train))
    yt = torch.from_numpy(np.asarray(y_train, dtype=np.int64))
    n, d = xt.shape

    with _one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        order = torch.Generator().manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(d, hidden),
            nn.BatchNorm1d(hidden),
            nn.Dropout(dropout),
            nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )
        opt = torch.optim.Adam(model.parameters(), lr=lr)

        model.train()
        for _ in range(epochs):
            perm = torch.randperm(n, generator=order)
            for start in range(0, n, batch_size):
                idx = perm[start : start + batch_size]
                if len(idx) < 2:
                    continue
                loss = F.cross_entropy(model(xt[idx]), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()

        model.eval()
        with torch.no_grad():
            scores = model(torch.from_numpy(np.ascontiguousarray(x_test))).numpy()
    extra = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "hidden": hidden}
    return result_from_scores(
        "mlp", scores, y_test, n_train=n, class_names=class_names, extra=extra
    )


ProbeFn = Callable[..., ProbeResult]
PROBES: dict[str, ProbeFn] = {"linear": linear_probe, "knn": knn_probe, "mlp": mlp_probe}


# ---- the whole run -------------------------------------------------------------------------


@dataclass
class ProbeReport:
    """Everything `run_probes` found; `to_dict` gives its JSON form."""

    seed: int
    split: str  # "stratified" or "test-set"
    test_fraction: float | None
    dim: int
    n_labels: int
    n_matched: int
    n_unmatched_labels: int
    n_unlabelled_rows: int
    n_train: int
    n_test: int
    classes: list[str]
    results: list[ProbeResult]
    test_counts: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data; the schema is documented on `run_probes`."""
        return {
            "seed": self.seed,
            "split": self.split,
            "test_fraction": self.test_fraction,
            "dim": self.dim,
            "n_labels": self.n_labels,
            "n_matched": self.n_matched,
            "n_unmatched_labels": self.n_unmatched_labels,
            "n_unlabelled_rows": self.n_unlabelled_rows,
            "test_counts": self.test_counts,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "classes": list(self.classes),
            "results": [r.to_dict() for r in self.results],
        }


def _gather(features: np.ndarray, rows: np.ndarray, keys: Sequence[str], what: str) -> np.ndarray:
    """Copy the labelled rows out of a (possibly memory-mapped) feature array, as float32."""
    x = np.ascontiguousarray(features[rows], dtype=np.float32)  # (M, D)
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if len(bad):
        raise DimError(
            f"{len(bad)} {what} feature rows hold NaN or infinite values"
            f" (e.g. {keys[rows[bad[0]]]!r}); re-encode those images or remove them"
        )
    return x


def _check_features(features: np.ndarray, keys: Sequence[str], what: str) -> None:
    if features.ndim != 2:
        raise DimError(f"{what} features must be a (rows, dims) array, got shape {features.shape}")
    if features.shape[0] != len(keys):
        raise DimError(
            f"{what} features have {features.shape[0]} rows but {len(keys)} paths;"
            " the feature file is inconsistent, re-create it"
        )


def run_probes(
    features: np.ndarray,
    keys: Sequence[str],
    labels: Mapping[str, str],
    *,
    methods: Sequence[str] = PROBE_METHODS,
    test_features: np.ndarray | None = None,
    test_keys: Sequence[str] | None = None,
    test_labels: Mapping[str, str] | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    k: int = DEFAULT_K,
    mlp_epochs: int = DEFAULT_MLP_EPOCHS,
) -> ProbeReport:
    """Match features to labels, split (or take the given test set) and run each probe.

    The test rows come from one of three places:

    - neither `test_features` nor `test_labels`: the labelled rows are split by
      `stratified_split` with `test_fraction` and `seed`;
    - `test_features` (paths `test_keys`): all labelled rows of `features` train and the
      rows of `test_features` labelled in `test_labels` (by default `labels`) test;
    - `test_labels` alone: the rows of `features` labelled in `labels` train and those
      labelled in `test_labels` test (one feature file, the split given by two label sets).
      A path in both is an error (`check_disjoint_labels`); rows in neither are ignored, and
      both `n_unlabelled_rows` count them.

    With a test set, `test_fraction` is ignored, and every test class must occur in training.

    JSON schema of `ProbeReport.to_dict()` (all keys always present)::

        {
          "seed": int, "split": "stratified" | "test-set",
          "test_fraction": float | null,       # null with a test set
          "dim": int,                          # feature width
          "n_labels": int, "n_matched": int,   # training side (or the only side)
          "n_unmatched_labels": int, "n_unlabelled_rows": int,
          "test_counts": null | {"n_labels", "n_matched", "n_unmatched_labels",
                                 "n_unlabelled_rows"},   # the test set's
          "n_train": int, "n_test": int,
          "classes": [str, ...],               # order of class ids and confusion rows
          "results": [ {"method": "linear" | "knn" | "mlp", "top1": float,
                        "top5": float | null, "macro_f1": float,
                        "per_class": {class: float}, "confusion": [[int]],
                        "n_train": int, "n_test": int, "classes": [str],
                        "extra": {...method settings...}}, ... ]   # in `methods` order
        }

    Raises:
        DimError: unknown method, inconsistent features, no matching labels, fewer than two
            classes, classes too small to split, NaN/inf features, a path labelled both
            for training and for testing.
    """
    unknown = [m for m in methods if m not in PROBES]
    if unknown or not methods:
        raise DimError(
            f"unknown probe method(s) {unknown or '(none given)'}; choose from {', '.join(PROBES)}"
        )
    _check_features(features, keys, "training")
    if test_features is None and test_keys is not None:
        raise ValueError("test_keys need test_features")
    if test_features is None and test_labels is not None:
        check_disjoint_labels(labels, test_labels)  # before any work on the rows
    aligned = align(keys, labels)
    classes = aligned.classes
    if len(classes) < 2:
        raise DimError(
            f"all {aligned.n_matched} labelled rows have the class {classes[0]!r}; a probe needs"
            " at least 2 classes"
        )

    test_counts: dict[str, int] | None = None
    n_unlabelled_rows = aligned.n_unlabelled_rows
    if test_features is None and test_labels is not None:  # the test rows are in `features`
        t = align(keys, test_labels, classes=classes)
        n_unlabelled_rows = len(keys) - aligned.n_matched - t.n_matched  # labelled in neither
        test_counts = {
            "n_labels": t.n_labels,
            "n_matched": t.n_matched,
            "n_unmatched_labels": t.n_unmatched_labels,
            "n_unlabelled_rows": n_unlabelled_rows,
        }
        x_train, y_train = _gather(features, aligned.rows, keys, "training"), aligned.y
        x_test, y_test = _gather(features, t.rows, keys, "test"), t.y
        split, fraction = "test-set", None
    elif test_features is None:
        x = _gather(features, aligned.rows, keys, "training")
        train_idx, test_idx = stratified_split(aligned.y, test_fraction, seed, class_names=classes)
        x_train, y_train = x[train_idx], aligned.y[train_idx]
        x_test, y_test = x[test_idx], aligned.y[test_idx]
        split, fraction = "stratified", test_fraction
    else:
        if test_keys is None:
            raise ValueError("test_features need test_keys")
        _check_features(test_features, test_keys, "test")
        if test_features.shape[1] != features.shape[1]:
            raise DimError(
                f"training features have {features.shape[1]} dims but test features"
                f" {test_features.shape[1]}; encode both with the same model and layer"
            )
        t = align(test_keys, test_labels if test_labels is not None else labels, classes=classes)
        test_counts = {
            "n_labels": t.n_labels,
            "n_matched": t.n_matched,
            "n_unmatched_labels": t.n_unmatched_labels,
            "n_unlabelled_rows": t.n_unlabelled_rows,
        }
        x_train, y_train = _gather(features, aligned.rows, keys, "training"), aligned.y
        x_test, y_test = _gather(test_features, t.rows, test_keys, "test"), t.y
        split, fraction = "test-set", None

    n_classes = len(classes)
    results: list[ProbeResult] = []
    for method in methods:
        args = (x_train, y_train, x_test, y_test, n_classes, seed)
        if method == "linear":
            results.append(linear_probe(*args, class_names=classes))
        elif method == "knn":
            results.append(knn_probe(*args, k=k, class_names=classes))
        else:
            results.append(mlp_probe(*args, epochs=mlp_epochs, class_names=classes))
    return ProbeReport(
        seed=seed,
        split=split,
        test_fraction=fraction,
        dim=int(features.shape[1]),
        n_labels=aligned.n_labels,
        n_matched=aligned.n_matched,
        n_unmatched_labels=aligned.n_unmatched_labels,
        n_unlabelled_rows=n_unlabelled_rows,
        n_train=len(x_train),
        n_test=len(x_test),
        classes=list(classes),
        results=results,
        test_counts=test_counts,
    )
