"""Bytes from where a model lives: the contract every source implements, and the HTTP receive paths.

- ``source``: the ``Source`` / ``SpanReader`` contract, the one place transport failures are mapped, the local file.
- ``http_source``: a model URL on any HTTP server (``HttpSource``), each request on the socket path when it can.
- ``rawhttp``: the fast path: one ranged GET on a plain socket whose body pool threads read.
- ``aiohttp_source``: the general path (TLS, proxies, a borrowed session): aiohttp on the event loop.
- ``httputil``: what both paths share: Range, Content-Range, status mapping, Retry-After, backoff, URL checks.
- ``ratelimit``: one download's bandwidth cap, shared by every connection and mirror.
"""
