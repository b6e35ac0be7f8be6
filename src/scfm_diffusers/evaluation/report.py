"""Reports of an evaluation: Markdown + JSON table, a labelled PNG image grid, quality-vs-steps plots, mp4 clips.

A report is a list of rows (dicts, e.g. :meth:`~.harness.EvaluationResult.to_dict` plus a ``method``
key). :func:`write_report` writes ``results.md``, ``results.json``, ``grid.png`` (when grid rows are given)
and ``quality_vs_steps.png`` (when matplotlib is installed: ``pip install "scfm-diffusers[eval]"``) into one
folder. A video evaluation's clips are written as they are made (:func:`write_video`, with imageio:
``pip install "scfm-diffusers[video]"``) and its table uses :data:`VIDEO_COLUMNS`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
from torch import Tensor

__all__ = [
    "DEFAULT_COLUMNS",
    "VIDEO_COLUMNS",
    "image_grid",
    "markdown_table",
    "plot_quality_vs_steps",
    "require_video_writer",
    "write_report",
    "write_video",
]

logger = logging.getLogger(__name__)

#: (row key, column header, format) of the Markdown table; columns whose values are all None are dropped.
DEFAULT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("method", "method", "{}"),
    ("num_inference_steps", "steps", "{}"),
    ("shift", "shift", "{}"),
    ("lora_scale", "LoRA scale", "{:g}"),
    ("latency_s", "latency s", "{:.4f}"),
    ("fd_vs_real", "FD vs real", "{:.2f}"),
    ("delta_fd", "ΔFD", "{:+.2f}"),
    ("fd_vs_teacher", "FD vs teacher", "{:.2f}"),
    ("paired_rmse", "paired RMSE", "{:.4f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("clip_score", "CLIP", "{:.2f}"),
)

#: The table of a video evaluation: frames per clip, and latency in seconds per clip.
VIDEO_COLUMNS: tuple[tuple[str, str, str], ...] = tuple(
    column
    for key, header, fmt in DEFAULT_COLUMNS
    for column in (
        [(key, header, fmt), ("num_frames", "frames", "{}")]
        if key == "num_inference_steps"
        else [(key, "latency s/clip" if key == "latency_s" else header, fmt)]
    )
)


def _format(value: Any, fmt: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]] = DEFAULT_COLUMNS
) -> str:
    """A GitHub Markdown table of ``rows``; a column is kept when at least one row has a value for it."""
    kept = [c for c in columns if any(row.get(c[0]) is not None for row in rows)]
    lines = ["| " + " | ".join(header for _, header, _ in kept) + " |", "|" + "---|" * len(kept)]
    for row in rows:
        lines.append("| " + " | ".join(_format(row.get(key), fmt) for key, _, fmt in kept) + " |")
    return "\n".join(lines)


def _to_uint8(images: Tensor) -> np.ndarray:
    """``(K, C, H, W)`` in [0, 1] → ``(K, H, W, 3)`` uint8."""
    array = images.detach().float().clamp(0, 1).cpu().numpy()
    if array.shape[1] == 1:
        array = np.repeat(array, 3, axis=1)
    return (array.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)


def require_video_writer() -> None:
    """Raise ``ImportError`` naming the extra when imageio or its ffmpeg (what :func:`write_video` needs) is missing.

    Call it before an evaluation whose clips will be written, so that it fails before the sampling, not after.
    """
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f'Writing videos needs imageio and imageio-ffmpeg ({error.name} is missing): pip install "scfm-diffusers[video]".'
        ) from error


def write_video(path: str | Path, frames: Tensor, *, fps: int = 16) -> Path:
    """Write one clip as an mp4 with diffusers' ``export_to_video`` (imageio's ffmpeg, quality 5).

    Args:
        path: The ``.mp4`` file (its folder is created).
        frames: ``(F, C, H, W)`` in [0, 1]; rounded to 8 bits.
        fps: Frames per second (Wan: 16).

    Returns:
        ``path``.
    """
    require_video_writer()
    from diffusers.utils import export_to_video

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_to_video([PIL.Image.fromarray(frame) for frame in _to_uint8(frames)], str(path), fps=fps)
    return path


def image_grid(
    rows: Sequence[tuple[str, Tensor]], *, scale: float = 1, padding: int = 2, label_width: int = 160
) -> PIL.Image.Image:
    """Lay out labelled rows of images: each row is ``(label, images (K, C, H, W) in [0, 1])``.

    Every image is resized by ``scale`` (nearest neighbour when enlarging, so small images stay sharp;
    Lanczos when shrinking) and framed by
    ``padding`` white pixels; the label is drawn in a left margin of ``label_width`` pixels. All rows must
    have the same image size; shorter rows leave blank cells.

    Returns:
        An RGB image of width ``label_width + K·(round(W·scale) + 2·padding)`` and height
        ``R·(round(H·scale) + 2·padding)``, with K the longest row and R the number of rows.
    """
    if not rows:
        raise ValueError("image_grid needs at least one row.")
    height, width = rows[0][1].shape[-2:]
    tile_h, tile_w = max(1, round(height * scale)), max(1, round(width * scale))
    cell_h, cell_w = tile_h + 2 * padding, tile_w + 2 * padding
    resample = PIL.Image.NEAREST if scale >= 1 else PIL.Image.LANCZOS
    columns = max(len(images) for _, images in rows)
    canvas = PIL.Image.new("RGB", (label_width + columns * cell_w, len(rows) * cell_h), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        if tuple(images.shape[-2:]) != (height, width):
            raise ValueError(
                f"Row {label!r} has images of size {tuple(images.shape[-2:])}, expected {(height, width)}."
            )
        top = r * cell_h
        draw.text((4, top + cell_h // 2 - 6), label, fill="black")
        for c, pixels in enumerate(_to_uint8(images)):
            tile = PIL.Image.fromarray(pixels).resize((tile_w, tile_h), resample)
            canvas.paste(tile, (label_width + c * cell_w + padding, top + padding))
    return canvas


def plot_quality_vs_steps(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path | None:
    """Plot FD (vs real when present, else vs teacher) and paired RMSE against steps, one line per method.

    Rows need ``method`` and ``num_inference_steps``; rows of a method with a single step count (e.g. the
    many-step teacher) are drawn as horizontal dashed reference lines. A metric no row has (FD of a video
    evaluation) gets no panel. Uses matplotlib's Agg backend.

    Returns:
        ``path``, or None when matplotlib is not installed (and logged) or no row has either metric.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info('Skipped %s: it needs matplotlib (pip install "scfm-diffusers[eval]").', Path(path).name)
        return None
    fd_key = "fd_vs_real" if any(r.get("fd_vs_real") is not None for r in rows) else "fd_vs_teacher"
    panels = [
        (key, title)
        for key, title in (
            (fd_key, "FD vs real data" if fd_key == "fd_vs_real" else "FD vs teacher"),
            ("paired_rmse", "paired RMSE vs teacher"),
        )
        if any(r.get(key) is not None for r in rows)
    ]
    if not panels:
        return None
    methods = list(dict.fromkeys(r["method"] for r in rows))
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
    for axis, (key, title) in zip(np.atleast_1d(axes), panels):
        for method in methods:
            points = sorted(
                (r["num_inference_steps"], r[key]) for r in rows if r["method"] == method and r.get(key) is not None
            )
            if not points:
                continue
            if len(points) == 1 and len({r["num_inference_steps"] for r in rows}) > 1:
                axis.axhline(points[0][1], linestyle="--", color="grey", label=f"{method} ({points[0][0]} steps)")
            else:
                axis.plot(*zip(*points), marker="o", label=method)
        axis.set_xlabel("sampling steps")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_report(
    output_dir: str | Path,
    rows: Sequence[Mapping[str, Any]],
    *,
    title: str = "Evaluation",
    notes: Sequence[str] = (),
    settings: Mapping[str, Any] | None = None,
    grid_rows: Sequence[tuple[str, Tensor]] | None = None,
    grid_scale: float = 1,
    columns: Sequence[tuple[str, str, str]] = DEFAULT_COLUMNS,
) -> dict[str, Path]:
    """Write ``results.md``, ``results.json``, ``grid.png`` and ``quality_vs_steps.png`` into ``output_dir``.

    Args:
        output_dir: Folder (created).
        rows: One dict per evaluated sampler; JSON-serialisable values.
        title: Heading of the Markdown file.
        notes: Paragraphs printed under the table (settings that matter for reading it, e.g. shifts).
        settings: Stored under ``"settings"`` in the JSON and listed in the Markdown.
        grid_rows: Labelled image rows for :func:`image_grid` (skipped when None).
        grid_scale: Resize factor of the grid images.
        columns: Table columns.

    Returns:
        ``{"markdown": path, "json": path, "grid": path?, "plot": path?}``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if grid_rows:
        written["grid"] = output_dir / "grid.png"
        image_grid(grid_rows, scale=grid_scale).save(written["grid"])
    plot = plot_quality_vs_steps(rows, output_dir / "quality_vs_steps.png") if rows else None
    if plot is not None:
        written["plot"] = plot
    written["json"] = output_dir / "results.json"
    payload = {"title": title, "settings": dict(settings or {}), "notes": list(notes), "rows": [dict(r) for r in rows]}
    written["json"].write_text(json.dumps(payload, indent=2, default=str) + "\n")
    parts = [f"# {title}", "", markdown_table(rows, columns), ""]
    parts += [f"{note}\n" for note in notes]
    if settings:
        parts += ["## Settings", "", *(f"- {key}: {value}" for key, value in settings.items()), ""]
    if "grid" in written:
        parts += ["## Samples (same noise per column)", "", "![samples](grid.png)", ""]
    if plot is not None:
        parts += ["## Quality against steps", "", "![quality vs steps](quality_vs_steps.png)", ""]
    written["markdown"] = output_dir / "results.md"
    written["markdown"].write_text("\n".join(parts))
    return written
