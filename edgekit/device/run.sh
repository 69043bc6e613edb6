#!/bin/sh
# Run this bundle's model with its venv (after install.sh):
#   ./run.sh predict INPUT.npy OUTPUT.npy     ./run.sh bench [--runs 100] [--threads 4]     ./run.sh info
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
LAUNCH="${EDGEKIT_LAUNCHER:-}"
PY="$HERE/venv/bin/python"
[ -x "$PY" ] || { echo "run.sh: run install.sh first" >&2; exit 3; }
# the model's file name comes from manifest.json as data (never pasted into this script)
MODEL=$($LAUNCH "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["artifact"]["path"])' \
    "$HERE/manifest.json") || { echo "run.sh: cannot read manifest.json" >&2; exit 3; }
MODEL="$HERE/$MODEL"
if [ -f "$HERE/build_engine.py" ]; then  # TensorRT: the engine is built on first start, ONNX if that fails
    ENGINE=$($LAUNCH "$PY" "$HERE/build_engine.py" --print-path) && MODEL="$ENGINE" || \
        echo "run.sh: no TensorRT engine (see above); running the ONNX fallback with ONNX Runtime" >&2
fi
[ $# -ge 1 ] || { echo "usage: run.sh predict IN.npy OUT.npy | bench [...] | info" >&2; exit 2; }
CMD=$1; shift
case "$CMD" in
    predict|bench) exec $LAUNCH "$PY" "$HERE/runner.py" "$CMD" "$MODEL" "$@" ;;
    *) exec $LAUNCH "$PY" "$HERE/runner.py" "$CMD" "$@" ;;
esac
