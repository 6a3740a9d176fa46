"""The installed ``streamload`` as a new user meets it (issue 14): every flag checked, one-line errors, cached models
run by name, ``serve`` that says where it listens or why it cannot, ``convert`` that shows progress and a short summary."""

from __future__ import annotations

import argparse
import json
import os
import pty
import re
import socket
import subprocess
from pathlib import Path

import pytest

import streamload
from streamload.cache import JOURNAL_NAME, JOURNAL_RECORD
from streamload.cli.parser import build_parser
from streamload.cli.stream import DECODER_DEFAULTS, check_run_options
from streamload.formats import ModelReader
from tests.support.cli import STREAMLOAD, assert_one_line_error, read_terminal, streamload_cli
from tests.support.ports import wait_for_port
from tests.support.serving import ServerThread, serve_directory


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["run", "m.slm", "--ids", "1", "--max-new-tokens", "-1"], "--max-new-tokens: '-1'"),
        (["run", "m.slm", "--ids", "1", "--max-new-tokens", "-5"], "--max-new-tokens: '-5'"),
        (["run", "m.slm", "--ids=-5,101"], "--ids"),
        (["run", "m.slm", "--ids", "1,x"], "--ids"),
        (["run", "m.slm", "--ids", "1", "--temperature", "-1"], "--temperature: '-1'"),
        (["run", "m.slm", "--ids", "1", "--temperature", "nan"], "--temperature: 'nan'"),
        (["run", "m.slm", "--ids", "1", "--top-p", "2"], "--top-p: '2'"),
        (["run", "m.slm", "--ids", "1", "--top-p", "0"], "--top-p: '0'"),
        (["run", "m.slm", "--ids", "1", "--seed", "-1"], "--seed: '-1'"),
        (["run", "m.slm", "--ids", "1", "--seed=--"], "--seed: '--' is not a seed"),
        (["run", "m.slm", "--ids", "1", "--memory-budget=--"], "--memory-budget: not a size: '--'"),
        (["run", "m.slm", "--ids", "1", "--memory-budget=-1G"], "--memory-budget: not a size: '-1G'"),
        (["run", "m.slm", "--ids", "1", "--memory-budget", "-1G"], "--memory-budget: expected one argument"),
        (["run", "m.slm", "--text", ""], "the text is empty"),
        (["run", "m.slm", "--text", "   "], "the text is empty"),
        (["run", "m.slm", "--ids", "1", "--connections", "0"], "--connections: '0'"),
        (["fetch", "m.slm", "--digest", "abc"], "not a sha256 digest"),
        (["serve", ".", "--rate", "-5"], "--rate: '-5'"),
        (["serve", ".", "--latency-ms", "-1"], "--latency-ms: '-1'"),
        (["serve", ".", "--port", "99999"], "--port: '99999'"),
        (["serve", ".", "--port", "-1"], "--port: '-1'"),
        (["convert", ".", "-o", "/nonexistent-dir/x.slm"], "the directory /nonexistent-dir does not exist"),
        (["convert", ".", "-o", "x.slm", "--level", "0"], "--level: '0'"),
        (["convert", ".", "-o", "models/"], "models/ names a directory: give the .slm file to write, e.g. models/model.slm"),
        (["convert", ".", "-o", "x.slm", "--chunk-size", "0"], "--chunk-size: '0'"),
        (["verify", "http://127.0.0.1:8800/minilm.slm"], "verify checks a local file"),
    ],
)
def test_a_bad_flag_is_a_one_line_usage_error(args: list[str], phrase: str) -> None:
    assert_one_line_error(streamload_cli(*args), 2, phrase)


def test_an_option_given_as_option_equals_two_dashes_takes_them_as_its_value() -> None:
    """Python 3.11's argparse dropped the '--' of ``--option=--`` and left the option an empty list."""
    args = build_parser().parse_args(["run", "m.slm", "--text=--", "--cache-dir=--"])
    assert args.text == ["--"] and args.cache_dir == "--" and args.memory_budget == "auto"


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_a_directory_is_refused_where_a_file_is_needed(command: str, tmp_path: Path) -> None:
    assert_one_line_error(streamload_cli(command, str(tmp_path)), 2, f"{tmp_path} is a directory")


