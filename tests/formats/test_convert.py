"""The converter on real sources: MiniLM from its package, transformers-style Llama folders."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from streamload.errors import NoConfigError
from streamload.formats import ConversionInputError, ModelReader, UnsupportedArchitectureError, convert, summarize_compression
from streamload.formats.safetensors_source import SafetensorsCollection
from tests.support.synthetic import llama_config, write_synthetic_llama
from tests.support.tensors import read_dequantized


def test_minilm_meets_size_and_entropy_targets(minilm_dir: Path, minilm_slm: Path) -> None:
    fp32_size = (minilm_dir / "model.safetensors").stat().st_size
    assert minilm_slm.stat().st_size <= 0.25 * fp32_size
    with ModelReader(minilm_slm) as reader:
        m = reader.manifest
        summary = summarize_compression(m)
        assert summary is not None and 0 <= summary.bound_overhead <= 0.03
        assert [layer.name for layer in m.layers] == ["embeddings", *(f"block.{i}" for i in range(6)), "head", "embeddings.rows"]
        assert m.config["pooling"] == "mean" and m.config["normalize"] is True and m.config["max_seq_length"] == 256
        assert m.tokenizer is not None and m.tokenizer.raw_size_bytes == (minilm_dir / "tokenizer.json").stat().st_size
        assert reader.verify() == []


def test_dequantized_weights_match_source_within_reported_error(minilm_dir: Path, minilm_slm: Path) -> None:
    source = SafetensorsCollection([minilm_dir / "model.safetensors"])
    with ModelReader(minilm_slm) as reader:
        restored = dict(read_dequantized(reader))
        for name, values in restored.items():
            original = source.array(name)
            entry = reader.manifest.tensor(name)
            if entry.max_abs_error is None:
                np.testing.assert_array_equal(values, original)  # floats are stored exactly
            else:
                assert np.abs(values - original).max() <= entry.max_abs_error * (1 + 1e-6)
    assert "embeddings.position_ids" not in restored  # integer buffer, dropped


@pytest.mark.parametrize("tied", [False, True])
def test_llama_layers_and_gqa_shapes(tmp_path: Path, tied: bool) -> None:
    config = llama_config(num_hidden_layers=2, tie_word_embeddings=tied)
    source = write_synthetic_llama(tmp_path / "src", config)
    convert(source, tmp_path / "m.slm")
    with ModelReader(tmp_path / "m.slm") as reader:
        m = reader.manifest
        assert [layer.name for layer in m.layers] == ["embeddings", "block.0", "block.1", "head", "embeddings.rows"]
        assert m.tensor("model.embed_tokens.weight").layer_index == 4
        assert m.tensor("model.embed_tokens.weight.scales").layer_index == 0
        assert m.tensor("model.layers.1.self_attn.k_proj.weight").shape == (32, 64)  # 2 kv heads x 16
        assert m.tensor("model.layers.1.self_attn.k_proj.weight").layer_index == 2
        assert ("lm_head.weight" in m.tensor_by_name) is not tied
        assert m.config["num_key_value_heads"] == 2 and m.config["head_dim"] == 16


def test_token_table_is_a_row_table_after_every_step(minilm_slm: Path) -> None:
    """The table comes last, in small chunks of whole rows, its scales in layer 0: a client fetches an input's rows."""
    with ModelReader(minilm_slm) as reader:
        m = reader.manifest
        table = m.tensor("embeddings.word_embeddings.weight")
        rows_layer = m.layers[table.layer_index]
        assert rows_layer.kind.value == "rows" and table.layer_index == len(m.layers) - 1 == m.step_count
        assert m.tensor(table.scales or "").layer_index == 0
        assert table.raw_offset == rows_layer.raw_offset
        row_bytes = table.shape[1]
        chunks = m.chunks_of_layer(table.layer_index)
        assert all((c.raw_offset - table.raw_offset) % row_bytes == 0 and c.raw_size_bytes % row_bytes == 0 for c in chunks)
        rows_per_chunk = chunks[0].raw_size_bytes // row_bytes
        assert 8 <= rows_per_chunk <= 64  # tools/bench_row_chunks.py: manifest bytes against bytes fetched per input
        assert m.chunks[-len(chunks) :] == chunks  # the file ends with the table


