"""Ship a trained encoder: export it to ONNX, TorchScript or torch.export, and describe model files.

An exported graph takes a normalised float32 batch (N, 3, S, S), RGB, NCHW, and returns one
float32 tensor (N, D): the features of one layer, flattened like `dim encode --layer`. The
preprocessing that makes that input from pixels (input size, mean, std, resize policy) is
written into the exported file as a JSON document under the key "dimcli":

    ONNX          model metadata_props["dimcli"]
    TorchScript   the extra file "dimcli.json" (torch.jit.load(..., _extra_files=...))
    torch.export  the extra file "dimcli.json" (torch.export.load(..., extra_files=...))
    safetensors   the model file's own "dimcli" metadata (the export is a checked copy)

Every export is verified before it replaces the output: the written file is loaded back and
run on a batch of a size other than the one it was exported with, and its output compared
with the PyTorch encoder's.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dimcli import __version__
from dimcli._constants import DEFAULT_OPSET, FORMATS
from dimcli.errors import DimError, ModelFileError, UsageError
from dimcli.modelfile import (
    LoadedEncoder,
    atomic_write,
    check_format_version,
    file_sha256,
    load_encoder,
    read_metadata,
    resolve_model_path,
)
from dimcli.models.encoders import ENCODERS, LAYERS, Encoder

# FORMATS: format name -> file extension. `--format` takes a name; without it the extension
# decides. It and DEFAULT_OPSET live in dimcli._constants, so that `dim --help` needs no torch.
GRAPH_FORMATS: tuple[str, ...] = ("onnx", "torchscript", "pt2")

EXPORT_FORMAT = "dimcli.export"
EXPORT_FORMAT_VERSION = 1
METADATA_KEY = "dimcli"  # ONNX metadata_props key
METADATA_FILE = "dimcli.json"  # TorchScript and pt2 extra file
INPUT_NAME = "images"
OUTPUT_NAME = "features"

# Opset 18 (DEFAULT_OPSET) is what the torch.export-based ONNX exporter writes natively;
# onnxruntime runs it since 1.14. 17 is reached by the exporter's down-conversion.
MIN_OPSET = 17

# The graph is exported with one batch size and verified with another, so a batch size
# baked into the graph cannot pass verification.
EXPORT_BATCH = 2
VERIFY_BATCH = 3

# fp32 agreement required of the exported program: max |exported - torch| must not exceed
# ATOL + RTOL * max |torch| (relative to the output's scale, since deep random-init ResNets
# produce large activations and different kernels sum in different orders).
ATOL = 1e-4
RTOL = 1e-4

ONNX_INSTALL_HINT = "pip install 'dimcli[onnx]'"


class ExportError(DimError):
    """An export that could not be written or did not verify; no output was left behind."""


@dataclass
class ExportResult:
    """What `export_encoder` wrote and how it was checked."""

    path: Path
    format: str
    layer: str
    metadata: dict[str, Any]
    max_abs_diff: float | None = None  # None when numerics were not compared
    tolerance: float | None = None
    verified_with: str | None = None  # the runtime that ran the written file
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Human-readable report: file, verification, and the input the file expects."""
        meta = self.metadata
        size_mb = self.path.stat().st_size / 1e6
        enc = meta["encoder"]
        opset = f", opset {meta['opset']}" if "opset" in meta else ""
        lines = [f"exported {enc['name']} to {self.path} ({self.format}{opset}, {size_mb:.1f} MB)"]
        if self.max_abs_diff is not None and self.tolerance is not None:
            lines.append(
                f"verified with {self.verified_with} on a batch of {VERIFY_BATCH} "
                f"(exported with {EXPORT_BATCH}): max abs diff {self.max_abs_diff:.2e} "
                f"<= tolerance {self.tolerance:.2e}"
            )
        lines.extend(preprocessing_lines(meta))
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


