"""The visual report of a run: one self-contained HTML file plus its figures as PNG files.

`write_report(run_dir)` reads what `dim train` left in the run folder and writes:

    <run>/report.html           (or the `out` path) everything below, figures inlined as
                                base64 PNG data URIs; inline CSS, no scripts, no network
    <run>/figures/*.png         the same figures as files

Sections, each replaced by a short note when its inputs are missing:

1. summary: steps, epochs, last loss and MI values, throughput, best probe accuracy;
2. training curves (metrics.jsonl): every "loss_*" term, every "mi_*" estimate, images/s;
3. nearest neighbours: query images and their top-k neighbours by cosine similarity of the
   encoded features, labelled by their first folder when there is one;
4. probe results (probe.json and probe-*.json, or `probe=`): a table and confusion heat maps;
5. model: encoder, layer shapes, parameter count, file hash;
6. data: image folder, image count, skipped files;
7. settings and versions, as saved in config.json.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dimcli import __version__, plots
from dimcli.errors import BadImageError, DimError, UsageError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
MODEL_FILE = "encoder.safetensors"
SKIPPED_FILE = "skipped.txt"
PROBE_FILE = "probe.json"
REPORT_FILE = "report.html"
FIGURES_DIR = "figures"
RUN_MARKERS = (CONFIG_FILE, METRICS_FILE, MODEL_FILE)

# Images encoded on the fly for the neighbour search when no feature file is given. Encoding
# is quick at 32 pixels, but a report should not re-encode a whole large data set.
# Limitation: without --features, neighbours come from an evenly spaced subset of at most
# MAX_ENCODE images; see docs/limitations.md
MAX_ENCODE = 2000
# Random queries behind the "top-k label agreement" figure (more than the ones drawn).
AGREEMENT_QUERIES = 500
_ENCODE_BATCH = 256
_SIM_CHUNK = 8192
_SKIPPED_SHOWN = 20


# ==== collected material ====


@dataclass
class Figure:
    """A drawn figure: its file name in figures/, its alt text, and the image."""

    name: str
    alt: str
    image: Any  # PIL.Image.Image
    caption: str = ""

    def png(self) -> bytes:
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG", optimize=True)
        return buffer.getvalue()


@dataclass
class Section:
    """One part of the report: escaped HTML pieces and figures, in page order."""

    id: str
    title: str
    body: list[str | Figure] = field(default_factory=list)

    @property
    def figures(self) -> list[Figure]:
        return [piece for piece in self.body if isinstance(piece, Figure)]

    def note(self, text: str) -> None:
        self.body.append(f'<p class="note">{html.escape(text)}</p>')

    def para(self, text: str) -> None:
        self.body.append(f"<p>{html.escape(text)}</p>")

    def table(self, header: Sequence[str] | None, rows: Sequence[Sequence[object]]) -> None:
        self.body.append(_table(header, rows))

    def figure(self, fig: Figure) -> None:
        """Add `fig`; its image is written and inlined when the report is assembled."""
        self.body.append(fig)


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[object]]) -> str:
    parts = ["<table>"]
    if header:
        parts.append("<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header))
        parts.append("</tr></thead>")
    parts.append("<tbody>")
    for row in rows:
        cells = "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row)
        parts.append(f"<tr>{cells}</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return _num(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _num(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def _pct(value: object) -> str:
    return f"{100 * float(value):.1f} %" if isinstance(value, (int, float)) else "-"


# ==== reading the run folder ====


def check_run_dir(run_dir: Path) -> None:
    """Raise a one-line DimError unless `run_dir` is a folder that `dim train` wrote into."""
    if not run_dir.exists():
        raise DimError(f"run folder {run_dir} does not exist; pass a folder `dim train` wrote")
    if not run_dir.is_dir():
        raise DimError(f"{run_dir} is a file, not a run folder; pass a folder `dim train` wrote")
    if not any((run_dir / name).is_file() for name in RUN_MARKERS):
        raise DimError(
            f"{run_dir} is not a run folder of `dim train` (it has none of "
            f"{', '.join(RUN_MARKERS)}); pass the folder a run wrote, e.g. runs/latest"
        )


def read_config(run_dir: Path, notes: list[str]) -> dict[str, Any]:
    """config.json as a dict; {} (and a note) when it is missing or damaged."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        notes.append(f"no {CONFIG_FILE} in the run folder: settings and data summary unknown")
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        notes.append(f"{CONFIG_FILE} could not be read ({err}); settings unknown")
        return {}
    if not isinstance(config, dict):
        notes.append(f"{CONFIG_FILE} is not a JSON object; settings unknown")
        return {}
    return config


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of metrics.jsonl and the number of lines that were not JSON objects.

    A line cut short by a crash, or any other bad line, is counted and skipped.
    """
    records: list[dict[str, Any]] = []
    bad = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                bad += 1
    return records, bad


def read_skipped(path: Path) -> list[tuple[str, str]]:
    """(path, reason) pairs of skipped.txt (tab-separated; a line without a tab has no reason)."""
    entries = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip():
            key, _, reason = line.partition("\t")
            entries.append((key, reason))
    return entries


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    settings = config.get("settings")
    return settings if isinstance(settings, dict) else {}


def _resolved(config: dict[str, Any]) -> dict[str, Any]:
    resolved = config.get("resolved")
    return resolved if isinstance(resolved, dict) else {}


# ==== sections ====


def _curves_section(run_dir: Path, summary: dict[str, str]) -> Section:
    sec = Section("curves", "Training curves")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        sec.note(f"No {METRICS_FILE} in the run folder, so there are no curves to draw.")
        return sec
    records, bad = read_metrics(path)
    if bad:
        sec.note(f"{bad} line(s) of {METRICS_FILE} were not JSON objects and were skipped.")
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    rows = steps or epochs
    if not rows:
        sec.note(f"{METRICS_FILE} holds no step or epoch records yet.")
        return sec

    last = rows[-1]
    summary["steps"] = str(last.get("step", "-"))
    if epochs:
        summary["epochs completed"] = str(len(epochs))
    for key in sorted(k for k in last if k.startswith(("loss_", "mi_"))):
        value = last[key]
        if isinstance(value, (int, float)):
            summary[f"last {key}"] = _num(float(value))
    rates = [float(r["images_per_s"]) for r in rows if _is_number(r.get("images_per_s"))]
    if rates:
        summary["images/s (median)"] = f"{float(np.median(rates)):.0f}"

    x_of = [float(r["step"]) if _is_number(r.get("step")) else float(i) for i, r in enumerate(rows)]
    what = "step" if steps else "epoch record"
    sec.para(
        f"{len(rows)} {what}s from {METRICS_FILE} (each point is the mean over one logging "
        "interval). Losses are minimised; the MI estimates are the objective's lower bounds, "
        "so they should rise."
    )
    groups = [
        ("losses", "Loss terms", "loss", ("loss_",)),
        ("mi", "Mutual-information estimates", "estimate (nats)", ("mi_",)),
    ]
    for name, title, ylabel, prefixes in groups:
        keys = sorted({k for r in rows for k in r if k.startswith(prefixes)})
        if not keys:
            sec.note(f"No {prefixes[0]}* values in {METRICS_FILE}.")
            continue
        series = [plots.Series(k, x_of, [_as_float(r.get(k)) for r in rows]) for k in keys]
        image = plots.line_chart(series, title=title, xlabel="step", ylabel=ylabel)
        sec.figure(Figure(f"{name}.png", title, image))
    if rates:
        series = [plots.Series("images/s", x_of, [_as_float(r.get("images_per_s")) for r in rows])]
        image = plots.line_chart(
            series,
            title="Training throughput",
            xlabel="step",
            ylabel="images / second",
            include_zero=True,
        )
        sec.figure(Figure("throughput.png", "Training throughput", image))
    return sec


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_float(value: object) -> float:
    return float(value) if _is_number(value) else math.nan  # type: ignore[arg-type]


def _probe_files(run_dir: Path, probe: Path | None) -> list[Path]:
    if probe is not None:
        if not probe.is_file():
            raise DimError(f"probe report {probe} does not exist; pass a file `dim probe` wrote")
        return [probe]
    found = [run_dir / PROBE_FILE] if (run_dir / PROBE_FILE).is_file() else []
    found += sorted(p for p in run_dir.glob("probe-*.json") if p.is_file())
    return found


def _probe_section(run_dir: Path, probe: Path | None, summary: dict[str, str]) -> Section:
    sec = Section("probe", "Probe results")
    files = _probe_files(run_dir, probe)
    if not files:
        sec.note(
            f"No {PROBE_FILE} in the run folder. Run `dim probe` on encoded features and save "
            f"its JSON report as {run_dir / PROBE_FILE} (or pass --probe FILE) to see it here."
        )
        return sec

    rows: list[list[object]] = []
    headline: dict[str, Any] | None = None
    for path in files:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            results = doc["results"]
            assert isinstance(results, list)
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            sec.note(f"{path.name} is not a probe report of `dim probe` and was skipped.")
            continue
        label = str(doc.get("label") or path.stem)
        for res in results:
            if not isinstance(res, dict):
                continue
            rows.append(
                [
                    label,
                    res.get("method", "?"),
                    _pct(res.get("top1")),
                    _pct(res.get("top5")),
                    _pct(res.get("macro_f1")),
                    res.get("n_train"),
                    res.get("n_test"),
                    doc.get("dim"),
                ]
            )
        if headline is None:
            headline = doc
    if not rows:
        return sec
    sec.para(
        "Frozen features, a classifier trained on top: linear = logistic regression, "
        "knn = cosine k-nearest neighbours, mlp = the paper's one-hidden-layer probe."
    )
    sec.table(["features", "probe", "top-1", "top-5", "macro F1", "train", "test", "dim"], rows)

    assert headline is not None, "a parsed report exists when rows were found"
    for res in headline["results"]:
        if not isinstance(res, dict):
            continue
        method = str(res.get("method", "probe"))
        if _is_number(res.get("top1")):
            summary[f"{method} probe top-1"] = _pct(res["top1"])
        confusion = res.get("confusion")
        classes = res.get("classes") or headline.get("classes")
        if not (isinstance(confusion, list) and isinstance(classes, list)):
            continue
        if not _square(confusion, classes):
            continue
        label = str(headline.get("label") or files[0].stem)
        title = f"Confusion matrix: {method} probe ({label})"
        image = plots.confusion_heatmap(confusion, [str(c) for c in classes], title=title)
        sec.figure(Figure(f"confusion-{_slug(method)}.png", title, image))
    return sec


def _square(confusion: list[Any], classes: list[Any]) -> bool:
    """Whether `confusion` is an n x n matrix of numbers for the n `classes`."""
    n = len(classes)
    return (
        n > 0
        and len(confusion) == n
        and all(
            isinstance(row, list) and len(row) == n and all(_is_number(v) for v in row)
            for row in confusion
        )
    )


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text) or "x"


def _model_section(run_dir: Path) -> Section:
    sec = Section("model", "Model")
    path = run_dir / MODEL_FILE
    if not path.is_file():
        sec.note(f"No {MODEL_FILE} in the run folder (the run may have stopped before saving).")
        return sec
    from dimcli.modelfile import file_sha256, read_metadata

    try:
        meta = read_metadata(path)
    except DimError as err:
        sec.note(f"{MODEL_FILE} could not be read: {err}")
        return sec
    params, buffers = _count_parameters(path)
    enc = meta.get("encoder", {})
    training = meta.get("training") or {}
    prep = meta.get("preprocessing", {})
    sec.table(
        None,
        [
            ["encoder", enc.get("name")],
            ["input", f"{prep.get('image_size')} x {prep.get('image_size')} RGB"],
            ["feature dim (y)", enc.get("feature_dim")],
            ["parameters", f"{params:,} (+ {buffers:,} batch-norm statistics)"],
            ["trained steps", training.get("steps")],
            ["file", f"{path.name}, {path.stat().st_size / 1e6:.1f} MB"],
            ["sha256", file_sha256(path)],
            ["dimcli version", meta.get("dimcli_version")],
        ],
    )
    layer_rows = []
    for name, dims in (meta.get("layers") or {}).items():
        if isinstance(dims, list) and all(isinstance(d, int) for d in dims):
            layer_rows.append([name, " x ".join(str(d) for d in dims), int(np.prod(dims))])
    if layer_rows:
        sec.para("Layers that dim encode --layer can read (flattened for probes):")
        sec.table(["layer", "shape", "features"], layer_rows)
    return sec


def _count_parameters(path: Path) -> tuple[int, int]:
    """(learned parameters, batch-norm buffers) from the file's header; no weights are read."""
    from safetensors import safe_open

    params = buffers = 0
    with safe_open(str(path), framework="np") as fh:
        for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
            n = int(np.prod(fh.get_slice(name).get_shape()))
            if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
                buffers += n
            else:
                params += n
    return params, buffers


