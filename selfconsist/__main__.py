"""``python -m selfconsist`` is the ``selfconsist`` command."""

from .cli import main

main()
