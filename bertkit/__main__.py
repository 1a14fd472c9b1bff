"""``python -m bertkit``: the same command line as the ``bertkit`` script."""

import sys

from .cli import main

sys.exit(main())
