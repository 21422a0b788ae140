"""`python -m labtune.cli ...`: the `labtune` command."""

from labtune.cli import main

main()
