"""Slow tokenizer files converted into the embedded tokenizer.json at convert time (formats/tokenizer_import.py)."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import pytest

import streamload
from streamload.formats import convert
from streamload.formats.tokenizer_import import read_tokenizer
from streamload.runtime import run

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Streaming a model lets a phone start computing before the download finishes.",
    "How do I reset my password? Zürich, naïve café, 1,000,000 copies!",
    "    indented code(x) { return x + 1; }",
] * 20
CHECKED = ["The lazy fox resets a phone.", "naïve café in Zürich", "  two spaces and unseen wörds 42"]


def model_folder(tmp_path: Path, family: str) -> Path:
    folder = tmp_path / family
    shutil.copytree(FIXTURES / f"{family}-tiny", folder)
    return folder


async def test_gpt2_vocab_and_merges_become_the_embedded_tokenizer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    slow = Tokenizer(models.BPE())
    slow.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    slow.decoder = decoders.ByteLevel()
    slow.train_from_iterator(
        TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    folder = model_folder(tmp_path, "gpt2")
    slow.model.save(str(folder))  # vocab.json + merges.txt, as GPT-2 ships them
    assert not (folder / "tokenizer.json").exists()
    convert(folder, tmp_path / "gpt2.slm")
    async with streamload.open(str(tmp_path / "gpt2.slm"), cache_dir=tmp_path / "cache") as model:
        tokenizer = model.tokenizer
        assert tokenizer is not None
        for text in CHECKED:
            assert tokenizer.encode(text).ids == slow.encode(text).ids
            assert tokenizer.decode(tokenizer.encode(text).ids) == text
        assert tokenizer.token_to_id("<|endoftext|>") == 0
        result = await run(model, texts=["The lazy fox"], max_new_tokens=3)
    assert result.text is not None and len(result.generated_ids or []) == 3


@pytest.mark.parametrize(("model_type", "llama_like"), [("bpe", True), ("bpe", False), ("unigram", False)])
def test_sentencepiece_model_becomes_the_embedded_tokenizer(tmp_path: Path, model_type: str, llama_like: bool) -> None:
    """Llama's and Mistral's models keep every space and normalise nothing; sentencepiece's defaults do both."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXT), encoding="utf-8")
    folder = model_folder(tmp_path, "mistral")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=320,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=1.0,
        **({"remove_extra_whitespaces": False, "normalization_rule_name": "identity"} if llama_like else {}),
    )
    reference = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    from tokenizers import Tokenizer

    converted = read_tokenizer(folder)
    assert converted is not None
    tokenizer = Tokenizer.from_str(converted.decode("utf-8"))
    for text in CHECKED:
        assert tokenizer.encode(text, add_special_tokens=False).ids == reference.encode(text), text
        assert tokenizer.decode(reference.encode(text)) == reference.decode(reference.encode(text))


def test_sentencepiece_without_the_package_says_once_that_ids_are_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder = model_folder(tmp_path, "mistral")
    (folder / "tokenizer.model").write_bytes(b"\x0a\x00")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import sentencepiece raises ImportError
    with caplog.at_level(logging.WARNING):
        report = convert(folder, tmp_path / "m.slm")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].endswith(
        "needs the sentencepiece and protobuf packages to convert; the model will need token ids"
    )
    assert report.manifest.tokenizer is None