def _data_section(run_dir: Path, config: dict[str, Any]) -> Section:
    sec = Section("data", "Data")
    settings, resolved = _settings(config), _resolved(config)
    rows: list[list[object]] = []
    if settings.get("images"):
        rows.append(["image folder", settings["images"]])
    if "num_images" in resolved:
        rows.append(["images", resolved["num_images"]])
    if "image_size" in resolved:
        rows.append(["input size", f"{resolved['image_size']} px"])
    if "augment" in resolved:
        rows.append(["augmentation", resolved["augment"]])
    skipped_path = run_dir / SKIPPED_FILE
    skipped = read_skipped(skipped_path) if skipped_path.is_file() else []
    rows.append(["skipped (unreadable) files", len(skipped)])
    sec.table(None, rows)
    if not config:
        sec.note("The image count and folder come from config.json, which is missing.")
    if skipped:
        shown = skipped[:_SKIPPED_SHOWN]
        sec.para(f"Skipped files (from {SKIPPED_FILE}, first {len(shown)} of {len(skipped)}):")
        sec.table(["file", "reason"], shown)
    return sec


def _settings_section(config: dict[str, Any]) -> Section:
    sec = Section("settings", "Settings and versions")
    settings = _settings(config)
    if not settings:
        sec.note("No settings recorded (config.json is missing or has none).")
        return sec
    sec.table(["setting", "value"], sorted(settings.items()))
    resolved = _resolved(config)
    if resolved:
        sec.para("Resolved automatic values:")
        sec.table(["setting", "value"], sorted(resolved.items()))
    versions = config.get("versions")
    rows: list[list[object]] = []
    if isinstance(versions, dict):
        rows += [[k, v] for k, v in versions.items()]
    for key in ("git_sha", "created", "updated"):
        if config.get(key):
            rows.append([key, config[key]])
    if rows:
        sec.para("Versions and provenance:")
        sec.table(None, rows)
    return sec


