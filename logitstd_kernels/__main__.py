"""``python -m logitstd_kernels <command>``: see ``logitstd_kernels.cli``."""

import sys

from .cli import main

sys.exit(main())
