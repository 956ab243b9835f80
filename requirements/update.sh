#!/usr/bin/env bash
# Regenerate the locks from pyproject.toml: `bash requirements/update.sh`. Every package of
# the tree at one exact version, for every platform the markers name (one
# universal resolution, Python 3.11 and newer):
#   runtime.txt  the service alone, with hashes (the Dockerfile installs it with
#                --require-hashes)
#   test.txt     the service and the test extra (the Quick start and .ci/run install the
#                project with it as constraints: `pip install -e '.[test]' -c requirements/test.txt`)
#   bench.txt    the service, the test extra and the bench extra (`python -m bench`)
# The constraint files carry no hashes: pip checks hashes only when every requirement has
# one, and an editable install of the project itself has none.
# Pass uv's own options through, e.g. `--upgrade-package redis` to move one package and keep
# the others; with none, every package stays where the lock has it unless pyproject.toml
# asks for another version. tests/unit/test_lock.py fails when pyproject.toml and a lock
# disagree.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.10
tool="${TMPDIR:-/tmp}/report-forwarder-uv-$UV_VERSION"
[ -x "$tool/bin/uv" ] || python3 -m pip install --quiet --prefix "$tool" "uv==$UV_VERSION"
uv() { PYTHONPATH= "$tool/bin/uv" "$@"; }
compile() {
  local out="$1"; shift
  uv pip compile pyproject.toml --quiet --universal --python-version 3.11 \
    --no-emit-package setuptools --custom-compile-command "bash requirements/update.sh" \
    --output-file "requirements/$out" "$@"
}
# one resolution: the widest lock first, the others within it, so that a package any two
# of them hold is at one version in both
compile bench.txt --extra test --extra bench "$@"
compile test.txt --extra test --constraints requirements/bench.txt "$@"
compile runtime.txt --generate-hashes --constraints requirements/bench.txt "$@"
