"""A decoder as people use ollama run: tokens printed as they come (a pty), the prompt from stdin, an interactive
session on the loaded model with the model's chat template; and the streaming detokenizer under it."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from streamload.api import StreamingDetokenizer, apply_chat_template
from streamload.formats import ModelReader, convert
from tests.support.cli import read_terminal
from tests.support.synthetic import llama_config, write_synthetic_llama

STREAMLOAD = str(Path(sys.executable).parent / "streamload")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_byte_tokenizer(folder: Path) -> None:
    """A byte-level tokenizer with no merges (every byte a token: a multi-byte character spans tokens), and a
    tokenizer_config.json with a chat template, as transformers saves them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<s>": 0, "<unk>": 1, "</s>": 2}
    for character in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[character] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": False}, "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def chat_slm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 small blocks (a decode step takes a few ms: 200 tokens take a visible while) with a byte tokenizer."""
    config = llama_config(
        num_hidden_layers=12, hidden_size=128, intermediate_size=256, vocab_size=259, max_position_embeddings=512
    )  # the tokenizer's 259
    folder = write_synthetic_llama(tmp_path_factory.mktemp("chat-src"), config)
    write_byte_tokenizer(folder)
    out = tmp_path_factory.mktemp("chat") / "chat.slm"
    convert(folder, out)
    return out


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STREAMLOAD, *args], input=stdin, capture_output=True, text=True, timeout=120)


def test_the_converter_keeps_the_chat_template(chat_slm: Path) -> None:
    with ModelReader(chat_slm) as reader:
        config = reader.manifest.config
    assert config["chat_template"] == CHAT_TEMPLATE
    assert config["chat_special_tokens"] == {"bos_token": "<s>", "eos_token": "</s>"}
    prompt = apply_chat_template(config, [{"role": "user", "content": "hi"}])
    assert prompt == "<s><|user|>hi\n<|assistant|>"


def test_streamed_pieces_join_to_the_whole_decode_across_multibyte_characters(chat_slm: Path, tmp_path: Path) -> None:
    import streamload

    text = "héllo 日本 wörld ✓ 😀!"
    with streamload.load(chat_slm, cache_dir=tmp_path) as model:
        tokenizer = model.tokenizer
    ids = tokenizer.encode(text).ids
    assert len(ids) > len(text)  # characters over several byte tokens
    stream = StreamingDetokenizer(tokenizer)
    pieces = [stream.add(i) for i in ids]
    pieces.append(stream.finish())
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)  # never half a character
    assert sum(1 for piece in pieces if piece) >= 15  # piece by piece, not all at the end


def test_run_prints_each_token_as_it_is_generated(chat_slm: Path, tmp_path: Path) -> None:
    """On a terminal, the tokens arrive in many writes spread over the decoding, the first long before the last; the
    printed text is the result's (``--json`` gives it whole)."""
    args = [
        "run",
        str(chat_slm),
        "--ids",
        "70,71,72",
        "--max-new-tokens",
        "200",
        "--temperature",
        "1",
        "--cache-dir",
        str(tmp_path),
        "-q",
        "--no-finish",
    ]
    controller, terminal = pty.openpty()
    process = subprocess.Popen([STREAMLOAD, *args], stdout=terminal, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    os.close(terminal)
    arrivals = list(read_terminal(controller, process))  # (process still running, bytes)
    process.wait(timeout=60)
    os.close(controller)
    assert process.returncode == 0, process.stderr.read() if process.stderr else ""
    assert arrivals and arrivals[0][0], "the first token appeared only once the process had ended"
    assert len(arrivals) >= 5, f"the text came in {len(arrivals)} writes: printed at the end, not as generated"
    printed = b"".join(data for _, data in arrivals).decode("utf-8", "replace").replace("\r\n", "\n").rstrip("\n")
    whole = json.loads(run_cli(*args, "--json").stdout)
    assert printed == whole["text"]
    assert len(whole["generated_ids"]) > 20


def test_the_prompt_from_stdin_is_the_prompt_as_an_argument(chat_slm: Path, tmp_path: Path) -> None:
    common = (str(chat_slm), "--cache-dir", str(tmp_path), "--max-new-tokens", "6", "--json")
    from_stdin = run_cli("run", *common, "-", stdin="why is the sky blue\n")
    assert from_stdin.returncode == 0, from_stdin.stderr
    as_argument = run_cli("run", *common, "why is the sky blue")
    assert json.loads(from_stdin.stdout)["generated_ids"] == json.loads(as_argument.stdout)["generated_ids"]
    empty = run_cli("run", *common, "-", stdin="\n")
    assert empty.returncode == 2 and "stdin held no text" in empty.stderr


def test_with_no_text_an_interactive_session_applies_the_chat_template_and_keeps_the_conversation(chat_slm: Path, tmp_path: Path) -> None:
    common = (str(chat_slm), "--cache-dir", str(tmp_path), "--max-new-tokens", "5")
    session = run_cli("run", *common, "--json", stdin="hello there\n\nand then?\n/bye\nnever read\n")
    assert session.returncode == 0, session.stderr
    turns = [json.loads(line) for line in session.stdout.splitlines()]
    assert len(turns) == 2  # the empty line skipped, /bye ended it before the last
    with ModelReader(chat_slm) as reader:
        config = reader.manifest.config
    import streamload

    with streamload.load(chat_slm, cache_dir=tmp_path) as model:
        tokenizer = model.tokenizer
    first = [{"role": "user", "content": "hello there"}]
    second = [*first, {"role": "assistant", "content": turns[0]["text"]}, {"role": "user", "content": "and then?"}]
    for messages, turn in zip((first, second), turns, strict=True):
        ids = tokenizer.encode(apply_chat_template(config, messages), add_special_tokens=False).ids
        alone = run_cli("run", *common, "--json", "--ids", ",".join(map(str, ids)))
        assert json.loads(alone.stdout)["generated_ids"] == turn["generated_ids"]
    at_eof = run_cli("run", *common, stdin="")  # end of input: the session ends, nothing printed
    assert at_eof.returncode == 0 and at_eof.stdout == "", at_eof.stderr


def test_generate_yields_the_text_piece_by_piece_and_its_async_twin_agrees(chat_slm: Path, tmp_path: Path) -> None:
    import asyncio

    import streamload

    options = {"max_new_tokens": 40, "temperature": 1.0, "seed": 3}
    with streamload.load(chat_slm, cache_dir=tmp_path) as model:
        pieces = list(model.generate("hello", **options))
        whole = model.run(texts=["hello"], **options)
        early = model.generate("hello", **options)
        first = next(early)
        early.close()  # leaving early stops the decoding; the model stays usable
        again = list(model.generate("hello", **options))
    assert "".join(pieces) == whole.text and len(pieces) > 1 and first == pieces[0] and again == pieces

    async def twin() -> list[str]:
        async with streamload.open(chat_slm, cache_dir=tmp_path) as model:
            return [piece async for piece in model.generate("hello", **options)]

    assert asyncio.run(twin()) == pieces


def test_an_encoder_reads_one_text_a_line_from_stdin(minilm_slm: Path, tmp_path: Path) -> None:
    common = (str(minilm_slm), "--cache-dir", str(tmp_path), "--json", "-q")
    from_stdin = run_cli("run", *common, "-", stdin="first one\n\nsecond\n")
    assert from_stdin.returncode == 0, from_stdin.stderr
    as_arguments = run_cli("run", *common, "first one", "second")
    assert json.loads(from_stdin.stdout)["embedding"] == json.loads(as_arguments.stdout)["embedding"]
