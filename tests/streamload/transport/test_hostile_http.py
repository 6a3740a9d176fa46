"""Hostile servers, URLs and files against the HTTP client (issue 23, items 9, 10, 11, 13, 14, 22): every answer a
one-line StreamloadError, nothing a server says sent back unchecked, no credential shown or stored, no traceback.

The servers here speak HTTP by hand on raw loopback sockets (``Hostile``), so that they can say what aiohttp's own
server never would: a 304 to a plain GET, a Content-Length of 5000 digits, an ETag holding a bare LF.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
import zstandard

import streamload
from streamload.cli.cached import file_name
from streamload.errors import FetchError, FormatError, InvalidURLError, MalformedResponseError, StreamloadError, UsageError, redact_urls
from streamload.formats.constants import Codec
from streamload.formats.entries import TokenizerBlob
from streamload.tokenizer import load_tokenizer
from streamload.transport.httputil import RetryPolicy, check_url, parse_content_range, parse_decimal, parse_etag, parse_retry_after
from tests.support.cli import STREAMLOAD, streamload_cli
from tests.support.paths import ROOT

FAST = RetryPolicy(max_attempts=2, base_delay_s=0.01, max_delay_s=0.02, connect_timeout_s=5.0, stall_timeout_s=5.0)
TRANSPORTS = ["socket", "aiohttp"]  # the threaded socket path (no session) and aiohttp's (a borrowed plain session)


@dataclasses.dataclass
class Hostile:
    """A server that reads each request's head and writes ``answer(self, request)`` (the whole response), then closes."""

    data: bytes
    answer: Callable[[Hostile, bytes], bytes]
    requests: list[bytes] = dataclasses.field(default_factory=list)


def ranged(data: bytes, request: bytes, *, cut: int | None = None, **headers: str | bytes) -> bytes:
    """What a static host answers (206 to the Range asked for), with ``headers`` set or replaced; ``cut``: only that many
    body bytes."""
    match = re.search(rb"\r\nRange: bytes=(\d+)-(\d*)", request)
    start = int(match.group(1)) if match else 0
    end = min(len(data), int(match.group(2)) + 1) if match and match.group(2) else len(data)
    fields: dict[str, str | bytes] = {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}", "Content-Length": str(end - start)}
    fields["ETag"] = '"v1"'
    fields.update({name.replace("_", "-"): value for name, value in headers.items()})
    head = b"HTTP/1.1 206 Partial Content\r\n"
    head += b"".join(
        name.encode() + b": " + (value if isinstance(value, bytes) else value.encode()) + b"\r\n" for name, value in fields.items()
    )
    return head + b"\r\n" + data[start:end][:cut]


@contextlib.asynccontextmanager
async def hostile(server: Hostile) -> AsyncIterator[str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            server.requests.append(request)
            writer.write(server.answer(server, request))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    listening = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with listening:
        yield f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}/m.slm"


@contextlib.asynccontextmanager
async def borrowed(transport: str) -> AsyncIterator[aiohttp.ClientSession | None]:
    if transport == "socket":
        yield None
        return
    async with aiohttp.ClientSession() as session:
        yield session


def status_head(line: str, **headers: str | bytes) -> bytes:
    head = f"HTTP/1.1 {line}\r\n".encode()
    for name, value in {"Content-Length": "0", **headers}.items():
        head += name.replace("_", "-").encode() + b": " + (value if isinstance(value, bytes) else value.encode()) + b"\r\n"
    return head + b"\r\n"


