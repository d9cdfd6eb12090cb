"""``python -m medfcn``: the ``medfcn`` command, for environments without the console script."""

from medfcn.cli import main

main()