# ==== nearest neighbours ====


def _retrieval_section(
    run_dir: Path,
    config: dict[str, Any],
    *,
    images: Path | None,
    features: Path | None,
    k: int,
    queries: int,
    seed: int,
    layer: str,
    summary: dict[str, str],
) -> Section:
    sec = Section("retrieval", "Nearest neighbours")
    if images is None:
        recorded = _settings(config).get("images")
        images = Path(recorded) if recorded else None
    if images is None or not images.is_dir():
        where = f"the image folder {images} is not available" if images else "no image folder"
        sec.note(
            f"Skipped: {where}. Pass --images DIR (and --features FILE) to show query images "
            "and their nearest neighbours."
        )
        return sec

    if features is not None:
        from dimcli.features import read_features

        matrix, keys = read_features(features)
        source = f"features from {features.name}"
    else:
        if not (run_dir / MODEL_FILE).is_file():
            sec.note(
                f"Skipped: no --features given and no {MODEL_FILE} in the run folder to encode "
                "the images with."
            )
            return sec
        try:
            matrix, keys, total = _encode_sample(run_dir / MODEL_FILE, images, layer)
        except DimError as err:  # a damaged model file, a folder without images, ...
            sec.note(f"Skipped: could not encode the images of {images}: {err}")
            return sec
        source = f"layer {layer!r} of this run's encoder"
        if total > len(keys):
            source += f", {len(keys)} of the {total} images (evenly spaced)"
    n, d = matrix.shape
    if n < 2:
        sec.note(f"Skipped: {n} feature row(s); the neighbour search needs at least 2.")
        return sec
    k = min(k, n - 1)
    queries = min(queries, n)

    # ---- cosine similarities of a few random queries to every row ----
    rng = np.random.default_rng(seed)
    agree_rows = rng.choice(n, size=min(n, max(queries, AGREEMENT_QUERIES)), replace=False)
    query_rows = agree_rows[:queries]
    neighbours, sims = nearest_neighbours(matrix, agree_rows, k)  # (Q, k) each

    labels = [_label(key) for key in keys]
    labelled = any(lab is not None for lab in labels)
    if labelled:
        hits = [
            labels[int(nb)] == labels[int(q)]
            for q, row in zip(agree_rows, neighbours, strict=True)
            for nb in row
            if labels[int(q)] is not None
        ]
        if hits:
            share = float(np.mean(hits))
            summary[f"top-{k} neighbour label agreement"] = _pct(share)

    # ---- draw the grid ----
    from dimcli.data import load_rgb

    def tile(row: int, line2: str, query_label: str | None) -> plots.Tile:
        key = keys[row]
        try:
            image = load_rgb(images / key)
        except BadImageError:
            image = None
        label = labels[row]
        match = None if label is None or query_label is None else label == query_label
        return plots.Tile(image, label or Path(key).name, line2, match)

    grid_rows = []
    unreadable = 0
    for qi, q in enumerate(query_rows):
        q_label = labels[int(q)]
        query = tile(int(q), "query", None)
        tiles = [
            tile(int(nb), f"cos {sims[qi, j]:.3f}", q_label) for j, nb in enumerate(neighbours[qi])
        ]
        unreadable += sum(t.image is None for t in [query, *tiles])
        grid_rows.append((query, tiles))
    if unreadable == len(grid_rows) * (k + 1):
        sec.note(
            f"Skipped: none of the feature paths (e.g. {keys[int(query_rows[0])]!r}) is an image "
            f"under {images}; pass the folder the features were encoded from with --images."
        )
        return sec

    sec.para(
        f"{len(grid_rows)} random queries (seed {seed}) and their {k} nearest neighbours among "
        f"{n} images by cosine similarity of {d}-dimensional features ({source}), the query "
        "itself excluded. "
        + (
            "Green frames share the query's label (its first folder), red ones do not."
            if labelled
            else "The images have no folder labels."
        )
    )
    if f"top-{k} neighbour label agreement" in summary:
        sec.para(
            f"Over {len(agree_rows)} random queries, "
            f"{summary[f'top-{k} neighbour label agreement']} of the top-{k} neighbours share "
            "the query's label."
        )
    if unreadable:
        sec.note(f"{unreadable} pictured image(s) could not be read and are shown grey.")
    image = plots.retrieval_grid(grid_rows, k=k)
    sec.figure(Figure("neighbours.png", "Query images and their nearest neighbours", image))
    return sec


