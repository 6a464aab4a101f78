"""`python -m spotbox` is the `spotbox` command."""

from spotbox.cli import main

main()
