"""A deliberately misbehaving static host for fault tests: real sockets, scripted faults."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from aiohttp import web


@dataclasses.dataclass
class Faults:
    corrupt_range: tuple[int, int] | None = None  # file offsets [start, end) whose bytes get flipped
    corrupt_times: int = 0  # how many responses carry the corruption (a large number: always)
    requests: list[str] = dataclasses.field(default_factory=list)  # Range header of every GET, "" for none


def faulty_app(path: Path, faults: Faults) -> web.Application:
    data = path.read_bytes()

    async def handle(request: web.Request) -> web.StreamResponse:
        header = request.headers.get("Range", "")
        faults.requests.append(header)
        start, end, status = 0, len(data), 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", header)
        if match:
            start = int(match.group(1))
            end = min(len(data), int(match.group(2)) + 1) if match.group(2) else len(data)
            status = 206
        body = bytearray(data[start:end])
        if faults.corrupt_range and faults.corrupt_times > 0:
            lo, hi = faults.corrupt_range
            if start <= lo < end:
                body[lo - start] ^= 0xFF
                faults.corrupt_times -= 1
        headers = {"Content-Length": str(len(body)), "ETag": '"fixed"'}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        return web.Response(status=status, body=bytes(body), headers=headers)

    app = web.Application()
    app.router.add_get("/{name}", handle)
    return app
