"""``python -m fabricd run --config PATH`` — same as the ``fabricd`` command."""

from .cli import fabricd_main

fabricd_main()
