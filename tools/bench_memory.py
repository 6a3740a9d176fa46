"""Decode of a Llama-3.2-1B-shaped model inside memory limits four and two times below its size, beside its floor.

Usage:
    python tools/bench_memory.py [--workdir DIR] [--model FILE.slm] [--budgets 320M,640M] [--tokens 8] [--streamed]

Builds the model unless --model is given (tools/make_big_llama.py: random fp16 weights, 2.5 GB of safetensors; then
``streamload convert``), caches it with one unconstrained run, measures the disk's direct (uncached) read rate on the
cache's store, and then decodes the same prompt:

* unconstrained (``--memory-budget none``, no cgroup): the compute floor;
* per budget, inside a memory cgroup of that size (v1 ``memory.limit_in_bytes`` or v2 ``memory.max``; both count the
  page cache; caches dropped first), twice: with streamload's budget (read from the cgroup, as a user gets it) and with
  ``--memory-budget none`` (every weight memory-mapped: what the page cache's LRU makes of it).

Without root (no cgroups) it says so and passes ``--memory-budget`` instead. For each row it prints s/token (the median
step after the first token), the floor (the slower of the unconstrained decode and reading, per token, the weight bytes
the budget cannot keep resident at the measured direct-read rate), their ratio, the cgroup's peak and the process's
peak RSS, and whether the tokens equal the unconstrained run's. ``--streamed`` adds a fetch+run from the bundled server
inside the smallest budget, with an empty cache.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")
PROMPT_IDS = "128000,791,3938,315,279,1917,374"


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def streamload(*args: str) -> list[str]:
    return [sys.executable, "-m", "streamload.cli", *args]


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


class MemoryCgroup:
    """A memory cgroup of ``limit_bytes`` to start one command in (v1 if mounted, else v2); None where we may not."""

    def __init__(self, name: str, limit_bytes: int) -> None:
        if (CGROUP_V1 / "memory.limit_in_bytes").exists():
            self.path, self.version = CGROUP_V1 / name, 1
        else:
            self.path, self.version = CGROUP_V2 / name, 2
        self.path.mkdir(exist_ok=True)
        limit_file = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
        (self.path / limit_file).write_text(str(limit_bytes))
        if self.version == 1:
            (self.path / "memory.max_usage_in_bytes").write_text("0")

    def wrap(self, command: list[str]) -> list[str]:
        procs = self.path / "cgroup.procs"
        return ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *command]

    def peak_bytes(self) -> int | None:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def can_make_cgroups() -> bool:
    return os.geteuid() == 0 and ((CGROUP_V1 / "memory.limit_in_bytes").exists() or (CGROUP_V2 / "cgroup.controllers").exists())


def run_decode(model: str, cache: Path, tokens: int, budget: str, cgroup: MemoryCgroup | None) -> dict:
    command = streamload("run", model, "--ids", PROMPT_IDS, "--max-new-tokens", str(tokens), "--json", "-q", "--cache-dir", str(cache))
    command += ["--memory-budget", budget, "--no-finish"]
    if cgroup is not None:
        command = cgroup.wrap(command)
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    stdout, stderr = process.stdout.read(), process.stderr.read()  # type: ignore[union-attr]
    wall_s = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        return {"error": (stderr.strip().splitlines() or ["killed (out of memory?)"])[-1][:160], "wall_s": wall_s}
    result = json.loads(stdout)
    times = result["token_times_s"]
    steps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {
        "ids": result["generated_ids"],
        "s_per_token": statistics.median(steps[1:] or steps),  # the first step also reads what stays resident
        "first_token_s": result["first_token_s"],
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "cgroup_peak_bytes": cgroup.peak_bytes() if cgroup else None,
        "wall_s": wall_s,
    }


def direct_read_rate(path: Path) -> float:
    """Bytes/s of an O_DIRECT sequential read of ``path`` in 64 MiB requests (the disk, not the page cache)."""
    drop_caches()
    buffer = mmap.mmap(-1, 64 << 20)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    try:
        started, total = time.perf_counter(), 0
        while (got := os.preadv(fd, [buffer], total)) > 0:
            total += got
            if got < len(buffer):
                break
        return total / (time.perf_counter() - started)
    finally:
        os.close(fd)


def decode_weight_bytes(model: str) -> int:
    """Bytes a decode step reads: every block's layer and the head's matrix (the tied table or lm_head)."""
    from streamload.formats import ModelReader

    with ModelReader(model) as reader:
        manifest = reader.manifest
        blocks = int(manifest.config["num_hidden_layers"])
        head = "lm_head.weight" if "lm_head.weight" in manifest.tensor_by_name else "model.embed_tokens.weight"
        return sum(manifest.layers[i].raw_size_bytes for i in range(1, blocks + 1)) + manifest.tensor(head).size_bytes


def build_model(workdir: Path) -> Path:
    source, model = workdir / "llama-1b-shaped", workdir / "llama-1b-shaped.slm"
    if not model.exists():
        if not (source / "config.json").exists():
            subprocess.run([sys.executable, str(HERE / "make_big_llama.py"), str(source)], check=True)
        subprocess.run(streamload("convert", str(source), "-o", str(model)), check=True)
    return model


def streamed_run(model: Path, workdir: Path, tokens: int, limit: int) -> dict:
    """Fetch+run from the bundled server on an empty cache, inside the cgroup."""
    cache = workdir / "cache-streamed"
    shutil.rmtree(cache, ignore_errors=True)
    server = subprocess.Popen(streamload("serve", str(model.parent), "--port", "0", "-q"), stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()  # type: ignore[union-attr]
        found = re.search(r"https?://[^\s/]+", line)
        if found is None:
            return {"error": f"the server did not say where it listens: {line!r}", "wall_s": 0.0}
        url = f"{found.group(0)}/{model.name}"
        drop_caches()
        cgroup = MemoryCgroup(f"streamload-bench-streamed-{os.getpid()}", limit)
        try:
            return run_decode(url, cache, tokens, "auto", cgroup)
        finally:
            cgroup.remove()
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(cache, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("bench-memory"), help="where the model and its cache go")
    parser.add_argument("--model", help="an existing .slm to use instead of building the 1B-shaped one")
    parser.add_argument("--budgets", default="320M,640M")
    parser.add_argument("--tokens", type=int, default=8, help="tokens to generate per run")
    parser.add_argument("--streamed", action="store_true", help="also fetch+run from the bundled server inside the smallest budget")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else build_model(args.workdir)
    cache = args.workdir / "cache"
    subprocess.run(streamload("fetch", str(model), "-q", "--cache-dir", str(cache)), check=True, stdout=subprocess.DEVNULL)
    store = next(cache.glob("models/*/store.bin"))
    rate = direct_read_rate(store)
    weights = decode_weight_bytes(str(model))
    cgroups = can_make_cgroups()
    if not cgroups:
        print("not root or no memory cgroup controller: runs pass --memory-budget instead of running inside a limit", file=sys.stderr)
    drop_caches()
    free = run_decode(str(model), cache, args.tokens, "none", None)
    print(f"model {model.name}: decode reads {weights / 1e9:.2f} GB per token; store read directly at {rate / 1e9:.2f} GB/s")
    print(f"unconstrained: {free.get('s_per_token', float('nan')):.3f} s/token, peak RSS {free.get('peak_rss_bytes', 0) / 2**20:.0f} MiB")
    print()
    print("| limit | mode | s/token | floor | ratio | cgroup peak | peak RSS | tokens = unconstrained |")
    print("|---|---|---|---|---|---|---|---|")
    for text in args.budgets.split(","):
        limit = parse_size(text)
        floor = max(free["s_per_token"], max(0, weights - limit) / rate)
        for mode in ("budget", "mmap"):
            cgroup = MemoryCgroup(f"streamload-bench-{os.getpid()}", limit) if cgroups else None
            budget = ("auto" if cgroups else str(limit)) if mode == "budget" else "none"
            if not cgroups and mode == "mmap":
                continue
            drop_caches()
            try:
                row = run_decode(str(model), cache, args.tokens, budget, cgroup)
            finally:
                if cgroup is not None:
                    cgroup.remove()
            print(format_row(text, mode, row, floor, free["ids"]))
    if args.streamed:
        text = args.budgets.split(",")[0]
        row = streamed_run(model, args.workdir, args.tokens, parse_size(text))
        print(format_row(text, "fetch+run", row, max(free["s_per_token"], max(0, weights - parse_size(text)) / rate), free["ids"]))
        if "first_token_s" in row:
            print(f"\nfetch+run inside {text}: first token at {row['first_token_s']:.2f} s")
    return 0


def format_row(limit: str, mode: str, row: dict, floor: float, ids: list[int]) -> str:
    if "error" in row:
        return f"| {limit} | {mode} | failed after {row['wall_s']:.1f} s: {row['error']} | {floor:.3f} | | | | |"
    peak = row["cgroup_peak_bytes"]
    return (
        f"| {limit} | {mode} | {row['s_per_token']:.3f} | {floor:.3f} | {row['s_per_token'] / floor:.2f} | "
        f"{'-' if peak is None else f'{peak / 2**20:.0f} MiB'} | {row['peak_rss_bytes'] / 2**20:.0f} MiB | {row['ids'] == ids} |"
    )


if __name__ == "__main__":
    sys.exit(main())
