"""Subcommands of ``bertkit`` that are too long for ``bertkit/cli.py`` (which keeps the table and ``main``)."""

import argparse


# The one argparse type for counts, shared by every subcommand (bertkit.cli, pipelines, serving).
def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number
