"""``python -m diffsolve`` runs the command line."""

from diffsolve.cli import main

main()
