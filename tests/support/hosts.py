"""Real web servers and a caching edge for the host tests: ``tools/_support/hosts.py``, shared with the tools (which never import tests)."""

from tools._support.hosts import (
    APACHE_CONF,
    BINARIES,
    HOSTS,
    LIGHTTPD_CONF,
    NGINX_CONF,
    PACKAGES,
    RANGES,
    Host,
    HostMissing,
    binary,
    public_directory,
    start_edge,
    start_host,
)

__all__ = [
    "APACHE_CONF",
    "BINARIES",
    "HOSTS",
    "Host",
    "HostMissing",
    "LIGHTTPD_CONF",
    "NGINX_CONF",
    "PACKAGES",
    "RANGES",
    "binary",
    "public_directory",
    "start_edge",
    "start_host",
]
