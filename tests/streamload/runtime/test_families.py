"""The decoder families against transformers (tools/make_family_references.py): tiny random models with each
family's distinctive pieces on, converted, served on loopback, streamed and run; the references are fp32 eager
attention. Prompts of 5, 12 and 20 tokens: the last two reach past the 8-token sliding window."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import streamload
from streamload.calibrate import CalibratedShifts
from streamload.formats import ModelReader, convert
from streamload.runtime import run
from tests.support.paths import FIXTURES
from tests.support.previews import assert_preview_then_exact
from tests.support.serving import ServerThread, serve_directory

FAMILIES = ("qwen2", "qwen3", "mistral", "phi3", "gemma2", "gpt2", "olmo2", "granite", "stablelm")


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def references(family: str) -> tuple[dict, list[np.ndarray]]:
    meta = json.loads((FIXTURES / f"{family}_reference.json").read_text())
    with np.load(FIXTURES / f"{family}_reference.npz") as arrays:
        logits = [arrays[f"logits_{i}"] for i in range(len(meta["prompts"]))]
    return meta, logits


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    directory = tmp_path_factory.mktemp("families")
    for family in FAMILIES:
        convert(FIXTURES / f"{family}-tiny", directory / f"{family}.slm")
        convert(FIXTURES / f"{family}-tiny", directory / f"{family}-f32.slm", quant="none")
    with serve_directory(directory) as server:
        yield server


async def run_prompts(url: str, cache: Path, prompts: list[list[int]], new_tokens: int) -> list[streamload.runtime.RunResult]:
    results = []
    async with streamload.open(url, cache_dir=cache) as model:
        for prompt in prompts:
            results.append(await run(model, ids=prompt, max_new_tokens=new_tokens, keep_prompt_logits=True))
    return results


@pytest.mark.parametrize("family", FAMILIES)
async def test_int8_matches_transformers(family: str, served: ServerThread, tmp_path: Path) -> None:
    meta, reference = references(family)
    results = await run_prompts(served.url(f"{family}.slm"), tmp_path, meta["prompts"], len(meta["greedy"][0]))
    agreeing = []
    for result, logits, greedy in zip(results, reference, meta["greedy"], strict=True):
        assert result.architecture == family
        assert result.prompt_logits is not None and result.prompt_logits.shape == logits.shape
        assert cosine_rows(result.prompt_logits, logits).min() >= 0.999
        agreeing.extend(result.prompt_logits.argmax(axis=1) == logits.argmax(axis=1))
        assert result.generated_ids is not None and result.generated_ids[:4] == greedy[:4]
    assert np.mean(agreeing) >= 0.9  # over the 37 prompt positions: a 5-token prompt's one near-tie would be 0.8 alone


@pytest.mark.parametrize("family", FAMILIES)
async def test_float_weights_reproduce_transformers_greedy_decoding(family: str, served: ServerThread, tmp_path: Path) -> None:
    """Without quantization error every token matches, past the window and (Phi-3) across longrope's switch."""
    meta, reference = references(family)
    results = await run_prompts(served.url(f"{family}-f32.slm"), tmp_path, meta["prompts"], len(meta["greedy"][0]))
    for result, logits, greedy in zip(results, reference, meta["greedy"], strict=True):
        assert cosine_rows(result.prompt_logits, logits).min() >= 0.99999
        np.testing.assert_allclose(result.prompt_logits, logits, atol=2e-4)
        assert result.generated_ids == greedy


@pytest.mark.parametrize("family", FAMILIES)
async def test_block_0_computes_before_the_rest_arrives(family: str, served: ServerThread, tmp_path: Path) -> None:
    """Rows first, then each layer in execution order: the converter's grouping put every tensor where its step reads it."""
    meta, _ = references(family)
    async with streamload.open(served.url(f"{family}.slm"), cache_dir=tmp_path) as model:
        blocks = model.manifest.step_count - 2
        result = await run(model, ids=meta["prompts"][0], max_new_tokens=1)
    assert [t.index for t in result.timeline] == list(range(blocks + 2))
    assert [r.name for r in result.row_fetches] == ["embeddings.rows"]