def test_version_comes_from_the_package_metadata() -> None:
    from importlib.metadata import version

    assert streamload.__version__ == version("streamload")
    done = streamload_cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"streamload {streamload.__version__}"


def test_help_documents_every_option_and_the_cache(tmp_path: Path) -> None:
    serve_help = streamload_cli("serve", "--help").stdout
    assert "address to listen on" in serve_help and "0 takes a free port" in serve_help
    assert "JSON array" in streamload_cli("list", "--help").stdout
    assert str(tmp_path) in re.sub(r"\s+", "", streamload_cli("run", "--help", cache=tmp_path).stdout)  # argparse wraps the path


# ---------------------------------------------------------------- run: options that depend on the model


@pytest.mark.parametrize(
    ("options", "phrase"),
    [
        (["--text", "hi", "--max-new-tokens", "3"], "--max-new-tokens needs a decoder; this model is a bert encoder"),
        (["--text", "hi", "--temperature", "0.5", "--top-p", "0.9"], "--temperature and --top-p need a decoder"),
        (["--ids", "101,99999"], "token id 99999 is outside this model's vocabulary (ids 0..30521)"),
    ],
)
def test_options_that_do_not_fit_the_encoder_are_refused(server: ServerThread, tmp_path: Path, options: list[str], phrase: str) -> None:
    done = streamload_cli("run", server.url("minilm.slm"), "-q", *options, cache=tmp_path)
    assert_one_line_error(done, 2, phrase)
    assert done.stdout == ""


def test_ids_outside_the_decoders_vocabulary_are_refused(server: ServerThread, tmp_path: Path) -> None:
    done = streamload_cli("run", server.url("deep.slm"), "-q", "--ids", "1,1024", "--max-new-tokens", "1", cache=tmp_path)
    assert_one_line_error(done, 2, "token id 1024 is outside this model's vocabulary (ids 0..1023)")


