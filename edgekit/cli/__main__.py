"""`python -m edgekit.cli`: the `edgekit` command."""
from . import main

if __name__ == "__main__":
    main()
