"""Print each decoder family's fidelity to transformers: prompt-logit cosine, argmax agreement, greedy tokens.

Usage (no torch needed; the references are tools/make_family_references.py's fixtures):
    python tools/family_fidelity.py [--quant int8|none] [family ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

import numpy as np

import streamload
from streamload.formats import convert
from streamload.runtime import run

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
FAMILIES = ("qwen2", "qwen3", "mistral", "phi3", "gemma2", "gpt2", "olmo2", "granite", "stablelm")


async def measure(family: str, quant: str, workdir: Path) -> str:
    meta = json.loads((FIXTURES / f"{family}_reference.json").read_text())
    arrays = np.load(FIXTURES / f"{family}_reference.npz")
    path = workdir / f"{family}-{quant}.slm"
    convert(FIXTURES / f"{family}-tiny", path, quant=quant)
    cosines, agreements, greedy, positions = [], [], [], []
    async with streamload.open(str(path), cache_dir=workdir / "cache") as model:
        for i, (prompt, expected) in enumerate(zip(meta["prompts"], meta["greedy"], strict=True)):
            result = await run(model, ids=prompt, max_new_tokens=len(expected), keep_prompt_logits=True)
            ours, theirs = result.prompt_logits, arrays[f"logits_{i}"]
            cos = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
            cosines.append(float(cos.min()))
            agreements.append(float((ours.argmax(1) == theirs.argmax(1)).mean()))
            positions.append(len(prompt))
            same = next((k for k, (a, b) in enumerate(zip(result.generated_ids, expected, strict=True)) if a != b), len(expected))
            greedy.append(f"{same}/{len(expected)}")
    return (
        f"{family:8s} {quant:5s} prompts {[len(p) for p in meta['prompts']]}: min cosine {min(cosines):.6f}, "
        f"argmax agreement {' '.join(f'{a:.2f}' for a in agreements)} "
        f"(all {np.average(agreements, weights=positions):.2f}), greedy tokens identical {' '.join(greedy)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--quant", choices=("int8", "none"), action="append")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        for quant in args.quant or ["int8", "none"]:
            for family in args.families:
                print(asyncio.run(measure(family, quant, Path(workdir))))


if __name__ == "__main__":
    main()
