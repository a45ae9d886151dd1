"""Tests for dimcli.probe: labels, alignment, splits, the three probes and the report."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from dimcli.errors import DimError
from dimcli.probe import (
    DEFAULT_L2_GRID,
    ProbeResult,
    align,
    check_disjoint_labels,
    knn_probe,
    labels_from_keys,
    linear_probe,
    mlp_probe,
    read_labels_csv,
    result_from_scores,
    run_probes,
    stratified_split,
)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # These problems are tiny: extra threads only add hand-off costs on a shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- labels CSV ----------------------------------------------------------------------------


def _labels_file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "labels.csv"
    path.write_bytes(data)
    return path


def test_labels_with_bom_crlf_quotes_and_extra_columns(tmp_path: Path) -> None:
    data = (
        b"\xef\xbb\xbfNote,Label,PATH\r\n"
        b'x,cat,"cats/a,b.jpg"\r\n'
        b"y, dog ,.\\dogs\\c.jpg\r\n"
        b'z,bird,"./birds/say ""hi"".png"\r\n'
        b"\r\n"
    )
    labels = read_labels_csv(_labels_file(tmp_path, data))
    assert labels == {"cats/a,b.jpg": "cat", "dogs/c.jpg": "dog", 'birds/say "hi".png': "bird"}


def test_labels_strip_spaces_around_paths_and_labels(tmp_path: Path) -> None:
    data = b"label, path\ncat, cats/a b.jpg \n"
    assert read_labels_csv(_labels_file(tmp_path, data)) == {"cats/a b.jpg": "cat"}


def test_labels_with_lf_and_integer_labels(tmp_path: Path) -> None:
    data = b"path,label\nc.jpg,10\na.jpg,2\nb.jpg,1\nd.jpg,2\n"
    labels = read_labels_csv(_labels_file(tmp_path, data))
    assert labels == {"c.jpg": "10", "a.jpg": "2", "b.jpg": "1", "d.jpg": "2"}
    aligned = align(["a.jpg", "b.jpg", "c.jpg", "d.jpg"], labels)
    assert aligned.classes == ["1", "2", "10"]  # numeric order, not "1" < "10" < "2"
    assert aligned.y.tolist() == [1, 0, 2, 1]


def test_labels_with_non_utf8_bytes_match_fsdecode_names(tmp_path: Path) -> None:
    raw_name = b"caf\xe9/\xff.jpg"  # Latin-1 bytes, not valid UTF-8
    labels = read_labels_csv(_labels_file(tmp_path, b"path,label\n" + raw_name + b",cafe\n"))
    key = os.fsdecode(raw_name)
    assert labels == {key: "cafe"}
    assert align([key], labels).n_matched == 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "is empty; write a header 'path,label'"),
        (b"  \n\n", "is empty"),
        (b"path,label\n", "has a header but no rows"),
        (b"file,class\na,b\n", r"no 'path' column \(found 'file', 'class'\)"),
        (b"path,class\na,b\n", r"no 'label' column \(found 'path', 'class'\)"),
        (
            b"path,label\na.jpg,x\n./a.jpg,y\nb.jpg,z\nb.jpg,z\n",
            r"lists 2 paths more than once \('a.jpg', 'b.jpg'\); keep one row",
        ),
        (
            b"path,label\na,x\nb,\nc\nd,y\ne, \n",
            r"3 rows without a label \(lines 3, 4, 6\); label them or remove them",
        ),
        (b"path,label\n,x\n", r"1 rows with an empty path \(lines 2\)"),
        (b'path,label\n"a,x\n', "not valid CSV"),
    ],
)
def test_labels_errors(tmp_path: Path, data: bytes, message: str) -> None:
    with pytest.raises(DimError, match=message):
        read_labels_csv(_labels_file(tmp_path, data))


def test_labels_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DimError, match=r"labels file .*nope\.csv does not exist"):
        read_labels_csv(tmp_path / "nope.csv")


def test_labels_from_keys() -> None:
    keys = ["cat/1.jpg", "dog/sub/2.jpg", "loose.jpg", "dog\\3.jpg", "./cat/4.jpg"]
    assert labels_from_keys(keys) == {
        "cat/1.jpg": "cat",
        "dog/sub/2.jpg": "dog",
        "dog/3.jpg": "dog",
        "cat/4.jpg": "cat",
    }
    with pytest.raises(DimError, match=r"none of the 2 feature paths is inside a subfolder"):
        labels_from_keys(["a.jpg", "b.jpg"])


# ---- align ---------------------------------------------------------------------------------


def test_align_counts() -> None:
    keys = ["a/1.jpg", "b/2.jpg", "c/3.jpg", "a/4.jpg"]
    labels = {"a/1.jpg": "a", "a/4.jpg": "a", "c/3.jpg": "c", "zzz.jpg": "z"}
    aligned = align(keys, labels)
    assert aligned.rows.tolist() == [0, 2, 3]
    assert aligned.rows.dtype == np.int64 and aligned.y.dtype == np.int64
    assert aligned.classes == ["a", "c"]  # only classes of matched rows
    assert aligned.y.tolist() == [0, 1, 0]
    assert (aligned.n_labels, aligned.n_matched) == (4, 3)
    assert (aligned.n_unmatched_labels, aligned.n_unlabelled_rows) == (1, 1)


def test_align_errors() -> None:
    with pytest.raises(
        DimError, match=r"none of the 1 labelled paths .* label path 'x/1.jpg', feature path 'y/1"
    ):
        align(["y/1.jpg"], {"x/1.jpg": "x"})
    with pytest.raises(DimError, match=r"lists 1 paths more than once \('a.jpg'\)"):
        align(["a.jpg", "./a.jpg"], {"a.jpg": "x"})
    with pytest.raises(DimError, match=r"not among the 1 training classes \('b'\)"):
        align(["a.jpg", "b.jpg"], {"a.jpg": "a", "b.jpg": "b"}, classes=["a"])


# ---- split ---------------------------------------------------------------------------------


def test_stratified_split_properties() -> None:
    y = np.repeat(np.arange(4), [10, 20, 3, 47])
    train, test = stratified_split(y, 0.3, seed=7)
    assert np.intersect1d(train, test).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(y)))
    for c, n_c in enumerate([10, 20, 3, 47]):
        assert int((y[test] == c).sum()) == round(n_c * 0.3)
    again_train, again_test = stratified_split(y, 0.3, seed=7)
    assert np.array_equal(train, again_train) and np.array_equal(test, again_test)
    _, other_test = stratified_split(y, 0.3, seed=8)
    assert not np.array_equal(test, other_test)


def test_stratified_split_keeps_every_class_on_both_sides() -> None:
    y = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    train, test = stratified_split(y, 0.01, seed=0)  # rounds to 0 test rows for class 0
    assert set(y[test].tolist()) == {0, 1} and set(y[train].tolist()) == {0, 1}
    train, test = stratified_split(y, 0.99, seed=0)
    assert set(y[test].tolist()) == {0, 1} and set(y[train].tolist()) == {0, 1}


def test_stratified_split_errors() -> None:
    with pytest.raises(DimError, match=r"single labelled image \('rare'\)"):
        stratified_split(np.array([0, 0, 1]), 0.5, 0, class_names=["common", "rare"])
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(DimError, match=f"between 0 and 1 .*got {bad}"):
            stratified_split(np.array([0, 0, 1, 1]), bad, 0)


# ---- scoring -------------------------------------------------------------------------------


def test_result_from_scores_matches_hand_counts() -> None:
    # 3 classes, 6 test rows; predictions are the argmax of each row.
    scores = np.array(
        [
            [0.9, 0.1, 0.0],  # true 0, pred 0
            [0.2, 0.7, 0.1],  # true 0, pred 1
            [0.1, 0.8, 0.1],  # true 1, pred 1
            [0.1, 0.2, 0.7],  # true 1, pred 2
            [0.0, 0.3, 0.6],  # true 2, pred 2
            [0.5, 0.4, 0.1],  # true 2, pred 0
        ]
    )
    y = np.array([0, 0, 1, 1, 2, 2])
    r = result_from_scores("test", scores, y, n_train=10, class_names=["a", "b", "c"])
    assert r.confusion == [[1, 1, 0], [0, 1, 1], [1, 0, 1]]
    assert r.top1 == pytest.approx(3 / 6)
    assert r.top5 is None  # 3 classes
    assert r.per_class == {"a": 0.5, "b": 0.5, "c": 0.5}
    # Each class: tp 1, fp 1, fn 1 -> F1 = 2 / (2 + 1 + 1) = 0.5.
    assert r.macro_f1 == pytest.approx(0.5)
    assert (r.n_train, r.n_test, r.classes) == (10, 6, ["a", "b", "c"])


def _reference_macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    f1s = []
    for c in sorted(set(y.tolist()) | set(pred.tolist())):
        tp = sum(1 for t, p in zip(y, pred, strict=True) if t == c and p == c)
        fp = sum(1 for t, p in zip(y, pred, strict=True) if t != c and p == c)
        fn = sum(1 for t, p in zip(y, pred, strict=True) if t == c and p != c)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(f1s) / len(f1s)


def test_result_from_scores_against_references() -> None:
    rng = np.random.default_rng(3)
    n, c = 200, 8
    scores = rng.standard_normal((n, c))
    y = rng.integers(0, c - 1, n)  # class 7 never true: only counts where predicted
    r = result_from_scores("test", scores, y, n_train=1)
    pred = scores.argmax(axis=1)
    assert r.macro_f1 == pytest.approx(_reference_macro_f1(y, pred))
    hand = np.zeros((c, c), dtype=int)
    for t, p in zip(y, pred, strict=True):
        hand[t, p] += 1
    assert r.confusion == hand.tolist()
    assert sum(map(sum, r.confusion)) == n
    top5_hits = sum(
        1 for i in range(n) if y[i] in sorted(range(c), key=lambda j: -scores[i, j])[:5]
    )
    assert r.top5 == pytest.approx(top5_hits / n)
    assert "7" not in r.per_class


# ---- probes on synthetic data ----------------------------------------------------------------


def _blobs(n_classes: int = 5, per_class: int = 100, dim: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_classes, dim)) * 1.5
    y = np.repeat(np.arange(n_classes), per_class)
    x = (centers[y] + rng.standard_normal((len(y), dim))).astype(np.float32)
    train, test = stratified_split(y, 0.3, seed)
    return x[train], y[train], x[test], y[test]


PROBE_CALLS = {
    "linear": lambda *a: linear_probe(*a, l2_grid=(1e-4, 1e-2)),
    "knn": lambda *a: knn_probe(*a, k=10),
    "mlp": lambda *a: mlp_probe(*a, epochs=20),
}


@pytest.mark.parametrize("method", list(PROBE_CALLS))
def test_probe_separates_blobs(method: str) -> None:
    x_tr, y_tr, x_te, y_te = _blobs()
    r = PROBE_CALLS[method](x_tr, y_tr, x_te, y_te, 5, 0)
    assert r.method == method
    assert r.top1 >= 0.95
    assert r.top5 is None
    assert sum(map(sum, r.confusion)) == len(y_te) == r.n_test
    assert r.n_train == len(y_tr)


@pytest.mark.parametrize("method", list(PROBE_CALLS))
def test_probe_is_near_chance_on_shuffled_labels(method: str) -> None:
    x_tr, y_tr, x_te, y_te = _blobs(per_class=200)
    rng = np.random.default_rng(1)
    r = PROBE_CALLS[method](x_tr, rng.permutation(y_tr), x_te, rng.permutation(y_te), 5, 0)
    assert r.top1 < 1 / 5 + 0.15


@pytest.mark.parametrize("method", list(PROBE_CALLS))
def test_top5_with_more_than_5_classes(method: str) -> None:
    x_tr, y_tr, x_te, y_te = _blobs(n_classes=8, per_class=20)
    r = PROBE_CALLS[method](x_tr, y_tr, x_te, y_te, 8, 0)
    assert r.top5 is not None and r.top5 >= r.top1


@pytest.mark.parametrize("method", list(PROBE_CALLS))
def test_probe_same_seed_same_numbers(method: str) -> None:
    x_tr, y_tr, x_te, y_te = _blobs(per_class=30, seed=2)
    a = PROBE_CALLS[method](x_tr, y_tr, x_te, y_te, 5, 11).to_dict()
    b = PROBE_CALLS[method](x_tr, y_tr, x_te, y_te, 5, 11).to_dict()
    assert a == b


def test_linear_records_chosen_l2() -> None:
    x_tr, y_tr, x_te, y_te = _blobs(per_class=30)
    r = linear_probe(x_tr, y_tr, x_te, y_te, 5, 0)
    assert r.extra["l2"] in DEFAULT_L2_GRID
    assert set(r.extra["validation_accuracy"]) == {str(v) for v in DEFAULT_L2_GRID}
    best = max(r.extra["validation_accuracy"].values())
    assert r.extra["validation_accuracy"][str(r.extra["l2"])] == best


def test_knn_caps_k_and_chunking_does_not_change_results() -> None:
    x_tr, y_tr, x_te, y_te = _blobs(per_class=10)
    r = knn_probe(x_tr, y_tr, x_te, y_te, 5, 0, k=1000)
    assert r.extra["k"] == len(y_tr)
    whole = knn_probe(x_tr, y_tr, x_te, y_te, 5, 0, k=5)
    chunked = knn_probe(x_tr, y_tr, x_te, y_te, 5, 0, k=5, max_chunk_elements=len(y_tr) * 3)
    assert whole.to_dict() == chunked.to_dict()


def test_knn_votes_match_a_loop() -> None:
    rng = np.random.default_rng(4)
    x_tr = rng.standard_normal((30, 6)).astype(np.float32)
    y_tr = rng.integers(0, 3, 30)
    x_te = rng.standard_normal((12, 6)).astype(np.float32)
    y_te = rng.integers(0, 3, 12)
    r = knn_probe(x_tr, y_tr, x_te, y_te, 3, 0, k=4, temperature=0.5)
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    pred = []
    for q in x_te:
        sims = [float(unit(q) @ unit(t)) for t in x_tr]
        nearest = sorted(range(30), key=lambda i: -sims[i])[:4]
        votes = [0.0, 0.0, 0.0]
        for i in nearest:
            votes[y_tr[i]] += np.exp(sims[i] / 0.5)
        pred.append(int(np.argmax(votes)))
    hand = np.zeros((3, 3), dtype=int)
    for t, p in zip(y_te, pred, strict=True):
        hand[t, p] += 1
    assert r.confusion == hand.tolist()


def test_probes_take_read_only_features_silently() -> None:
    # Feature files are memory-mapped read-only; torch warns about such arrays unless copied.
    x_tr, y_tr, x_te, y_te = _blobs()
    for a in (x_tr, x_te):
        a.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = {name: call(x_tr, y_tr, x_te, y_te, 5, 0) for name, call in PROBE_CALLS.items()}
    assert all(r.top1 > 0.9 for r in results.values()), {n: r.top1 for n, r in results.items()}


def test_probes_reject_inconsistent_inputs_and_accept_float64() -> None:
    x_tr, y_tr, x_te, y_te = _blobs(per_class=10)
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 3\)"):
        knn_probe(x_tr, y_tr, x_te, y_te, 3, 0)
    with pytest.raises(ValueError, match="one label per feature row"):
        linear_probe(x_tr, y_tr[:-1], x_te, y_te, 5, 0)
    with pytest.raises(ValueError, match=r"\(N, D\) alike"):
        mlp_probe(x_tr, y_tr, x_te[:, :3], y_te, 5, 0)
    r64 = linear_probe(x_tr.astype(np.float64), y_tr, x_te.astype(np.float64), y_te, 5, 0)
    r32 = linear_probe(x_tr, y_tr, x_te, y_te, 5, 0)
    assert r64.to_dict() == r32.to_dict()


def test_mlp_restores_global_rng() -> None:
    x_tr, y_tr, x_te, y_te = _blobs(per_class=10)
    torch.manual_seed(123)
    torch.set_num_threads(2)
    state = torch.get_rng_state()
    mlp_probe(x_tr, y_tr, x_te, y_te, 5, 0, epochs=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.get_num_threads() == 2


def test_probe_result_to_dict_is_json() -> None:
    x_tr, y_tr, x_te, y_te = _blobs(per_class=10)
    d = knn_probe(x_tr, y_tr, x_te, y_te, 5, 0).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert set(d) == set(ProbeResult.__dataclass_fields__)


# ---- run_probes ----------------------------------------------------------------------------


def _keyed_blobs(per_class: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    names = ["cat", "dog", "eel"]
    centers = rng.standard_normal((3, 16)) * 2
    y = np.repeat(np.arange(3), per_class)
    x = (centers[y] + rng.standard_normal((len(y), 16))).astype(np.float32)
    keys = [f"{names[c]}/{i:04d}.jpg" for i, c in enumerate(y)]
    return x, keys


def test_run_probes_report_schema_and_determinism() -> None:
    x, keys = _keyed_blobs()
    keys = [*keys, "loose.jpg"]
    x = np.concatenate([x, np.zeros((1, 16), dtype=np.float32)])
    labels = labels_from_keys(keys)
    labels["gone/x.jpg"] = "cat"
    report = run_probes(x, keys, labels, seed=3, mlp_epochs=5)
    d = report.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert set(d) == {
        "seed",
        "split",
        "test_fraction",
        "dim",
        "n_labels",
        "n_matched",
        "n_unmatched_labels",
        "n_unlabelled_rows",
        "test_counts",
        "n_train",
        "n_test",
        "classes",
        "results",
    }
    assert (d["n_matched"], d["n_labels"], d["n_unmatched_labels"]) == (90, 91, 1)
    assert d["n_unlabelled_rows"] == 1 and d["test_counts"] is None
    assert d["classes"] == ["cat", "dog", "eel"]
    assert (d["n_train"], d["n_test"], d["dim"], d["seed"]) == (72, 18, 16, 3)
    assert [r["method"] for r in d["results"]] == ["linear", "knn", "mlp"]
    assert all(r["top1"] >= 0.9 for r in d["results"][:2])
    assert run_probes(x, keys, labels, seed=3, mlp_epochs=5).to_dict() == d


def test_run_probes_with_a_test_set() -> None:
    x, keys = _keyed_blobs(per_class=20, seed=0)
    x_test, test_keys = _keyed_blobs(per_class=5, seed=0)
    test_keys = ["t/" + k for k in test_keys]
    test_labels = {k: k.split("/")[1] for k in test_keys}
    report = run_probes(
        x,
        keys,
        labels_from_keys(keys),
        methods=["knn"],
        test_features=x_test,
        test_keys=test_keys,
        test_labels=test_labels,
    )
    assert report.split == "test-set" and report.test_fraction is None
    assert (report.n_train, report.n_test) == (60, 15)
    assert report.test_counts == {
        "n_labels": 15,
        "n_matched": 15,
        "n_unmatched_labels": 0,
        "n_unlabelled_rows": 0,
    }
    assert report.results[0].top1 >= 0.9

    with pytest.raises(DimError, match="60 dims|16 dims but test features 4"):
        run_probes(
            x, keys, labels_from_keys(keys), test_features=x_test[:, :4], test_keys=test_keys
        )
    unseen = {k: "fox" for k in test_keys}
    with pytest.raises(DimError, match=r"not among the 3 training classes \('fox'\)"):
        run_probes(
            x,
            keys,
            labels_from_keys(keys),
            test_features=x_test,
            test_keys=test_keys,
            test_labels=unseen,
        )


def test_run_probes_errors() -> None:
    x, keys = _keyed_blobs(per_class=4)
    labels = labels_from_keys(keys)
    with pytest.raises(DimError, match=r"unknown probe method\(s\) \['svm'\]; choose from linear"):
        run_probes(x, keys, labels, methods=["svm"])
    with pytest.raises(DimError, match="have the class 'cat'; a probe needs at least 2 classes"):
        run_probes(x, keys, {k: "cat" for k in keys})
    with pytest.raises(DimError, match="have 12 rows but 11 paths"):
        run_probes(x, keys[:-1], labels)
    bad = x.copy()
    bad[5, 2] = np.nan
    with pytest.raises(DimError, match=r"1 training feature rows hold NaN .*'dog/0005.jpg'"):
        run_probes(bad, keys, labels)


# ---- test rows from the same features (test_labels alone) ----------------------------------


def test_check_disjoint_labels() -> None:
    check_disjoint_labels({"a.jpg": "x", "b.jpg": "y"}, {"c.jpg": "x"})  # disjoint: no error
    train = {f"{i}.jpg": "x" for i in range(6)}
    test = {f"./{i}.jpg": "x" for i in range(1, 6)} | {"other.jpg": "y"}  # compared normalised
    with pytest.raises(
        DimError,
        match=r"^5 paths are labelled in both the training labels and the test labels "
        r"\('1.jpg', '2.jpg', '3.jpg', \.\.\.\); a row cannot both train and test",
    ):
        check_disjoint_labels(train, test)
    with pytest.raises(DimError, match=r"1 paths are labelled in both a.csv and b.csv \('x'\);"):
        check_disjoint_labels({"x": "1"}, {"x": "2"}, names=("a.csv", "b.csv"))


def test_run_probes_with_test_labels_from_the_same_features() -> None:
    x, keys = _keyed_blobs(per_class=20, seed=0)  # 60 rows, 3 classes
    train = {k: k.split("/")[0] for i, k in enumerate(keys) if i % 4 < 2}  # 30 rows
    test = {k: k.split("/")[0] for i, k in enumerate(keys) if i % 4 == 2}  # 15 rows
    test["gone/x.jpg"] = "cat"
    report = run_probes(x, keys, train, methods=["knn"], test_labels=test)
    assert report.split == "test-set" and report.test_fraction is None
    assert (report.n_train, report.n_test, report.n_unlabelled_rows) == (30, 15, 15)
    assert report.test_counts == {
        "n_labels": 16,
        "n_matched": 15,
        "n_unmatched_labels": 1,
        "n_unlabelled_rows": 15,  # labelled in neither
    }
    # The same as the rows given as a separate test set.
    test_rows = [i for i, k in enumerate(keys) if k in test]
    separate = run_probes(
        x,
        keys,
        train,
        methods=["knn"],
        test_features=x[test_rows],
        test_keys=[keys[i] for i in test_rows],
        test_labels=test,
    )
    assert report.results == separate.results

    with pytest.raises(DimError, match="1 paths are labelled in both the training labels"):
        run_probes(x, keys, train, test_labels={next(iter(train)): "cat"})
    with pytest.raises(DimError, match="none of the 1 labelled paths matches one of the 60"):
        run_probes(x, keys, train, test_labels={"gone/x.jpg": "cat"})
    with pytest.raises(ValueError, match="test_keys need test_features"):
        run_probes(x, keys, train, test_keys=keys)
