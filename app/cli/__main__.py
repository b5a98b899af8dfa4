"""``python -m app.cli``: the ``tlserve`` command."""

import sys

from app.cli import main

sys.exit(main())
