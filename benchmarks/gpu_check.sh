#!/usr/bin/env bash
# GPU check of userllm, run from the repository root on a machine with a CUDA GPU:
#   bash benchmarks/gpu_check.sh                    # every stage
#   bash benchmarks/gpu_check.sh build tests        # some stages (each call of the device tool <= 10 min;
#                                                   # a machine idle for 30 s is given back, so start
#                                                   # each call with build: e.g. "build tests kernels",
#                                                   # then "build e2e")
# Stages:
#   build    the native ops (CMake; a failure is reported and the rest runs on Triton/reference)
#   tests    tests/kernels and the fused training-step test, compiled for the GPU (no TRITON_INTERPRET)
#   kernels  benchmarks/test_kernels.py at the issue's shapes (bf16, peers: eager, torch.compile, SDPA)
#   e2e      benchmarks/test_end_to_end.py (~102M-parameter LLM, batch 64)
# Logs and pytest-benchmark JSON go to $OUT (default /tmp/userllm_gpu_check); the last step prints the
# tables of benchmarks/RESULTS.md (benchmarks/summarize.py).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
OUT=${OUT:-/tmp/userllm_gpu_check}
mkdir -p "$OUT"
STAGES=${*:-build tests kernels e2e}
status=0
has() { [[ " $STAGES " == *" $1 "* ]]; }

python3 -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA GPU'; \
print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" || exit 1
git rev-parse --short HEAD 2>/dev/null || true

if has build; then
  echo "== build: native ops"
  GEN=""; command -v ninja >/dev/null && GEN="-G Ninja"
  if cmake -S . -B build $GEN -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v python3)" \
       > "$OUT/build.log" 2>&1 && cmake --build build -j >> "$OUT/build.log" 2>&1; then
    lib=$(find build -name '_C*.so' | head -1)
    echo "native build: ok ($lib)"
    [ -n "$lib" ] && export USERLLM_NATIVE_LIB="$PWD/$lib"
  else
    echo "native build: FAILED (tail of $OUT/build.log below); continuing with Triton/reference"; status=1
    tail -20 "$OUT/build.log"
  fi
fi

if has tests; then
  echo "== tests: kernels and the fused training step on the GPU"
  # (the ahead-of-time compile check is for machines without a GPU: here the kernels compile for real)
  python3 -m pytest tests/kernels tests/integration/test_fused_training_step.py \
    --ignore=tests/kernels/test_compile_check.py -q -p no:cacheprovider -rs > "$OUT/tests.log" 2>&1 || status=1
  tail -15 "$OUT/tests.log"
fi

if has kernels; then
  echo "== kernels: benchmarks at the issue's shapes"
  python3 -m pytest benchmarks/test_kernels.py -q -p no:cacheprovider --benchmark-only \
    --benchmark-json="$OUT/kernels.json" > "$OUT/kernels.log" 2>&1 || { status=1; tail -30 "$OUT/kernels.log"; }
fi

if has e2e; then
  echo "== e2e: User-LLM vs TextPrompt, fused training step, Perceiver, cached K/V"
  python3 -m pytest benchmarks/test_end_to_end.py -q -p no:cacheprovider --benchmark-only \
    --benchmark-json="$OUT/e2e.json" > "$OUT/e2e.log" 2>&1 || { status=1; tail -30 "$OUT/e2e.log"; }
fi

jsons=$(ls "$OUT"/kernels.json "$OUT"/e2e.json 2>/dev/null)
[ -n "$jsons" ] && python3 benchmarks/summarize.py $jsons | tee "$OUT/summary.md"
exit $status
