"""Find a source model's files: its weights, its config, its tokenizer and the extras its folder holds.

``find_source`` takes a Hugging Face model folder (one model.safetensors, a sharded index, or loose shards) or a single
.safetensors file, and returns a ``ModelSource``: the weights' paths, the config (config.json beside the weights,
one given, or the safetensors metadata's), the tokenizer JSON (converted from slow tokenizer files where needed) and
what sentence-transformers and tokenizer_config.json add (pooling, normalisation, the chat template). Reads only
small JSON files; threads: the caller's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConversionInputError, NoConfigError
from .safetensors_source import SafetensorsCollection
from .tokenizer_import import read_tokenizer


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSource:
    """The files that make up one source model."""

    weights: tuple[Path, ...]
    hf_config: Mapping[str, Any]
    tokenizer_json: bytes | None
    extras: Mapping[str, Any]  # sentence-transformers pooling / normalisation, when present


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConversionInputError(f"cannot read {path}: {exc}") from None


def read_sentence_transformers_extras(folder: Path) -> dict[str, Any]:
    """A sentence-transformers folder's pooling mode, normalisation and max_seq_length, for the manifest's config."""
    extras: dict[str, Any] = {}
    pooling_file = folder / "1_Pooling" / "config.json"
    if pooling_file.is_file():
        pooling = _read_json(pooling_file)
        for mode in ("mean", "cls", "max"):
            key = "pooling_mode_mean_tokens" if mode == "mean" else f"pooling_mode_{mode}_token" + ("s" if mode == "max" else "")
            if pooling.get(key):
                extras["pooling"] = mode
    modules_file = folder / "modules.json"
    if modules_file.is_file():
        modules = _read_json(modules_file)
        extras["normalize"] = any("Normalize" in str(m.get("type", "")) for m in modules if isinstance(m, dict))
    bert_config = folder / "sentence_bert_config.json"
    if bert_config.is_file():
        max_len = _read_json(bert_config).get("max_seq_length")
        if isinstance(max_len, int) and max_len > 0:
            extras["max_seq_length"] = max_len
    return extras


def read_chat_template_extras(folder: Path) -> dict[str, Any]:
    """tokenizer_config.json's chat template and the special tokens it names, for the manifest's config (a chat client
    renders it); a template that is a list of named templates keeps the one named "default"."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    tokenizer_config = _read_json(path)
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(template, str) or not template:
        return {}
    tokens = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = tokenizer_config.get(key)
        value = value.get("content") if isinstance(value, dict) else value  # an AddedToken as transformers saves it
        if isinstance(value, str):
            tokens[key] = value
    return {"chat_template": template, "chat_special_tokens": tokens}


def find_source(path: str | os.PathLike[str], *, config_path: str | os.PathLike[str] | None = None) -> ModelSource:
    """Locate weights, config and tokenizer for a folder or a single .safetensors file.

    Raises:
        ConversionInputError: with what is missing and how to supply it.
    """
    path = Path(path)
    if path.is_dir():
        folder = path
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionInputError(f"{index}: no weight_map")
            weights = tuple(folder / name for name in sorted(set(weight_map.values())))
        elif (folder / "model.safetensors").is_file():
            weights = (folder / "model.safetensors",)
        else:
            weights = tuple(sorted(folder.glob("*.safetensors")))
        if not weights:
            raise ConversionInputError(
                f"{folder} holds no .safetensors weights (model.safetensors or a sharded index); "
                "convert PyTorch .bin checkpoints to safetensors first"
            )
        for w in weights:
            if not w.is_file():
                raise ConversionInputError(f"shard {w.name} named by the index is missing from {folder}")
    elif path.is_file() and path.suffix == ".safetensors":
        folder, weights = path.parent, (path,)
    elif not path.exists():
        raise ConversionInputError(f"{path}: no such file or folder (give a Hugging Face model folder or a .safetensors file)")
    else:
        raise ConversionInputError(f"{path} is neither a model folder nor a .safetensors file")
    hf_config: Any = None
    if config_path is not None:
        hf_config = _read_json(Path(config_path))
    elif (folder / "config.json").is_file():
        hf_config = _read_json(folder / "config.json")
    else:
        metadata = SafetensorsCollection(weights).files[0].metadata
        if "config" in metadata:
            try:
                hf_config = json.loads(metadata["config"])
            except ValueError:
                raise ConversionInputError(f"{weights[0]}: __metadata__.config is not JSON") from None
    if not isinstance(hf_config, dict):
        raise NoConfigError(f"no config.json for {path}: put it beside the weights or give its path as config_path")
    return ModelSource(
        weights=weights,
        hf_config=hf_config,
        tokenizer_json=read_tokenizer(folder),  # tokenizer.json, or converted from vocab.json + merges.txt / tokenizer.model
        extras=read_sentence_transformers_extras(folder) | read_chat_template_extras(folder),
    )
