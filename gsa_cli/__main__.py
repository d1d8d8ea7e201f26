"""``python -m gsa_cli``: the same program as the ``gsa`` console script."""

from gsa_cli.cli.app import main

if __name__ == "__main__":
    main()