HOSTILE_ANSWERS: dict[str, Callable[[Hostile, bytes], bytes]] = {
    "304 to a plain GET": lambda s, r: status_head("304 Not Modified", ETag='"v1"'),
    "non-ASCII digit in Content-Length": lambda s, r: ranged(s.data, r, Content_Length="²".encode()),
    "non-ASCII digit in Content-Length (latin-1)": lambda s, r: ranged(s.data, r, Content_Length=b"\xb2"),
    "5000-digit Content-Length": lambda s, r: ranged(s.data, r, Content_Length="9" * 5000),
    "5000-digit Content-Range": lambda s, r: ranged(s.data, r, Content_Range=f"bytes 0-{'9' * 5000}/{len(s.data)}"),
    "non-ASCII digit in Retry-After": lambda s, r: status_head("503 Busy", Retry_After="²".encode()),
    "non-ASCII digit in Retry-After (latin-1)": lambda s, r: status_head("503 Busy", Retry_After=b"\xb2"),
    "5000-digit Retry-After": lambda s, r: status_head("503 Busy", Retry_After="9" * 5000),
    "Location with port 99999": lambda s, r: status_head("302 Found", Location="http://127.0.0.1:99999/m.slm"),
    "Location with port x8": lambda s, r: status_head("302 Found", Location="http://127.0.0.1:x8/m.slm"),
    "Location with an unclosed IPv6 address": lambda s, r: status_head("302 Found", Location="http://[::1/m.slm"),
    "a 60 KiB Location": lambda s, r: status_head("302 Found", Location="http://127.0.0.1:99999/" + "a" * 60_000),
}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", list(HOSTILE_ANSWERS))
async def test_a_hostile_answer_is_a_one_line_fetch_error(case: str, transport: str, deep_slm: Path, tmp_path: Path) -> None:
    server = Hostile(deep_slm.read_bytes(), HOSTILE_ANSWERS[case])
    async with hostile(server) as url, borrowed(transport) as session:
        with pytest.raises(FetchError) as info:
            async with streamload.open(url, cache_dir=tmp_path, retry=FAST, session=session) as model:
                await model.wait_complete()
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    assert server.requests, "the server was asked"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_malformed_etag_is_never_sent_back(transport: str, deep_slm: Path, tmp_path: Path) -> None:
    """An ETag holding a bare LF would inject a header into the If-Range of the next request: it is treated as absent."""
    injected = b'"v1\nX-Injected: 1"'

    def answer(server: Hostile, request: bytes) -> bytes:  # the first body ends early: the rest is asked for again
        return ranged(server.data, request, cut=100_000 if len(server.requests) == 1 else None, ETag=injected)

    server = Hostile(deep_slm.read_bytes(), answer)
    async with hostile(server) as url, borrowed(transport) as session:
        async with streamload.open(url, cache_dir=tmp_path, retry=FAST, session=session) as model:
            await model.wait_complete()
    assert len(server.requests) >= 2, "a second request was made"
    assert not any(b"X-Injected" in request or b"If-Range" in request for request in server.requests)


async def test_a_location_with_a_control_character_is_refused_not_cleaned(tmp_path: Path) -> None:
    """urljoin drops CR, LF and tab silently: a Location holding one is refused before it is resolved (on the socket
    path; aiohttp's parser refuses a bare CR in a header itself)."""
    server = Hostile(b"", lambda s, r: status_head("302 Found", Location=b"/m.slm\rX-Evil: 1"))
    async with hostile(server) as url:
        with pytest.raises(MalformedResponseError, match="control character"):
            async with streamload.open(url, cache_dir=tmp_path, retry=FAST):
                pass
    assert len(server.requests) == 1


def test_response_values_are_parsed_as_ascii_bounded_numbers_and_rfc_etags() -> None:
    assert parse_decimal("123") == 123 and parse_decimal(" 7 ") == 7
    assert parse_decimal("²") is None and parse_decimal("١٢") is None and parse_decimal("9" * 20) is None and parse_decimal("") is None
    assert parse_content_range("bytes 0-9/10") == (0, 9, 10) and parse_content_range("bytes 0-9/*") == (0, 9, None)
    assert parse_content_range("bytes ١-9/10") is None and parse_content_range(f"bytes 0-{'9' * 30}/10") is None
    assert parse_retry_after("²") is None and parse_retry_after("9" * 5000) is None and parse_retry_after("5") == 5.0
    assert parse_etag('"abc"') == '"abc"' and parse_etag('W/"abc"') == 'W/"abc"' and parse_etag('""') == '""'
    for bad in ['"a\nb"', '"a\rb"', "abc", '"a"b"', '"é"', '"a" x', "W/abc"]:
        assert parse_etag(bad) is None, bad


# ------------------------------------------------------------------ item 10: URLs where they enter

