"""``python -m natskv``: the ``natskv`` command (see natskv.cli)."""

import sys

from natskv.cli import main

if __name__ == "__main__":
    sys.exit(main())
