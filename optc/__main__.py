"""`python -m optc` runs the command line."""

import sys

from optc.cli import main

sys.exit(main())
