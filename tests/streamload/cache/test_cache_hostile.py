"""A cache someone else changed under us: a read-only mount, a damaged store behind a complete marker, a garbled ref,
links and FIFOs in place of the cache's own directories and files. Real caches, real servers on loopback, and the
CLI through its console script."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamload.formats import ModelReader
from tests.support.checks import free_port
from tests.support.serving import ServerThread

STREAMLOAD = str(Path(sys.executable).parent / "streamload")  # the console script pip installed


def streamload_cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STREAMLOAD, *args], capture_output=True, text=True, timeout=timeout_s)


def fill_cache(url: str, cache: Path) -> str:
    done = streamload_cli("fetch", url, "--cache-dir", str(cache), "-q", "--json")
    assert done.returncode == 0, done.stderr
    return next((cache / "models").iterdir()).name


def offline_url(name: str, digest: str) -> str:
    return f"http://127.0.0.1:{free_port()}/{name}#sha256={digest}"  # pinned, and nobody listens there


def assert_runs(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0 and done.stdout.strip() and "Traceback" not in done.stderr, done.stderr


def assert_fails_with_one_error(done: subprocess.CompletedProcess[str], *phrases: str) -> None:
    """Exit 1, nothing on stdout, no traceback, and one "error:" line (last; warnings may come before it) saying ``phrases``."""
    assert done.returncode == 1 and not done.stdout and "Traceback" not in done.stderr, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], done.stderr
    assert all(phrase in lines[-1] for phrase in phrases), done.stderr


# ---------------------------------------------------------------- 12: rm of a linked model directory


def test_rm_of_a_model_directory_that_is_a_symlink_removes_the_link_and_nothing_it_points_to(server: ServerThread, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    digest = fill_cache(server.url("minilm.slm"), elsewhere)
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / digest).symlink_to(elsewhere / "models" / digest)
    before = sorted(p.name for p in (elsewhere / "models" / digest).iterdir())
    done = streamload_cli("rm", digest[:12], "--cache-dir", str(cache))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert not (cache / "models" / digest).is_symlink() and not (cache / "models" / digest).exists()
    assert sorted(p.name for p in (elsewhere / "models" / digest).iterdir()) == before  # no lock file created there either


def test_rm_never_creates_a_file_through_a_linked_lock(server: ServerThread, tmp_path: Path) -> None:
    digest = fill_cache(server.url("minilm.slm"), tmp_path / "cache")
    lock = tmp_path / "cache" / "models" / digest / "lock"
    lock.unlink()
    lock.symlink_to(tmp_path / "victim")
    done = streamload_cli("rm", digest[:12], "--cache-dir", str(tmp_path / "cache"))
    assert not (tmp_path / "victim").exists()
    assert_fails_with_one_error(done, "symbolic link")


# ---------------------------------------------------------------- 15: a complete cache on a read-only mount


@contextlib.contextmanager
def read_only_view(directory: Path, mount_point: Path) -> Iterator[Path]:
    """``directory`` bind-mounted read-only at ``mount_point`` (root only), unmounted on the way out."""
    mount_point.mkdir()
    bind = subprocess.run(["mount", "--bind", str(directory), str(mount_point)], capture_output=True, text=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({bind.stderr.strip()}); a read-only mount needs root")
    try:
        remount = subprocess.run(["mount", "-o", "remount,ro,bind", str(mount_point)], capture_output=True, text=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only ({remount.stderr.strip()})")
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_complete_cache_on_a_read_only_mount_runs_unpinned_pinned_and_offline(server: ServerThread, tmp_path: Path) -> None:
    url = server.url("minilm.slm")
    digest = fill_cache(url, tmp_path / "cache")
    with read_only_view(tmp_path / "cache", tmp_path / "ro") as cache:
        for source in (url, f"{url}#sha256={digest}", offline_url("minilm.slm", digest)):
            assert_runs(streamload_cli("run", source, "--cache-dir", str(cache), "--text", "hello", "-q"))
        fetched = streamload_cli("fetch", url, "--cache-dir", str(cache))
        listed = streamload_cli("list", "--cache-dir", str(cache))
    assert fetched.returncode == 0 and "ready" in fetched.stdout, fetched.stderr
    assert listed.returncode == 0 and digest[:12] in listed.stdout, listed.stderr


def test_a_cache_that_lacks_chunks_on_a_read_only_mount_is_a_one_line_error(server: ServerThread, www: Path, tmp_path: Path) -> None:
    url = server.url("minilm.slm")
    digest = fill_cache(url, tmp_path / "cache")
    with ModelReader(www / "minilm.slm") as reader:
        first_layer_end = reader.manifest.layers[0].raw_end
    with open(tmp_path / "cache" / "models" / digest / "store.bin", "r+b") as store:
        store.write(bytes(first_layer_end))  # damaged: must be fetched again, and cannot be written
    with read_only_view(tmp_path / "cache", tmp_path / "ro") as cache:
        done = streamload_cli("run", url, "--cache-dir", str(cache), "--text", "hello", "-q")
    assert_fails_with_one_error(done, "Read-only file system")


# ---------------------------------------------------------------- 16: fetch checks what it declares ready


def test_fetch_checks_a_complete_cache_before_saying_it_is_ready(server: ServerThread, www: Path, tmp_path: Path) -> None:
    url = server.url("minilm.slm")
    digest = fill_cache(url, tmp_path)
    with open(tmp_path / "models" / digest / "store.bin", "r+b") as store:
        store.seek(1 << 20)
        store.write(bytes(200_000))
    fetched = streamload_cli("fetch", url, "--cache-dir", str(tmp_path), "--json")
    assert fetched.returncode == 0, fetched.stderr
    assert '"chunks_fetched": 0' not in fetched.stdout  # the damaged chunks were fetched again
    assert_runs(streamload_cli("run", offline_url("minilm.slm", digest), "--cache-dir", str(tmp_path), "--text", "hello", "-q"))


def test_fetch_offline_of_a_damaged_complete_cache_is_a_one_line_error(server: ServerThread, tmp_path: Path) -> None:
    digest = fill_cache(server.url("minilm.slm"), tmp_path)
    with open(tmp_path / "models" / digest / "store.bin", "r+b") as store:
        store.seek(1 << 20)
        store.write(bytes(200_000))
    done = streamload_cli("fetch", offline_url("minilm.slm", digest), "--cache-dir", str(tmp_path))
    assert_fails_with_one_error(done, "damaged", "cannot be reached")


# ---------------------------------------------------------------- 17: a garbled ref


def test_a_garbled_ref_is_treated_as_absent(server: ServerThread, tmp_path: Path) -> None:
    url = server.url("minilm.slm")
    digest = fill_cache(url, tmp_path)
    (ref,) = (tmp_path / "refs").iterdir()
    ref.write_text(f"garbage\n{url}\n")
    inspected = streamload_cli("inspect", url, "--cache-dir", str(tmp_path))
    assert inspected.returncode == 0 and digest[:12] in inspected.stdout, inspected.stderr
    assert_runs(streamload_cli("run", url, "--cache-dir", str(tmp_path), "--text", "hello", "-q"))
    listed = streamload_cli("list", "--cache-dir", str(tmp_path))
    assert listed.returncode == 0 and digest[:12] in listed.stdout, listed.stderr


# ---------------------------------------------------------------- 18: links and FIFOs the cache did not make


@pytest.mark.parametrize("linked", ["refs", "models"])
def test_the_cache_never_writes_through_a_linked_refs_or_models_directory(server: ServerThread, tmp_path: Path, linked: str) -> None:
    cache, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    cache.mkdir()
    elsewhere.mkdir()
    (cache / linked).symlink_to(elsewhere)
    done = streamload_cli("fetch", server.url("minilm.slm"), "--cache-dir", str(cache))
    assert list(elsewhere.iterdir()) == []
    assert_fails_with_one_error(done, "symbolic link", f"/{linked}:")


@pytest.mark.parametrize("replaced", ["header.slm", "chunks.log", "ref"])
def test_a_fifo_in_place_of_a_cached_file_hangs_neither_run_nor_list(
    server: ServerThread, www: Path, tmp_path: Path, replaced: str
) -> None:
    url = server.url("minilm.slm")
    digest = fill_cache(url, tmp_path)
    path = next((tmp_path / "refs").iterdir()) if replaced == "ref" else tmp_path / "models" / digest / replaced
    path.unlink()
    os.mkfifo(path)
    listed = streamload_cli("list", "--cache-dir", str(tmp_path), timeout_s=30)
    assert listed.returncode == 0 and digest[:12] in listed.stdout, listed.stderr
    for source in (url, f"{url}#sha256={digest}"):
        done = streamload_cli("run", source, "--cache-dir", str(tmp_path), "--text", "hello", "-q", timeout_s=30)
        if replaced == "chunks.log":  # the journal cannot be replaced as the header is: refused, and said so
            assert_fails_with_one_error(done, "chunks.log", "not a regular file")
        else:  # an unreadable header or ref is a missing one: fetched again
            assert_runs(done)


# ---------------------------------------------------------------- found probing: hard links, a huge header


def test_a_store_with_another_hard_link_is_never_written_into(server: ServerThread, www: Path, tmp_path: Path) -> None:
    """A hard link to the store (made by someone else) would be written through as a symbolic link would."""
    url = server.url("minilm.slm")
    digest = fill_cache(url, tmp_path / "cache")
    store = tmp_path / "cache" / "models" / digest / "store.bin"
    with open(store, "r+b") as f:
        f.write(bytes(100_000))  # damaged: the run would write the chunk again
    other = tmp_path / "other-name"
    os.link(store, other)
    before = other.read_bytes()
    done = streamload_cli("run", url, "--cache-dir", str(tmp_path / "cache"), "--text", "hello", "-q")
    assert other.read_bytes() == before
    assert_fails_with_one_error(done, "store.bin", "hard link")


@pytest.mark.parametrize("replaced", ["header.slm", "ref"])
def test_a_huge_header_or_ref_is_neither_read_whole_by_list_nor_by_run(server: ServerThread, tmp_path: Path, replaced: str) -> None:
    """A 4 GiB (sparse) header.slm or ref: over any such file's size, so damaged; `list` and `run` stay within 3 GiB of
    address space."""
    import resource

    url = server.url("minilm.slm")
    digest = fill_cache(url, tmp_path)
    header = tmp_path / "models" / digest / "header.slm"
    huge = next((tmp_path / "refs").iterdir()) if replaced == "ref" else header
    huge.unlink()
    with open(huge, "wb") as f:
        f.truncate(4 << 30)

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    listed = subprocess.run([STREAMLOAD, "list", "--cache-dir", str(tmp_path)], capture_output=True, text=True, preexec_fn=limited, env=env)
    assert listed.returncode == 0 and digest[:12] in listed.stdout, listed.stderr
    ran = subprocess.run(
        [STREAMLOAD, "run", url if replaced == "ref" else f"{url}#sha256={digest}", "--cache-dir", str(tmp_path), "--text", "hello", "-q"],
        capture_output=True,
        text=True,
        preexec_fn=limited,
        env=env,
    )
    assert_runs(ran)
    assert huge.stat().st_size < 1 << 20  # fetched (or written) again, replacing it
