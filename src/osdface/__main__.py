"""``python -m osdface`` (and ``accelerate launch -m osdface ...``) runs the CLI."""

import sys

from .cli import main

sys.exit(main())
