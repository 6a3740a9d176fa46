"""The on-disk cache, one directory per model: what is stored, what is durable, what a URL last served.

- ``files``: the layout (names written once) and the rules for touching the cache's files (no links followed).
- ``model_cache``: one model's directory: header, sparse store, journal, lock (``ModelCache``).
- ``journal``: the group commit that makes stored chunks durable before they are journaled (``GroupCommitter``).
- ``store_space``: the store's disk space, reserved block by block as verified data lands.
- ``refs``: which model a URL last served, and its ETag.
- ``reuse``: chunks a new model shares with cached ones, copied instead of downloaded.
- ``listing``: what a cache directory holds (``streamload list``) and removing it (``streamload rm``).
"""

from .files import JOURNAL_NAME, JOURNAL_RECORD, default_cache_dir
from .model_cache import ModelCache

__all__ = ["JOURNAL_NAME", "JOURNAL_RECORD", "ModelCache", "default_cache_dir"]
