"""Hostile model configs: refused with a FormatError naming the field before the runtime allocates anything."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

import streamload
from streamload import errors
from streamload.runtime import run
from tests.support.mutate import join_file, split_file


def with_config(source: Path, target: Path, **changes: Any) -> Path:
    """A copy of a converted file whose manifest config has these values (chunks and hashes untouched)."""
    manifest, region = split_file(source.read_bytes())
    manifest["config"].update(changes)
    target.write_bytes(join_file(manifest, region))
    return target


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"head_dim": 5_000_000},
            r"num_attention_heads=4 x head_dim=5000000 = 20000000 contradicts tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' of shape \(64, 64\)",
        ),
        ({"head_dim": 10**9}, r"head_dim=1000000000 = 4000000000 contradicts tensor 'model\.layers\.0\.self_attn\.q_proj\.weight'"),
        ({"num_hidden_layers": 10**9}, r"num_hidden_layers=1000000000 contradicts the file's 5 execution steps"),
    ],
)
async def test_runtime_refuses_before_allocating(tmp_path: Path, llama_slm: Path, changes: dict[str, Any], message: str) -> None:
    hostile = with_config(llama_slm, tmp_path / "hostile.slm", **changes)
    async with streamload.open(hostile, cache_dir=tmp_path / "cache") as model:
        tracemalloc.start()
        try:
            with pytest.raises(errors.ManifestSchemaError, match=message):
                await run(model, ids=[1, 2, 3], max_new_tokens=2)
            _, peak_bytes = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak_bytes < 16 << 20  # 5e6 x 64 x 4 bytes would be 1.2 GB for one projection


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"num_key_value_heads": 4},
            r"num_key_value_heads=4 x head_dim=16 = 64 contradicts tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' of shape \(32, 64\)",
        ),
        ({"vocab_size": 10**6}, r"vocab_size=1000000 contradicts tensor 'model\.embed_tokens\.weight' of shape \(512, 64\)"),
        (
            {"hidden_size": 96},
            r"hidden_size=96 contradicts tensor 'model\.embed_tokens\.weight' of shape \(512, 64\) \(dimension 1 is 64\)",
        ),
        ({"intermediate_size": 177}, r"intermediate_size=177 contradicts tensor 'model\.layers\.0\.mlp\.gate_proj\.weight'"),
        ({"num_attention_heads": 3}, r"num_attention_heads=3 is not a multiple of num_key_value_heads=2"),
        ({"head_dim": 15, "num_attention_heads": 2, "num_key_value_heads": 1}, r"head_dim=15 must be even"),
        ({"max_position_embeddings": 10**12}, r"max_position_embeddings=1000000000000 is invalid: expected an integer in \[1, 16777216\]"),
        ({"rope_theta": float("nan")}, r"rope_theta=nan is invalid"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": float("inf")}}, r"rope_scaling\.factor=inf is invalid"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_scaling=.* llama3 scaling"),
        ({"rms_norm_eps": "tiny"}, r"rms_norm_eps='tiny' is invalid"),
        ({"head_dim": True}, r"head_dim=True is invalid"),
        ({"eos_token_id": ["x"]}, r"eos_token_id='x' is invalid"),
        ({"attention_bias": True}, r"implies tensor 'model\.layers\.0\.self_attn\.q_proj\.bias', which the file does not hold"),
    ],
)
async def test_llama_config_fields_against_tensor_shapes(tmp_path: Path, llama_slm: Path, changes: dict[str, Any], message: str) -> None:
    hostile = with_config(llama_slm, tmp_path / "hostile.slm", **changes)
    async with streamload.open(hostile, cache_dir=tmp_path / "cache") as model:
        with pytest.raises(errors.ManifestSchemaError, match=message):
            await run(model, ids=[1, 2], max_new_tokens=1)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"type_vocab_size": 3}, r"type_vocab_size=3 contradicts tensor 'embeddings\.token_type_embeddings\.weight' of shape \(2, 384\)"),
        ({"max_position_embeddings": 4096}, r"max_position_embeddings=4096 contradicts tensor 'embeddings\.position_embeddings\.weight'"),
        ({"num_attention_heads": 5}, r"hidden_size=384 is not a multiple of num_attention_heads=5"),
        ({"pad_token_id": 10**6}, r"pad_token_id=1000000 is outside vocab_size=30522"),
        ({"pooling": "median"}, r"pooling='median' is invalid"),
        ({"layer_norm_eps": -1.0}, r"layer_norm_eps=-1\.0 is invalid"),
    ],
)
async def test_bert_config_fields_against_tensor_shapes(tmp_path: Path, minilm_slm: Path, changes: dict[str, Any], message: str) -> None:
    hostile = with_config(minilm_slm, tmp_path / "hostile.slm", **changes)
    async with streamload.open(hostile, cache_dir=tmp_path / "cache") as model:
        with pytest.raises(errors.ManifestSchemaError, match=message):
            await run(model, texts=["hello"])


def test_cli_run_prints_one_line_and_no_traceback(tmp_path: Path, llama_slm: Path) -> None:
    hostile = with_config(llama_slm, tmp_path / "hostile.slm", head_dim=5_000_000)
    done = subprocess.run(
        [sys.executable, "-m", "streamload.cli", "run", str(hostile), "--text", "hi", "--cache-dir", str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model config: num_attention_heads=4 x head_dim=5000000"), done.stderr
