"""``python -m diffsolve`` runs the command line."""

from diffsolve.app.cli import main

main()
