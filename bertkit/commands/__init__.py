"""Subcommands of ``bertkit`` that are too long for ``bertkit/cli.py`` (which keeps the table and ``main``)."""
