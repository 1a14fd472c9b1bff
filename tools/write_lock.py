"""Writes requirements/test.lock from `pip freeze` output on stdin (used by `make upgrade-references`).

Local version labels are dropped (`torch==2.13.0+cpu` -> `torch==2.13.0`): `==2.13.0` still matches the
CPU build where an extra index offers it, and matches the plain PyPI build where it does not.
"""

import sys
from datetime import date

HEADER = """\
# Exact versions of everything `make test` installs: the test-only references (transformers,
# sentence-transformers, onnxruntime, ...), the tools (pytest, hypothesis) and their dependencies.
# Used as a pip constraints file (-c) by the Makefile, so a clone tested today installs the same
# thing next month. bertkit's own runtime requirements stay ranges in pyproject.toml.
#
# Do not edit versions by hand: `make upgrade-references` re-resolves the newest releases, runs the
# whole suite against them and rewrites this file only if it passes. A number that changes after an
# upgrade is a finding to investigate, never a tolerance to loosen (README, "Upgrading the references").
# Written {today}.
"""


def main() -> None:
    pins = []
    for line in sys.stdin:
        line = line.strip()
        if not line or line.startswith(("#", "-e ")) or "==" not in line:
            continue  # editable bertkit itself, comments, direct URLs
        name, version = line.split("==", 1)
        if name.lower() == "bertkit":
            continue
        pins.append(f"{name}=={version.split('+', 1)[0]}")
    sys.stdout.write(HEADER.format(today=date.today().isoformat()))
    sys.stdout.write("\n".join(sorted(pins, key=str.lower)) + "\n")


if __name__ == "__main__":
    main()
