"""``python -m streambroker``: the command-line tool."""

from .apps.cli import main

main()
