"""``python -m benchmarks.bench`` = ``tlserve bench``: the measurement code lives in :mod:`app.bench`.

python -m benchmarks.bench [--quick] [--out benchmarks/out] [--model-store DIR] [--sweep]
"""

from __future__ import annotations

import sys

from app.bench import cli

if __name__ == "__main__":
    sys.exit(cli())
