"""What the CLI shows: exit codes, sizes in words, the progress bars, a decoder's tokens as they come, and the summaries
and results it prints."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from ..download.origin import is_url
from ..errors import redact_urls

EXIT_OK = 0
EXIT_FAILURE = 1  # the operation failed (bad file, network, integrity)
EXIT_USAGE = 2  # argparse's own code for bad arguments


def format_bytes(size: float) -> str:
    """SI units (1 MB = 10^6 B), the ones the progress bar shows too."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


class ConvertProgress:
    """A bar over the source's bytes on a terminal's stderr, fed by ``convert``'s progress callback."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled
        self.bar: Any = None

    def __call__(self, done_bytes: int, total_bytes: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc=self.label, file=sys.stderr, **bar_width()
            )
        self.bar.n = min(done_bytes, total_bytes)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.enabled = False  # closed for good: later progress (completing the cache after the result) draws nothing


class ProgressBar:
    """An `ollama pull`-style bar on stderr, fed by the download progress callback; ``last`` is the latest report."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled
        self.bar: Any = None
        self.last: Any = None

    def __call__(self, progress: Any) -> None:
        self.last = progress
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=progress.bytes_total or progress.bytes_cached + progress.bytes_to_download,  # a resumed bar goes on out of the whole
                # what the cache held, and what arrived before this first report, are not counted in the rate: counted
                # over the instant since the bar was made, the header's bytes read as a rate of gigabytes per second
                initial=progress.bytes_cached + progress.bytes_downloaded,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                desc=self.label,
                file=sys.stderr,
                **bar_width(),
            )
        done = progress.bytes_cached + progress.bytes_downloaded
        self.bar.n = min(done, self.bar.total or done)
        # in the description, not the postfix: a narrow terminal drops the postfix first
        self.bar.set_description_str(f"{self.label} layers {progress.layers_ready}/{progress.layers_total}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.enabled = False  # closed for good: later progress (completing the cache after the result) draws nothing


class TokenPrinter:
    """``on_token`` for a decoder's run: each token's text on stdout as soon as it is sampled, flushed.

    Called on the decode thread; the text is decoded and written on the event loop (``call_soon_threadsafe``), which
    also closes the progress bar before the first piece, so stdout and the bar never share a line. Multi-byte
    characters split over byte tokens are held until complete (``StreamingDetokenizer``); a model without a
    tokenizer shows the ids, comma-separated, as the final result would.
    """

    def __init__(self, model: Any, bar: ProgressBar) -> None:
        from ..api import StreamingDetokenizer

        tokenizer = model.tokenizer
        self._stream = StreamingDetokenizer(tokenizer) if tokenizer is not None else None
        self._bar = bar
        self._loop = asyncio.get_running_loop()
        self._count = 0
        self.text = ""  # what was printed

    def __call__(self, token_id: int) -> None:
        self._loop.call_soon_threadsafe(self._show, token_id)

    def _show(self, token_id: int) -> None:
        if self._count == 0:
            self._bar.close()
        piece = self._stream.add(token_id) if self._stream is not None else f"{',' if self._count else ''}{token_id}"
        self._count += 1
        self._write(piece)

    def _write(self, piece: str) -> None:
        if piece:
            self.text += piece
            sys.stdout.write(piece)
            sys.stdout.flush()

    def finish(self) -> None:
        """The rest of the text (an incomplete character at the end), and the end of the line."""
        self._write(self._stream.finish() if self._stream is not None else "")
        self._bar.close()
        sys.stdout.write("\n")
        sys.stdout.flush()


def bar_width() -> dict[str, Any]:
    """Follow the terminal's width. A terminal that reports a size of 0 x 0 (``script``, some CI ptys) gets 80 x 24:
    tqdm draws nothing in zero rows."""
    import os

    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):
        size = os.terminal_size((0, 0))
    return {"dynamic_ncols": True} if size.columns > 0 and size.lines > 0 else {"ncols": 80, "nrows": 24}


