"""`python -m fuse.zoo build DIR [--seed N] [--force]` and `python -m fuse.zoo evaluate DIR` (same as `fuse zoo`)."""

import sys

from fuse.zoo.cli import main

if __name__ == "__main__":
    sys.exit(main())
