"""A progressive decoder served slowly: its preview, then its exact result, checked against the plain file's."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import streamload
from streamload.runtime import run, run_progressive
from tests.support.serving import serve_directory


async def assert_preview_then_exact(progressive: Path, plain: str | Path, prompt: list[int], cache_dir: Path) -> None:
    """Serve ``progressive`` (from its folder) at a rate that leaves refinements due when the first token is computed:
    a coarse preview, then the exact result. The exact result is the plain file's (the same tokens, the first token's
    logits within 1e-6); the preview is close to it, and really computed on other weights."""
    with serve_directory(progressive.parent, rate_bytes_per_s=progressive.stat().st_size / 1.5) as server:  # refinements still due
        async with streamload.open(server.url(progressive.name), cache_dir=cache_dir / "p") as model:
            assert model.progressive
            results = [r async for r in run_progressive(model, ids=prompt, max_new_tokens=4)]
    async with streamload.open(plain, cache_dir=cache_dir / "plain") as model:
        expected = await run(model, ids=prompt, max_new_tokens=4)
    preview, exact = results
    assert (preview.precision, exact.precision) == ("coarse", "exact")
    assert exact.generated_ids == expected.generated_ids
    np.testing.assert_allclose(exact.first_token_logits, expected.first_token_logits, rtol=0, atol=1e-6)
    a, b = preview.first_token_logits, exact.first_token_logits
    assert 0.9 < float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) < 1.0  # close, and really computed on other weights
