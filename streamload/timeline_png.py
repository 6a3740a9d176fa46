"""Draw a streamed run as a picture: per layer, download, decompress and compute intervals on one time axis."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .errors import StreamloadError
from .runtime.timeline import LayerTiming, RowsTiming
from .stats import LayerTimes


def draw_timeline(
    path: str | os.PathLike[str],
    layer_times: Sequence[LayerTimes],
    timings: Sequence[LayerTiming],
    started: float,
    *,
    rows: Sequence[RowsTiming] = (),
    result_s: float | None = None,
    preview_s: float | None = None,
    preview: Sequence[LayerTiming] = (),
    link_floor_s: float | None = None,
    title: str = "",
) -> None:
    """Write a PNG: one row per layer; ``started`` (perf_counter) is time zero; the link floor as a dashed line.

    ``rows``: the row fetches of the input (drawn on their table's line, from asked to arrived); ``result_s``: when
    the result was there (a solid line); ``preview_s``: when a preview from coarse weights was (a dotted line), and
    ``preview`` its per-layer compute (a progressive layer's refinements are drawn apart from its coarse levels).

    Raises:
        StreamloadError: matplotlib is not installed (``pip install 'streamload[plot]'``).
    """
    plt = _import_pyplot()
    rows_count = len(layer_times)
    ends = [t.compute_done_s for t in timings] + [s.download[1] - started for s in layer_times if s.download] + [link_floor_s or 0.0]
    visible_s = max(ends, default=1.0) * 0.004  # compute takes milliseconds: draw at least this wide
    figure, axes = plt.subplots(figsize=(10, 1.6 + 0.28 * rows_count), dpi=110)
    # the drawing order is the legend's order (each label once, where it first appears)
    _draw_layers(axes, layer_times, timings, started, visible_s)
    _draw_preview_and_rows(axes, rows_count, preview, rows, visible_s)
    _draw_marks(axes, result_s, preview_s, link_floor_s)
    _label_axes(axes, layer_times, title)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _import_pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise StreamloadError("drawing a timeline needs matplotlib: pip install 'streamload[plot]'") from None
    return plt


def _draw_layers(axes: Any, layer_times: Sequence[LayerTimes], timings: Sequence[LayerTiming], started: float, visible_s: float) -> None:
    """Per layer: download (and refinements) above, verify + decompress in the middle, compute below."""
    compute = {t.index: t for t in timings}
    rows_count = len(layer_times)
    for times in layer_times:
        y = rows_count - 1 - times.index
        for interval, offset, color, label in (
            (times.download, 0.25, "#4c78a8", "download"),
            (times.refinement, 0.25, "#9ecae9", "refinements: download + fold"),
            (times.decompress, 0.0, "#f58518", "verify + decompress"),
        ):
            if interval:  # perf_counter seconds: drawn from the start
                axes.barh(y + offset, interval[1] - interval[0], left=interval[0] - started, height=0.25, color=color, label=label)
        timing = compute.get(times.index)
        if timing:
            width = max(timing.compute_done_s - timing.compute_start_s, visible_s)
            axes.barh(y - 0.25, width, left=timing.compute_start_s, height=0.25, color="#54a24b", label="compute")


def _draw_preview_and_rows(
    axes: Any, rows_count: int, preview: Sequence[LayerTiming], rows: Sequence[RowsTiming], visible_s: float
) -> None:
    """A preview's compute on its layer's compute line; the input's row fetches on their table's download line."""
    for timing in preview:
        width = max(timing.compute_done_s - timing.compute_start_s, visible_s)
        axes.barh(
            rows_count - 1 - timing.index - 0.25, width, left=timing.compute_start_s, height=0.25, color="#b279a2", label="preview compute"
        )
    for fetch in rows:
        axes.barh(
            rows_count - 1 - fetch.index + 0.25,
            max(fetch.ready_s - fetch.asked_s, visible_s),
            left=fetch.asked_s,
            height=0.25,
            color="#e45756",
            label="the input's rows",
        )


def _draw_marks(axes: Any, result_s: float | None, preview_s: float | None, link_floor_s: float | None) -> None:
    """Vertical lines: the result (solid), the preview (dotted), the link floor (dashed)."""
    if result_s is not None:
        axes.axvline(result_s, color="#e45756", linewidth=1.5, label=f"result {result_s:.2f} s")
    if preview_s is not None:
        axes.axvline(preview_s, color="#b279a2", linewidth=1.5, linestyle=":", label=f"preview {preview_s:.2f} s")
    if link_floor_s is not None:
        axes.axvline(link_floor_s, color="black", linestyle="--", linewidth=1, label=f"link floor {link_floor_s:.2f} s")


def _label_axes(axes: Any, layer_times: Sequence[LayerTimes], title: str) -> None:
    """The legend below the plot (each label once), the layer names, the time axis and the title."""
    rows_count = len(layer_times)
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    axes.legend(
        unique.values(),
        unique.keys(),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.18 - 0.6 / rows_count),
        ncol=4,
        fontsize=8,
        frameon=False,
    )
    axes.set_yticks(range(rows_count))
    axes.set_yticklabels([s.name for s in reversed(layer_times)], fontsize=8)
    axes.set_xlabel("seconds from start")
    axes.set_xlim(left=0)
    axes.set_title(title, fontsize=10)
    axes.grid(axis="x", alpha=0.3)
