"""How much memory and time `streamload convert` takes on a big model, unconstrained and inside memory cgroups.

    python tools/bench_convert.py                          # builds the Llama-3.2-1B-shaped model, limits: none, 1 GiB
    python tools/bench_convert.py --shape 7b --limits-mib 0,1024
    python tools/bench_convert.py --source DIR --limits-mib 0,512,1024 --progressive
    python tools/bench_convert.py --cli old="python /path/to/old_cli.py"   # another CLI side by side, same runs

Each run drops the page cache first (``sync; echo 3 > /proc/sys/vm/drop_caches``), then converts in a child process
placed in a fresh memory cgroup (v1: ``memory.limit_in_bytes`` under /sys/fs/cgroup/memory; v2: ``memory.max``)
before it executes, and prints per run: wall time, the child's peak RSS (``wait4``'s ``ru_maxrss``), the cgroup's
peak usage, which counts the page cache the conversion reads and writes (v1 ``memory.max_usage_in_bytes``, v2
``memory.peak``), source and output size, the output's sha256 (equal across runs and CLIs: the output is
deterministic) and the outcome (a conversion over its limit is killed). Without root, the cgroup runs and the
cache drops are skipped and the table says so.

The model is built with tools/make_big_llama.py into ``--work`` (default /tmp/streamload-bench-convert) and kept
there for the next run; ``--source`` converts an existing folder instead. Figures from a busy machine are noisy:
compare rows of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")
TOOLS = Path(__file__).resolve().parent


def cgroup_kind() -> str | None:
    """'v1' or 'v2' when this process may make memory cgroups, else None."""
    if os.geteuid() != 0:
        return None
    if (CGROUP_V1 / "memory.limit_in_bytes").exists():
        return "v1"
    controllers = CGROUP_V2 / "cgroup.subtree_control"
    if controllers.exists() and "memory" in controllers.read_text(errors="replace").split():
        return "v2"
    return None


@contextlib.contextmanager
def memory_cgroup(kind: str, limit_bytes: int) -> Iterator[tuple[Path, str]]:
    """A fresh cgroup limited to ``limit_bytes``: (its folder, the file holding its peak usage); removed afterwards."""
    root = CGROUP_V1 if kind == "v1" else CGROUP_V2
    folder = root / f"bench-convert-{os.getpid()}-{limit_bytes}"
    folder.mkdir()
    try:
        if kind == "v1":
            (folder / "memory.limit_in_bytes").write_text(str(limit_bytes))
            yield folder, "memory.max_usage_in_bytes"
        else:
            (folder / "memory.max").write_text(str(limit_bytes))
            if (folder / "memory.swap.max").exists():
                (folder / "memory.swap.max").write_text("0")
            yield folder, "memory.peak"
    finally:
        for _ in range(50):  # the exited child leaves the cgroup a moment after wait returns
            try:
                folder.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def drop_caches() -> bool:
    if os.geteuid() != 0:
        return False
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    return True


def build_model(work: Path, shape: str) -> Path:
    folder = work / f"llama-{shape}"
    if not (folder / "model.safetensors.index.json").is_file():
        subprocess.run([sys.executable, str(TOOLS / "make_big_llama.py"), str(folder), "--shape", shape], check=True)
    return folder


def source_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def sha256_prefix(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(8 << 20):
            digest.update(piece)
    return digest.hexdigest()[:12]


def run_once(command: list[str], cgroup: tuple[Path, str] | None) -> tuple[float, int, int | None, int]:
    """(wall seconds, peak RSS bytes, cgroup peak bytes or None, return code) of one conversion."""
    procs = None if cgroup is None else str(cgroup[0] / "cgroup.procs")

    def enter_cgroup() -> None:  # in the child, before exec: everything it runs is charged to the cgroup
        if procs is not None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

    started = time.perf_counter()
    child = subprocess.Popen(command, preexec_fn=enter_cgroup, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: PLW1509
    assert child.stderr is not None
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if child.returncode not in (0, -9):
        sys.stderr.write(stderr.decode(errors="replace"))
    peak = int((cgroup[0] / cgroup[1]).read_text()) if cgroup is not None else None
    return seconds, usage.ru_maxrss * 1024, peak, child.returncode


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1b", choices=("1b", "7b", "tiny"), help="model to build with make_big_llama.py (default 1b)")
    parser.add_argument("--source", type=Path, help="convert this model folder instead of building one")
    parser.add_argument("--work", type=Path, default=Path("/tmp/streamload-bench-convert"), help="where models and outputs go")
    parser.add_argument("--limits-mib", default="0,1024", help="comma-separated memory limits in MiB; 0 = no limit (default 0,1024)")
    parser.add_argument("--progressive", action="store_true", help="convert --progressive (runs the calibration)")
    parser.add_argument(
        "--cli",
        action="append",
        default=[],
        metavar="LABEL=COMMAND",
        help="a CLI to run (repeatable; default streamload=this Python's `-m streamload.cli`)",
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    source = args.source or build_model(args.work, args.shape)
    clis = [c.split("=", 1) for c in args.cli] or [["streamload", f"{shlex.quote(sys.executable)} -m streamload.cli"]]
    limits = [int(x) for x in args.limits_mib.split(",") if x]
    kind = cgroup_kind()
    if kind is None and any(limits):
        print("no memory cgroups (needs root and the v1 or v2 memory controller): running unconstrained only", file=sys.stderr)
        limits = [0]
    size = source_size(source)
    print(
        f"source {source}: {size / 1e9:.3f} GB of safetensors; cgroups: {kind or 'none'}; page cache dropped before each run: "
        f"{os.geteuid() == 0}\n"
    )
    print(
        f"{'cli':<12} {'limit':>9} {'time s':>8} {'peak RSS MB':>12} {'cgroup peak MB':>15} {'source GB':>10} {'output GB':>10} "
        f"{'sha256':>13}  outcome"
    )
    for label, command in clis:
        for limit in limits:
            output = args.work / f"out-{label}-{limit}.slm"
            output.unlink(missing_ok=True)
            argv = [*shlex.split(command), "convert", str(source), "-o", str(output), *(["--progressive"] if args.progressive else [])]
            drop_caches()
            with memory_cgroup(kind, limit << 20) if limit and kind else contextlib.nullcontext() as cgroup:
                seconds, rss, peak, code = run_once(argv, cgroup)
            ok = code == 0 and output.is_file()
            outcome = "ok" if ok else ("killed (out of memory)" if code == -9 else f"failed (exit {code})")
            print(
                f"{label:<12} {(f'{limit} MiB' if limit else 'none'):>9} {seconds:>8.1f} {rss / 1e6:>12.0f} "
                f"{(f'{peak / 1e6:.0f}' if peak is not None else '-'):>15} {size / 1e9:>10.3f} "
                f"{(f'{output.stat().st_size / 1e9:.3f}' if ok else '-'):>10} {(sha256_prefix(output) if ok else '-'):>13}  {outcome}",
                flush=True,
            )
            for leftover in (
                output,
                *(output.with_name(output.name + suffix) for suffix in (".data.tmp", ".refine.tmp", ".steps.tmp", ".partial")),
            ):
                leftover.unlink(missing_ok=True)  # a killed conversion leaves its temporary files
    return 0


if __name__ == "__main__":
    sys.exit(main())
