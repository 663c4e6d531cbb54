"""`python -m localgemma ...`: the same as the `localgemma` command."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="localgemma")
