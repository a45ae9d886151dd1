"""Tests for `dim probe` (dimcli/cli/probe.py), from feature files and from image folders."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dimcli.cli import app
from dimcli.cli.probe import parse_methods
from dimcli.encode import encode_folder
from dimcli.errors import UsageError
from dimcli.features import FeatureWriter
from dimcli.modelfile import save_encoder
from dimcli.models import build_encoder

PREPROCESSING = {
    "image_size": 32,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "resize": "shorter-side-center-crop",
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # The probes are tiny; on a shared 2-core machine a second intra-op thread only spins.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_features(path: Path, x: np.ndarray, keys: list[str]) -> Path:
    n, d = x.shape
    with FeatureWriter(path, dim=d, capacity=n) as w:
        w.write(x, keys)
    return path


def _write_labels(path: Path, labels: dict[str, str], header: str = "path,label") -> Path:
    lines = [header, *(f"{k},{v}" for k, v in labels.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def _blobs(n_classes: int, per_class: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Well separated Gaussian blobs, one per class; keys are class<c>/<i>.png."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 4.0, (n_classes, 12))
    x = np.concatenate(
        [centres[c] + rng.normal(0.0, 0.3, (per_class, 12)) for c in range(n_classes)]
    )
    keys = [f"class{c}/{i:03d}.png" for c in range(n_classes) for i in range(per_class)]
    return x.astype(np.float32), keys


@pytest.fixture
def blobs(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """feats.npy with 8 separable classes x 20 rows, and labels.csv naming every row."""
    x, keys = _blobs(8, 20)
    feats = _write_features(tmp_path / "feats.npy", x, keys)
    labels = _write_labels(tmp_path / "labels.csv", {k: k.split("/")[0] for k in keys})
    return feats, labels, keys


def _cli(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["probe", *(str(a) for a in args)])
    return result.exit_code, result.stdout, result.stderr


def _one_line_error(code: int, err: str, expected_code: int, message: str) -> None:
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]


# ==== results ====


def test_every_method_separates_separable_features(
    tmp_path: Path, blobs: tuple[Path, Path, list[str]]
) -> None:
    feats, labels, _ = blobs
    report = tmp_path / "report.json"
    code, out, err = _cli("--features", feats, "--labels", labels, "--method", "all",
                          "--mlp-epochs", "100", "--json", report)  # fmt: skip
    assert code == 0, err
    data = json.loads(report.read_text())
    assert [r["method"] for r in data["results"]] == ["linear", "knn", "mlp"]
    for r in data["results"]:
        assert r["top1"] >= 0.95, r["method"]
        assert r["top5"] == 1.0
    assert "160 of 160 labelled paths matched" in out
    for column in ("method", "top-1", "top-5", "macro-F1", "n_train", "n_test"):
        assert column in out
    assert "linear" in out and "knn" in out and "mlp" in out


def test_json_report_schema(tmp_path: Path, blobs: tuple[Path, Path, list[str]]) -> None:
    feats, labels, _ = blobs
    report = tmp_path / "sub" / "report.json"
    code, _, err = _cli("--features", feats, "--labels", labels, "--method", "linear,knn",
                        "--json", report)  # fmt: skip
    assert code == 0, err
    data = json.loads(report.read_text())
    assert set(data) == {
        "inputs", "seed", "split", "test_fraction", "dim", "n_labels", "n_matched",
        "n_unmatched_labels", "n_unlabelled_rows", "test_counts", "n_train", "n_test",
        "classes", "results",
    }  # fmt: skip
    assert data["inputs"]["features"] == str(feats) and data["inputs"]["labels"] == str(labels)
    assert data["split"] == "stratified" and data["test_fraction"] == 0.2 and data["seed"] == 0
    assert (data["n_train"], data["n_test"], data["dim"]) == (128, 32, 12)
    assert data["classes"] == [f"class{c}" for c in range(8)]
    for r in data["results"]:
        assert set(r) == {
            "method", "top1", "top5", "macro_f1", "per_class", "confusion", "n_train",
            "n_test", "classes", "extra",
        }  # fmt: skip
        confusion = np.array(r["confusion"])
        assert confusion.shape == (8, 8) and confusion.sum() == 32
        assert r["top1"] == pytest.approx(np.trace(confusion) / 32)
        assert set(r["per_class"]) == set(data["classes"])
    assert [p.name for p in report.parent.iterdir()] == ["report.json"]  # no temporary left


def test_same_seed_gives_the_same_report(
    tmp_path: Path, blobs: tuple[Path, Path, list[str]]
) -> None:
    feats, labels, _ = blobs
    texts = []
    for name in ("a.json", "b.json"):
        args = ["--method", "all", "--mlp-epochs", "5", "--seed", "3", "--json", tmp_path / name]
        code, _, err = _cli("--features", feats, "--labels", labels, *args)
        assert code == 0, err
        texts.append((tmp_path / name).read_text())
    assert texts[0] == texts[1]
    assert json.loads(texts[0])["seed"] == 3


def test_top5_column_only_with_more_than_five_classes(tmp_path: Path) -> None:
    x, keys = _blobs(3, 10)
    feats = _write_features(tmp_path / "feats.npy", x, keys)
    code, out, err = _cli("--features", feats, "--labels-from-folders", "--method", "knn")
    assert code == 0, err
    assert "top-1" in out and "top-5" not in out


def test_per_class_table(tmp_path: Path, blobs: tuple[Path, Path, list[str]]) -> None:
    feats, labels, _ = blobs
    code, out, err = _cli("--features", feats, "--labels", labels, "--per-class",
                          "--method", "knn")  # fmt: skip
    assert code == 0, err
    assert "per-class accuracy" in out
    assert all(f"class{c}" in out for c in range(8))


def test_labels_from_folders_and_default_features_file(
    tmp_path: Path, blobs: tuple[Path, Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # feats.npy of the fixture is the default
    code, _, err = _cli("--labels-from-folders", "--method", "knn", "--json", "r.json")
    assert code == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["inputs"]["labels"] == "folders" and data["inputs"]["features"] == "feats.npy"
    assert data["n_matched"] == 160 and data["results"][0]["top1"] >= 0.95


def test_partial_labels_are_reported(tmp_path: Path, blobs: tuple[Path, Path, list[str]]) -> None:
    feats, _, keys = blobs
    labelled = {k: k.split("/")[0] for k in keys[::2]}  # every other row
    labelled["elsewhere/x.png"] = "class0"
    labels = _write_labels(tmp_path / "half.csv", labelled)
    code, out, err = _cli("--features", feats, "--labels", labels, "--method", "knn")
    assert code == 0, err
    assert "80 of 81 labelled paths matched feature rows (1 labels without a row, " in out
    assert "80 rows without a label" in out


def test_separate_test_set_from_features(tmp_path: Path) -> None:
    x, keys = _blobs(4, 20, seed=0)
    x_test, _ = _blobs(4, 5, seed=0)  # same centres, new rows
    test_keys = [f"test/{i:03d}.png" for i in range(20)]
    feats = _write_features(tmp_path / "train.npy", x, keys)
    test_feats = _write_features(tmp_path / "test.npz", x_test, test_keys)
    labels = _write_labels(tmp_path / "labels.csv", {k: k.split("/")[0] for k in keys})
    test_labels = _write_labels(
        tmp_path / "test.csv", {k: f"class{i // 5}" for i, k in enumerate(test_keys)}
    )
    report = tmp_path / "r.json"
    code, out, err = _cli("--features", feats, "--labels", labels, "--test-features",
                          test_feats, "--test-labels", test_labels, "--method", "linear",
                          "--json", report)  # fmt: skip
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["split"] == "test-set" and data["test_fraction"] is None
    assert (data["n_train"], data["n_test"]) == (80, 20)
    assert data["test_counts"]["n_matched"] == 20
    assert data["results"][0]["top1"] >= 0.95
    assert "test set: 20 of 20 labelled paths matched" in out


# ==== encoding on the fly ====


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "run" / "encoder.safetensors"
    save_encoder(build_encoder("conv32", feature_dim=16), path, preprocessing=PREPROCESSING)
    return path


def test_images_and_model_give_the_same_report_as_a_feature_file(
    tmp_path: Path, make_image_folder: Callable[..., Path], model_file: Path
) -> None:
    images = make_image_folder(tmp_path / "images", 16, 32)
    test_images = make_image_folder(tmp_path / "test_images", 6, 32)
    feats, test_feats = tmp_path / "feats.npy", tmp_path / "test.npy"
    for folder, out in ((images, feats), (test_images, test_feats)):
        encode_folder(folder, out, model=model_file, workers=0, progress=False)

    common = ["--labels-from-folders", "--method", "knn,linear", "--k", "3"]
    fly_args = ["--images", images, "--test-images", test_images, "--model", model_file]
    code, _, err = _cli(*fly_args, "--workers", "0", "-q", *common, "--json", tmp_path / "fly.json")
    assert code == 0, err
    code, _, err = _cli("--features", feats, "--test-features", test_feats, *common,
                        "--json", tmp_path / "file.json")  # fmt: skip
    assert code == 0, err

    fly = json.loads((tmp_path / "fly.json").read_text())
    file = json.loads((tmp_path / "file.json").read_text())
    assert fly["inputs"]["images"] == str(images) and fly["inputs"]["model"] == str(model_file)
    assert fly["inputs"]["layer"] == "y" and fly["inputs"]["features"] is None
    assert fly["results"] == file["results"]
    assert (fly["n_matched"], fly["test_counts"]["n_matched"]) == (16, 6)


def test_images_with_a_bad_model_is_a_one_line_error(
    tmp_path: Path, make_image_folder: Callable[..., Path]
) -> None:
    images = make_image_folder(tmp_path / "images", 4, 32)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    code, _, err = _cli("--images", images, "--model", bad, "--labels-from-folders")
    _one_line_error(code, err, 1, "not a safetensors model file")


# ==== errors ====


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--labels labels.csv (header path,label) or --labels-from-folders"),
        (["--labels", "l.csv", "--labels-from-folders"], "either --labels or --labels-from"),
        (["--labels-from-folders", "--features", "f.npy", "--images", "d"], "either --features"),
        (["--labels-from-folders", "--test-features", "t.npy", "--test-images", "d"],
         "either --test-features or --test-images"),
        (["--labels-from-folders", "--test-labels", "t.csv"], "drop --test-labels"),
        (["--labels-from-folders", "--method", "svm"],
         "unknown --method 'svm'; choose from linear, knn, mlp or all"),
        (["--labels-from-folders", "--workers", "x"], "--workers must be auto or a number"),
    ],
)  # fmt: skip
def test_usage_errors_exit_2(args: list[str], message: str) -> None:
    code, _, err = _cli(*args)
    _one_line_error(code, err, 2, message)


def test_labels_without_a_label_column(tmp_path: Path, blobs: tuple[Path, Path, list[str]]) -> None:
    feats, _, keys = blobs
    labels = _write_labels(tmp_path / "l.csv", {k: "x" for k in keys}, header="path,class")
    code, _, err = _cli("--features", feats, "--labels", labels)
    _one_line_error(code, err, 1, "has no 'label' column (found 'path', 'class')")


def test_labels_that_match_no_row(tmp_path: Path, blobs: tuple[Path, Path, list[str]]) -> None:
    feats, _, _ = blobs
    labels = _write_labels(tmp_path / "l.csv", {"other/a.png": "a", "other/b.png": "b"})
    code, _, err = _cli("--features", feats, "--labels", labels)
    _one_line_error(code, err, 1, "none of the 2 labelled paths matches one of the 160 feature")


def test_class_too_small_to_split(tmp_path: Path, blobs: tuple[Path, Path, list[str]]) -> None:
    feats, _, keys = blobs
    labelled = {k: k.split("/")[0] for k in keys}
    labelled[keys[0]] = "lonely"
    labels = _write_labels(tmp_path / "l.csv", labelled)
    code, _, err = _cli("--features", feats, "--labels", labels)
    _one_line_error(code, err, 1, "1 classes have a single labelled image ('lonely')")


def test_single_class_is_an_error(tmp_path: Path, blobs: tuple[Path, Path, list[str]]) -> None:
    feats, _, keys = blobs
    labels = _write_labels(tmp_path / "l.csv", {k: "same" for k in keys})
    code, _, err = _cli("--features", feats, "--labels", labels)
    _one_line_error(code, err, 1, "a probe needs at least 2 classes")


def test_missing_files(tmp_path: Path, blobs: tuple[Path, Path, list[str]]) -> None:
    feats, labels, _ = blobs
    code, _, err = _cli("--features", feats, "--labels", tmp_path / "nope.csv")
    _one_line_error(code, err, 1, f"labels file {tmp_path / 'nope.csv'} does not exist")
    code, _, err = _cli("--features", tmp_path / "nope.npy", "--labels", labels)
    _one_line_error(code, err, 1, f"feature file {tmp_path / 'nope.npy'} does not exist")


def test_missing_default_features_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli("--labels-from-folders")
    _one_line_error(code, err, 1, "feature file feats.npy does not exist")


def test_bad_test_fraction(blobs: tuple[Path, Path, list[str]]) -> None:
    feats, labels, _ = blobs
    code, _, err = _cli("--features", feats, "--labels", labels, "--test-fraction", "1.5")
    _one_line_error(code, err, 1, "test fraction must be between 0 and 1")


def test_parse_methods_accepts_repeats_commas_and_all() -> None:
    assert parse_methods(None) == ["linear"]
    assert parse_methods(["knn", "linear,knn"]) == ["knn", "linear"]
    assert parse_methods(["all"]) == ["linear", "knn", "mlp"]
    assert parse_methods(["MLP, knn"]) == ["mlp", "knn"]
    with pytest.raises(UsageError, match="--method is empty"):
        parse_methods([","])


# ==== real data: a trained encoder beats its random initialisation ====


def _linear_probe_accuracy(model: Path, cifar: Path, report: Path) -> float:
    data_args = ["--images", cifar / "train", "--test-images", cifar / "test"]
    model_args = ["--model", model, "--layer", "fc", "--device", "cpu", "--workers", "0"]
    probe_args = ["--labels-from-folders", "--method", "linear", "-q", "--json", report]
    code, _, err = _cli(*data_args, *model_args, *probe_args)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert (data["n_train"], data["n_test"]) == (400, 200)
    return float(data["results"][0]["top1"])


# Measured on the `cifar_subset` images (fc layer, linear probe, 200 test images): the
# random initialisation scores 29.5%; 80 steps of batch 32 reach 36%, 250 steps of batch 64
# 35%. The 64-dim y, pushed towards the uniform prior, needs far longer training than this
# to pull ahead of random features, so fc is the layer compared here.
@pytest.mark.parametrize(
    ("steps", "batch_size", "margin"),
    [
        (80, 32, 0.03),  # about 25 s on two busy CPU cores
        pytest.param(250, 64, 0.04, marks=pytest.mark.slow),
    ],
)
def test_trained_encoder_beats_random_init_on_cifar(
    tmp_path: Path, cifar_subset: Path, steps: int, batch_size: int, margin: float
) -> None:
    from dimcli.modelfile import load_encoder
    from dimcli.settings import TrainSettings
    from dimcli.train import train

    settings = TrainSettings(
        images=cifar_subset / "train",
        encoder="conv32",
        mi_units=64,
        max_steps=steps,
        batch_size=batch_size,
        out=tmp_path / "run",
        workers=0,
        device="cpu",
        seed=0,
    )
    result = train(settings, verbosity=-1)
    assert result.model_path is not None and result.steps == steps

    # The same architecture and preprocessing, at its random initialisation.
    torch.manual_seed(0)
    random_model = tmp_path / "random.safetensors"
    metadata = load_encoder(result.model_path).metadata
    save_encoder(
        build_encoder("conv32", feature_dim=64),
        random_model,
        preprocessing=metadata["preprocessing"],
    )

    trained = _linear_probe_accuracy(result.model_path, cifar_subset, tmp_path / "dim.json")
    random = _linear_probe_accuracy(random_model, cifar_subset, tmp_path / "random.json")
    assert trained >= random + margin, (trained, random)


# ==== --test-labels alone: the test rows come from the same features ====


def _split_csvs(tmp_path: Path, keys: list[str]) -> tuple[Path, Path, list[int], list[int]]:
    """train.csv (rows 0-13 of each class of 20) and test.csv (rows 14-17); 18-19 in neither."""
    train_rows = [i for i in range(len(keys)) if i % 20 < 14]
    test_rows = [i for i in range(len(keys)) if 14 <= i % 20 < 18]
    train = _write_labels(
        tmp_path / "train.csv", {keys[i]: keys[i].split("/")[0] for i in train_rows}
    )
    test = _write_labels(tmp_path / "test.csv", {keys[i]: keys[i].split("/")[0] for i in test_rows})
    return train, test, train_rows, test_rows


def test_test_labels_alone_split_one_feature_file(
    tmp_path: Path, blobs: tuple[Path, Path, list[str]]
) -> None:
    feats, _, keys = blobs
    train, test, train_rows, test_rows = _split_csvs(tmp_path, keys)
    common = ["--method", "all", "--mlp-epochs", "3"]
    code, out, err = _cli("--features", feats, "--labels", train, "--test-labels", test,
                          *common, "--json", tmp_path / "one.json")  # fmt: skip
    assert code == 0, err
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["split"] == "test-set" and one["test_fraction"] is None
    assert (one["n_train"], one["n_test"]) == (len(train_rows), len(test_rows)) == (112, 32)
    assert (one["n_matched"], one["n_unlabelled_rows"]) == (112, 16)  # 16 rows in neither CSV
    assert one["test_counts"] == {
        "n_labels": 32, "n_matched": 32, "n_unmatched_labels": 0, "n_unlabelled_rows": 16
    }  # fmt: skip
    assert one["inputs"]["test_labels"] == str(test) and one["inputs"]["test_features"] is None
    assert "labels: 112 of 112 labelled paths matched feature rows (0 labels without a row, " in out
    assert "test set: 32 of 32 labelled paths matched rows of the same features (0 labels " in out
    assert "16 rows without a label" in out and "n_test" in out

    # The same rows as two separate feature files give the same results.
    x, _ = _blobs(8, 20)
    train_feats = _write_features(
        tmp_path / "train.npy", x[train_rows], [keys[i] for i in train_rows]
    )
    test_feats = _write_features(tmp_path / "test.npy", x[test_rows], [keys[i] for i in test_rows])
    code, _, err = _cli("--features", train_feats, "--labels", train,
                        "--test-features", test_feats, "--test-labels", test, *common,
                        "--json", tmp_path / "two.json")  # fmt: skip
    assert code == 0, err
    two = json.loads((tmp_path / "two.json").read_text())
    assert (two["n_train"], two["n_test"]) == (112, 32)
    assert one["results"] == two["results"]


def test_test_labels_alone_with_images_encoded_on_the_fly(
    tmp_path: Path, make_image_folder: Callable[..., Path], model_file: Path
) -> None:
    images = make_image_folder(tmp_path / "images", 12, 32)
    train = _write_labels(
        tmp_path / "train.csv", {f"class{i % 2}/{i:04d}.png": f"c{i % 2}" for i in range(8)}
    )
    test = _write_labels(
        tmp_path / "test.csv", {f"class{i % 2}/{i:04d}.png": f"c{i % 2}" for i in range(8, 11)}
    )
    code, _, err = _cli("--images", images, "--model", model_file, "--workers", "0", "-q",
                        "--labels", train, "--test-labels", test, "--method", "knn",
                        "--json", tmp_path / "r.json")  # fmt: skip
    assert code == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    assert (data["n_train"], data["n_test"], data["test_counts"]["n_unlabelled_rows"]) == (8, 3, 1)
    assert data["inputs"]["images"] == str(images) and data["inputs"]["test_images"] is None


def test_test_labels_alone_refuses_a_path_in_both_csvs(
    tmp_path: Path, blobs: tuple[Path, Path, list[str]]
) -> None:
    feats, labels, keys = blobs  # labels.csv names every row
    _, test, _, _ = _split_csvs(tmp_path, keys)
    code, _, err = _cli("--features", feats, "--labels", labels, "--test-labels", test)
    _one_line_error(
        code, err, 1,
        f"32 paths are labelled in both {labels} and {test} ('class0/014.png', 'class0/015.png',"
        " 'class0/016.png', ...); a row cannot both train and test the probes, so remove those"
        " paths from one of the files",
    )  # fmt: skip


def test_test_labels_alone_that_match_no_row(
    tmp_path: Path, blobs: tuple[Path, Path, list[str]]
) -> None:
    feats, _, keys = blobs
    train, _, _, _ = _split_csvs(tmp_path, keys)
    test = _write_labels(tmp_path / "t.csv", {"other/a.png": "class0", "other/b.png": "class1"})
    code, _, err = _cli("--features", feats, "--labels", train, "--test-labels", test)
    _one_line_error(code, err, 1, "none of the 2 labelled paths matches one of the 160 feature")


def test_test_labels_alone_ignores_test_fraction(
    tmp_path: Path, blobs: tuple[Path, Path, list[str]]
) -> None:
    feats, _, keys = blobs
    train, test, _, _ = _split_csvs(tmp_path, keys)
    code, _, err = _cli("--features", feats, "--labels", train, "--test-labels", test,
                        "--test-fraction", "0.5", "--method", "knn",
                        "--json", tmp_path / "r.json")  # fmt: skip
    assert code == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    assert (data["n_train"], data["n_test"], data["test_fraction"]) == (112, 32, None)
