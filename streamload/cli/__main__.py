"""``python -m streamload.cli``."""

from . import entry

entry()
