"""A model hub and an object store on two loopback ports, as Hugging Face and S3 presigned URLs behave.

The hub answers ``GET /models/NAME`` with 302 to ``/resolve/NAME`` on itself (the same origin: the
caller's token still goes there), which answers 302 to the store on another host and port
(``localhost``, not ``127.0.0.1``) with a signed query string: ``?expires=UNIX_MS&signature=HMAC``
(milliseconds, so that a test can let one expire quickly).
With ``Hub.token`` set, both hub paths want ``Authorization: Bearer TOKEN`` (401 otherwise).

The store serves the directory with Range, like S3: 403 once the signature has expired or when it does
not match, 400 when a request carries both a signature and an Authorization header (S3's "only one
auth mechanism allowed"). ``Store.cut_after_bytes`` ends each response after that many body bytes,
``cut_delay_s`` later, so that the client must ask again (and, with a short expiry, resolve again).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import re
import time
from pathlib import Path

from aiohttp import web

SECRET = b"test-signing-key"


def sign(path: str, expires: int) -> str:
    return hmac.new(SECRET, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()


@dataclasses.dataclass
class Store:
    directory: Path
    cut_after_bytes: int | None = None
    cut_delay_s: float = 0.0
    log: list[tuple[int, str, str | None]] = dataclasses.field(default_factory=list)  # (status, Range, Authorization)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{name}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        status, response = await self._answer(request)
        self.log.append((status, request.headers.get("Range", ""), request.headers.get("Authorization")))
        return response

    async def _answer(self, request: web.Request) -> tuple[int, web.StreamResponse]:
        expires, signature = request.query.get("expires", ""), request.query.get("signature", "")
        if "Authorization" in request.headers:
            return 400, web.Response(status=400, text="Only one auth mechanism allowed")
        if not expires.isdigit() or not hmac.compare_digest(signature, sign(request.path, int(expires))):
            return 403, web.Response(status=403, text="SignatureDoesNotMatch")
        if time.time() * 1000 > int(expires):
            return 403, web.Response(status=403, text="Request has expired")
        path = self.directory / request.match_info["name"]
        if not path.is_file():
            return 404, web.Response(status=404)
        data = path.read_bytes()
        start, end, status = 0, len(data), 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
            end = min(len(data), int(match.group(2)) + 1) if match.group(2) else len(data)
            status = 206
        headers = {"Content-Length": str(end - start), "ETag": f'"{hashlib.md5(data).hexdigest()}"', "Accept-Ranges": "bytes"}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        body = memoryview(data)[start:end]
        if self.cut_after_bytes is not None and len(body) > self.cut_after_bytes:
            await response.write(bytes(body[: self.cut_after_bytes]))
            await asyncio.sleep(self.cut_delay_s)
            assert request.transport is not None
            request.transport.close()
        else:
            await response.write(bytes(body))
        return status, response


@dataclasses.dataclass
class Hub:
    store_port: int
    token: str | None = None
    expiry_s: float = 3600.0
    loop_forever: bool = False  # /models/NAME redirects to itself: a redirect loop
    log: list[tuple[str, int, str | None]] = dataclasses.field(default_factory=list)  # (path, status, Authorization)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/models/{name}", self.models)
        app.router.add_get("/resolve/{name}", self.resolve)
        return app

    def _refuse(self, request: web.Request) -> web.Response | None:
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.Response(status=401, text="a token is needed for this private model")
        return None

    async def models(self, request: web.Request) -> web.Response:
        refusal = self._refuse(request)
        location = request.path if self.loop_forever else f"/resolve/{request.match_info['name']}"
        response = refusal or web.Response(status=302, headers={"Location": location})
        self.log.append((request.path, response.status, request.headers.get("Authorization")))
        return response

    async def resolve(self, request: web.Request) -> web.Response:
        refusal = self._refuse(request)
        path = f"/{request.match_info['name']}"
        expires = int((time.time() + self.expiry_s) * 1000)
        location = f"http://localhost:{self.store_port}{path}?expires={expires}&signature={sign(path, expires)}"
        response = refusal or web.Response(status=302, headers={"Location": location})
        self.log.append((request.path, response.status, request.headers.get("Authorization")))
        return response
