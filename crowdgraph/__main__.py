"""``python -m crowdgraph`` is the ``crowdgraph`` command."""

import sys

from .cli import main

sys.exit(main())
