"""`python -m omnilab` = the `omnilab` command."""

from omnilab.cli import main

main()
