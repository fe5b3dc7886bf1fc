#!/usr/bin/env bash
# The GPU check: one command on a CUDA machine, run before anything else on the first GPU we get.
#
#   bash benchmarks/gpu_check.sh             # on a CUDA machine: tests + benchmarks, dated figures -> docs/benchmarks.md
#   bash benchmarks/gpu_check.sh --dry-run   # anywhere: the same steps' CPU stand-ins, nothing written
#
# Steps (each runs even if an earlier one failed; the exit status is non-zero if any failed):
#   1. the CUDA test cases: tests/kernels (Triton kernels on the GPU, bf16 / fp16 cases included; they run
#      in the interpreter or skip on a CPU-only machine) and the core dispatch / decode tests, every marker
#      selected (-m "gpu or not gpu"), skips listed (-rs) so a skipped CUDA case is visible;
#   2. python -m benchmarks.scan --sections gpu      (Triton scan / SSD time and bandwidth vs peak, dated);
#   3. python -m benchmarks.decode --device cuda     (whole-model decode on the GPU: hiss module step vs HF);
#   4. python -m benchmarks.vision --device cuda ... (Vim-Ti vs DeiT-Ti against resolution, bf16, batch 8: the GPU
#      rows of docs/vision.md's scaling table -> docs/img/vision_scaling_cuda.{json,md,png});
#   5. a dated summary block (device, versions, each step's result) in docs/benchmarks.md (<!-- gpu_check -->).
# Logs of every step: $HISS_GPU_CHECK_LOGS (default runs/gpu_check/<UTC date-time>/).
# Without a CUDA device (and without --dry-run) it stops at once with exit status 2 and says so.
set -u -o pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; elif [ $# -gt 0 ]; then echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 64; fi
PY=${PYTHON:-python}
STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
LOGS=${HISS_GPU_CHECK_LOGS:-runs/gpu_check/$STAMP}
mkdir -p "$LOGS"

if ! DEVICE=$($PY - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(1)
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)")
EOF
); then
  if [ $DRY -eq 0 ]; then
    {
      echo "gpu_check: NO CUDA DEVICE HERE - nothing was checked."
      echo "  torch.cuda.is_available() is False (torch $($PY -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>/dev/null))."
      echo "  Run this on a machine with an NVIDIA GPU and a CUDA build of torch + triton,"
      echo "  or 'bash benchmarks/gpu_check.sh --dry-run' to exercise the steps on CPU."
    } >&2
    exit 2
  fi
  DEVICE="none (dry run on CPU)"
fi
echo "gpu_check: device: $DEVICE; logs: $LOGS"

declare -a NAMES RESULTS
FAILED=0
step() {  # step NAME COMMAND...: run, log, record the result and the log's last line
  local name=$1; shift
  local log="$LOGS/${name// /_}.log"
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" >"$log" 2>&1
  local rc=$?
  local last; last=$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-200)
  local res="ok"
  if [ $rc -ne 0 ]; then res="FAILED (exit $rc)"; FAILED=1; fi
  echo "   $res in $((SECONDS - t0)) s: $last"
  NAMES+=("$name"); RESULTS+=("$res, $((SECONDS - t0)) s: \`$last\`")
}

if [ $DRY -eq 0 ]; then
  step "cuda tests" $PY -m pytest tests/kernels tests/core/test_backend.py tests/core/test_fast_decode.py \
    -m "gpu or not gpu" -rs -q -p no:cacheprovider
  step "scan gpu" $PY -m benchmarks.scan --sections gpu
  step "decode cuda" $PY -m benchmarks.decode --device cuda
  step "vision cuda" $PY -m benchmarks.vision --sizes 224 512 1024 1248 --device cuda --batch 8 --dtype bf16 \
    --out docs/img/vision_scaling_cuda
else
  step "cuda tests (collect only)" $PY -m pytest tests/kernels/test_kernels_triton.py -m "gpu or not gpu" \
    --collect-only -q -p no:cacheprovider
  step "scan gpu (dry run)" $PY -m benchmarks.scan --sections gpu --gpu-dry-run
  step "decode (quick, CPU)" $PY -m benchmarks.decode --quick
  step "vision (64 px, CPU)" $PY -m benchmarks.vision --sizes 64 --repeats 1 --threads 1
fi

SUMMARY=$($PY - "$DEVICE" "$STAMP" "$DRY" "$LOGS" "${#NAMES[@]}" "${NAMES[@]}" "${RESULTS[@]}" <<'EOF'
import sys
device, stamp, dry, logs, n = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4], int(sys.argv[5])
names, results = sys.argv[6:6 + n], sys.argv[6 + n:6 + 2 * n]
lines = [f"Run {stamp} on {device} (`bash benchmarks/gpu_check.sh`; logs in `{logs}`).", "",
         "| step | result |", "| --- | --- |"] + [f"| {a} | {b.replace('|', '/')} |" for a, b in zip(names, results)]
body = "\n".join(lines)
print(body)
if not dry:
    from pathlib import Path
    from benchmarks._doc import write_section
    write_section(Path("docs/benchmarks.md"), "gpu_check", "## GPU check\n\n" + body)
EOF
)
echo "$SUMMARY"
if [ $FAILED -ne 0 ]; then echo "gpu_check: some steps FAILED (see $LOGS)" >&2; exit 1; fi
echo "gpu_check: all steps passed"
