#!/usr/bin/env python3
"""Generate the demo corpus: 5 heavy-tailed multimodal sources with real encoded images.

    python scripts/make_dataset.py --out DIR [--samples N] [--seed S] [--corrupt-fraction F]

The generator lives in ``fabricd.corpus`` (importable by tests and benchmarks); this is its CLI.
"""

import sys

from fabricd.corpus import main

if __name__ == "__main__":
    sys.exit(main())
