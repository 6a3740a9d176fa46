"""`streamload convert | inspect | verify` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamload.cli import main


def test_convert_inspect_verify(tmp_path: Path, llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.slm"
    assert main(["convert", str(llama_dir), "-o", str(out)]) == 0
    assert "largest error abs" in capsys.readouterr().out
    assert main(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [layer["name"] for layer in summary["layers"]][:2] == ["embeddings", "block.0"]
    assert summary["int8_payload"]["entropy_bits_per_weight"] > 0
    assert len(summary["manifest_digest"]) == 64
    assert main(["inspect", str(out)]) == 0
    assert "vs bound" in capsys.readouterr().out
    assert main(["verify", str(out)]) == 0
    assert "intact" in capsys.readouterr().out


def test_verify_fails_on_a_damaged_file(tmp_path: Path, llama_slm: Path, capsys: pytest.CaptureFixture[str]) -> None:
    damaged = tmp_path / "damaged.slm"
    data = bytearray(llama_slm.read_bytes())
    data[-100] ^= 0x01
    damaged.write_bytes(bytes(data))
    assert main(["verify", str(damaged)]) == 1
    out = capsys.readouterr().out
    assert "BAD  chunk" in out and "sha256 mismatch" in out


def test_errors_are_one_line_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x.slm").write_bytes(b"not a model at all, just some text here")
    assert main(["inspect", str(tmp_path / "x.slm")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a streamload .slm file" in err and "Traceback" not in err
    assert main(["verify", str(tmp_path / "missing.slm")]) == 1
    assert "no such file" in capsys.readouterr().err