BAD_URLS = {
    "http://127.0.0.1:99999/m.slm": "port 99999 is out of range",
    "http://127.0.0.1:notaport/m.slm": "port is not a number",
    "http://[::1/m.slm": "IPv6 address is not closed",
    "http://127.0.0.1:0/m.slm": "port 0 is out of range",
    "http:///m.slm": "names no host",
    "http://127.0.0.1/m\x00.slm": "control character",
    "http://127.0.0.1:1/m\t.slm": "control character",  # urlsplit would drop it without a word
    "http://exa mple.com/m.slm": "host holds a space",
}


@pytest.mark.parametrize("url", list(BAD_URLS))
async def test_a_malformed_url_is_an_invalid_url_error_naming_it(url: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidURLError, match=re.escape(BAD_URLS[url])):
        async with streamload.open(url, cache_dir=tmp_path):
            pass
    with pytest.raises(InvalidURLError, match=re.escape(BAD_URLS[url])):
        async with streamload.open("http://127.0.0.1:1/m.slm", cache_dir=tmp_path, mirrors=[url]):
            pass
    with pytest.raises(InvalidURLError, match=re.escape(BAD_URLS[url])):
        await streamload.read_remote_header(url)


def test_a_url_with_non_ascii_or_spaces_is_sent_percent_encoded() -> None:
    assert check_url("http://h:8/a b/é.slm?x=ü") == "http://h:8/a%20b/%C3%A9.slm?x=%C3%BC"
    assert check_url("https://h/m.slm?X-Amz-Signature=a%2Fb") == "https://h/m.slm?X-Amz-Signature=a%2Fb"  # unchanged


@pytest.mark.parametrize(
    "args",
    [
        ("fetch", "http://127.0.0.1:99999/m.slm"),
        ("run", "http://127.0.0.1:notaport/m.slm", "hello"),
        ("inspect", "http://[::1/m.slm"),
        ("fetch", "http://127.0.0.1:1/m.slm", "--mirror", "http://[::1/m.slm"),
    ],
)
def test_cli_a_malformed_url_is_a_one_line_error(args: tuple[str, ...], tmp_path: Path) -> None:
    done = streamload_cli(*args, cache=tmp_path)
    assert done.returncode == 1, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "is not a usable URL" in done.stderr


# ------------------------------------------------------------------ item 13: a borrowed session's credentials


@pytest.mark.parametrize(
    "make",
    [
        lambda: aiohttp.ClientSession(headers={"Authorization": "Bearer s3cret"}),
        lambda: aiohttp.ClientSession(auth=aiohttp.BasicAuth("u", "s3cret")),  # deprecated in aiohttp 3.14, still honoured
    ],
)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_a_borrowed_session_that_would_send_credentials_to_every_host_is_refused(
    make: Callable[[], aiohttp.ClientSession], deep_slm: Path, tmp_path: Path
) -> None:
    """aiohttp adds a session's default headers and auth to every request: to a redirect target on another host too."""
    storage = Hostile(deep_slm.read_bytes(), lambda s, r: ranged(s.data, r))
    async with hostile(storage) as elsewhere:
        redirector = Hostile(b"", lambda s, r: status_head("302 Found", Location=elsewhere.replace("127.0.0.1", "localhost")))
        async with hostile(redirector) as url, make() as session:
            with pytest.raises(UsageError, match="give credentials as headers="):
                async with streamload.open(url, cache_dir=tmp_path, retry=FAST, session=session) as model:
                    await model.wait_complete()
            with pytest.raises(UsageError):
                await streamload.read_remote_header(url, session=session, retry=FAST)
    assert not any(b"s3cret" in request or b"Authorization" in request for request in storage.requests)


async def test_a_borrowed_session_with_only_a_user_agent_is_used(deep_slm: Path, tmp_path: Path) -> None:
    server = Hostile(deep_slm.read_bytes(), lambda s, r: ranged(s.data, r))
    async with hostile(server) as url, aiohttp.ClientSession(headers={"User-Agent": "an-app/1.0"}) as session:
        async with streamload.open(url, cache_dir=tmp_path, retry=FAST, session=session) as model:
            await model.wait_complete()
    assert all(b"User-Agent: an-app/1.0" in request for request in server.requests)


# ------------------------------------------------------------------ item 14: credentials inside URLs


