"""Synthetic versions of a model folder, for update tests: a "fine-tune" (every weight moved a little), one block
changed, the config changed. Stdlib, numpy and safetensors only (no torch)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from streamload.formats import ModelReader

TINY_LLAMA = Path(__file__).resolve().parent.parent / "fixtures" / "llama-tiny"


def write_version(
    source: Path, folder: Path, *, move: float = 0.0, seed: int = 1, only: str | None = None, config: dict | None = None
) -> Path:
    """A copy of the model folder ``source`` with every float weight moved by ``move`` times its tensor's standard
    deviation times N(0, 1) (only the tensors whose names contain ``only``, when given), and ``config`` merged into
    config.json."""
    from safetensors.numpy import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.name != "model.safetensors":
            shutil.copy(path, folder / path.name)
    tensors = load_file(str(source / "model.safetensors"))
    rng = np.random.default_rng(seed)
    if move:
        for name, values in tensors.items():
            if only is not None and only not in name:
                continue
            noise = rng.standard_normal(values.shape).astype(np.float32) * move * float(values.std() or 1.0)
            tensors[name] = (values.astype(np.float32) + noise).astype(values.dtype)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if config:
        merged = json.loads((source / "config.json").read_text()) | config
        (folder / "config.json").write_text(json.dumps(merged, indent=2))
    return folder


CHUNK_BYTES = 16 << 10  # the tests' chunk size: several chunks per layer


def fetch_json(url: str, cache: Path) -> dict:
    """``streamload fetch URL --json`` into ``cache``: what it printed."""
    argv = [sys.executable, "-m", "streamload.cli", "fetch", url, "--cache-dir", str(cache), "--json"]
    return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120).stdout)


def header_bytes(path: Path) -> int:
    """The bytes a client reads before any chunk: the preamble and the manifest (the padding after them is not read)."""
    with ModelReader(path) as reader:
        return 32 + reader.preamble.manifest_size_bytes
