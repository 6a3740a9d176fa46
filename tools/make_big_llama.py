"""Write a Llama-shaped model folder of random fp16 weights, as big as a real one, in bounded memory.

    python tools/make_big_llama.py OUT_DIR                 # Llama-3.2-1B shape: 1.24 G weights, 2.5 GB
    python tools/make_big_llama.py OUT_DIR --shape 7b      # the "7B" shape of Llama 3 (untied): 8.03 G weights, 16.1 GB
    python tools/make_big_llama.py OUT_DIR --tiny          # a few hundred KB, for tests
    python tools/make_big_llama.py OUT_DIR --blocks 4      # any preset with some dimensions overridden

Presets (``--shape``; every dimension can be overridden with the options below):

=======  ======  ======  =====  ========  ========  ============  ======  ======
shape    hidden  blocks  heads  kv heads  head dim  intermediate  vocab   tied
=======  ======  ======  =====  ========  ========  ============  ======  ======
1b       2048    16      32     8         64        8192          128256  yes
7b       4096    32      32     8         128       14336         128256  no
tiny     64      2       4      2         16        176           512     yes
=======  ======  ======  =====  ========  ========  ============  ======  ======

The folder is what a sharded Hugging Face checkpoint looks like: config.json (llama3 rope_scaling, rope_theta 500000,
rms_norm_eps 1e-5, max_position_embeddings 131072, as Llama 3.2 has them), one safetensors file per block plus one
for the embeddings, final norm (and untied head), and model.safetensors.index.json mapping each tensor to its file.
There is no tokenizer: a consumer feeds token ids.

Weights are normal(0, ``--scale``) (default 0.02, the initializer range of Llama checkpoints) in fp16; norm weights
are 1 + normal(0, scale). Each tensor has its own seed (``--seed`` and its name), so a folder is reproducible.

Memory: tensors are generated and written ``ROWS_PER_BLOCK`` rows at a time into each file (the safetensors header,
which holds only names, shapes and offsets, is written first), so the script's peak RSS is 123 MB for the 1b shape
and 208 MB for 7b (the widest block's float32 normals). Time: 29 s for 1b (2.47 GB) on one core; 7b (16.1 GB) took
17.5 min on a busy one. Needs numpy only (safetensors' layout is ten lines, written here).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROWS_PER_BLOCK = 1024
"""Rows generated at a time: 1024 x 14336 float32 is 56 MiB of temporaries at the widest 7B matrix, 8 MiB at 1B."""


@dataclasses.dataclass(frozen=True, slots=True)
class Shape:
    hidden: int
    blocks: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool


SHAPES = {
    "1b": Shape(hidden=2048, blocks=16, heads=32, kv_heads=8, head_dim=64, intermediate=8192, vocab=128256, tied=True),
    "7b": Shape(hidden=4096, blocks=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256, tied=False),
    "tiny": Shape(hidden=64, blocks=2, heads=4, kv_heads=2, head_dim=16, intermediate=176, vocab=512, tied=True),
}


def hf_config(shape: Shape) -> dict[str, object]:
    """config.json as transformers writes it for Llama 3.2 (1B), with this shape's dimensions."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000 if shape.vocab > 128001 else 1,
        "eos_token_id": 128001 if shape.vocab > 128001 else 2,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "hidden_size": shape.hidden,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": shape.heads,
        "num_hidden_layers": shape.blocks,
        "num_key_value_heads": shape.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": shape.tied,
        "torch_dtype": "float16",
        "use_cache": True,
        "vocab_size": shape.vocab,
    }