def test_redact_urls_hides_passwords_and_query_strings_and_keeps_the_rest() -> None:
    text = "at http://u:pw@h:8/m.slm?X-Amz-Signature=abc: failed (see https://h/x?t=1), and 'http://tok@h/p?q'"
    assert redact_urls(text) == "at http://***@h:8/m.slm?***: failed (see https://h/x?***), and 'http://***@h/p?***'"
    assert redact_urls("/home/u/m.slm and http://h/m.slm") == "/home/u/m.slm and http://h/m.slm"


def test_cli_credentials_in_a_url_never_reach_errors_refs_or_list(server: object, tmp_path: Path) -> None:
    """A password and a signed query string: not in an error, not in the cache's refs, not in `streamload list`."""
    base = server.url("deep.slm")  # type: ignore[attr-defined]
    secret = base.replace("http://", "http://user:pa55word@") + "?X-Amz-Signature=T0KEN"
    done = streamload_cli("fetch", "--json", secret, cache=tmp_path)
    assert done.returncode == 0, done.stderr
    assert list(json.loads(done.stdout)["bytes_by_source"]) == [base.replace("http://", "http://***@") + "?***"]
    inspected = streamload_cli("inspect", secret, cache=tmp_path)
    assert inspected.returncode == 0 and "/deep.slm?***" in inspected.stdout
    assert file_name(secret) == "deep.slm"  # the progress bar's and the picture's title
    listed = streamload_cli("list", cache=tmp_path)
    listed_json = streamload_cli("list", "--json", cache=tmp_path)
    missing = streamload_cli("fetch", secret.replace("deep.slm", "missing.slm"), cache=tmp_path)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    refs = b"".join(path.read_bytes() for path in (tmp_path / "refs").iterdir())
    for shown in [
        done.stdout + done.stderr,
        inspected.stdout + inspected.stderr,
        listed.stdout,
        listed_json.stdout,
        missing.stderr,
        refs.decode(),
    ]:
        assert "pa55word" not in shown and "T0KEN" not in shown, shown
    assert "127.0.0.1" in listed.stdout and "deep.slm?***" in listed.stdout
    again = streamload_cli("fetch", secret, cache=tmp_path)  # the ref is still found by the whole URL
    assert again.returncode == 0 and "already cached whole" in again.stdout, again.stdout + again.stderr
    by_name = streamload_cli("fetch", "deep.slm", cache=tmp_path)  # as `list` shows it: the redacted URL, pinned
    assert by_name.returncode == 0 and "already cached whole" in by_name.stdout, by_name.stdout + by_name.stderr
    assert "pa55word" not in by_name.stderr + by_name.stdout and "T0KEN" not in by_name.stderr + by_name.stdout


# ------------------------------------------------------------------ item 11: a hostile embedded tokenizer

TOKENIZER = {
    "version": "1.0",
    "truncation": None,
    "padding": None,
    "added_tokens": [],
    "normalizer": None,
    "pre_tokenizer": {"type": "Whitespace"},
    "post_processor": None,
    "decoder": None,
    "model": {"type": "WordLevel", "vocab": {"a": 0, "[UNK]": 1}, "unk_token": "[UNK]"},
}


def blob_of(config: dict[str, object]) -> TokenizerBlob:
    raw = json.dumps(config).encode()
    return TokenizerBlob(Codec.ZSTD, len(raw), zstandard.ZstdCompressor(level=3).compress(raw))


def test_a_damaged_zstd_block_in_the_tokenizer_is_a_format_error() -> None:
    vocab = {f"word{i}": i for i in range(2000)} | {"[UNK]": 2000}
    good = blob_of({**TOKENIZER, "model": {**TOKENIZER["model"], "vocab": vocab}})  # type: ignore[dict-item]
    assert load_tokenizer(good) is not None
    damaged = None
    for position in range(zstandard.frame_header_size(good.data) + 3, len(good.data)):  # past the first block's header
        data = bytearray(good.data)
        data[position] ^= 0xFF
        try:
            zstandard.ZstdDecompressor().decompress(bytes(data), max_output_size=good.raw_size_bytes)
        except zstandard.ZstdError:
            damaged = dataclasses.replace(good, data=bytes(data))  # the frame's layout and content size still right
            break
    assert damaged is not None
    with pytest.raises(FormatError, match="the embedded tokenizer is damaged") as info:
        load_tokenizer(damaged)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "settings",
    [
        {"truncation": {"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 5}},
        {
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "[X]", "type_id": 0}}],
                "pair": [],
                "special_tokens": {},
            }
        },
    ],
)
def test_a_tokenizer_the_rust_library_panics_on_is_a_format_error_at_load(settings: dict[str, object]) -> None:
    """Without the check, these load and then raise pyo3's PanicException (a BaseException) on the first encode."""
    with pytest.raises(FormatError, match="cannot be used") as info:
        load_tokenizer(blob_of({**TOKENIZER, **settings}))
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ item 22: files `run` writes


