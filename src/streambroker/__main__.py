"""``python -m streambroker``: the command-line tool."""

from .cli import main

main()
