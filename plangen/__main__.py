"""`python -m plangen` is the `plangen` command."""

import sys

from plangen.cli import main

sys.exit(main())
