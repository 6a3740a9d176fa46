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
            "load",
            "open",
            "read_remote_header",
        ]
    )


@pytest.mark.parametrize("module", [streamload, streamload.formats, streamload.server], ids=lambda m: m.__name__)
def test_every_listed_name_is_defined_inside_the_package(module: object) -> None:
    """A name in __all__ resolves to something streamload itself defines (no stray re-export of a dependency)."""
    for name in module.__all__:  # type: ignore[attr-defined]
        value = getattr(module, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__module__.startswith("streamload"), f"{module.__name__}.{name} comes from {value.__module__}"  # type: ignore[attr-defined]


def test_the_blocking_model_is_a_model_with_every_property(deep_slm: Path, tmp_path: Path) -> None:
    assert issubclass(streamload.SyncModel, streamload.Model)
    properties = [name for name, value in vars(streamload.Model).items() if isinstance(value, property)]
    assert {"manifest", "config", "digest", "path", "stats", "opened_at", "layer_ready_s", "tokenizer"} <= set(properties)
    with streamload.load(deep_slm, cache_dir=tmp_path) as model:
        assert model.digest == model.manifest.digest and model.path.name == model.digest
        assert model.wait_complete().chunks_fetched == len(model.manifest.chunks)
        assert len(model.layer_ready_s) == len(model.manifest.layers) and None not in model.layer_ready_s
        assert [span.index for span in model.layer_spans()] == list(range(len(model.manifest.layers)))
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
        "print([m for m in ('aiohttp', 'streamload.http_source', 'streamload.rawhttp') if m in sys.modules])\n"
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
