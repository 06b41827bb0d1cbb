#!/usr/bin/env bash
# The CUDA checks of one device session, as recorded in benchmarks/RESULTS.md: the
# CUDA-parametrized tests of the flat layout and train step, then the benchmarks, one
# size each. Run from the repository root; wheels missing there (optree) in .whl/.
# Logs go to $OUT (or ./cuda-logs).
set -uo pipefail
out=${OUT:-cuda-logs}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, optree; print('torch', torch.__version__, 'optree', optree.__version__)"
run() {  # name, timeout in s, command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt" | grep -v "^  ready:"
}
cd benchmarks
run step_adamw 150 python3 bench_step.py --device cuda --sizes 100M --cases flat,combo,foreach
run step_sgd 80 python3 bench_step.py --device cuda --sizes 100M --optimizer sgd --cases flat
cd ..
run tests 120 python3 -m pytest -q -p no:cacheprovider -k cuda ${TESTS:-tests/test_flat.py tests/test_adapter_flat.py}
cd benchmarks
for extra in ${EXTRA:-}; do
    run "$extra" 150 python3 "$extra.py" --device cuda ${EXTRA_ARGS:-}
done