@pytest.mark.parametrize("option", ["--save-logits", "--timeline-png"])
def test_cli_run_checks_the_files_it_writes_before_the_run(option: str, server: object, tmp_path: Path) -> None:
    url = server.url("deep.slm")  # type: ignore[attr-defined]
    directory = tmp_path / "out"
    directory.mkdir()
    for target, phrase in [(directory, "is a directory"), (tmp_path / "missing" / "x.npy", "does not exist")]:
        done = subprocess.run(
            [STREAMLOAD, "run", url, "--ids", "1,2,3", option, str(target), "--cache-dir", str(tmp_path / "cache")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr  # a bad argument, as argparse reports them
        assert len(done.stderr.strip().splitlines()) == 1 and phrase in done.stderr and "Traceback" not in done.stderr
        assert not (tmp_path / "cache").exists(), "checked before anything was fetched"
    assert not Path(f"{directory}.npy").exists()


def test_the_docs_say_how_to_install_the_plot_extra_from_a_source_checkout() -> None:
    """There is no streamload package on the index: the plot extra comes from the checkout (``pip install -e '.[plot]'``)."""
    texts = [path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]]
    assert not any("pip install 'streamload[plot]'" in text for text in texts)
    assert any("pip install -e '.[plot]'" in text for text in texts)


def test_every_streamload_error_hides_url_credentials() -> None:
    for error in [FetchError("gave up on http://u:p@h/m?sig=1"), StreamloadError("https://h/m?sig=1 failed")]:
        assert "sig=1" not in str(error) and ":p@" not in str(error)


async def test_a_mirror_that_answers_malformed_spans_is_dropped_and_the_primary_finishes(
    server: object, deep_slm: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The mirror's header probe is answered well, every span after it with a Content-Length of 5000 digits."""

    def answer(mirror: Hostile, request: bytes) -> bytes:
        probe = re.search(rb"\r\nRange: bytes=0-\d+\r\n", request) is not None
        return ranged(mirror.data, request) if probe else ranged(mirror.data, request, Content_Length="9" * 5000)

    mirror = Hostile(deep_slm.read_bytes(), answer)
    async with hostile(mirror) as mirror_url:
        primary = server.url("deep.slm")  # type: ignore[attr-defined]
        async with streamload.open(primary, mirrors=[mirror_url], cache_dir=tmp_path, retry=FAST) as model:
            stats = await model.wait_complete()
    assert stats.chunks_fetched == stats.chunks_total
    assert len(mirror.requests) > 1, "the mirror was given spans"
    assert any("not a byte count" in r.getMessage() and "the other sources take its share" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("value", ["tok€n", "a\x01b", "a\x7fb"])
def test_cli_a_header_value_that_cannot_be_sent_is_a_one_line_usage_error(value: str, server: object, tmp_path: Path) -> None:
    """The socket path encodes its request as latin-1: a '€' raised UnicodeEncodeError; a control character reached the server."""
    url = server.url("deep.slm")  # type: ignore[attr-defined]
    for done in [
        streamload_cli("fetch", url, "--header", f"X-Token: {value}", cache=tmp_path),
        subprocess.run(
            [STREAMLOAD, "fetch", url],
            capture_output=True,
            text=True,
            timeout=120,
            env={"STREAMLOAD_TOKEN": value, "STREAMLOAD_CACHE": str(tmp_path)},
        ),
    ]:
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "printable ASCII" in done.stderr and "Traceback" not in done.stderr
