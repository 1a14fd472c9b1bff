"""``python -m bertkit.train finetune|pretrain ...`` (the form ``torchrun -m`` needs)."""

import sys

from .cli import main

sys.exit(main())
