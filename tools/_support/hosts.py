"""The static hosts users put .slm files on, each started for real on a loopback port, and a caching edge.

``start_host(kind, work, root)`` runs one of ``HOSTS`` serving ``root``, with its access log in ``work``
(Caddy's is JSON on its stderr; ``python -m http.server`` writes one line per request on its stderr;
lighttpd buffers its log until it stops, so read ``statuses()`` after ``stop()``). ``start_edge`` runs
Varnish in front of an origin, caching, as a CDN edge does. ``root`` must be readable by other users:
Apache drops root's privileges to ``nobody`` (``public_directory`` makes one).

A missing binary raises ``HostMissing``, which the tests turn into a skip (a failure under CI, whose
``.ci/run`` installs the packages). Stdlib only: tools/bench_hosts.py imports it too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .ports import free_port, wait_for_port

HOSTS = ("nginx", "caddy", "apache", "lighttpd", "python")
RANGES = {"nginx": True, "caddy": True, "apache": True, "lighttpd": True, "python": False}  # what each host does with Range
PACKAGES = {"nginx": "nginx-light", "caddy": "caddy", "apache": "apache2", "lighttpd": "lighttpd", "varnish": "varnish"}
BINARIES = {"nginx": "nginx", "caddy": "caddy", "apache": "apache2", "lighttpd": "lighttpd", "varnish": "varnishd"}

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {work}/access.log;
    client_body_temp_path {work}/tmp-body;
    proxy_temp_path {work}/tmp-proxy;
    fastcgi_temp_path {work}/tmp-fastcgi;
    uwsgi_temp_path {work}/tmp-uwsgi;
    scgi_temp_path {work}/tmp-scgi;
    types {{ application/octet-stream slm; }}
    sendfile on;
    tcp_nopush off;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        {ranges}
        location / {{ }}
    }}
}}
"""

# Debian's apache2 has log_config and unixd built in; mime types from no file: .slm goes out untyped
APACHE_CONF = """
ServerRoot /usr/lib/apache2
LoadModule mpm_event_module modules/mod_mpm_event.so
LoadModule authz_core_module modules/mod_authz_core.so
LoadModule mime_module modules/mod_mime.so
TypesConfig /dev/null
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
PidFile {work}/httpd.pid
Mutex file:{work} default
ErrorLog {work}/error.log
LogFormat "%h \\"%r\\" %>s %b" small
CustomLog {work}/access.log small
DocumentRoot {root}
<Directory {root}>
    Require all granted
</Directory>
User nobody
Group nogroup
"""

LIGHTTPD_CONF = """
server.document-root = "{root}"
server.bind = "127.0.0.1"
server.port = {port}
server.errorlog = "{work}/error.log"
server.modules = ("mod_accesslog")
accesslog.filename = "{work}/access.log"
accesslog.format = "%h \\"%r\\" %>s %b"
mimetype.assign = (".slm" => "application/octet-stream")
"""


class HostMissing(RuntimeError):
    """The host's binary is not installed."""


@dataclasses.dataclass
class Host:
    kind: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path | None  # the access log (Caddy, python: the stderr holding it)

    def url(self, name: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def statuses(self) -> list[str]:
        """The status of every GET in the access log, in order."""
        if self.log is None or not self.log.exists():
            return []
        if self.kind == "caddy":
            entries = [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]
            return [str(e["status"]) for e in entries if e.get("logger") == "http.log.access" and e["request"]["method"] == "GET"]
        # nginx's combined format, Apache's and lighttpd's as configured above, http.server's: ... "GET /x HTTP/1.1" 206 ...
        lines = [line for line in self.log.read_text().splitlines() if '"GET ' in line]
        return [line.split('"')[2].split()[0] for line in lines]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def binary(kind: str) -> str:
    name = BINARIES[kind]
    found = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)
    if found is None:
        raise HostMissing(f"{name} is not installed (apt-get install {PACKAGES[kind]})")
    return found


def public_directory(files: list[Path]) -> Path:
    """A fresh directory others may read (mode 755, files 644) holding copies of files; the caller removes it."""
    directory = Path(tempfile.mkdtemp(prefix="streamload-www-"))
    directory.chmod(0o755)
    for path in files:
        shutil.copy(path, directory / path.name)
        (directory / path.name).chmod(0o644)
    return directory


def start_host(kind: str, work: Path, root: Path, *, ranges: bool = True) -> Host:
    """Start ``kind`` (one of HOSTS) serving ``root`` on a free loopback port; returns once it accepts connections."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log: Path | None = work / "access.log"
    stderr: int | Path = subprocess.DEVNULL
    env = None
    if kind == "nginx":
        conf = work / "nginx.conf"
        conf.write_text(NGINX_CONF.format(work=work, port=port, root=root, ranges="" if ranges else "max_ranges 0;"))
        command = [binary(kind), "-p", str(work), "-c", str(conf), "-e", str(work / "error.log")]
    elif kind == "caddy":
        command = [binary(kind), "file-server", "--root", str(root), "--listen", f"127.0.0.1:{port}", "--access-log"]
        stderr = log = work / "caddy.log"
        env = os.environ | {"HOME": str(work), "XDG_DATA_HOME": str(work), "XDG_CONFIG_HOME": str(work)}  # its storage, not ~
    elif kind == "apache":
        conf = work / "httpd.conf"
        conf.write_text(APACHE_CONF.format(work=work, port=port, root=root))
        command = [binary(kind), "-f", str(conf), "-DFOREGROUND"]
    elif kind == "lighttpd":
        conf = work / "lighttpd.conf"
        conf.write_text(LIGHTTPD_CONF.format(work=work, port=port, root=root))
        command = [binary(kind), "-D", "-f", str(conf)]
    elif kind == "python":
        command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)]
        stderr = log = work / "http.server.log"
    else:
        raise ValueError(f"unknown host {kind!r}; one of {HOSTS}")
    return _start(kind, command, port, work, log, stderr, env)


def start_edge(work: Path, origin_port: int, *, cache_bytes: int = 256 << 20) -> Host:
    """Varnish caching everything from the origin at 127.0.0.1:origin_port (its default VCL: a CDN edge)."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [binary("varnish"), "-F", "-j", "none", "-n", str(work / "varnish"), "-T", "none"]
    command += ["-a", f"127.0.0.1:{port}", "-b", f"127.0.0.1:{origin_port}", "-s", f"malloc,{cache_bytes}"]
    return _start("varnish", command, port, work, None, work / "varnishd.log", None)


def _start(kind: str, command: list[str], port: int, work: Path, log: Path | None, stderr: int | Path, env: dict[str, str] | None) -> Host:
    err = open(stderr, "ab") if isinstance(stderr, Path) else stderr  # noqa: SIM115 - the child keeps it
    try:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=work)
    finally:
        if not isinstance(err, int):
            err.close()
    try:
        wait_for_port(port, 20.0)
        return Host(kind, port, process, log)
    except TimeoutError:
        pass
    process.kill()
    process.wait()
    errors = "\n".join(p.read_text(errors="replace")[-2000:] for p in work.glob("*.log"))
    raise RuntimeError(f"{kind} did not start on port {port}: {errors}")
