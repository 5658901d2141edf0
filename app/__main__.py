"""`python -m app` is the `entraide` command."""

from app.cli import main

main()