def files_of(shape: Shape) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
    """(file name, [(tensor name, shape)]) per file: the embeddings file first, then one per block."""
    count = shape.blocks + 1
    head = [("model.embed_tokens.weight", (shape.vocab, shape.hidden)), ("model.norm.weight", (shape.hidden,))]
    if not shape.tied:
        head.append(("lm_head.weight", (shape.vocab, shape.hidden)))
    files = [(f"model-00001-of-{count:05d}.safetensors", head)]
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    for block in range(shape.blocks):
        prefix = f"model.layers.{block}."
        tensors = [
            (prefix + "input_layernorm.weight", (shape.hidden,)),
            (prefix + "mlp.down_proj.weight", (shape.hidden, shape.intermediate)),
            (prefix + "mlp.gate_proj.weight", (shape.intermediate, shape.hidden)),
            (prefix + "mlp.up_proj.weight", (shape.intermediate, shape.hidden)),
            (prefix + "post_attention_layernorm.weight", (shape.hidden,)),
            (prefix + "self_attn.k_proj.weight", (kv, shape.hidden)),
            (prefix + "self_attn.o_proj.weight", (shape.hidden, q)),
            (prefix + "self_attn.q_proj.weight", (q, shape.hidden)),
            (prefix + "self_attn.v_proj.weight", (kv, shape.hidden)),
        ]
        files.append((f"model-{block + 2:05d}-of-{count:05d}.safetensors", tensors))
    return files


def row_blocks(name: str, dims: tuple[int, ...], *, seed: int, scale: float) -> Iterator[np.ndarray]:
    """The tensor's fp16 values, ROWS_PER_BLOCK rows at a time (a 1-D tensor in one piece)."""
    rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")])
    rows = dims[0]
    cols = math.prod(dims[1:])
    for start in range(0, rows, ROWS_PER_BLOCK if len(dims) > 1 else rows):
        count = min(ROWS_PER_BLOCK, rows - start) if len(dims) > 1 else rows
        values = rng.standard_normal((count, cols) if len(dims) > 1 else count, dtype=np.float32)
        values *= np.float32(scale)
        if len(dims) == 1:  # a norm's weight: near one
            values += np.float32(1.0)
        yield values.astype(np.float16)


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], *, seed: int, scale: float) -> int:
    """Write one fp16 safetensors file block by block; returns its data bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in tensors:
        size = math.prod(dims) * 2
        header[name] = {"dtype": "F16", "shape": list(dims), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-aligned, as safetensors writes it
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as out:
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        for name, dims in tensors:
            for block in row_blocks(name, dims, seed=seed, scale=scale):
                out.write(memoryview(block).cast("B"))
    os.replace(partial, path)
    return offset


def make_model(out_dir: Path, shape: Shape, *, seed: int = 0, scale: float = 0.02) -> int:
    """Write the folder (config.json, the shards, their index); returns the weights' bytes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for file_name, tensors in files_of(shape):
        total += write_safetensors(out_dir / file_name, tensors, seed=seed, scale=scale)
        weight_map |= {name: file_name for name, _ in tensors}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(hf_config(shape), indent=2) + "\n")
    return total


def parse_args(argv: list[str] | None) -> tuple[Path, Shape, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="folder to write (created; files in it are replaced)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="preset (default 1b)")
    parser.add_argument("--tiny", action="store_true", help="the same as --shape tiny")
    for field in dataclasses.fields(Shape):
        if field.name != "tied":
            parser.add_argument("--" + field.name.replace("_", "-"), type=int, help=f"override the preset's {field.name}")
    parser.add_argument("--tied", action=argparse.BooleanOptionalAction, default=None, help="tie the head to the embeddings")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--scale", type=float, default=0.02, help="standard deviation of the weights (default 0.02)")
    args = parser.parse_args(argv)
    shape = SHAPES["tiny" if args.tiny else args.shape]
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Shape) if getattr(args, f.name) is not None}
    shape = dataclasses.replace(shape, **overrides)
    if shape.heads % shape.kv_heads or min(dataclasses.astuple(shape)[:-1]) < 1:
        parser.error(f"impossible shape {shape}: every dimension must be positive and heads a multiple of kv heads")
    return args.out_dir, shape, args


def main(argv: list[str] | None = None) -> int:
    out_dir, shape, args = parse_args(argv)
    started = time.perf_counter()
    total = make_model(out_dir, shape, seed=args.seed, scale=args.scale)
    weights = total // 2
    print(f"wrote {out_dir}: {shape}, {weights / 1e9:.3f} G weights, {total / 1e9:.3f} GB in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