class LayerOutput(nn.Module):
    """An encoder reduced to one output: the features of `layer`, flattened to (N, D)."""

    def __init__(self, encoder: Encoder, layer: str) -> None:
        super().__init__()
        assert layer in LAYERS, f"layer {layer!r} is not one of {LAYERS}"
        self.encoder = encoder
        self.layer = layer

    def forward(self, images: Tensor) -> Tensor:
        # Limitation: the encoder computes every layer, so .pt/.pt2 exports of fc or conv keep
        # the later layers' weights (ONNX prunes them); see docs/limitations.md
        out = self.encoder(images)[self.layer]  # (N, C, H, W) for conv, (N, D) otherwise
        # conv: (N, C, H, W) -> (N, C*H*W), channel-major, the same rows as `dim encode`
        return out.flatten(1)


# ==== choosing what to write ====


def resolve_format(out: Path, fmt: str | None) -> str:
    """The export format: `fmt` when given, else from the extension of `out`.

    Raises:
        UsageError: an unknown format or extension, or a --format that contradicts a known
            extension.
    """
    choices = ", ".join(f"{name} ({suffix})" for name, suffix in FORMATS.items())
    by_suffix = {suffix: name for name, suffix in FORMATS.items()}
    implied = by_suffix.get(out.suffix.lower())
    if fmt is None:
        if implied is None:
            raise UsageError(
                f"cannot tell the export format from the extension of {out.name!r}; "
                f"name the output with one of the extensions or pass --format: {choices}"
            )
        return implied
    name = fmt.strip().lower().lstrip(".")
    if name == "pt":
        name = "torchscript"
    if name not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; choose one of {choices}")
    if implied is not None and implied != name:
        raise UsageError(
            f"--format {name} contradicts the extension of {out.name!r} ({implied}); "
            f"use the extension {FORMATS[name]} or drop --format"
        )
    return name


def _check_output(out: Path, source: Path, overwrite: bool) -> None:
    if not out.parent.is_dir():
        raise DimError(
            f"output folder {out.parent} does not exist; create it (mkdir -p {out.parent}) "
            "or choose another -o"
        )
    if out.exists() and out.resolve() == source.resolve():
        raise UsageError(f"output {out} is the model file itself; choose another -o")
    if out.exists() and not overwrite:
        raise DimError(
            f"output {out} already exists; pass --overwrite to replace it or choose another -o"
        )


def export_metadata(
    loaded: LoadedEncoder, layer: str, fmt: str, *, opset: int | None = None
) -> dict[str, Any]:
    """The JSON document a graph export carries: preprocessing, input, output, provenance."""
    s = loaded.image_size
    shape = [int(v) for v in loaded.module.layer_dims[layer]]
    meta: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "export_format": fmt,
        "dimcli_version": __version__,
        "torch_version": torch.__version__,
        "encoder": dict(loaded.metadata["encoder"]),
        "layer": layer,
        "layer_shape": shape,
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 3, s, s],
            "dtype": "float32",
            "layout": "NCHW, RGB",
            "normalization": "(pixel / 255 - mean) / std, per channel",
        },
        "output": {"name": OUTPUT_NAME, "shape": ["batch", math.prod(shape)], "dtype": "float32"},
        "preprocessing": dict(loaded.metadata["preprocessing"]),
        "training": dict(loaded.metadata.get("training") or {}),
        "source": {
            "sha256": file_sha256(loaded.path),
            "format_version": loaded.metadata["format_version"],
            "dimcli_version": loaded.metadata.get("dimcli_version"),
        },
    }
    if opset is not None:
        meta["opset"] = opset
    return meta


def preprocessing_lines(meta: dict[str, Any]) -> list[str]:
    """'input' and 'output' lines describing what an exported file expects and returns."""
    prep = meta["preprocessing"]
    s = int(prep["image_size"])
    mean = ", ".join(f"{v:g}" for v in prep["mean"])
    std = ", ".join(f"{v:g}" for v in prep["std"])
    lines = [
        f"input     {INPUT_NAME}: float32 (batch, 3, {s}, {s}), RGB, NCHW, "
        "normalised as (pixel / 255 - mean) / std",
        f"          mean {mean}; std {std}",
        f"          resize: {prep.get('resize', 'not recorded')}",
    ]
    if "output" in meta:
        d = meta["output"]["shape"][1]
        shape = tuple(meta["layer_shape"])
        how = f", flattened from {shape}" if len(shape) > 1 else ""
        lines.append(f"output    {OUTPUT_NAME}: float32 (batch, {d}), layer {meta['layer']}{how}")
    return lines


