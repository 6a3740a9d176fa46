"""A model folder's tokenizer as tokenizer.json bytes, the form a .slm embeds.

``tokenizer.json`` is taken as it is. Without one, the slow tokenizer files are converted with the ``tokenizers``
library alone (transformers is never needed):

- GPT-2's ``vocab.json`` + ``merges.txt``: a byte-level BPE, GPT-2's pre-tokenizer, its special tokens from
  ``special_tokens_map.json`` / ``tokenizer_config.json`` when they are in the vocabulary.
- sentencepiece's ``tokenizer.model`` (Llama 2, Mistral, Gemma): read with the ``sentencepiece`` and ``protobuf``
  packages when they are installed; a BPE model becomes a byte-fallback BPE whose merges are ranked by the merged
  piece's score, a unigram model a unigram model, both with sentencepiece's "▁" word boundaries.

When nothing can be converted the function logs one warning: the model will need token ids. Costs: one pass over
the vocabulary (a sentencepiece BPE's merges are found among pairs of pieces: linear in the vocabulary times the
longest piece).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

NEEDS_IDS = "; the model will need token ids"


def read_tokenizer(folder: Path) -> bytes | None:
    """tokenizer.json's bytes for a model folder, converted from the slow files when it has none; None when it cannot."""
    fast = folder / "tokenizer.json"
    if fast.is_file():
        return fast.read_bytes()
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return _byte_level_bpe(folder).to_str().encode("utf-8")
    if (folder / "tokenizer.model").is_file():
        try:
            import sentencepiece  # noqa: F401
            from sentencepiece import sentencepiece_model_pb2  # needs protobuf
        except ImportError:
            logger.warning("%s: tokenizer.model needs the sentencepiece and protobuf packages to convert%s", folder, NEEDS_IDS)
            return None
        tokenizer = _sentencepiece(folder / "tokenizer.model", sentencepiece_model_pb2)
        return None if tokenizer is None else tokenizer.to_str().encode("utf-8")
    logger.warning("%s holds no tokenizer (tokenizer.json, vocab.json + merges.txt or tokenizer.model)%s", folder, NEEDS_IDS)
    return None


def _special_tokens(folder: Path) -> list[str]:
    """Special tokens the slow tokenizer's files name (strings or {"content": ...} entries)."""
    names: list[str] = []
    for file, key in (("special_tokens_map.json", None), ("tokenizer_config.json", "added_tokens_decoder")):
        path = folder / file
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            continue
        values: Any = data.get(key, {}).values() if key else data.values()
        for value in values:
            for item in value if isinstance(value, list) else [value]:
                content = item.get("content") if isinstance(item, dict) else item
                if isinstance(content, str) and content not in names:
                    names.append(content)
    return names


def _byte_level_bpe(folder: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    vocab = tokenizer.get_vocab()
    specials = [token for token in _special_tokens(folder) if token in vocab] or [t for t in ("<|endoftext|>",) if t in vocab]
    tokenizer.add_special_tokens(specials)
    return tokenizer


def _sentencepiece(path: Path, pb2: Any) -> Any:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    proto = pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    pieces = [(piece.piece, piece.score, piece.type) for piece in proto.pieces]  # type: 1 normal, 2 unknown, 3 control, 6 byte
    unk_id = next((i for i, (_, _, kind) in enumerate(pieces) if kind == 2), 0)
    byte_fallback = bool(proto.trainer_spec.byte_fallback)
    if proto.trainer_spec.model_type == 2:  # BPE: merges ranked by the merged piece's score, as sentencepiece applies them
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        merges = []
        for merged, rank in vocab.items():
            for cut in range(1, len(merged)):
                left, right = merged[:cut], merged[cut:]
                if left in vocab and right in vocab:
                    merges.append((rank, vocab[left], vocab[right], left, right))
        merges.sort()
        model = models.BPE(
            vocab, [(left, right) for *_, left, right in merges], unk_token=pieces[unk_id][0], fuse_unk=True, byte_fallback=byte_fallback
        )
    elif proto.trainer_spec.model_type == 1:
        model = models.Unigram([(piece, score) for piece, score, _ in pieces], unk_id, byte_fallback)
    else:
        logger.warning(
            "%s: sentencepiece model type %d is not convertible (BPE and unigram are)%s", path, proto.trainer_spec.model_type, NEEDS_IDS
        )
        return None
    tokenizer = Tokenizer(model)
    spec = proto.normalizer_spec
    steps = [normalizers.NFKC()] if spec.name.startswith(("nmt_nfkc", "nfkc")) else []
    if spec.remove_extra_whitespaces:  # sentencepiece's default; Llama's and Mistral's models keep every space
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    steps += [normalizers.Prepend("▁")] if spec.add_dummy_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(Regex(" "), "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if proto.normalizer_spec.add_dummy_prefix else []
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    tokenizer.add_special_tokens([AddedToken(piece, normalized=False) for piece, _, kind in pieces if kind in (2, 3)])
    return tokenizer
