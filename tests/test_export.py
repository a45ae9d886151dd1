"""`dim export` and `dim info`: round trips through every format, metadata, and failure paths.

Exported files are run here with each format's own runtime (onnxruntime, torch.jit.load,
torch.export.load, safetensors) rather than through dimcli, and compared with the PyTorch
encoder on a batch size that neither the export (2) nor its verification (3) used.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import struct
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import dimcli
from dimcli import export as dexport
from dimcli.cli import app
from dimcli.errors import ModelFileError
from dimcli.export import (
    EXPORT_BATCH,
    EXPORT_FORMAT_VERSION,
    METADATA_FILE,
    VERIFY_BATCH,
    ExportError,
    describe_model,
    export_encoder,
    read_export_metadata,
)
from dimcli.modelfile import (
    FORMAT_VERSION,
    LoadedEncoder,
    load_encoder,
    read_metadata,
    save_encoder,
)
from dimcli.models import build_encoder

# torch.jit.load warns that TorchScript is deprecated; .pt files are still what users ask for.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")

FORMATS = ("onnx", "torchscript", "pt2", "safetensors")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2", "safetensors": ".safetensors"}
# Encoders at their smallest input size; feature_dim small to keep files small.
ENCODER_SIZES = {"conv32": 32, "alex64": 64, "resnet18": 32, "resnet50": 32}
TEST_BATCH = 4  # neither EXPORT_BATCH nor VERIFY_BATCH
MEAN = [0.4914, 0.4822, 0.4465]
STD = [0.247, 0.243, 0.261]
TRAINING = {"estimator": "jsd", "lr": 0.0001, "epochs": 3, "mode": "local"}


def _prep(size: int) -> dict[str, Any]:
    return {"image_size": size, "mean": MEAN, "std": STD, "resize": "shorter side, centre crop"}


def _save_model(path: Path, name: str, *, feature_dim: int = 8) -> LoadedEncoder:
    """Save a model file whose BatchNorm statistics are not the identity, so eval mode matters.

    Returns the in-memory encoder that was saved, the reference for exported outputs.
    """
    torch.manual_seed(0)
    enc = build_encoder(name, image_size=ENCODER_SIZES[name], feature_dim=feature_dim)
    gen = torch.Generator().manual_seed(1)
    for module in enc.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            assert module.running_mean is not None and module.running_var is not None
            c = module.running_mean.shape[0]
            module.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
            module.running_var.copy_(0.5 + torch.rand(c, generator=gen))
    save_encoder(enc, path, preprocessing=_prep(ENCODER_SIZES[name]), training=TRAINING)
    return LoadedEncoder(module=enc.eval(), metadata=read_metadata(path), path=path)


@pytest.fixture(scope="module")
def model_for(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Return `get(name)`: a run folder with a saved encoder `name`, made once per module."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            run = tmp_path_factory.mktemp(f"run-{name}")
            _SOURCE[run] = _save_model(run / "encoder.safetensors", name)
            made[name] = run
        return made[name]

    return get


# The encoder saved in each run folder of `model_for`: the reference for exported outputs.
_SOURCE: dict[Path, LoadedEncoder] = {}


def _cli(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def _one_line_error(code: int, stdout: str, stderr: str, expected_code: int = 1) -> str:
    """Assert the CLI failed with one `error:` line and no traceback; return that line."""
    assert code == expected_code, (code, stdout, stderr)
    assert "Traceback" not in stdout + stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert all(line.startswith(("error: ", "exporting ")) for line in lines), stderr
    return errors[0]


# ==== independent readers of each format ====


def _load_and_run(
    path: Path, fmt: str, x: torch.Tensor, layer: str
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run an exported file with its own runtime on normalised x (N, 3, S, S); its metadata."""
    if fmt == "onnx":
        import onnx
        import onnxruntime as ort

        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (inp,) = session.get_inputs()
        assert inp.name == "images" and inp.shape[1:] == list(x.shape[1:])
        assert not isinstance(inp.shape[0], int), "the batch axis must be dynamic"
        out = torch.from_numpy(session.run(None, {inp.name: x.numpy()})[0])
        return out, json.loads(props["dimcli"])
    extra = {"dimcli.json": ""}
    with torch.no_grad():
        if fmt == "torchscript":
            out = torch.jit.load(str(path), _extra_files=extra)(x)
        elif fmt == "pt2":
            out = torch.export.load(str(path), extra_files=extra).module()(x)
        else:
            out = load_encoder(path).module(x)[layer].flatten(1)
            with safe_open(str(path), "pt") as fh:
                extra["dimcli.json"] = fh.metadata()["dimcli"]
    return out, json.loads(extra["dimcli.json"])


