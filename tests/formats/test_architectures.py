"""One description per model family: the converter, the runtime's config reading and the synthetic writer agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamload import errors
from streamload.formats import ModelReader
from streamload.formats.architectures import BERT, LLAMA, architecture_named
from streamload.runtime.bert import BertConfig
from streamload.runtime.decoder import LlamaConfig
from tests.support.synthetic import llama_config, llama_tensor_shapes


def test_defaults_are_written_once() -> None:
    hf_bert = {
        "model_type": "bert",
        "vocab_size": 100,
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 16,
        "max_position_embeddings": 32,
    }
    converted = BERT.normalize_config(hf_bert, {})
    assert converted["layer_norm_eps"] == BERT.default("layer_norm_eps") == 1e-12
    sparse = {
        k: converted[k]
        for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings")
    }
    read = BertConfig.from_manifest(sparse)  # a manifest without the optional fields: the same defaults
    assert (read.layer_norm_eps, read.hidden_act, read.pooling, read.max_seq_length) == (1e-12, "gelu", "mean", 32)
    hf_llama = llama_config()
    del hf_llama["rms_norm_eps"], hf_llama["rope_theta"]
    converted = LLAMA.normalize_config(hf_llama, {})
    assert (
        (converted["rms_norm_eps"], converted["rope_theta"])
        == (LLAMA.default("rms_norm_eps"), LLAMA.default("rope_theta"))
        == (1e-6, 10000.0)
    )
    required = {
        k: converted[k]
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        )
    }
    assert LlamaConfig.from_manifest(required).rms_norm_eps == 1e-6


def test_synthetic_writer_converter_and_runtime_share_tensor_names(llama_slm: Path) -> None:
    config = llama_config(num_hidden_layers=3)
    with ModelReader(llama_slm) as reader:
        manifest = reader.manifest
    stored = {t.name: t.shape for t in manifest.tensors if not t.name.endswith(".scales")}
    assert stored == llama_tensor_shapes(config)
    assert architecture_named(manifest.architecture) is LLAMA
    assert LLAMA.validate(manifest.config, manifest)["head_dim"] == 16
    assert "lm_head.weight" not in LLAMA.expected_shapes(LLAMA.normalize_config(llama_config(tie_word_embeddings=True), {}))


def test_missing_required_field_is_named() -> None:
    with pytest.raises(errors.ManifestSchemaError, match="model config: head_dim is missing"):
        LLAMA.read_config(
            {
                "vocab_size": 1,
                "hidden_size": 1,
                "intermediate_size": 1,
                "num_hidden_layers": 1,
                "num_attention_heads": 1,
                "num_key_value_heads": 1,
            }
        )
