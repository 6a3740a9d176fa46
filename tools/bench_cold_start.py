"""Benchmark: cold start of `streamload run` on a cached model, to its first embedding, beside the floors under it.

Usage:
    python tools/bench_cold_start.py [--runs 15] [--before REF]

Each row is the wall time of a whole process (fork to exit), median and minimum over --runs runs, after one
unmeasured run that writes the bytecode (PYTHONDONTWRITEBYTECODE is cleared for the children). The model is
all-MiniLM-L6-v2 converted here, its cache filled by one earlier run.

Rows:
    python -c pass                         the interpreter and its site packages: no program starts faster
    python -c 'import numpy, asyncio, tokenizers, os; os._exit(0)'
                                           the libraries a cached run cannot do without, ended as streamload ends
    streamload run FILE --text ...         the console script on a local .slm whose layers are cached
    streamload run NAME --text ...         the same model by its cached name, pulled from a URL (pinned to its digest:
                                           no network), as `ollama run NAME` runs a pulled model
With --before REF (a git revision of this checkout), HEAD and REF are each exported with git archive and run as
`python -m streamload.cli run FILE` through PYTHONPATH, alternating with the other rows so all share the machine's
load: compare those two rows with each other (the console script's rows go through the install's import hook).
``--before HEAD`` runs two exports of the same revision: the spread between them is the machine's noise. The last line
is the median of the differences of runs made back to back (HEAD's minus REF's), steadier than the two medians' gap
when the machine's load shifts during the runs.
/proc/loadavg is printed with the table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from bench_embed import export_revision, loadavg, minilm_folder  # noqa: E402

from _support.ports import free_port, wait_for_port  # noqa: E402

TEXT = "a cold start"


def time_process_s(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr[-1000:]}")
    return elapsed


def streamload_script() -> str:
    """The console script installed beside this interpreter (a pyenv shim on PATH adds ~50 ms of bash)."""
    script = Path(sys.executable).parent / "streamload"
    if not script.exists():
        raise SystemExit(f"no console script at {script}: pip install -e . first")
    return str(script)


def fill_cache(path: Path, cache: Path, env: dict[str, str]) -> str:
    """Run the model once from a local file and once from a URL (the bundled server), so both are cached; the name."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "streamload.cli", "serve", str(path.parent), "--port", str(port), "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        for source in (str(path), f"http://127.0.0.1:{port}/{path.name}"):
            time_process_s(
                [sys.executable, "-m", "streamload.cli", "run", source, "--cache-dir", str(cache), "--text", TEXT], env, path.parent
            )
    finally:
        server.terminate()
        server.wait()
    return path.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--before", metavar="REF", help="also run the streamload rows on this git revision, alternating")
    args = parser.parse_args()

    from streamload.formats import convert

    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    work = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    try:
        path = work / "models" / "minilm.slm"
        path.parent.mkdir()
        asyncio.run(asyncio.to_thread(convert, minilm_folder(), path))
        cache = work / "cache"
        name = fill_cache(path, cache, env)
        script = streamload_script()
        tail = ["--cache-dir", str(cache), "--text", TEXT]
        rows: dict[str, tuple[list[str], dict[str, str]]] = {
            "python -c pass": ([sys.executable, "-c", "pass"], env),
            "python -c 'import numpy, asyncio, tokenizers' (exits as streamload does)": (
                [sys.executable, "-c", "import numpy, asyncio, tokenizers, os; os._exit(0)"],
                env,
            ),
            "streamload run FILE": ([script, "run", str(path), *tail], env),
            "streamload run NAME (cached from a URL)": ([script, "run", name, *tail], env),
        }
        if args.before:
            # both revisions launched the same way (an export on PYTHONPATH, python -m): an editable install's import
            # hook costs the console script rows time the export does not pay, so only these two rows compare
            module = [sys.executable, "-m", "streamload.cli", "run"]
            for number, revision in enumerate(("HEAD", args.before)):  # --before HEAD: the machine's noise, two exports
                export = work / f"export-{number}"
                export.mkdir()
                revision_env = {**env, "PYTHONPATH": export_revision(revision, export)["PYTHONPATH"]}
                rows[f"python -m streamload.cli run FILE at {revision}{' (again)' if number and revision == 'HEAD' else ''}"] = (
                    [*module, str(path), *tail],
                    revision_env,
                )
        for argv, row_env in rows.values():  # writes the bytecode; not measured
            time_process_s(argv, row_env, work)  # in the work directory: NAME is not a file there
        times: dict[str, list[float]] = {label: [] for label in rows}
        load_before = loadavg()
        for run in range(args.runs):  # alternate the rows, so they share the machine's load; every other round
            for label, (argv, row_env) in list(rows.items())[:: 1 if run % 2 == 0 else -1]:  # in reverse: no row always
                times[label].append(time_process_s(argv, row_env, work))  # follows the same one
        print(f"cold start of a cached all-MiniLM-L6-v2 run, whole process, {args.runs} runs alternating; {sys.executable}")
        print(f"load before: {load_before}; after: {loadavg()}")
        print(f"{'process':72} {'median s':>9} {'min s':>7}")
        for label, values in times.items():
            print(f"{label:72} {statistics.median(values):9.3f} {min(values):7.3f}")
        if args.before:  # each pair ran back to back: their difference sheds the load that shifts both
            head, before = list(times.values())[-2:]
            paired = statistics.median(h - b for h, b in zip(head, before, strict=True))
            print(f"median of the paired differences, HEAD - {args.before}: {paired * 1e3:+.1f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