def test_bf16_source_converts_like_its_f32_values(tmp_path: Path) -> None:
    config = llama_config(num_hidden_layers=1)
    f32 = write_synthetic_llama(tmp_path / "f32", config)
    arrays = SafetensorsCollection([f32 / "model.safetensors"])
    bf16_dir = tmp_path / "bf16"
    bf16_dir.mkdir()
    header, blobs, offset = {}, [], 0
    for name in arrays.names():
        values = arrays.array(name)
        raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()  # truncate to bf16
        header[name] = {"dtype": "BF16", "shape": list(values.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    encoded = json.dumps(header).encode()
    (bf16_dir / "model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))
    (bf16_dir / "config.json").write_text(json.dumps(config))
    convert(bf16_dir, tmp_path / "m.slm")
    with ModelReader(tmp_path / "m.slm") as reader:
        norm = dict(read_dequantized(reader))["model.norm.weight"]
    expected = (arrays.array("model.norm.weight").view(np.uint32) & 0xFFFF0000).view(np.float32)
    np.testing.assert_array_equal(norm, expected)


def test_sharded_source_equals_single_file(tmp_path: Path) -> None:
    config = llama_config(num_hidden_layers=2)
    single = write_synthetic_llama(tmp_path / "single", config)
    arrays = SafetensorsCollection([single / "model.safetensors"])
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = sorted(arrays.names())
    weight_map = {}
    for shard, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file = f"model-0000{shard + 1}-of-00002.safetensors"
        save_file({n: np.array(arrays.array(n)) for n in part}, str(sharded / file))
        weight_map |= {n: file for n in part}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (sharded / "config.json").write_text(json.dumps(config))
    convert(single, tmp_path / "a.slm")
    convert(sharded, tmp_path / "b.slm")
    assert (tmp_path / "a.slm").read_bytes() == (tmp_path / "b.slm").read_bytes()


def test_single_safetensors_file_with_config(tmp_path: Path) -> None:
    source = write_synthetic_llama(tmp_path / "src", llama_config(num_hidden_layers=1))
    lone = tmp_path / "lone"
    lone.mkdir()
    (source / "model.safetensors").rename(lone / "weights.safetensors")
    with pytest.raises(NoConfigError, match="give its path as config_path$"):
        convert(lone / "weights.safetensors", tmp_path / "m.slm")
    convert(lone / "weights.safetensors", tmp_path / "m.slm", config_path=source / "config.json")
    assert (tmp_path / "m.slm").stat().st_size > 0


def test_unknown_architecture_lists_supported(tmp_path: Path) -> None:
    source = write_synthetic_llama(tmp_path / "src", llama_config(num_hidden_layers=1) | {"model_type": "falcon"})
    supported = "bert, llama, qwen2, qwen3, mistral, phi3, gemma2, gpt2, olmo2, granite, stablelm"
    with pytest.raises(UnsupportedArchitectureError, match=f"'falcon' is not supported; streamload converts: {supported}$"):
        convert(source, tmp_path / "m.slm")
    assert not (tmp_path / "m.slm").exists()


def test_config_that_does_not_match_weights(tmp_path: Path) -> None:
    source = write_synthetic_llama(tmp_path / "src", llama_config(num_hidden_layers=1))
    (source / "config.json").write_text(json.dumps(llama_config(num_hidden_layers=2)))
    with pytest.raises(ConversionInputError, match=r"'model\.layers\.1\.[a-z_.]+' is missing"):
        convert(source, tmp_path / "m.slm")
    (source / "config.json").write_text(json.dumps(llama_config(num_hidden_layers=1, hidden_size=32)))
    with pytest.raises(ConversionInputError, match="has shape"):
        convert(source, tmp_path / "m.slm")


def test_quant_none_keeps_float_weights(tmp_path: Path, llama_dir: Path) -> None:
    convert(llama_dir, tmp_path / "m.slm", quant="none")
    source = SafetensorsCollection([llama_dir / "model.safetensors"])
    with ModelReader(tmp_path / "m.slm") as reader:
        assert reader.manifest.int8_histogram is None
        for name, values in read_dequantized(reader):
            np.testing.assert_array_equal(values, source.array(name))


def test_converter_refuses_a_config_the_runtime_would_refuse(tmp_path: Path) -> None:
    source = write_synthetic_llama(tmp_path / "src", llama_config(num_hidden_layers=1, max_position_embeddings=10**12))
    with pytest.raises(
        ConversionInputError, match=r"max_position_embeddings=1000000000000 is invalid: expected an integer in \[1, 16777216\]"
    ):
        convert(source, tmp_path / "m.slm")
    assert not (tmp_path / "m.slm").exists()
