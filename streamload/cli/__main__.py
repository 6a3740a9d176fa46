"""``python -m streamload.cli``."""

import sys

from . import main

sys.exit(main())
