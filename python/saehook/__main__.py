"""`python -m saehook` runs the command line (the same as the `saehook` command)."""
import sys

from .cli import main

sys.exit(main())
