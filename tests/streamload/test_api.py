"""The public API is deliberate: what __all__ lists, and that it all imports."""

from __future__ import annotations

import streamload
import streamload.formats
import streamload.server
from streamload.errors import StreamloadError


def test_streamload_public_names() -> None:
    assert sorted(streamload.__all__) == sorted(
        [
            "CacheError", "ChunkIntegrityError", "DigestMismatchError", "DownloadStats", "FetchError", "FormatError",
            "HTTPStatusError", "Layer", "Model", "Progress", "RetryPolicy", "RuntimeModelError", "StalledError",
            "StreamloadError", "SyncModel", "load", "open", "read_remote_header",
        ]
    )
    for name in streamload.__all__:
        assert getattr(streamload, name) is not None


def test_format_and_server_packages_export_what_they_list() -> None:
    for module in (streamload.formats, streamload.server):
        for name in module.__all__:
            assert getattr(module, name) is not None


def test_every_error_is_a_streamload_error_and_its_builtin() -> None:
    assert issubclass(streamload.FormatError, ValueError) and issubclass(streamload.FetchError, OSError)
    assert issubclass(streamload.CacheError, OSError) and issubclass(streamload.DigestMismatchError, ValueError)
    for name in streamload.__all__:
        value = getattr(streamload, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, StreamloadError)
