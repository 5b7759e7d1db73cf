#!/usr/bin/env bash
# Creates .venv and installs unitrain (editable) with all four frameworks, ONNX export, TensorBoard
# logging, the test tools and the documentation tools. Usage: scripts/setup.sh [PYTHON]
# (default: $PYTHON or python3). Safe to run again: when nothing it depends on changed since its
# last complete run, it returns at once. The first run downloads about 1 GB and takes minutes; it
# says what it is doing as it goes.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-${PYTHON:-python3}}
stamp=.venv/.unitrain-setup

# What a set-up depends on: the requirements and pins, this script, and where the checkout is
# (the editable install and the venv's scripts hold its absolute path).
key=$(cat pyproject.toml scripts/constraints.txt scripts/setup.sh <(pwd) | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$key" ] && .venv/bin/python -c '' 2>/dev/null; then
    exit 0
fi

say() { printf 'unitrain set-up: %s\n' "$*" >&2; }
started=$SECONDS
if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $("$python" --version 2>&1) ($python)"
    "$python" -m venv .venv
fi
rm -f "$stamp"  # until this run completes, the next one starts over
pip=(.venv/bin/python -m pip install --disable-pip-version-check -c scripts/constraints.txt)
say "pinned pip, setuptools and wheel"
"${pip[@]}" -q --upgrade pip 'setuptools>=77,<81' wheel
# chainer 7.8.1 is an sdist whose setup.py imports pkg_resources; pip >= 25 no longer applies
# constraints to isolated builds, so build it against the venv's pinned setuptools instead.
say "chainer 7.8.1 (built from its source distribution)"
"${pip[@]}" -q --no-build-isolation chainer==7.8.1
say "unitrain with PyTorch, MindSpore, Chainer, ONNX, the test and documentation tools (about 1 GB the first time: minutes)"
# pip's own lines say what it downloads and builds; those about what is already there are noise.
"${pip[@]}" -e '.[all,test,docs]' | { grep -v '^Requirement already satisfied' >&2 || true; }
echo "$key" >"$stamp"
say "done in $((SECONDS - started)) s; .venv is ready"
