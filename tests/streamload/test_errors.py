"""Every error a caller meets is in the one tree: declared classes and fields, no errno or args written by hand,
the transports' internal signals kept out of it, and no CLI flag in a library message (the CLI adds its own hints)."""

from __future__ import annotations

import ast
import errno
import re
import subprocess
import sys
from pathlib import Path

import pytest

import streamload
import streamload.errors
from streamload.cache import JOURNAL_NAME
from streamload.cli import command_hint
from streamload.download.header import read_header
from streamload.errors import (
    BadMagicError,
    CacheWriteError,
    ChunkIntegrityError,
    DigestMismatchError,
    ModelFileError,
    NoConfigError,
    NoTokenizerError,
    RetryableError,
    StreamloadError,
    UnreachableError,
    located,
)
from streamload.transport.httputil import RetryPolicy
from streamload.transport.source import FileSource, map_transport_error
from tests.support.serving import serve_directory


def test_the_error_module_exports_only_the_tree() -> None:
    for name in streamload.errors.__all__:
        value = getattr(streamload.errors, name)
        assert isinstance(value, type) and issubclass(value, StreamloadError), name
    assert not [name for name in vars(streamload.errors) if name.startswith("Transport")]


@pytest.mark.parametrize("kind", ["directory", "missing"])
def test_a_local_model_that_cannot_be_opened_is_a_model_file_error(kind: str, tmp_path: Path) -> None:
    path = tmp_path if kind == "directory" else tmp_path / "nosuch.slm"
    with pytest.raises(ModelFileError) as caught:
        FileSource(path)
    assert isinstance(caught.value, OSError) and caught.value.errno is None  # no errno made up by hand
    assert str(caught.value).startswith(f"{path}: ")
    assert ("is a directory" if kind == "directory" else "No such file") in str(caught.value)


async def test_a_header_that_is_not_a_model_is_named_after_its_source_once(tmp_path: Path) -> None:
    page = tmp_path / "index.html"
    page.write_bytes(b"<!doctype html><html>" + b" " * 64)
    with pytest.raises(BadMagicError) as caught:
        await read_header(FileSource(page))
    message = str(caught.value)
    assert message.startswith(f"{page}: not a streamload .slm file") and message.count(str(page)) == 1
    assert caught.value.args == (message,)


def test_located_keeps_the_class_and_its_fields() -> None:
    moved = located(ChunkIntegrityError("sha256 differs", layer_index=3, chunk_index=7), "http://host/m.slm")
    assert type(moved) is ChunkIntegrityError and (moved.layer_index, moved.chunk_index) == (3, 7)
    assert str(moved) == "http://host/m.slm: sha256 differs"


@pytest.mark.parametrize(
    ("failure", "unreachable"),
    [(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), True), (ConnectionResetError(errno.ECONNRESET, "reset"), False)],
)
def test_nobody_answering_is_its_own_class(failure: OSError, unreachable: bool) -> None:
    mapped = map_transport_error("http://127.0.0.1:9/m.slm", RetryPolicy(), failure)
    assert isinstance(mapped, RetryableError) and isinstance(mapped, UnreachableError) is unreachable
    assert not hasattr(mapped, "unreachable")


@pytest.mark.parametrize(
    ("error", "hint"),
    [
        (CacheWriteError("no space left; free some space or use a cache directory on another disk"), " (--cache-dir DIR)"),
        (NoTokenizerError("this model has no tokenizer: give token ids instead of text"), " (--ids 1,2,3)"),
        (NoConfigError("no config.json for m.safetensors: put it beside the weights or give its path as config_path"), " (--config PATH)"),
        (DigestMismatchError("another model", cached_digest="ab" * 32), " (`streamload rm abababababab`)"),
        (DigestMismatchError("not the pinned one"), ""),
        (BadMagicError("not a streamload .slm file"), " (`streamload convert` makes .slm files)"),
        (StreamloadError("anything else"), ""),
    ],
)
def test_the_cli_adds_the_flag_the_library_does_not_name(error: StreamloadError, hint: str) -> None:
    assert "--" not in str(error) and not re.search(r"streamload (rm|convert|run|fetch)", str(error))
    assert command_hint(error) == hint


def test_a_full_cache_is_a_cache_write_error(tmp_path: Path) -> None:
    from streamload.cache.files import cache_error

    full = cache_error("writing", tmp_path / "store.bin", OSError(errno.ENOSPC, "No space left on device"))
    denied = cache_error("writing", tmp_path / "store.bin", OSError(errno.EACCES, "Permission denied"))
    assert isinstance(full, CacheWriteError) and isinstance(denied, CacheWriteError) and isinstance(full, streamload.CacheError)
    assert "--" not in str(full) + str(denied)


def test_no_library_message_names_a_cli_flag_or_command() -> None:
    """String values outside the CLI (docstrings aside) name no ``--option`` and no ``streamload COMMAND``."""
    root = Path(__file__).resolve().parents[2]
    found = []
    for folder in ("streamload", "formats", "server"):
        for path in sorted((root / folder).rglob("*.py")):
            if "cli" in path.relative_to(root).parts:
                continue
            tree = ast.parse(path.read_text())
            docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}  # of modules, functions, attributes
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                    for hit in re.findall(r"(?<![\w-])--[a-z][a-z-]*|streamload (?:rm|convert|run|fetch|list|serve)\b", node.value):
                        found.append(f"{path.relative_to(root)}:{node.lineno}: {hit}")
    assert found == []


def test_the_cli_names_the_option_for_a_model_without_a_tokenizer(deep_slm: Path, tmp_path: Path) -> None:
    streamload_script = Path(sys.executable).parent / "streamload"
    done = subprocess.run(
        [str(streamload_script), "run", str(deep_slm), "--text", "hello", "--cache-dir", str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "error: this model has no tokenizer (it was converted from a folder without tokenizer.json): give token ids instead of text (--ids 1,2,3)"
    ]


async def test_a_pinned_partial_copy_whose_url_serves_another_model_names_the_copy(deep_slm: Path, llama_slm: Path, tmp_path: Path) -> None:
    served, cache = tmp_path / "www", tmp_path / "cache"
    served.mkdir()
    (served / "deep.slm").write_bytes(deep_slm.read_bytes())
    with serve_directory(served) as server:
        url = server.url("deep.slm")
        async with streamload.open(url, cache_dir=cache) as model:
            await model.wait_complete()
            digest = model.digest
        next(cache.glob(f"models/*/{JOURNAL_NAME}")).unlink()  # the cached copy now lacks every chunk
        (served / "deep.slm").write_bytes(llama_slm.read_bytes())  # and the URL serves another model
        with pytest.raises(DigestMismatchError) as caught:
            async with streamload.open(f"{url}#sha256={digest}", cache_dir=cache) as model:
                await model.wait_complete()
    assert caught.value.cached_digest == digest
    assert f"remove the cached copy of {digest[:12]}" in str(caught.value) and "streamload rm" not in str(caught.value)
    assert command_hint(caught.value) == f" (`streamload rm {digest[:12]}`)"


def test_renamed_errors_keep_their_old_names_for_one_release() -> None:
    assert streamload.errors.SourceError is streamload.errors.ConversionInputError
    assert streamload.errors.SourceChangedError is streamload.errors.FileChangedError
    drawn = streamload.errors.__doc__ or ""
    assert "ConversionInputError" in drawn and "FileChangedError" in drawn and "SourceError" not in drawn
