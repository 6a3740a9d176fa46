"""Benchmark: what the reader's defences cost and what they save.

Usage:
    python tools/bench_reader_limits.py [--repeats 5] [--chunks 600000] [--baseline-rev de0e7bc]

1. Manifest parsing, each in a fresh process: a 64 MiB manifest whose unknown key holds 67 million
   empty maps (the bomb), and a legal manifest of --chunks 1 MiB chunks. Reports the outcome,
   seconds and peak RSS growth (VmHWM after the parse minus before it) for this checkout and,
   with --baseline-rev, for that git revision's streamload.formats (extracted with git archive),
   run alternately; medians of --repeats (the baseline's bomb runs once: it takes gigabytes).
2. The one-frame check on chunks: decompress_chunk on 1 MiB int8-like chunks with and without the
   walk over the frame's block headers, alternately; medians of --repeats rounds of 200 chunks.

Run from a checkout: the legal manifest is built by tools/_support/synthetic.py (not installed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np
import zstandard

from _support.synthetic import large_manifest
from streamload.formats import reader
from streamload.formats.constants import MAX_MANIFEST_SIZE_BYTES
from streamload.formats.manifest import ChunkEntry

REPO_ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import importlib.util, json, sys, time, types
root, path, size = sys.argv[1], sys.argv[2], sys.argv[3]
if root != "-":  # load streamload.formats from another tree, without its package's __init__
    package = types.ModuleType("streamload")
    package.__path__ = [root + "/streamload"]
    sys.modules["streamload"] = package
    spec = importlib.util.spec_from_file_location("streamload.formats", root + "/formats/__init__.py", submodule_search_locations=[root + "/formats"])
    module = importlib.util.module_from_spec(spec)
    sys.modules["streamload.formats"] = module
    spec.loader.exec_module(module)
from streamload.errors import FormatError
from streamload.formats.manifest import parse_manifest

sys.path.insert(0, sys.argv[4])  # tools/: the one peak-RSS reader
from _support.memory import peak_rss_bytes

data = open(path, "rb").read()
before = peak_rss_bytes()
started = time.perf_counter()
try:
    manifest = parse_manifest(data, data_size_bytes=None if size == 'none' else int(size))
    chunks = manifest.chunk_table if hasattr(manifest, "chunk_table") else manifest.chunks  # columns since chunks2
    outcome = f"ok, {len(chunks)} chunks"
except FormatError as exc:
    outcome = type(exc).__name__
except MemoryError:
    outcome = "MemoryError"
print(json.dumps([outcome, time.perf_counter() - started, peak_rss_bytes() - before]))
"""


def bomb_manifest() -> bytes:
    root = {
        "config": {"architecture": "x"},
        "chunk_size": 64,
        "layers": [{"name": "a", "raw_offset": 0, "raw_size": 0}],
        "tensors": [],
        "chunks": [],
    }
    head = msgpack.packb(root, use_bin_type=True)
    key = msgpack.packb("future")
    count = MAX_MANIFEST_SIZE_BYTES - len(head) - len(key) - 5
    return bytes([head[0] + 1]) + head[1:] + key + b"\xdd" + count.to_bytes(4, "big") + b"\x80" * count


def bench_manifests(repeats: int, chunk_count: int, baseline_rev: str | None, workdir: Path) -> None:
    bomb = workdir / "bomb.msgpack"
    bomb.write_bytes(bomb_manifest())
    large, data_size = large_manifest(chunk_count)
    (workdir / "large.msgpack").write_bytes(large)
    trees = {"this checkout": "-"}
    if baseline_rev:
        baseline = workdir / "baseline"
        baseline.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "archive", baseline_rev, "formats", "streamload"], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive.stdout, check=True)
        trees[baseline_rev] = str(baseline)
    cases = [("bomb", bomb, "none"), (f"legal, {chunk_count} chunks", workdir / "large.msgpack", str(data_size))]
    print(
        f"\n1. parse_manifest in a fresh process (medians of {repeats}); manifests: bomb {bomb.stat().st_size / 1e6:.1f} MB, legal {len(large) / 1e6:.1f} MB"
    )
    print(f"{'manifest':<26} {'code':<14} {'outcome':<28} {'seconds':>8} {'peak RSS growth MB':>19} {'x manifest':>10}")
    for label, path, size in cases:
        runs: dict[str, list[tuple[str, float, int]]] = {name: [] for name in trees}
        for attempt in range(repeats):
            for name, root in trees.items():  # alternate: the machine's load hits both alike
                if label == "bomb" and root != "-" and attempt > 0:
                    continue
                done = subprocess.run(
                    [sys.executable, "-c", CHILD, root, str(path), size, str(REPO_ROOT / "tools")],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs[name].append(tuple(json.loads(done.stdout)))
        for name, results in runs.items():
            seconds = statistics.median(r[1] for r in results)
            growth = statistics.median(r[2] for r in results)
            print(f"{label:<26} {name:<14} {results[0][0]:<28} {seconds:>8.2f} {growth / 1e6:>19.0f} {growth / path.stat().st_size:>10.2f}")


def bench_frame_check(repeats: int) -> None:
    rng = np.random.default_rng(0)
    compressor = zstandard.ZstdCompressor(level=3)
    chunks = []
    for _ in range(200):
        raw = np.clip(np.rint(rng.standard_normal(1 << 20, dtype=np.float32) * 24), -127, 127).astype(np.int8).tobytes()
        frame = compressor.compress(raw)
        chunks.append((ChunkEntry(0, 0, 0, len(frame), 0, len(raw), bytes(32)), frame))
    out = bytearray(1 << 20)
    walk = reader.frame_size_bytes

    def run_all() -> float:
        started = time.perf_counter()
        for chunk, frame in chunks:
            reader.decompress_chunk(chunk, frame, memoryview(out))
        return time.perf_counter() - started

    with_check, without_check = [], []
    for _ in range(repeats):
        with_check.append(run_all())
        reader.frame_size_bytes = len  # the walk replaced by "the whole input is the frame"
        try:
            without_check.append(run_all())
        finally:
            reader.frame_size_bytes = walk
    started = time.perf_counter()
    for _, frame in chunks:
        walk(frame)
    walk_s = time.perf_counter() - started
    a, b = statistics.median(with_check), statistics.median(without_check)
    print(f"\n2. decompress_chunk, 200 chunks of 1 MiB, into a buffer (medians of {repeats})")
    print(
        f"without the frame-size walk {b * 1e3:.1f} ms ({200 * (1 << 20) / b / 1e9:.2f} GB/s); with it {a * 1e3:.1f} ms; ratio {a / b:.4f}"
    )
    print(f"the walk alone: {walk_s / 200 * 1e6:.1f} us per chunk = {walk_s / b * 100:.2f}% of decompression")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=600_000)
    parser.add_argument("--baseline-rev", help="git revision to compare with (e.g. de0e7bc)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench_manifests(args.repeats, args.chunks, args.baseline_rev, Path(tmp))
    bench_frame_check(args.repeats)


if __name__ == "__main__":
    main()
