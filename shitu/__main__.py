"""``python -m shitu`` runs the command line."""

from shitu.cli import main

main()
