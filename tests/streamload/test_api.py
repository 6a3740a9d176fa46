"""The public API is deliberate: what __all__ lists, that the blocking and async faces cannot drift, one error tree."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import streamload
import streamload.formats
import streamload.server
from streamload.errors import StreamloadError, UsageError
from streamload.model import ModelBase


def test_streamload_public_names() -> None:
    assert sorted(streamload.__all__) == sorted(
        [
            "CacheError",
            "ChunkIntegrityError",
            "DigestMismatchError",
            "DownloadStats",
            "FetchError",
            "FormatError",
            "HTTPStatusError",
            "Layer",
            "Model",
            "Progress",
            "RetryPolicy",
            "RuntimeModelError",
            "StalledError",
            "StreamloadError",
            "SyncModel",
            "UsageError",
            "load",
            "open",
            "read_remote_header",
            "runtime",
        ]
    )


@pytest.mark.parametrize("module", [streamload, streamload.formats, streamload.server], ids=lambda m: m.__name__)
def test_every_listed_name_is_defined_inside_the_package(module: object) -> None:
    """A name in __all__ resolves to something streamload itself defines (no stray re-export of a dependency)."""
    for name in module.__all__:  # type: ignore[attr-defined]
        value = getattr(module, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__module__.startswith("streamload"), f"{module.__name__}.{name} comes from {value.__module__}"  # type: ignore[attr-defined]


def test_the_blocking_model_shares_every_property_and_blocks_on_every_wait(deep_slm: Path, tmp_path: Path) -> None:
    """Both faces derive from ModelBase (neither is the other's subclass); each wait the async one awaits, the
    blocking one has as a plain call."""
    assert issubclass(streamload.SyncModel, ModelBase) and issubclass(streamload.Model, ModelBase)
    assert not issubclass(streamload.SyncModel, streamload.Model)
    properties = [name for name, value in vars(ModelBase).items() if isinstance(value, property)]
    assert {"manifest", "config", "digest", "path", "stats", "opened_at", "layer_ready_s", "tokenizer"} <= set(properties)
    waits = [
        name for name, value in vars(streamload.Model).items() if inspect.iscoroutinefunction(value) or inspect.isasyncgenfunction(value)
    ]
    assert set(waits) == {"layer", "coarse_layer", "rows", "embed", "generate", "layers", "wait_complete"}
    for name in waits:
        blocking = getattr(streamload.SyncModel, name)
        assert not inspect.iscoroutinefunction(blocking) and not inspect.isasyncgenfunction(blocking), name
    async_only = {"coarse", "runtime_state"}  # the runtime's view for a preview and its state: runtime.run is async
    public = {name for name in vars(streamload.Model) if not name.startswith("_")} - async_only
    assert public - set(dir(streamload.SyncModel)) == set()  # a member added to Model alone fails here
    with streamload.load(deep_slm, cache_dir=tmp_path) as model:
        assert model.digest == model.manifest.digest and model.path.name == model.digest
        assert model.wait_complete().chunks_fetched == len(model.manifest.chunks)
        assert len(model.layer_ready_s) == len(model.manifest.layers) and None not in model.layer_ready_s
        assert [span.index for span in model.layer_times()] == list(range(len(model.manifest.layers)))
        assert model.opened_at > 0 and model.config["architecture"] == "llama"
        assert model.layer(1).name == model.manifest.layers[1].name


def test_every_error_is_a_streamload_error_and_its_builtin() -> None:
    assert issubclass(streamload.FormatError, ValueError) and issubclass(streamload.FetchError, OSError)
    assert issubclass(streamload.CacheError, OSError) and issubclass(streamload.DigestMismatchError, ValueError)
    for name in streamload.__all__:
        value = getattr(streamload, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, StreamloadError)


def test_a_local_model_needs_no_http_client(deep_slm: Path, tmp_path: Path) -> None:
    """Opening a local or cached model must not import aiohttp: a cold start pays only for what it uses."""
    script = (
        "import sys, streamload\n"
        f"with streamload.load({str(deep_slm)!r}, cache_dir={str(tmp_path)!r}) as model:\n"
        "    model.layer(0)\n"
        "print([m for m in ('aiohttp', 'streamload.transport.http_source', 'streamload.transport.rawhttp') if m in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_attempts", 0), ("min_rate_bytes_per_s", -5), ("rate_window_s", 0), ("header_timeout_s", -1), ("stall_timeout_s", float("nan"))],
)
def test_a_retry_policy_out_of_range_is_refused_with_the_field_named(field: str, value: float) -> None:
    with pytest.raises(UsageError, match=f"RetryPolicy.{field} must be"):
        streamload.RetryPolicy(**{field: value})


def test_runtime_is_reachable_and_documented() -> None:
    import pydoc

    assert streamload.runtime.run is not None and "runtime" in streamload.__all__
    assert "runtime.run" in pydoc.render_doc(streamload) and "embed" in pydoc.render_doc(streamload)


def test_one_call_embed_and_its_async_twin_agree(minilm_slm: Path, tmp_path: Path) -> None:
    import asyncio

    vectors = streamload.load(minilm_slm, cache_dir=tmp_path).embed(["hello world", "streaming"])
    assert vectors.shape == (2, 384)
    with streamload.load(minilm_slm, cache_dir=tmp_path) as model:
        one = model.embed("hello world")  # one string: one text, one vector
    assert one.shape == (384,) and abs(one - vectors[0]).max() < 1e-5

    async def twin() -> object:
        async with streamload.open(minilm_slm, cache_dir=tmp_path) as model:
            return await model.embed(["hello world", "streaming"])

    assert (asyncio.run(twin()) == vectors).all()


def test_generate_yields_text_pieces_and_stops_when_the_reader_leaves(llama_slm: Path, tmp_path: Path) -> None:
    """The synthetic Llama has no tokenizer: generate says so; with token ids ``runtime.run`` gives the tokens and
    ``on_token`` sees each as it comes, in order."""
    import asyncio

    with streamload.load(llama_slm, cache_dir=tmp_path) as model:
        with pytest.raises(streamload.RuntimeModelError, match="no tokenizer"):
            next(model.generate([1, 2, 3]))
        seen: list[int] = []
        result = model.run(ids=[5, 6, 7], max_new_tokens=6, on_token=seen.append)
        assert seen == result.generated_ids and len(seen) >= 1
        with pytest.raises(UsageError, match="model.run"):  # the async runtime on the blocking model: said, not a hang
            asyncio.run(streamload.runtime.run(model, ids=[5]))


@pytest.mark.parametrize(
    ("options", "phrase"),
    [
        ({"texts": "hello"}, "not one string"),
        ({"texts": []}, "non-empty list"),
        ({"texts": ["ok", ""]}, "non-empty strings"),
        ({"texts": ["ok"], "temperature": -1}, "temperature"),
        ({"texts": ["ok"], "temperature": float("nan")}, "temperature"),
        ({"texts": ["ok"], "top_p": 0}, "top_p"),
        ({"texts": ["ok"], "top_p": 1.5}, "top_p"),
        ({"texts": ["ok"], "max_new_tokens": -1}, "max_new_tokens"),
        ({"texts": ["ok"], "seed": -1}, "seed"),
        ({"texts": ["ok"], "ids": [1]}, "not both"),
        ({}, "not both"),
    ],
)
def test_the_api_checks_its_arguments_as_the_cli_does(minilm_slm: Path, tmp_path: Path, options: dict, phrase: str) -> None:
    with streamload.load(minilm_slm, cache_dir=tmp_path) as model:
        with pytest.raises(UsageError, match=phrase):
            model.run(**options)


def test_a_decoder_refuses_a_second_prompt_and_generate_checks_its_range(llama_slm: Path, tmp_path: Path) -> None:
    with streamload.load(llama_slm, cache_dir=tmp_path) as model:
        with pytest.raises(UsageError, match="one prompt"):
            model.run(texts=["one", "two"])
        with pytest.raises(UsageError, match="temperature"):
            next(model.generate("hi", temperature=-1))
        with pytest.raises(UsageError, match="max_new_tokens"):
            next(model.generate("hi", max_new_tokens=-2))


def test_load_takes_a_cached_models_name(deep_slm: Path, tmp_path: Path) -> None:
    with streamload.load(deep_slm, cache_dir=tmp_path) as model:
        digest = model.digest
        model.wait_complete()
    for name in ("deep", digest[:8]):
        with streamload.load(name, cache_dir=tmp_path) as model:
            assert model.digest == digest
    with pytest.raises(streamload.CacheError, match="no cached model"):
        streamload.load("nosuch", cache_dir=tmp_path)
