#!/usr/bin/env bash
# GPU check of the fused kernels, run from the repository root on a machine with a CUDA GPU:
#   bash benchmarks/gpu_check.sh            (python3 with CUDA torch and triton on PATH)
# 1. builds the native ops when the CMake build is present (skipped, with a note, if the build fails),
# 2. runs tests/kernels compiled for the GPU (no TRITON_INTERPRET: the tests pick CUDA tensors),
# 3. runs the kernel benchmarks at the issue's shapes and prints one summary table.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
unset TRITON_INTERPRET
OUT=${OUT:-/tmp/userllm_gpu_check}
mkdir -p "$OUT"
status=0

python3 -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA GPU'; \
print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" || exit 1

if [ -f CMakeLists.txt ]; then
  echo "== building native ops"
  GEN=""; command -v ninja >/dev/null && GEN="-G Ninja"
  if cmake -S . -B build $GEN -DCMAKE_BUILD_TYPE=Release \
       -DPython_EXECUTABLE="$(command -v python3)" > "$OUT/cmake.log" 2>&1 \
     && cmake --build build -j >> "$OUT/cmake.log" 2>&1; then
    echo "native build: ok"
  else
    echo "native build: FAILED (see $OUT/cmake.log); continuing with Triton/reference"; status=1
  fi
fi

echo "== tests/kernels on the GPU"
python3 -m pytest tests/kernels -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmarks"
python3 -m pytest benchmarks/test_kernels.py -q -p no:cacheprovider --benchmark-only \
  --benchmark-json="$OUT/bench.json" > "$OUT/bench.log" 2>&1 || { status=1; tail -30 "$OUT/bench.log"; }

python3 - "$OUT/bench.json" <<'PY'
import json, sys
try:
    data = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    sys.exit("no benchmark results")
print(f"{'benchmark':45s} {'fused ms':>9s} {'GB/s':>8s} {'%copy':>6s} {'TFLOP/s':>8s}  speedup of fused vs peers")
for b in data["benchmarks"]:
    e = b["extra_info"]
    key = next((k for k in e if k.startswith("speedup_of_")), None)
    fused = key[len("speedup_of_"):] if key else "?"
    ms = e.get("median_ms", {}).get(fused, float("nan"))
    frac = e.get("fraction_of_copy_bandwidth")
    peers = ", ".join(f"{k} {v:.2f}x" for k, v in (e.get(key) or {}).items())
    print(f"{b['name']:45s} {ms:9.4f} {e.get('GB/s', ''):>8} {'' if frac is None else f'{100 * frac:.0f}':>6} "
          f"{e.get('TFLOP/s', ''):>8}  {peers}")
print("device:", data["benchmarks"][0]["extra_info"].get("gpu", "?") if data["benchmarks"] else "?")
PY
exit $status
