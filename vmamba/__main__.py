"""``python -m vmamba ...`` == the ``vmamba`` command."""

import sys

from vmamba.cli import main

if __name__ == "__main__":
    sys.exit(main())
