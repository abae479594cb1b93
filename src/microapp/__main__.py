"""`python -m microapp` is the `microapp` command."""

import sys

from microapp.cli import main

sys.exit(main())