def test_truncation_says_how_many_tokens_were_dropped(server: ServerThread, tmp_path: Path) -> None:
    done = streamload_cli("run", server.url("minilm.slm"), "-q", "--text", "word " * 600, "--text", "short", cache=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "text 1 longer than the model's 256 tokens: 346 tokens dropped" in done.stderr  # 600 words + [CLS] [SEP] - 256
    short = streamload_cli("run", server.url("minilm.slm"), "-q", "--text", "a short sentence", cache=tmp_path)
    assert "dropped" not in short.stderr


def test_text_comes_as_arguments_as_with_ollama_run(minilm_slm: Path, tmp_path: Path) -> None:
    """`streamload run MODEL 'TEXT' ...`: each argument one text, as --text, in order, before or after options; a text
    that starts with '-' after --; texts given both ways, none, or an empty one are one-line usage errors."""

    def embeddings(*args: str) -> list[list[float]]:
        done = streamload_cli("run", str(minilm_slm), "--json", "--cache-dir", str(tmp_path), *args)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["embedding"]

    by_option = embeddings("--text", "first one", "--text", "second")
    assert len(by_option) == 2
    assert embeddings("first one", "second") == by_option
    assert embeddings("-q", "first one", "second") == by_option  # after an option: argparse hands them back, in order
    assert embeddings("first one", "-q", "second") == by_option
    assert embeddings("-q", "--", "-5 degrees") == embeddings("--text=-5 degrees")
    common = (str(minilm_slm), "-q", "--cache-dir", str(tmp_path))
    no_text = subprocess.run([STREAMLOAD, "run", *common, "--json"], input="first one\n", capture_output=True, text=True, timeout=120)
    assert no_text.returncode == 0 and json.loads(no_text.stdout)["embedding"] == embeddings("first one")  # interactive: a line a text
    assert_one_line_error(streamload_cli("run", *common, "hi", "--ids", "101"), 2, "not both")
    assert_one_line_error(streamload_cli("run", *common, "a", "--text", "b"), 2, "as arguments or with --text, not both")
    assert_one_line_error(streamload_cli("run", *common, "   "), 2, "the text is empty")
    assert_one_line_error(streamload_cli("run", *common, "-5"), 2, "unrecognized arguments: -5", "after --")


def test_a_decoders_prompt_as_words_is_joined_and_two_prompts_are_refused(server: ServerThread, tmp_path: Path) -> None:
    """`streamload run llama why is the sky blue` is one prompt, as ollama run reads it; two --text are refused."""
    words = argparse.Namespace(text=["why", "is", "the", "sky", "blue"], words=True, ids=None, save_logits=None)
    words.__dict__.update(dict.fromkeys(DECODER_DEFAULTS))
    check_run_options(words, {"architecture": "llama", "vocab_size": 1024})
    assert words.text == ["why is the sky blue"]
    two = streamload_cli("run", server.url("deep.slm"), "-q", "--text", "why", "--text", "blue", "--cache-dir", str(tmp_path))
    assert_one_line_error(two, 2, "a decoder takes one prompt")


def test_a_local_file_run_speaks_of_no_download_and_a_url_run_does(server: ServerThread, minilm_slm: Path, tmp_path: Path) -> None:
    local = streamload_cli("run", str(minilm_slm), "hello", "--cache-dir", str(tmp_path / "a"))
    assert local.returncode == 0, local.stderr
    assert "result at" in local.stderr and "downloaded" not in local.stderr and "network" not in local.stderr
    remote = streamload_cli("run", server.url("minilm.slm"), "hello", "--cache-dir", str(tmp_path / "b"))
    assert remote.returncode == 0, remote.stderr
    assert "downloaded by then" in remote.stderr
    assert remote.stdout == local.stdout


def test_the_console_script_writes_all_its_output_before_its_fast_exit(minilm_slm: Path, tmp_path: Path) -> None:
    """The console script ends with os._exit (no interpreter teardown): stdout sent to a file, block-buffered, is
    still written whole, and the status is main's."""
    out = tmp_path / "out.json"
    with out.open("w") as stdout:
        done = subprocess.run([STREAMLOAD, "inspect", "--json", str(minilm_slm)], stdout=stdout, stderr=subprocess.PIPE, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["architecture"] == "bert"
    with out.open("w") as stdout:
        done = subprocess.run(
            [STREAMLOAD, "run", str(minilm_slm), "--text", "hello", "--json", "--cache-dir", str(tmp_path / "c")], stdout=stdout, text=True
        )
    assert done.returncode == 0 and len(json.loads(out.read_text())["embedding"]) == 384
    assert_one_line_error(streamload_cli("inspect", str(tmp_path / "missing.slm")), 1, "missing.slm")
    closed = subprocess.run(  # started with stdout closed (`streamload list >&-`): sys.stdout is None
        [STREAMLOAD, "list", "--cache-dir", str(tmp_path / "c")], stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1)
    )
    assert closed.returncode == 0 and closed.stderr == "", closed.stderr


# ---------------------------------------------------------------- cached models by name


def test_a_cached_model_runs_by_file_name_or_digest_prefix(server: ServerThread, tmp_path: Path, minilm_slm: Path) -> None:
    digest = ModelReader(minilm_slm).manifest.digest
    url = server.url("minilm.slm")
    assert streamload_cli("fetch", url, "-q", cache=tmp_path).returncode == 0
    by_url = streamload_cli("run", url, "--text", "hello", "-q", cache=tmp_path)
    for name in ("minilm", "minilm.slm", digest[:4], f"sha256:{digest[:12]}"):
        done = streamload_cli("run", name, "--text", "hello", "-q", cache=tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout == by_url.stdout
        assert f"running cached minilm.slm sha256:{digest[:12]} (complete) from {url}" in done.stderr


def test_a_model_cached_from_a_local_file_runs_by_name_while_the_file_is_there(minilm_slm: Path, tmp_path: Path) -> None:
    """Convert, run the file once, then `streamload run minilm 'TEXT'`, as with a model pulled from a URL."""
    model = tmp_path / "models" / "minilm.slm"
    model.parent.mkdir()
    model.write_bytes(minilm_slm.read_bytes())
    by_path = streamload_cli("run", str(model), "hello", "-q", cache=tmp_path / "cache")
    assert by_path.returncode == 0, by_path.stderr
    by_name = streamload_cli("run", "minilm", "hello", "-q", cache=tmp_path / "cache")
    assert by_name.returncode == 0, by_name.stderr
    assert by_name.stdout == by_path.stdout and f"from {model.resolve()}" in by_name.stderr
    (row,) = json.loads(streamload_cli("list", "--json", cache=tmp_path / "cache").stdout)
    assert row["sources"] == [str(model.resolve())]
    model.unlink()
    gone = streamload_cli("run", "minilm", "hello", "-q", cache=tmp_path / "cache")
    assert_one_line_error(gone, 1, f"came from a local file ({model.resolve()} is gone)")


@pytest.mark.parametrize("command", ["run", "fetch"])
def test_a_directory_to_run_or_fetch_is_named_and_a_model_folder_gets_the_convert_command(command: str, tmp_path: Path) -> None:
    extra = ["--text", "hi"] if command == "run" else []
    assert_one_line_error(streamload_cli(command, str(tmp_path), *extra, cache=tmp_path / "c"), 1, f"{tmp_path} is a directory")
    (tmp_path / "config.json").write_text("{}")
    done = streamload_cli(command, str(tmp_path), *extra, cache=tmp_path / "c")
    assert_one_line_error(done, 1, f"convert it first: streamload convert {tmp_path} -o model.slm")


def test_a_url_of_another_scheme_and_a_missing_conversion_source(tmp_path: Path) -> None:
    done = streamload_cli("run", "htp://127.0.0.1:8800/minilm.slm", "--text", "hi", cache=tmp_path)
    assert_one_line_error(done, 1, "only http:// and https:// URLs are supported")
    done = streamload_cli("convert", str(tmp_path / "nosuch"), "-o", str(tmp_path / "m.slm"))
    assert_one_line_error(done, 1, "nosuch: no such file or folder")


def test_an_unknown_name_and_a_url_without_its_scheme(tmp_path: Path) -> None:
    assert_one_line_error(streamload_cli("run", "nosuchmodel", "--text", "hi", cache=tmp_path), 1, "no cached model", str(tmp_path))
    done = streamload_cli("run", "127.0.0.1:8800/minilm.slm", "--text", "hi", cache=tmp_path)
    assert_one_line_error(done, 1, "did you mean http://127.0.0.1:8800/minilm.slm")


def test_inspect_of_a_url_nobody_answers_at_shows_its_cached_header(www: Path, tmp_path: Path) -> None:
    """As run falls back to the cached copy: at once, with one warning line, not after the retries."""
    with serve_directory(www) as server:
        url = server.url("minilm.slm")
        assert streamload_cli("fetch", url, "-q", cache=tmp_path).returncode == 0
        online = streamload_cli("inspect", url, "--json", "--cache-dir", str(tmp_path))
    offline = streamload_cli("inspect", url, "--json", "--cache-dir", str(tmp_path))
    assert offline.returncode == 0 and "retrying in" not in offline.stderr, offline.stderr  # no rounds of retries
    assert json.loads(offline.stdout) == json.loads(online.stdout)
    assert offline.stderr.count("\n") == 1 and "showing the cached copy sha256:" in offline.stderr, offline.stderr
    elsewhere = streamload_cli("inspect", url.replace("minilm", "other"), "--cache-dir", str(tmp_path), timeout_s=60)
    assert elsewhere.returncode == 1 and "cannot connect" in elsewhere.stderr  # nothing cached for that URL
    assert "warning: cannot connect" in elsewhere.stderr and "streamload.transport.httputil" not in elsewhere.stderr  # a user's words


def test_fetch_of_a_local_file_says_it_copied(tmp_path: Path, deep_slm: Path) -> None:
    done = streamload_cli("fetch", str(deep_slm), cache=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "copied from the local file" in done.stdout and "downloaded 0 B" not in done.stdout
    again = streamload_cli("fetch", str(deep_slm), cache=tmp_path)
    assert again.returncode == 0 and "already cached whole: nothing copied" in again.stdout, again.stdout


def test_list_says_where_the_cache_is_and_counts_partial_bytes(server: ServerThread, tmp_path: Path, deep_slm: Path) -> None:
    empty = streamload_cli("list", cache=tmp_path)
    assert empty.returncode == 0 and str(tmp_path) in empty.stdout
    assert streamload_cli("fetch", server.url("deep.slm"), "-q", cache=tmp_path).returncode == 0
    listed = streamload_cli("list", cache=tmp_path)
    assert f"1 model in {tmp_path}" in listed.stdout
    # make it partial: keep the journal records of block 0's chunks only (large ones, against the table's small), drop the mark
    manifest = ModelReader(deep_slm).manifest
    (model_dir,) = (tmp_path / "models").iterdir()
    (model_dir / "complete").unlink()
    journal = model_dir / JOURNAL_NAME
    records = list(JOURNAL_RECORD.iter_unpack(journal.read_bytes()))
    kept = [r for r in records if manifest.chunks[r[0]].layer_index == 1]
    journal.write_bytes(b"".join(JOURNAL_RECORD.pack(*r) for r in kept))
    sizes = {c.index: c.size_bytes for c in manifest.chunks}
    expected = int(100 * sum(sizes[i] for i, _ in kept) / sum(sizes.values()))
    assert expected != 100 * len(kept) // len(sizes)  # bytes and chunk counts disagree here
    (row,) = json.loads(streamload_cli("list", "--json", cache=tmp_path).stdout)
    assert row["status"] == f"partial {expected}%"


# ---------------------------------------------------------------- serve


def test_serve_on_a_port_in_use_is_a_one_line_error(www: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = streamload_cli("serve", str(www), "--port", str(port), timeout_s=30)
    assert_one_line_error(done, 1, f"cannot listen on 127.0.0.1:{port}", "in use", "--port 0")


def test_serve_on_port_zero_says_which_port_and_warns_on_an_empty_directory(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [STREAMLOAD, "serve", str(tmp_path), "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        line = process.stdout.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", line).group(1))  # type: ignore[union-attr]
        assert port != 0
        wait_for_port(port)
        assert "holds no .slm files" in process.stderr.readline()
    finally:
        process.terminate()
        process.wait(10)
    assert process.returncode == 0


# ---------------------------------------------------------------- on a terminal: convert's and fetch's bars


def run_on_a_terminal(args: list[str], cache: Path | None = None) -> tuple[int, str, str]:
    """Run with stderr on a fresh pseudo-terminal (0 columns, as under `script`); (status, stdout, terminal output)."""
    controller, terminal = pty.openpty()
    env = dict(os.environ, **({"STREAMLOAD_CACHE": str(cache)} if cache else {}))
    process = subprocess.Popen([STREAMLOAD, *args], stdout=subprocess.PIPE, stderr=terminal, text=True, env=env)
    os.close(terminal)
    seen = b"".join(data for _, data in read_terminal(controller, process))
    os.close(controller)
    stdout = process.stdout.read() if process.stdout else ""
    return process.wait(10), stdout, seen.decode(errors="replace")


def test_convert_shows_progress_then_a_short_summary(tmp_path: Path, llama_dir: Path) -> None:
    status, stdout, terminal = run_on_a_terminal(["convert", str(llama_dir), "-o", str(tmp_path / "m.slm")])
    assert status == 0, terminal
    assert "converting" in terminal and "100%" in terminal
    assert len(stdout.strip().splitlines()) == 2 and "largest error abs" in stdout and "--verbose" in stdout
    verbose = streamload_cli("convert", str(llama_dir), "-o", str(tmp_path / "v.slm"), "--verbose")
    assert "max abs err" in verbose.stdout and len(verbose.stdout.splitlines()) > 10


def test_what_is_left_to_cache_counts_what_came_after_the_last_progress_report(www: Path, tmp_path: Path) -> None:
    """ "completing the cache (N left)" is the file less what was cached and downloaded by then: never more than what the
    result line says was still missing (a stale progress report once made it most of the file)."""
    with serve_directory(www, rate_bytes_per_s=8_000_000) as server:  # the result comes well before the whole file
        status, _, terminal = run_on_a_terminal(["run", server.url("minilm.slm"), "hello"], cache=tmp_path)  # with its bar
    assert status == 0, terminal
    downloaded = re.search(r"needed\), ([0-9.]+) MB downloaded by then", terminal)
    left = re.search(r"completing the cache for the next run \(([0-9.]+) MB left", terminal)
    assert downloaded and left, terminal
    total_mb = (www / "minilm.slm").stat().st_size / 1e6
    assert float(left.group(1)) <= total_mb - float(downloaded.group(1)) + 0.1, terminal


def test_the_download_bar_shows_on_a_terminal_without_a_width(server: ServerThread, tmp_path: Path) -> None:
    status, _, terminal = run_on_a_terminal(["fetch", server.url("deep.slm")], cache=tmp_path)
    assert status == 0, terminal
    assert "layers 15/15" in terminal and "100%" in terminal and "MB" in terminal


def test_a_local_file_runs_where_the_cache_cannot_be_written(minilm_slm: Path, tmp_path: Path) -> None:
    """A local .slm needs no lasting cache: an unwritable cache directory means a temporary one, with a warning."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    done = subprocess.run(
        [STREAMLOAD, "run", str(minilm_slm), "--text", "hello", "--cache-dir", str(blocker / "cache"), "--json"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["embedding"]) == 384
    assert "is not writable; running" in done.stderr and "temporary copy" in done.stderr


def test_every_command_takes_a_name_a_digest_prefix_a_file_or_a_url(
    server: ServerThread, tmp_path: Path, deep_slm: Path, minilm_slm: Path
) -> None:
    """fetch, run, inspect, verify and rm take a model alike; list shows the name first; a name two models share is an
    error that lists both."""
    digest = ModelReader(deep_slm).manifest.digest
    url = server.url("deep.slm")
    assert streamload_cli("fetch", url, "-q", cache=tmp_path).returncode == 0
    listed = streamload_cli("list", cache=tmp_path).stdout.splitlines()
    assert listed[1].split()[:2] == ["NAME", "DIGEST"] and listed[2].split()[:2] == ["deep", digest[:12]]
    for name in ("deep", "deep.slm", digest[:6], url):
        done = streamload_cli("inspect", name, "--json", "--cache-dir", str(tmp_path))
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["manifest_digest"] == digest
    assert_one_line_error(
        streamload_cli("verify", "deep", "--cache-dir", str(tmp_path)), 1, "downloaded from a URL", "streamload fetch deep"
    )
    other = tmp_path / "elsewhere" / "deep.slm"  # another model by the same name, cached from a file
    other.parent.mkdir()
    other.write_bytes(minilm_slm.read_bytes())
    other_digest = ModelReader(minilm_slm).manifest.digest
    assert streamload_cli("fetch", str(other), "-q", cache=tmp_path).returncode == 0
    verified = streamload_cli("verify", other_digest[:8], "--cache-dir", str(tmp_path))  # by digest: the file it came from
    assert verified.returncode == 0 and "intact" in verified.stdout, verified.stderr
    for command in (["rm", "deep"], ["inspect", "deep"], ["run", "deep", "hi"]):
        done = streamload_cli(*command, cache=tmp_path) if command[0] == "rm" else streamload_cli(*command, "--cache-dir", str(tmp_path))
        assert_one_line_error(done, 1, "names 2 cached models", digest[:12], other_digest[:12])
    assert streamload_cli("rm", url, cache=tmp_path).returncode == 0
    assert streamload_cli("rm", str(other), cache=tmp_path).returncode == 0  # a file: the model of its manifest
    assert json.loads(streamload_cli("list", "--json", cache=tmp_path).stdout) == []
