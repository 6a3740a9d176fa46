"""A deliberately misbehaving static host for fault tests: real sockets, scripted faults.

Each GET takes the next action from ``Faults.script`` ("ok" once the script is used up):

    ok                  honour Range like a static host
    full                ignore Range: 200 with the whole file
    status:CODE[:S]     answer CODE (with Retry-After: S)
    reset:N             send N body bytes, then abort the connection (RST)
    truncate:N          send N body bytes, then close it cleanly (FIN) before Content-Length
    stall:N             send N body bytes, then send nothing more
    short:N             declare and send N bytes fewer than the range asks for
    trickle:N           send N body bytes one at a time, 50 ms apart, then stall

``Faults.fail_from``: any answer that reaches that file offset, except a header probe (a bounded range from byte 0),
sends the bytes before it, then closes the connection (FIN).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from pathlib import Path

from aiohttp import web


@dataclasses.dataclass
class Faults:
    script: list[str] = dataclasses.field(default_factory=list)
    corrupt_range: tuple[int, int] | None = None  # file offsets [start, end) whose first byte gets flipped
    corrupt_times: int = 0  # how many responses carry the corruption (a large number: always)
    fail_from: int | None = None  # file offset no answer gets past: reset there
    rate_bytes_per_s: float | None = None  # pace every body (per connection), in 16 KiB pieces
    requests: list[str] = dataclasses.field(default_factory=list)  # Range header of every GET, "" for none
    actions: list[str] = dataclasses.field(default_factory=list)  # what each GET was answered with


def faulty_app(path: Path, faults: Faults) -> web.Application:
    data = path.read_bytes()

    async def handle(request: web.Request) -> web.StreamResponse:
        header = request.headers.get("Range", "")
        faults.requests.append(header)
        action = faults.script.pop(0) if faults.script else "ok"
        faults.actions.append(action)
        kind, _, argument = action.partition(":")
        if kind == "status":
            code, _, retry_after = argument.partition(":")
            return web.Response(status=int(code), headers={"Retry-After": retry_after} if retry_after else {})
        start, end, status = 0, len(data), 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", header)
        if match and kind != "full":
            start = int(match.group(1))
            end = min(len(data), int(match.group(2)) + 1) if match.group(2) else len(data)
            status = 206
        if kind == "short":
            end -= int(argument)
        body = bytearray(data[start:end])
        if faults.corrupt_range and faults.corrupt_times > 0:
            lo, _ = faults.corrupt_range
            if start <= lo < end:
                body[lo - start] ^= 0xFF
                faults.corrupt_times -= 1
        headers = {"Content-Length": str(len(body)), "ETag": '"fixed"', "Accept-Ranges": "bytes"}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        limit = int(argument) if kind in ("reset", "truncate", "stall") else len(body)
        header_probe = start == 0 and bool(match and match.group(2))
        if faults.fail_from is not None and not header_probe and end > faults.fail_from:
            kind, limit = "truncate", max(0, min(limit, faults.fail_from - start))
        if kind == "trickle":
            for index in range(int(argument)):
                await response.write(bytes(body[index : index + 1]))
                await asyncio.sleep(0.05)
            kind = "stall"
        elif faults.rate_bytes_per_s:
            for piece in range(0, limit, 16 << 10):
                await response.write(bytes(body[piece : min(limit, piece + (16 << 10))]))
                await asyncio.sleep(min(limit - piece, 16 << 10) / faults.rate_bytes_per_s)
        else:
            await response.write(bytes(body[:limit]))
        if kind == "reset":
            assert request.transport is not None
            request.transport.abort()
        elif kind == "truncate":
            assert request.transport is not None
            request.transport.close()
        elif kind == "stall":
            await asyncio.sleep(3600)  # cancelled when the test server stops
        return response

    app = web.Application()
    app.router.add_get("/{name}", handle)
    return app
