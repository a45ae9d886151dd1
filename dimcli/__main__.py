"""`python -m dimcli` runs the `dim` command line (torchrun uses this form)."""

from dimcli.cli import main

main()