def test_gpt2_position_table_is_in_layer_0_and_conv1d_weights_are_stored_out_by_in(served: ServerThread, tmp_path: Path) -> None:
    path = tmp_path / "gpt2.slm"
    convert(FIXTURES / "gpt2-tiny", path)
    with ModelReader(path) as reader:
        manifest = reader.manifest
    assert manifest.tensor("transformer.wpe.weight").layer_index == 0
    assert manifest.tensor("transformer.h.0.attn.c_attn.weight").shape == (3 * 64, 64)
    assert manifest.tensor("transformer.h.1.mlp.c_fc.weight").layer_index == 2
    assert "lm_head.weight" not in manifest.tensor_by_name  # tied


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "phi3"])
async def test_progressive_preview_then_exact(family: str, served: ServerThread, tmp_path: Path) -> None:
    """The converter's calibration runs each family's steps; the exact pass equals the plain file's result."""
    progressive = tmp_path / "www" / f"{family}-p.slm"
    progressive.parent.mkdir()
    convert(FIXTURES / f"{family}-tiny", progressive, chunk_size_bytes=16 << 10, progressive=True, calibrator=CalibratedShifts)
    meta, _ = references(family)
    await assert_preview_then_exact(progressive, served.url(f"{family}.slm"), meta["prompts"][1], tmp_path)


def test_gpt2_hub_names_without_prefix_and_mask_buffers_convert_the_same(tmp_path: Path) -> None:
    """The original gpt2 checkpoints name tensors "h.0.attn.c_attn.weight" and store float causal-mask buffers."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "gpt2-hub"
    folder.mkdir()
    (folder / "config.json").write_bytes((FIXTURES / "gpt2-tiny" / "config.json").read_bytes())
    tensors = {
        name.removeprefix("transformer."): values for name, values in load_file(FIXTURES / "gpt2-tiny" / "model.safetensors").items()
    }
    tensors |= {f"h.{i}.attn.bias": np.tril(np.ones((1, 1, 64, 64), np.float32)) for i in range(2)}
    save_file(tensors, str(folder / "model.safetensors"))
    convert(folder, tmp_path / "hub.slm")
    convert(FIXTURES / "gpt2-tiny", tmp_path / "saved.slm")
    with ModelReader(tmp_path / "hub.slm") as hub, ModelReader(tmp_path / "saved.slm") as saved:
        assert [(t.name, t.shape, t.layer_index) for t in hub.manifest.tensors] == [
            (t.name, t.shape, t.layer_index) for t in saved.manifest.tensors
        ]


@pytest.mark.parametrize(
    ("family", "change", "message"),
    [
        ("gemma2", {"layer_types": ["sliding_attention"]}, r"layer_types has 1 entries for num_hidden_layers=2"),
        (
            "gemma2",
            {"layer_types": ["local", "global"]},
            r"layer_types='local' is invalid: expected one of full_attention, sliding_attention",
        ),
        ("phi3", {"partial_rotary_factor": 1.0}, r"rope_scaling.short_factor has 4 factors, the rotated half-dimension is 8"),
        ("mistral", {"sliding_window": 0}, r"sliding_window=0 is invalid"),
    ],
)
def test_a_family_config_that_contradicts_itself_is_refused_naming_the_field(family: str, change: dict, message: str) -> None:
    from streamload.errors import ManifestSchemaError
    from streamload.formats.architectures import architecture_named

    path = FIXTURES / f"{family}-tiny"
    arch = architecture_named(family)
    assert arch is not None
    config = arch.normalize_config(json.loads((path / "config.json").read_text()), {})
    arch.read_config(config)  # as converted: valid
    with pytest.raises(ManifestSchemaError, match=message):
        arch.read_config(config | change)