def print_summary(summary: dict[str, Any], source: str) -> None:
    config = summary["config"]
    print(redact_urls(source))
    print(
        f"  architecture   {summary['architecture']} ({config.get('num_hidden_layers')} blocks, "
        f"hidden {config.get('hidden_size')}, quant {config.get('quantization', '?')})"
    )
    print(f"  manifest       {format_bytes(summary['manifest_bytes'])}, digest sha256:{summary['manifest_digest']}")
    tokenizer = f"tokenizer.json, {format_bytes(summary['tokenizer_bytes'])} (stored compressed in the manifest)"
    print(f"  tokenizer      {tokenizer if summary['tokenizer_bytes'] else 'none'}")
    print(
        f"  data           {format_bytes(summary['data_bytes'])} in {summary['chunks']} chunks "
        f"of <= {format_bytes(summary['chunk_size_bytes'])}"
    )
    if summary["size_vs_fp32"] is not None:
        print(f"  size vs fp32   {summary['size_vs_fp32']:.3f} (fp32 weights would be {format_bytes(summary['fp32_equivalent_bytes'])})")
    print(f"\n  {'#':>3} {'layer':<15} {'tensors':>7} {'chunks':>6} {'raw':>11} {'compressed':>11} {'ratio':>6}")
    for layer in summary["layers"]:
        print(
            f"  {layer['index']:>3} {layer['name']:<15} {layer['tensors']:>7} {layer['chunks']:>6} "
            f"{format_bytes(layer['raw_bytes']):>11} {format_bytes(layer['compressed_bytes']):>11} {layer['ratio']:>6.3f}"
        )
    q = summary["quantization"]
    print(f"\n  quantization   {q['tensors_int8']} int8 tensors (per-row scales), {q['tensors_float']} float")
    if q["tensors_int8"]:
        print(f"                 largest error abs {q['max_abs_error']:.3e}, rel {q['max_rel_error']:.3e} ({q['worst_tensor']})")
    tiers = summary["progressive"]
    if tiers:
        cosine = tiers["preview_cosine_on_calibration"]
        print(
            f"  progressive    preview tier {format_bytes(tiers['coarse_tier_bytes'])} (what the preview needs: every layer, "
            f"its progressive matrices at coarse levels), "
            f"refinements {format_bytes(tiers['refinement_bytes'])}, row tables {format_bytes(tiers['row_table_bytes'])}\n"
            f"                 {tiers['progressive_matrices']} matrices progressive "
            f"({', '.join(f'{n} at {bits}' for bits, n in tiers['coarse_bits'].items())}), "
            f"{tiers['exact_matrices']} stored exact in the preview tier"
            + (f"; preview cosine to exact {cosine:.4f} on the calibration text" if cosine is not None else "")
        )
    payload = summary["int8_payload"]
    if payload:
        print(
            f"  int8 payload   {format_bytes(payload['compressed_bytes'])} compressed; "
            f"order-0 entropy {payload['entropy_bits_per_weight']:.3f} bits/weight, "
            f"bound {format_bytes(payload['entropy_bound_bytes'])}: {100 * payload['above_bound']:+.2f}% vs bound"
        )


def print_result(
    args: argparse.Namespace, result: dict[str, Any], label: str = "", *, streamed: bool = False, timings: bool = True
) -> None:
    """The result on stdout (its text unless ``streamed``: printed token by token already), then when and after how many
    bytes it came on stderr (unless not ``timings``)."""
    if args.json:
        print(json.dumps(result), flush=True)
        return
    if streamed:
        pass
    elif "embedding" in result:
        vectors = result["embedding"] if isinstance(result["embedding"][0], list) else [result["embedding"]]
        for vector in vectors:
            print("[" + ", ".join(f"{v:.6f}" for v in vector) + "]")
    else:
        print(result["text"] if result["text"] is not None else ",".join(map(str, result["generated_ids"])))
    sys.stdout.flush()
    if not timings:
        return
    first = result["first_block_done_s"]
    needed = f"{format_bytes(result['bytes_needed'])} of {format_bytes(result['file_bytes'])} needed"
    what = f"{label} result" if label else "result"
    similar = f", cosine to the exact result {format_cosine(result['preview']['cosine_to_exact'])}" if "preview" in result else ""
    line = f"{what} at {result['total_s']:.3f} s ({needed})"
    if first is not None:
        line = f"block 0 done at {first:.3f} s, {line}"
    if first is not None and is_url(args.source):  # a local file is read, not downloaded
        line += f", {format_bytes(result['bytes_downloaded'])} downloaded by then"
    print(
        line + similar,
        file=sys.stderr,
    )


def format_cosine(value: float | list[float]) -> str:
    values = value if isinstance(value, list) else [value]
    return f"{min(values):.4f}" if len(values) == 1 else f"min {min(values):.4f}, mean {sum(values) / len(values):.4f}"
