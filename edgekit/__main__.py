"""`python -m edgekit` (and `torchrun ... -m edgekit`): the same CLI as the `edgekit` command."""
from .cli import main

if __name__ == "__main__":
    main()
