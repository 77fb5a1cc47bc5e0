"""``python -m refimpl``: the ``refimpl`` command line (:mod:`refimpl.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
