#!/usr/bin/env bash
# Every GPU measurement of BENCHMARKS.md in one run (issue 20, item 5), in under 8 minutes on one GPU:
#
#   bash bench/gpu_check.sh                 # writes its tables into BENCHMARKS.md
#   bash bench/gpu_check.sh OTHER.md        # ... or into another file
#
# Stages, each with its own time limit (460 s together) and each writing its own table:
#   1. kernel correctness: the GPU tests of tests/hooks (the fused kernel against the float64 reference, compiled;
#      recorded and unrecorded steps with no hidden host synchronisation)
#   2. the step table with host synchronisations counted, the read-bandwidth floor and the GPU targets:
#      bench/bench_step.py --device cuda
#   3. launches: bench/count_ops.py --fused, the fused kernel run on CUDA while its launches are counted
#   4. the fused kernel's time against the read floor and the torch path: bench/bench_fused.py
# A failing stage does not stop the later ones (each table is independent); the script then exits 1, naming it.
# Without CUDA (or without triton) it stops at once with exit status 2.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out="${1:-BENCHMARKS.md}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # the compiled kernels, not the interpreter

python - <<'EOF' || exit 2
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA device (torch.cuda.is_available() is False): run it on a GPU machine")
try:
    import triton
except ImportError:
    sys.exit("gpu_check.sh: triton does not import: pip install 'actdiag[gpu]'")
print(f"gpu_check.sh: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton.__version__}")
EOF

failed=()
stage() {  # stage NAME SECONDS COMMAND...
    local name="$1" limit="$2" start=$SECONDS
    shift 2
    echo "== ${name} (at most ${limit}s): $*"
    if ! timeout --kill-after=10 "$limit" "$@"; then
        echo "gpu_check.sh: stage '${name}' failed or ran past ${limit}s" >&2
        failed+=("$name")
    fi
    echo "== ${name}: $((SECONDS - start))s"
}

# bench_step.py writes its table after each model: a run cut short by its limit keeps what it measured.
stage "kernel correctness" 90 python -m pytest -q -p no:cacheprovider -m gpu tests/hooks
stage "steps" 270 python bench/bench_step.py --device cuda --rounds 4 --warmup 5 --peer-block 2 --write "$out"
stage "launches" 60 python bench/count_ops.py --fused --device cuda --write "$out"
stage "fused kernel time" 40 python bench/bench_fused.py --write "$out"

echo "gpu_check.sh: ${SECONDS}s in all; tables written to ${out}"
if ((${#failed[@]})); then
    echo "gpu_check.sh: failed: ${failed[*]}" >&2
    exit 1
fi
