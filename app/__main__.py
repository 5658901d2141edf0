"""`python -m app` is the `entraide` command."""

from app.launch import main

main()