def _check_file(run: Path, out: Path, fmt: str, layer: str = "y") -> None:
    """Compare an exported file's outputs and metadata with the source model's."""
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name], "temp files left behind"
    loaded = _SOURCE[run]
    s = loaded.image_size
    gen = torch.Generator().manual_seed(7)
    pixels = torch.randint(0, 256, (TEST_BATCH, 3, s, s), dtype=torch.uint8, generator=gen)
    x = loaded.normalize(pixels)  # (N, 3, S, S)
    with torch.no_grad():
        expected = loaded.module(x)[layer].flatten(1)  # (N, D)
    got, meta = _load_and_run(out, fmt, x, layer)
    assert got.shape == expected.shape == (TEST_BATCH, math.prod(loaded.module.layer_dims[layer]))
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 + 1e-4 * scale)

    assert meta["preprocessing"] == _prep(s)
    assert meta["encoder"] == loaded.metadata["encoder"]
    if fmt == "safetensors":
        assert out.read_bytes() == loaded.path.read_bytes()
    else:
        assert meta["layer"] == layer
        assert meta["input"]["shape"] == ["batch", 3, s, s]
        assert meta["output"]["shape"] == ["batch", expected.shape[1]]
        assert meta["training"] == TRAINING
        assert meta["source"]["sha256"] == hashlib.sha256(loaded.path.read_bytes()).hexdigest()
        assert read_export_metadata(out) == meta


def _check_round_trip(run: Path, out: Path, fmt: str, layer: str = "y") -> None:
    """Export run -> out with the library, then check the file."""
    result = export_encoder(run, out, layer=layer)
    assert result.path == out and result.format == fmt and out.is_file()
    assert result.max_abs_diff is not None and result.tolerance is not None
    assert result.max_abs_diff <= result.tolerance
    if fmt == "onnx":
        assert "opset 18" in result.summary()
    _check_file(run, out, fmt, layer)


# ==== round trips ====


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips_conv32(
    model_for: Callable[[str], Path], tmp_path: Path, fmt: str
) -> None:
    _check_round_trip(model_for("conv32"), tmp_path / f"enc{SUFFIX[fmt]}", fmt)


@pytest.mark.parametrize("name", ["alex64", "resnet18", "resnet50"])
def test_every_encoder_round_trips_pt2(
    model_for: Callable[[str], Path], tmp_path: Path, name: str
) -> None:
    _check_round_trip(model_for(name), tmp_path / "enc.pt2", "pt2")


@pytest.mark.parametrize(
    ("fmt", "layer"),
    [
        ("pt2", "fc"),
        pytest.param("onnx", "fc", marks=pytest.mark.slow),
        pytest.param("onnx", "conv", marks=pytest.mark.slow),
        pytest.param("torchscript", "fc", marks=pytest.mark.slow),
        pytest.param("torchscript", "conv", marks=pytest.mark.slow),
    ],
)
def test_each_layer_round_trips_conv32(
    model_for: Callable[[str], Path], tmp_path: Path, fmt: str, layer: str
) -> None:
    _check_round_trip(model_for("conv32"), tmp_path / f"enc{SUFFIX[fmt]}", fmt, layer)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(ENCODER_SIZES))
def test_every_encoder_and_format_round_trip(
    model_for: Callable[[str], Path], tmp_path: Path, name: str, fmt: str
) -> None:
    _check_round_trip(model_for(name), tmp_path / f"enc{SUFFIX[fmt]}", fmt)


def test_cli_export_of_the_conv_layer_prints_what_it_checked(
    model_for: Callable[[str], Path], tmp_path: Path
) -> None:
    run, out = model_for("conv32"), tmp_path / "enc.pt2"
    code, stdout, stderr = _cli("export", "--model", run, "-o", out, "--layer", "conv")
    assert code == 0, stderr
    assert stderr == f"exporting conv32 (layer conv) to {out} as pt2 ...\n"
    assert (
        f"verified with torch.export.load on a batch of {VERIFY_BATCH} "
        f"(exported with {EXPORT_BATCH}): max abs diff"
    ) in stdout
    assert "input     images: float32 (batch, 3, 32, 32), RGB, NCHW" in stdout
    assert "mean 0.4914, 0.4822, 0.4465; std 0.247, 0.243, 0.261" in stdout
    assert "resize: shorter side, centre crop" in stdout
    assert (
        "output    features: float32 (batch, 4096), layer conv, flattened from (256, 4, 4)"
        in stdout
    )
    _check_file(run, out, "pt2", "conv")


