#!/usr/bin/env bash
# Creates .venv and installs unitrain (editable) with all four frameworks and the test tools.
# Usage: scripts/setup.sh [PYTHON]   (default: python3). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q -c scripts/constraints.txt)
"${pip[@]}" --upgrade pip 'setuptools>=77,<81' wheel
# chainer 7.8.1 is an sdist whose setup.py imports pkg_resources; pip >= 25 no longer applies
# constraints to isolated builds, so build it against the venv's pinned setuptools instead.
"${pip[@]}" --no-build-isolation chainer==7.8.1
"${pip[@]}" -e '.[all,test]'
