"""Fuzz the .slm reader: mutated preambles, manifests and chunk tables must raise only FormatError.

Usage:
    python tools/fuzz_reader.py [--count 10000] [--seed 0] [--per-input-timeout-s 5]

Seeds: the golden tiny file and a converted 3-block Llama. Each input is one of: bytes
mutated mostly inside preamble + manifest; one to three values replaced anywhere in the
manifest tree; values replaced inside the chunk table. Every input is parsed and every chunk
verified and decompressed, as a client would. Reports inputs per outcome, any exception that
is not a FormatError (a bug), the slowest input (a SIGALRM per input catches hangs) and peak
memory (tracemalloc peak of Python allocations, and the process's max RSS).

Run from a checkout: the synthetic-model and mutation helpers live in tools/_support (not installed).
"""

from __future__ import annotations

import argparse
import collections
import copy
import random
import resource
import signal
import tempfile
import time
import tracemalloc
from pathlib import Path

from _support.mutate import join_file, mutate_bytes, mutate_structure, read_everything, split_file
from _support.synthetic import llama_config, write_synthetic_llama
from streamload.formats import FormatError, convert

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "formats" / "golden" / "tiny.slm"


class Hang(Exception):
    pass


def on_alarm(signum: int, frame: object) -> None:
    raise Hang()


def mutate(seed_file: bytes, parts: tuple[dict, bytes], rng: random.Random) -> tuple[str, bytes]:
    manifest, region = parts
    kind = rng.choice(("bytes", "manifest", "chunks"))
    if kind == "bytes":
        return kind, mutate_bytes(seed_file, rng)
    tree = copy.deepcopy(manifest)
    if kind == "chunks" and tree.get("chunks"):
        for _ in range(rng.randint(1, 3)):
            tree["chunks"] = mutate_structure(tree["chunks"], rng)
    else:
        for _ in range(rng.randint(1, 3)):
            tree = mutate_structure(tree, rng)
    return kind, join_file(tree, region)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-input-timeout-s", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = write_synthetic_llama(Path(tmp) / "src", llama_config(num_hidden_layers=3))
        convert(source, Path(tmp) / "llama.slm", chunk_size_bytes=16 << 10)
        seeds = [GOLDEN.read_bytes(), (Path(tmp) / "llama.slm").read_bytes()]
    parts = [split_file(s) for s in seeds]
    rng = random.Random(args.seed)
    outcomes: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    bugs: list[str] = []
    slowest = (0.0, "")
    signal.signal(signal.SIGALRM, on_alarm)
    tracemalloc.start()
    started = time.perf_counter()
    for i in range(args.count):
        which = rng.randrange(len(seeds))
        kind, data = mutate(seeds[which], parts[which], rng)
        kinds[kind] += 1
        t0 = time.perf_counter()
        signal.alarm(args.per_input_timeout_s)
        try:
            read_everything(data)
            outcomes["accepted (mutation kept the file valid)"] += 1
        except FormatError as exc:
            outcomes[type(exc).__name__] += 1
        except Hang:
            bugs.append(f"input {i}: no answer within {args.per_input_timeout_s} s")
        except Exception as exc:  # noqa: BLE001 - anything else is a bug in the reader
            bugs.append(f"input {i} ({kind}): {type(exc).__name__}: {exc}")
        finally:
            signal.alarm(0)
        elapsed = time.perf_counter() - t0
        if elapsed > slowest[0]:
            slowest = (elapsed, f"input {i} ({kind})")
    total_s = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    print(f"{args.count} inputs in {total_s:.1f} s (seed {args.seed}): " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    print(f"{'outcome':<44} {'inputs':>7}")
    for name, count in outcomes.most_common():
        print(f"{name:<44} {count:>7}")
    print(f"{'not a FormatError (bugs)':<44} {len(bugs):>7}")
    for bug in bugs[:20]:
        print("  " + bug)
    print(f"slowest input: {slowest[0] * 1000:.1f} ms ({slowest[1]})")
    print(f"peak Python allocation {peak / 1e6:.1f} MB; process max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    raise SystemExit(1 if bugs else 0)


if __name__ == "__main__":
    main()
