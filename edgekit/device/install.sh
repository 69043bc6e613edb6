#!/bin/sh
# Install this edgekit bundle on the device: a venv in ./venv, the runtime from ./wheels, offline.
#   sh install.sh                     PYTHON=python3.11 sh install.sh
# EDGEKIT_LAUNCHER prefixes every python call, e.g. "qemu-aarch64-static -L SYSROOT" to install into an
# emulated arm64 userland on an x86_64 machine.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE"
PYTHON="${PYTHON:-python3}"
LAUNCH="${EDGEKIT_LAUNCHER:-}"
# No value of the bundle is pasted into this script: the Python version comes from manifest.json and the
# requirements from requirements.txt (read by pip, never by the shell), so a hostile report cannot inject shell.
HAVE=$($LAUNCH $PYTHON -c 'import sys; print("%d.%d" % sys.version_info[:2])') || {
    echo "install.sh: cannot run $PYTHON on this device (set PYTHON=/path/to/python3)" >&2; exit 3; }
WANT=$($LAUNCH $PYTHON -c 'import json; print(json.load(open("manifest.json"))["python_version"])') || {
    echo "install.sh: cannot read manifest.json" >&2; exit 3; }
VENV_FLAGS=""
[ ! -f build_engine.py ] || VENV_FLAGS="--system-site-packages"  # JetPack's tensorrt lives in the system Python
if [ -d wheels ] && [ "$HAVE" != "$WANT" ]; then
    echo "install.sh: this bundle's wheels are for Python $WANT, but $PYTHON is Python $HAVE; rebuild the" \
         "bundle with python_version=$HAVE (edgekit deploy --python $HAVE) or set PYTHON" >&2
    exit 3
fi
rm -rf venv.partial
$LAUNCH $PYTHON -m venv --without-pip $VENV_FLAGS venv.partial || {
    echo "install.sh: '$PYTHON -m venv' failed (Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 3; }
VPY="$HERE/venv.partial/bin/python"
if [ -d wheels ]; then
    PIPWHL=$(ls wheels/pip-*.whl 2>/dev/null | head -n 1)
    [ -n "$PIPWHL" ] || { echo "install.sh: wheels/ has no pip wheel" >&2; exit 3; }
    # only the bundle's wheels: no index, and no pip configuration of this machine (extra indexes, constraints)
    PIP_CONFIG_FILE=/dev/null $LAUNCH "$VPY" "$HERE/$PIPWHL/pip" install --quiet --disable-pip-version-check \
        --no-warn-script-location --no-index --find-links "$HERE/wheels" -r "$HERE/requirements.txt"
else
    $LAUNCH "$VPY" -m ensurepip --upgrade >/dev/null
    $LAUNCH "$VPY" -m pip install --quiet --disable-pip-version-check -r "$HERE/requirements.txt"
fi
$LAUNCH "$VPY" "$HERE/runner.py" info > runner-info.json
rm -rf venv
mv venv.partial venv
# the venv was made as venv.partial: point its scripts (activate, entry points' shebangs) at its final place
for f in venv/bin/* venv/pyvenv.cfg; do
    if [ -f "$f" ] && [ ! -L "$f" ] && grep -q "venv[.]partial" "$f" 2>/dev/null; then
        sed "s#venv[.]partial#venv#g" "$f" > "$f.tmp" && chmod --reference="$f" "$f.tmp" 2>/dev/null
        mv "$f.tmp" "$f"
    fi
done
echo "install.sh: installed into $HERE/venv (Python $HAVE): $(tr "\\n" " " < requirements.txt)"
