#!/usr/bin/env bash
# Creates .venv and installs unitrain with all four frameworks and the test tools.
# Usage: scripts/setup.sh [PYTHON]   (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# chainer is an sdist: its isolated build env must get setuptools<81 too, hence PIP_CONSTRAINT.
export PIP_CONSTRAINT="$PWD/scripts/constraints.txt"
.venv/bin/python -m pip install -q --upgrade pip 'setuptools>=77,<81' wheel
.venv/bin/python -m pip install -q -e '.[all,test]'
