#!/usr/bin/env bash
# All the set-up on a fresh machine, in .venv, then one thing:
#   ./bootstrap.sh quick [ARGS]   install bench, then `bench run mnist --profile quick --results results-local ARGS`:
#                                 the quick MNIST ladder, trained into a folder of its own (results/ holds the published
#                                 runs, which count as done); MNIST is downloaded into ./data unless $BENCH_DATA or
#                                 --data-root names a folder
#   ./bootstrap.sh test [ARGS]    install bench with its test extras, then ruff and `python -m pytest ARGS`
#                                 (the fast suite; .ci/run is this command)
# Environment:
#   PYTHON             the Python (3.11+) that makes the venv (default: python3)
#   BENCH_TORCH_INDEX  where torch comes from: a package index URL, or "pip" for pip's own configuration.  Default:
#                      PyTorch's CPU wheels when there is no NVIDIA GPU (nvidia-smi), since the default wheels pull
#                      about 6 GB of CUDA libraries a CPU cannot use; pip's own configuration otherwise.
set -euo pipefail
cd "$(dirname "$0")"

mode="${1:-}"
case "$mode" in
    quick) extras="" ;;
    test) extras="[dev,mlflow]" ;;  # mlflow: so that the MLflow tests run (without it they are skipped)
    *) echo "usage: ./bootstrap.sh quick|test [ARGS...]" >&2; exit 2 ;;
esac
shift

if [ "$mode" = test ] && [ "${BENCH_NO_POSTGRES:-}" != 1 ] \
        && ! command -v initdb >/dev/null 2>&1 && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
    # Some tests start a throwaway PostgreSQL server of their own (tests/postgres.py): they need its binaries
    # (initdb, pg_ctl), not a running service.
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "error: the tests need PostgreSQL's server binaries (initdb, pg_ctl): install them, or set" \
             "BENCH_NO_POSTGRES=1 to skip those tests" >&2
        exit 2
    fi
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql
fi

"${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip

default_index=pip
if ! command -v nvidia-smi >/dev/null 2>&1; then default_index=https://download.pytorch.org/whl/cpu; fi
index="${BENCH_TORCH_INDEX:-$default_index}"
if [ "$index" != pip ]; then
    # torch and torchvision as pyproject.toml pins them, from that index; the install below then keeps them
    mapfile -t torch < <(python -c 'import re, tomllib
for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    if re.match(r"torch(vision)?\b", d): print(d)')
    python -m pip install --quiet "${torch[@]}" --index-url "$index"
fi
python -m pip install --quiet -e ".$extras"

if [ "$mode" = quick ]; then
    exec bench run mnist --profile quick --results results-local "$@"
fi
python -m pip list 2>/dev/null | grep -iE '^(torch|torchvision|onnx|onnxruntime|optuna|mlflow) ' || true
ruff check bench exporters tests scripts
ruff format --check bench exporters tests scripts
exec python -m pytest "$@"
