"""``python -m captum_pattern``: the same command line as ``captum-pattern``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
