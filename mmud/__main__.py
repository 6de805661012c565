"""`python -m mmud run …`."""

import sys

from mmud.cli import main

if __name__ == "__main__":  # the spawned simulation process imports this module too
    sys.exit(main())
