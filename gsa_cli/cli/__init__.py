"""The ``gsa`` command line (:mod:`gsa_cli.cli.app`); nothing in the package imports it."""