def _label(key: str) -> str | None:
    head, sep, _ = key.replace("\\", "/").partition("/")
    return head if sep and head else None


def nearest_neighbours(
    features: np.ndarray, query_rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows by cosine similarity for each query row, the query itself excluded.

    Args:
        features: (N, D) feature rows (may be memory-mapped; read in chunks).
        query_rows: (Q,) row indices of the queries.
        k: neighbours per query, at most N - 1.

    Returns:
        (indices, similarities), both (Q, k), best first; ties keep the lower row first.
    """
    n, _ = features.shape
    assert 0 < k < n, f"k must be in 1..{n - 1}, got {k}"
    q = _unit(np.asarray(features[query_rows], dtype=np.float64))  # (Q, D)
    sims = np.empty((len(query_rows), n), dtype=np.float64)  # (Q, N)
    for start in range(0, n, _SIM_CHUNK):
        block = _unit(np.asarray(features[start : start + _SIM_CHUNK], dtype=np.float64))
        sims[:, start : start + len(block)] = q @ block.T  # (Q, D) x (D, B) -> (Q, B)
    sims[np.arange(len(query_rows)), query_rows] = -np.inf  # never return the query itself
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # (Q, k)
    return order, np.take_along_axis(sims, order, axis=1)


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _encode_sample(model: Path, images: Path, layer: str) -> tuple[np.ndarray, list[str], int]:
    """Encode up to MAX_ENCODE images of `images` (evenly spaced) with the run's model.

    Returns:
        (features (M, D) float32, their keys relative to `images`, images in the folder).
        Unreadable images are left out.
    """
    import torch

    from dimcli.data import load_rgb, make_transform, relative_key, scan_images
    from dimcli.modelfile import load_encoder

    encoder = load_encoder(model)
    paths = scan_images(images, warn=lambda _msg: None)
    total = len(paths)
    if total > MAX_ENCODE:
        picks = np.linspace(0, total - 1, MAX_ENCODE).round().astype(int)
        paths = [paths[i] for i in picks]
    transform = make_transform(encoder.image_size)
    rows: list[np.ndarray] = []
    keys: list[str] = []
    batch: list[torch.Tensor] = []
    batch_keys: list[str] = []

    def flush() -> None:
        if batch:
            x = torch.stack(batch)  # (B, 3, S, S) uint8
            rows.append(encoder.encode(x, layer).numpy().astype(np.float32))  # (B, D)
            keys.extend(batch_keys)
            batch.clear()
            batch_keys.clear()

    for path in paths:
        try:
            batch.append(transform(load_rgb(path, min_side=encoder.image_size)))
        except BadImageError:
            continue
        batch_keys.append(relative_key(path, images))
        if len(batch) == _ENCODE_BATCH:
            flush()
    flush()
    if not rows:
        return np.zeros((0, 1), dtype=np.float32), [], total
    return np.concatenate(rows), keys, total


# ==== assembling the page ====


def write_report(
    run_dir: Path,
    out: Path | None = None,
    *,
    images: Path | None = None,
    features: Path | None = None,
    probe: Path | None = None,
    k: int = 5,
    queries: int = 6,
    seed: int = 0,
    layer: str = "conv",
) -> Path:
    """Write the run's HTML report and its figures (PNG files in <run_dir>/figures).

    Args:
        run_dir: a run folder of `dim train`.
        out: the HTML file (default <run_dir>/report.html).
        images: the image folder for the neighbour section (default: the run's images).
        features: a feature file of those images (default: encode up to MAX_ENCODE of them
            with the run's encoder at `layer`).
        probe: a probe JSON report (default: probe.json and probe-*.json in the run folder).
        k: neighbours per query; queries: query images drawn; seed: picks the queries.
        layer: encoder layer used when encoding on the fly ("conv", "fc" or "y").

    Returns:
        The path of the HTML file.

    Raises:
        DimError: not a run folder, unreadable --features/--probe, or an unwritable output.
        UsageError: k or queries below 1, or an unknown layer.
    """
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    if k < 1:
        raise UsageError(f"--k must be at least 1 neighbour, got {k}")
    if queries < 1:
        raise UsageError(f"--queries must be at least 1, got {queries}")
    if layer not in ("conv", "fc", "y"):
        raise UsageError(f"unknown layer {layer!r}; choose conv, fc or y")
    out = Path(out) if out is not None else run_dir / REPORT_FILE

    notes: list[str] = []
    config = read_config(run_dir, notes)
    summary: dict[str, str] = {}
    sections = [
        _curves_section(run_dir, summary),
        _retrieval_section(
            run_dir,
            config,
            images=Path(images) if images is not None else None,
            features=Path(features) if features is not None else None,
            k=k,
            queries=queries,
            seed=seed,
            layer=layer,
            summary=summary,
        ),
        _probe_section(run_dir, Path(probe) if probe is not None else None, summary),
        _model_section(run_dir),
        _data_section(run_dir, config),
        _settings_section(config),
    ]

    # ---- figures: PNG files in the run folder, the same bytes inlined in the page ----
    figures_dir = run_dir / FIGURES_DIR
    pngs: dict[str, bytes] = {}
    try:
        figures_dir.mkdir(exist_ok=True)
        for sec in sections:
            for fig in sec.figures:
                pngs[fig.name] = fig.png()
                _write_bytes(figures_dir / fig.name, pngs[fig.name])
        page = _page(run_dir, config, summary, notes, sections, pngs)
        _write_bytes(out, page.encode("utf-8"))
    except OSError as err:
        raise DimError(
            f"cannot write the report ({err.strerror or err}: {err.filename or out}); "
            "make the run folder writable or pass -o to write elsewhere"
        ) from None
    return out


def _write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file and a rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _page(
    run_dir: Path,
    config: dict[str, Any],
    summary: dict[str, str],
    notes: list[str],
    sections: list[Section],
    pngs: dict[str, bytes],
) -> str:
    settings, resolved = _settings(config), _resolved(config)
    name = run_dir.resolve().name
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    head_rows: list[list[object]] = []
    if settings:
        head_rows.append(
            [
                "model",
                f"{settings.get('encoder', '?')}, {settings.get('preset', '?')}, "
                f"{settings.get('estimator', '?')} estimator",
            ]
        )
    if "num_images" in resolved:
        head_rows.append(["images", resolved["num_images"]])
    if "device" in resolved:
        head_rows.append(["device", f"{resolved['device']} ({resolved.get('precision', '?')})"])
    head_rows += [[key, value] for key, value in summary.items()]

    nav = " · ".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>dimcli report: {html.escape(name)}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f"<h1>Deep InfoMax run <code>{html.escape(name)}</code></h1>",
        f'<p class="meta">{html.escape(str(run_dir))} · report written {now} by dimcli '
        f"{html.escape(__version__)}</p>",
        f"<nav>{nav}</nav>",
        '<section id="summary"><h2>Summary</h2>',
    ]
    parts.append(_table(None, head_rows) if head_rows else "")
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    parts.append("</section>")
    for sec in sections:
        parts.append(f'<section id="{sec.id}"><h2>{html.escape(sec.title)}</h2>')
        for piece in sec.body:
            parts.append(_render_piece(piece, pngs))
        parts.append("</section>")
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def _render_piece(piece: str | Figure, pngs: dict[str, bytes]) -> str:
    if isinstance(piece, str):
        return piece
    width, height = piece.image.size
    data = base64.b64encode(pngs[piece.name]).decode("ascii")
    caption = f"<figcaption>{html.escape(piece.caption)}</figcaption>" if piece.caption else ""
    return (
        f'<figure><img src="data:image/png;base64,{data}" width="{width}" height="{height}" '
        f'alt="{html.escape(piece.alt)}">{caption}<figcaption class="file">'
        f"{FIGURES_DIR}/{html.escape(piece.name)}</figcaption></figure>"
    )


_CSS = """
:root { color-scheme: light; }
body { margin: 0; background: #f6f7f9; color: #212529;
  font: 15px/1.5 -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, Helvetica, Arial,
  sans-serif; }
main { max-width: 960px; margin: 0 auto; padding: 24px 20px 60px; }
h1 { font-size: 24px; margin: 8px 0 4px; }
h2 { font-size: 19px; margin: 0 0 12px; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.95em; }
.meta { color: #6c757d; margin: 0 0 12px; word-break: break-all; }
nav { margin: 0 0 20px; color: #6c757d; }
nav a { color: #0b63c4; text-decoration: none; }
section { background: #fff; border: 1px solid #e3e6ea; border-radius: 8px; padding: 18px 20px;
  margin: 0 0 18px; overflow-x: auto; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 14px; }
th, td { text-align: left; padding: 4px 14px 4px 0; border-bottom: 1px solid #eef0f2;
  vertical-align: top; word-break: break-word; }
th { color: #495057; font-weight: 600; border-bottom: 1px solid #ced4da; }
td:first-child { color: #495057; }
figure { margin: 10px 0 18px; }
figure img { max-width: 100%; height: auto; border: 1px solid #eef0f2; }
figcaption { color: #495057; font-size: 13px; }
figcaption.file { color: #868e96; font-family: ui-monospace, monospace; font-size: 12px; }
.note { color: #6c5a00; background: #fff8db; border-left: 3px solid #f0c36d;
  padding: 6px 10px; margin: 8px 0; }
"""