# ==== exporting ====


def export_encoder(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    layer: str = "y",
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export the encoder of a model file or run folder to `out`, verified, written atomically.

    Args:
        model: a `.safetensors` model file or a run folder of `dim train`.
        out: the file to write; its extension picks the format unless `fmt` is given.
        fmt: "onnx", "torchscript", "pt2" or "safetensors".
        layer: which output the exported graph returns: "y", "fc" or "conv" (flattened).
        opset: ONNX opset version (ONNX only).
        verify: load the written file back and compare its outputs with PyTorch's.
        overwrite: replace an existing `out`.
        progress: called with a one-line message once the model has loaded and the slow
            part (export, then verification) begins.

    Raises:
        UsageError: a bad format, layer, opset or output name.
        ModelFileError: the model file is missing, damaged or not a dimcli encoder.
        ExportError: the exporter failed or the written file did not verify; `out` is left as
            it was.
        DimError: ONNX export without the onnx packages, or an existing output.
    """
    # Everything the user can get wrong is checked before the slow part.
    out = Path(out)
    if out.is_dir():
        raise UsageError(
            f"output {out} is a folder; pass a file name such as {out / 'encoder.onnx'}"
        )
    fmt = resolve_format(out, fmt)
    if layer not in LAYERS:
        raise UsageError(f"layer must be one of {', '.join(LAYERS)}, got {layer!r}")
    if fmt == "safetensors" and layer != "y":
        raise UsageError(
            f"--layer applies to graph exports ({', '.join(GRAPH_FORMATS)}); a .safetensors "
            "export copies the whole encoder, every layer included; drop --layer"
        )
    if fmt == "onnx":
        onnx = _require_onnx()
        newest = int(onnx.defs.onnx_opset_version())
        if not MIN_OPSET <= opset <= newest:
            raise UsageError(
                f"ONNX opset must be between {MIN_OPSET} and {newest}, got {opset}; "
                f"the default {DEFAULT_OPSET} runs on onnxruntime 1.14 and later"
            )
    source = resolve_model_path(model)
    _check_output(out, source, overwrite)
    loaded = load_encoder(source)

    # Write under a temporary name, verify that file, and only then rename it to `out`.
    if fmt == "safetensors":
        meta = dict(loaded.metadata)
    else:
        meta = export_metadata(loaded, layer, fmt, opset=opset if fmt == "onnx" else None)
    module = LayerOutput(loaded.module, layer).eval()
    if progress is not None:
        what = "a checked copy" if fmt == "safetensors" else f"layer {layer}"
        progress(f"exporting {loaded.metadata['encoder']['name']} ({what}) to {out} as {fmt} ...")
    result = ExportResult(path=out, format=fmt, layer=layer, metadata=meta)

    def write_and_check(tmp: Path) -> None:
        _write(fmt, module, loaded, tmp, meta, opset)
        if verify:
            _verify(fmt, tmp, module, loaded, result)
        else:
            result.notes.append("not verified (verify=False)")

    atomic_write(out, write_and_check, suffix=f".partial{FORMATS[fmt]}")
    return result


def _write(
    fmt: str,
    module: LayerOutput,
    loaded: LoadedEncoder,
    path: Path,
    meta: dict[str, Any],
    opset: int,
) -> None:
    """Write one format to `path`; exporter failures become one-line ExportErrors."""
    if fmt == "safetensors":
        # A byte copy: the same weights and metadata, re-validated by _verify.
        shutil.copyfile(loaded.path, path)
        return
    example = sample_batch(loaded, EXPORT_BATCH, seed=0)
    try:
        _GRAPH_WRITERS[fmt](module, example, path, json.dumps(meta), opset)
    except DimError:
        raise
    except Exception as err:
        raise ExportError(
            f"{fmt} export of {loaded.metadata['encoder']['name']} failed: "
            f"{type(err).__name__}: {_first_line(err)}"
        ) from err


def _write_onnx(module: nn.Module, example: Tensor, path: Path, meta: str, opset: int) -> None:
    # The torch.export-based exporter (dynamo=True): the TorchScript-based one is deprecated
    # in PyTorch and due for removal; both handle BatchNorm in eval mode and a dynamic batch.
    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}},
        verbose=False,
    )
    assert program is not None, "torch.onnx.export(dynamo=True) returned no program"
    program.model.metadata_props[METADATA_KEY] = meta
    # Limitation: weights are stored inline, which caps ONNX files at 2 GB (alex64, the
    # largest encoder, is about 220 MB); see docs/limitations.md
    program.save(str(path), external_data=False)


def _write_torchscript(
    module: nn.Module, example: Tensor, path: Path, meta: str, opset: int
) -> None:
    # Tracing records the tensor ops for this input; the encoders have no data-dependent
    # control flow, and verification runs a different batch size through the result.
    with torch.no_grad(), _quiet_torchscript():
        traced = torch.jit.trace(module, (example,))
        torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: meta})


def _write_pt2(module: nn.Module, example: Tensor, path: Path, meta: str, opset: int) -> None:
    program = torch.export.export(
        module, (example,), dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}}
    )
    torch.export.save(program, str(path), extra_files={METADATA_FILE: meta})


_GRAPH_WRITERS: dict[str, Callable[[nn.Module, Tensor, Path, str, int], None]] = {
    "onnx": _write_onnx,
    "torchscript": _write_torchscript,
    "pt2": _write_pt2,
}


# ==== verifying ====


def sample_batch(loaded: LoadedEncoder, n: int, *, seed: int) -> Tensor:
    """n random uint8 images, normalised like real inputs: float32 (n, 3, S, S)."""
    s = loaded.image_size
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8, generator=gen)
    return loaded.normalize(pixels)


def _run_onnx(path: Path, images: Tensor) -> Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
    return torch.from_numpy(out)


def _run_torchscript(path: Path, images: Tensor) -> Tensor:
    with _quiet_torchscript():
        program = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return program(images)


def _run_pt2(path: Path, images: Tensor) -> Tensor:
    program = torch.export.load(str(path))
    with torch.no_grad():
        return program.module()(images)


def _run_safetensors(path: Path, images: Tensor) -> Tensor:
    copy = load_encoder(path)
    with torch.no_grad():
        return LayerOutput(copy.module, "y")(images)


# Each runner loads a written file and runs it on a normalised batch (N, 3, S, S) -> (N, D).
RUNNERS: dict[str, Callable[[Path, Tensor], Tensor]] = {
    "onnx": _run_onnx,
    "torchscript": _run_torchscript,
    "pt2": _run_pt2,
    "safetensors": _run_safetensors,
}
RUNTIME_NAMES = {
    "onnx": "onnxruntime",
    "torchscript": "torch.jit.load",
    "pt2": "torch.export.load",
    "safetensors": "dimcli.load_encoder",
}


def _verify(
    fmt: str, path: Path, module: LayerOutput, loaded: LoadedEncoder, result: ExportResult
) -> None:
    """Load the written file back, check its metadata, and compare its outputs with torch's.

    Raises:
        ExportError: metadata lost, the file does not load or run, a wrong output shape,
            non-finite outputs, or a difference over the tolerance.
    """
    assert VERIFY_BATCH != EXPORT_BATCH, "verify with another batch size than the export's"

    # ==== the file carries the metadata it was given ====
    if fmt == "safetensors":
        if file_sha256(path) != file_sha256(loaded.path):
            raise ExportError(f"verification failed: the copy of {loaded.path} differs from it")
        if read_metadata(path) != loaded.metadata:
            raise ExportError("verification failed: the copy's metadata differs from the model's")
    elif read_export_metadata(path, fmt) != result.metadata:
        raise ExportError(f"verification failed: the {fmt} file lost its dimcli metadata")

    # ==== ONNX: structural check; numerics need onnxruntime ====
    if fmt == "onnx":
        _check_onnx(path, result)
        if not _has_onnxruntime():
            result.notes.append(
                "onnxruntime is not installed, so the ONNX outputs were not compared with "
                f"PyTorch (onnx.checker passed); {ONNX_INSTALL_HINT} to compare them"
            )
            return

    # ==== run the written file on a new batch size and compare ====
    images = sample_batch(loaded, VERIFY_BATCH, seed=1)
    with torch.no_grad():
        expected = module(images)  # (VERIFY_BATCH, D)
    try:
        got = RUNNERS[fmt](path, images)
    except DimError:
        raise
    except Exception as err:
        raise ExportError(
            f"verification failed: {RUNTIME_NAMES[fmt]} could not run the exported file: "
            f"{type(err).__name__}: {_first_line(err)}"
        ) from err
    got = torch.as_tensor(got).detach().float().cpu()
    if got.shape != expected.shape:
        raise ExportError(
            f"verification failed: the exported {fmt} output has shape {tuple(got.shape)} for a "
            f"batch of {VERIFY_BATCH}, PyTorch gives {tuple(expected.shape)}"
        )
    if not torch.isfinite(got).all():
        raise ExportError(f"verification failed: the exported {fmt} output is not finite")
    diff = float((got - expected).abs().max())
    limit = ATOL + RTOL * float(expected.abs().max())
    if not diff <= limit:
        raise ExportError(
            f"verification failed: the exported {fmt} output differs from PyTorch by up to "
            f"{diff:.3g} (tolerance {limit:.3g}); nothing was written"
        )
    result.max_abs_diff = diff
    result.tolerance = limit
    result.verified_with = RUNTIME_NAMES[fmt]


def _check_onnx(path: Path, result: ExportResult) -> None:
    onnx = _require_onnx()
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:
        raise ExportError(
            f"verification failed: onnx.checker rejects the exported file: {_first_line(err)}"
        ) from err
    model = onnx.load(str(path), load_external_data=False)
    written = {imp.domain: imp.version for imp in model.opset_import}.get("")
    if written != result.metadata["opset"]:
        raise ExportError(
            f"verification failed: asked for ONNX opset {result.metadata['opset']} but the "
            f"exporter wrote {written}; use --opset {DEFAULT_OPSET}"
        )


# ==== reading exported files (no code runs) ====


def read_export_metadata(path: str | os.PathLike[str], fmt: str | None = None) -> dict[str, Any]:
    """The "dimcli" metadata of an exported .onnx, .pt or .pt2 file, read without running it.

    TorchScript and pt2 files are zip archives: the JSON is read with `zipfile`, nothing is
    unpickled. ONNX files are parsed as protobuf by `onnx.load` (external data not loaded).

    Raises:
        ModelFileError: the file is not such an export, or it carries no dimcli metadata.
        DimError: an ONNX file while the onnx package is not installed.
    """
    p = Path(path)
    fmt = fmt or resolve_format(p, None)
    if fmt == "onnx":
        raw = _onnx_metadata(p)
    elif fmt in ("torchscript", "pt2"):
        raw = _zip_metadata(p, fmt)
    else:
        raise UsageError(f"{p}: {fmt} files hold model metadata; use read_metadata")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise ModelFileError(
            f"{p}: the dimcli metadata is not valid JSON; the file is damaged"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise ModelFileError(f"{p}: metadata does not describe a dimcli export")
    check_format_version(p, meta, EXPORT_FORMAT_VERSION, "export")
    return meta


def _onnx_metadata(path: Path) -> str:
    onnx = _require_onnx()
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise ModelFileError(
            f"{path} is not a readable ONNX file ({type(err).__name__}: {_first_line(err)})"
        ) from None
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ModelFileError(
            f"{path} is an ONNX file without dimcli metadata; it was not written by `dim export`"
        )
    return str(props[METADATA_KEY])


def _zip_metadata(path: Path, fmt: str) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            # Both archive kinds put extra files at <root>/extra/<name>.
            names = [n for n in archive.namelist() if n.split("/")[1:] == ["extra", METADATA_FILE]]
            if not names:
                raise ModelFileError(
                    f"{path} is a {fmt} archive without dimcli metadata; it was not written by "
                    "`dim export`"
                )
            return archive.read(names[0]).decode("utf-8")
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError) as err:
        raise ModelFileError(f"{path} is not a readable {fmt} archive ({err})") from None


# ==== describing model files (`dim info`) ====


def describe_model(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a model file (or run folder) is: architecture, preprocessing, training, size, hash.

    The weights are loaded with every check `load_encoder` makes, so a file that describes
    cleanly also loads. Exported .onnx/.pt/.pt2 files are described from their metadata.

    Raises:
        ModelFileError: as `load_encoder` (or `read_export_metadata` for exported files).
    """
    p = resolve_model_path(path)
    if p.suffix.lower() in (".onnx", ".pt", ".pt2"):
        return _describe_export(p)
    loaded = load_encoder(p)
    meta = loaded.metadata
    enc = dict(meta["encoder"])
    dims = loaded.module.layer_dims
    return {
        "path": str(p),
        "kind": "model",
        "format": meta["format"],
        "format_version": meta["format_version"],
        "encoder": enc,
        "description": ENCODERS[enc["name"]].description,
        "image_size": loaded.image_size,
        "preprocessing": meta["preprocessing"],
        "layers": {
            name: {"shape": [int(v) for v in dims[name]], "dim": math.prod(dims[name])}
            for name in LAYERS
        },
        "parameters": sum(param.numel() for param in loaded.module.parameters()),
        "training": meta.get("training") or {},
        "dimcli_version": meta.get("dimcli_version"),
        "torch_version": meta.get("torch_version"),
        "file_size": p.stat().st_size,
        "sha256": file_sha256(p),
    }


def _describe_export(path: Path) -> dict[str, Any]:
    fmt = resolve_format(path, None)
    meta = read_export_metadata(path, fmt)
    return {
        "path": str(path),
        "kind": "export",
        **meta,
        "file_size": path.stat().st_size,
        "sha256": file_sha256(path),
    }


def format_description(info: dict[str, Any]) -> str:
    """`describe_model`'s dict as aligned text lines for `dim info`."""
    enc = info["encoder"]
    size_mb = info["file_size"] / 1e6
    lines = [f"file      {info['path']} ({size_mb:.1f} MB)", f"sha256    {info['sha256']}"]
    if info["kind"] == "export":
        opset = f", opset {info['opset']}" if "opset" in info else ""
        lines.append(f"export    {info['export_format']}{opset}, written by `dim export`")
        lines.append(f"encoder   {enc['name']}, feature_dim {enc['feature_dim']}")
        lines.extend(preprocessing_lines(info))
    else:
        lines.append(
            f"encoder   {enc['name']} ({info['description']}), feature_dim {enc['feature_dim']}"
        )
        lines.extend(preprocessing_lines(info))
        layer_text = "; ".join(
            f"{name} {tuple(spec['shape'])} = {spec['dim']}"
            if len(spec["shape"]) > 1
            else f"{name} {spec['dim']}"
            for name, spec in info["layers"].items()
        )
        lines.append(f"layers    {layer_text}")
        lines.append(f"params    {info['parameters']:,}")
    lines.append(
        f"versions  dimcli {info.get('dimcli_version')}, torch {info.get('torch_version')}"
        + (f", model format {info['format_version']}" if info["kind"] == "model" else "")
    )
    training = info.get("training") or {}
    if training:
        lines.append("training")
        width = max(len(k) for k in training)
        lines.extend(
            f"  {k:<{width}}  {v if isinstance(v, str) else json.dumps(v)}"
            for k, v in training.items()
        )
    else:
        lines.append("training  not recorded")
    return "\n".join(lines)


# ==== optional dependencies and small helpers ====


def _require_onnx() -> Any:
    """The onnx module; ONNX export also needs onnxscript (the exporter's operator library)."""
    try:
        import onnx
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise DimError(
            f"ONNX export needs the {err.name or 'onnx'} package, which is not installed; "
            f"install the ONNX extra: {ONNX_INSTALL_HINT}"
        ) from None
    return onnx


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _quiet_torchscript() -> Iterator[None]:
    """Silence PyTorch's deprecation notices for torch.jit, which `.pt` exports rely on."""
    # Limitation: TorchScript is deprecated in PyTorch; .pt exports work while torch.jit
    # remains; see docs/limitations.md
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*", category=FutureWarning)
        yield


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