@pytest.mark.slow
def test_onnx_opset_17(model_for: Callable[[str], Path], tmp_path: Path) -> None:
    import onnx

    out = tmp_path / "enc.onnx"
    result = export_encoder(model_for("conv32"), out, opset=17)
    assert result.max_abs_diff is not None and result.metadata["opset"] == 17
    assert {i.domain: i.version for i in onnx.load(str(out)).opset_import}[""] == 17
    _check_file(model_for("conv32"), out, "onnx")


def test_format_option_overrides_an_unknown_extension(
    model_for: Callable[[str], Path], tmp_path: Path
) -> None:
    run, out = model_for("conv32"), tmp_path / "encoder.bin"
    code, _, stderr = _cli("export", "-m", run, "-o", out, "--format", "safetensors", "-q")
    assert code == 0, stderr
    assert out.read_bytes() == (run / "encoder.safetensors").read_bytes()


def test_verification_tolerates_small_differences(
    model_for: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = dexport.RUNNERS["safetensors"]
    monkeypatch.setitem(dexport.RUNNERS, "safetensors", lambda p, x: real(p, x) + 1e-6)
    result = export_encoder(model_for("conv32"), tmp_path / "copy.safetensors")
    assert result.max_abs_diff == pytest.approx(1e-6, rel=0.05)


def test_onnx_without_onnxruntime_is_checked_structurally(
    model_for: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    result = export_encoder(model_for("conv32"), tmp_path / "enc.onnx")
    assert result.max_abs_diff is None and result.verified_with is None
    assert any("onnxruntime is not installed" in n and "dimcli[onnx]" in n for n in result.notes)
    assert "note: onnxruntime is not installed" in result.summary()
    assert (tmp_path / "enc.onnx").is_file()


# ==== failures leave nothing behind ====


@pytest.mark.parametrize("fmt", ["pt2", "safetensors"])
def test_verification_mismatch_deletes_the_output(
    model_for: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    monkeypatch.setitem(dexport.RUNNERS, fmt, lambda p, x: torch.full((x.shape[0], 8), 50.0))
    out = tmp_path / f"enc{SUFFIX[fmt]}"
    line = _one_line_error(*_cli("export", "-m", model_for("conv32"), "-o", out))
    assert "verification failed: the exported" in line and "differs from PyTorch by up to" in line
    assert list(tmp_path.iterdir()) == []


def test_failed_export_keeps_the_previous_output(
    model_for: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "enc.pt2"
    out.write_bytes(b"previous")
    monkeypatch.setitem(dexport.RUNNERS, "pt2", lambda p, x: torch.zeros(VERIFY_BATCH, 8))
    line = _one_line_error(*_cli("export", "-m", model_for("conv32"), "-o", out, "--overwrite"))
    assert "verification failed" in line
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["enc.pt2"]


def test_wrong_output_shape_fails_verification(
    model_for: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(dexport.RUNNERS, "pt2", lambda p, x: torch.zeros(EXPORT_BATCH, 8))
    with pytest.raises(ExportError, match=r"has shape \(2, 8\) for a batch of 3"):
        export_encoder(model_for("conv32"), tmp_path / "enc.pt2")
    assert list(tmp_path.iterdir()) == []


def test_exporter_crash_is_one_line(
    model_for: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object) -> None:
        raise RuntimeError("unsupported operator\nsecond line")

    monkeypatch.setitem(dexport._GRAPH_WRITERS, "torchscript", boom)
    line = _one_line_error(*_cli("export", "-m", model_for("conv32"), "-o", tmp_path / "e.pt"))
    assert line == "error: torchscript export of conv32 failed: RuntimeError: unsupported operator"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["-o", "{tmp}/enc.bin"], 2, "onnx (.onnx), torchscript (.pt), pt2 (.pt2), safetensors"),
        (["-o", "{tmp}/enc.x", "--format", "tflite"], 2, "unknown export format 'tflite'; choose"),
        (["-o", "{tmp}/enc.onnx", "--format", "pt2"], 2, "contradicts the extension"),
        (["-o", "{tmp}/missing/enc.onnx"], 1, "output folder {tmp}/missing does not exist"),
        (["-o", "{tmp}"], 2, "is a folder"),
        (["-o", "{tmp}/e.safetensors", "--layer", "fc"], 2, "copies the whole encoder"),
        (["-o", "{tmp}/e.onnx", "--opset", "9"], 2, "opset must be between 17 and"),
        (["-o", "{tmp}/e.onnx", "--layer", "z"], 2, "Invalid value for '--layer'"),
    ],
)
def test_bad_export_options_name_the_fix(
    model_for: Callable[[str], Path], tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    run = model_for("conv32")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(app, ["export", "-m", str(run), *argv])
    assert result.exit_code == code, result.stderr
    assert message.replace("{tmp}", str(tmp_path)) in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(model_for: Callable[[str], Path], tmp_path: Path) -> None:
    out = tmp_path / "enc.pt2"
    out.write_bytes(b"keep me")
    line = _one_line_error(*_cli("export", "-m", model_for("conv32"), "-o", out))
    assert "already exists; pass --overwrite" in line
    assert out.read_bytes() == b"keep me"


def test_export_onto_the_model_itself_is_refused(
    model_for: Callable[[str], Path],
) -> None:
    model = model_for("conv32") / "encoder.safetensors"
    line = _one_line_error(
        *_cli("export", "-m", model, "-o", model, "--overwrite"), expected_code=2
    )
    assert "is the model file itself" in line


def test_onnx_export_without_onnx_names_the_extra(
    model_for: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    line = _one_line_error(*_cli("export", "-m", model_for("conv32"), "-o", tmp_path / "e.onnx"))
    assert "needs the onnx package" in line and "pip install 'dimcli[onnx]'" in line
    assert list(tmp_path.iterdir()) == []


# ==== bad model files, through both commands ====


def _rewrite(
    src: Path, dst: Path, edit: Callable[[dict[str, Any], dict[str, torch.Tensor]], None]
) -> None:
    with safe_open(str(src), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        meta = json.loads(fh.metadata()["dimcli"])
    edit(meta, tensors)
    save_file(tensors, str(dst), metadata={"dimcli": json.dumps(meta)})


def _bad_files(src: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """Damaged variants of `src`, each with the message loading must give."""
    files: dict[str, tuple[Path, str]] = {}

    def add(name: str, message: str) -> Path:
        path = folder / f"{name}.safetensors"
        files[name] = (path, message)
        return path

    add("empty", "too short").write_bytes(b"")
    add("huge_header", "does not fit").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    data = src.read_bytes()
    add("truncated", "truncated").write_bytes(data[: len(data) // 2])
    save_file({"w": torch.zeros(2)}, str(add("foreign", "not a dimcli encoder")))
    with safe_open(str(src), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    save_file(tensors, str(add("bad_json", "not valid JSON")), metadata={"dimcli": "{nope"})
    _rewrite(
        src,
        add("unknown_encoder", "unknown encoder 'vit'"),
        lambda m, t: m["encoder"].update(name="vit"),
    )
    _rewrite(
        src,
        add("newer", "upgrade dimcli"),
        lambda m, t: m.update(format_version=FORMAT_VERSION + 1),
    )
    _rewrite(
        src,
        add("wrong_weights", "do not match the declared architecture"),
        lambda m, t: t.update({"head.weight": torch.zeros(3, 3)}),
    )
    files["missing"] = (folder / "nothing.safetensors", "not found")
    return files


@pytest.fixture(scope="module")
def bad_files(
    model_for: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, str]]:
    return _bad_files(model_for("conv32") / "encoder.safetensors", tmp_path_factory.mktemp("bad"))


BAD_KINDS = [
    "empty",
    "huge_header",
    "truncated",
    "foreign",
    "bad_json",
    "unknown_encoder",
    "newer",
    "wrong_weights",
    "missing",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("command", ["info", "export"])
def test_bad_model_files_give_one_line(
    bad_files: dict[str, tuple[Path, str]], tmp_path: Path, command: str, kind: str
) -> None:
    path, message = bad_files[kind]
    if command == "info":
        args: list[str | Path] = ["info", path]
    else:
        args = ["export", "-m", path, "-o", tmp_path / "e.pt2"]
    code, stdout, stderr = _cli(*args)
    line = _one_line_error(code, stdout, stderr)
    assert stderr.strip() == line, "a bad model file fails before any progress line"
    assert message in line
    assert list(tmp_path.iterdir()) == []


def test_info_never_runs_pickles(tmp_path: Path) -> None:
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (marker,))

    renamed = tmp_path / "evil.safetensors"
    renamed.write_bytes(pickle.dumps(Evil()))
    torch_file = tmp_path / "evil.pt"  # a zip archive holding a pickle, like a .pt export
    torch.save({"x": Evil()}, torch_file)
    assert "not a safetensors model file" in _one_line_error(*_cli("info", renamed))
    assert "without dimcli metadata" in _one_line_error(*_cli("info", torch_file))
    line = _one_line_error(*_cli("export", "-m", torch_file, "-o", tmp_path / "x.pt2"))
    assert "not a safetensors model file" in line
    assert not marker.exists()


# ==== dim info ====


def test_info_json_describes_the_model(model_for: Callable[[str], Path]) -> None:
    run = model_for("conv32")
    code, stdout, stderr = _cli("info", run, "--json")
    assert code == 0, stderr
    info = json.loads(stdout)
    model = run / "encoder.safetensors"
    torch.manual_seed(0)
    reference = build_encoder("conv32", feature_dim=8)
    assert info["parameters"] == sum(p.numel() for p in reference.parameters())
    assert info["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert info["file_size"] == model.stat().st_size
    assert info["path"] == str(model) and info["kind"] == "model"
    assert info["encoder"] == {"name": "conv32", "image_size": 32, "feature_dim": 8}
    assert info["image_size"] == 32 and info["preprocessing"] == _prep(32)
    assert info["layers"] == {
        "conv": {"shape": [256, 4, 4], "dim": 4096},
        "fc": {"shape": [1024], "dim": 1024},
        "y": {"shape": [8], "dim": 8},
    }
    assert info["training"] == TRAINING
    assert info["dimcli_version"] and info["torch_version"] == torch.__version__
    assert info == describe_model(model)


def test_info_text_lists_everything(model_for: Callable[[str], Path]) -> None:
    run = model_for("conv32")
    code, stdout, stderr = _cli("info", run)
    assert code == 0, stderr
    model = run / "encoder.safetensors"
    torch.manual_seed(0)
    n_params = sum(p.numel() for p in build_encoder("conv32", feature_dim=8).parameters())
    assert f"file      {model} (" in stdout
    assert f"params    {n_params:,}" in stdout
    assert f"sha256    {hashlib.sha256(model.read_bytes()).hexdigest()}" in stdout
    assert "encoder   conv32 (the paper's 32x32 encoder), feature_dim 8" in stdout
    assert "layers    conv (256, 4, 4) = 4096; fc 1024; y 8" in stdout
    assert "input     images: float32 (batch, 3, 32, 32)" in stdout
    assert "mean 0.4914, 0.4822, 0.4465; std 0.247, 0.243, 0.261" in stdout
    assert "resize: shorter side, centre crop" in stdout
    assert "  estimator  jsd\n  lr         0.0001\n  epochs     3\n  mode       local" in stdout
    assert (
        f"versions  dimcli {dimcli.__version__}, torch {torch.__version__}, model format 1"
        in stdout
    )


def test_info_reads_exported_files(model_for: Callable[[str], Path], tmp_path: Path) -> None:
    out = tmp_path / "enc.pt2"
    export_encoder(model_for("conv32"), out, layer="fc")
    info = json.loads(_cli("info", out, "--json")[1])
    assert info["kind"] == "export" and info["export_format"] == "pt2"
    assert info["layer"] == "fc" and info["output"]["shape"] == ["batch", 1024]
    assert info["preprocessing"] == _prep(32)
    assert info["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    code, stdout, _ = _cli("info", out)
    assert code == 0 and "export    pt2, written by `dim export`" in stdout
    assert "output    features: float32 (batch, 1024), layer fc" in stdout


def test_info_refuses_an_export_from_a_newer_format(
    model_for: Callable[[str], Path], tmp_path: Path
) -> None:
    good = tmp_path / "enc.pt2"
    export_encoder(model_for("conv32"), good)
    # Rewrite the archive with the same members, the metadata claiming a future version.
    newer = tmp_path / "newer.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(newer, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("/extra/" + METADATA_FILE):
                meta = json.loads(data)
                meta["format_version"] = EXPORT_FORMAT_VERSION + 1
                data = json.dumps(meta).encode()
            dst.writestr(item, data)
    assert read_export_metadata(good)["format_version"] == EXPORT_FORMAT_VERSION
    with pytest.raises(ModelFileError, match="newer than this dimcli reads"):
        read_export_metadata(newer)
    assert "upgrade dimcli" in _one_line_error(*_cli("info", newer))
