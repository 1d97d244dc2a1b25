#!/usr/bin/env bash
# Every GPU figure of benchmarks/RESULTS.md in one command, from the repository root:
#
#   bash benchmarks/gpu_check.sh OUT_DIR            # a CUDA machine: <= 9 minutes in all (budget below)
#   bash benchmarks/gpu_check.sh OUT_DIR --tiny     # any machine, CPU: every stage at toy size (CI, ~1 min)
#
# Stages, in order, each under a time limit cut to what is left of the budget (USERLLM_GPU_CHECK_BUDGET_S,
# default 540 s, so the whole command stays under 9 minutes even when a stage hangs):
#   build    the native ops (CMake + nvcc for this GPU's architecture; --tiny: configure only, CPU) <= 120 s
#   tests    the compiled Triton kernels, the native CUDA op (tests/kernels/test_native_cuda.py: 16-byte
#            and scalar paths) and the fused training step against the reference, and --compile
#            against eager (the ahead-of-time SASS checks, compile_check / cuda_check, and the --tiny
#            self-test are skipped: they need no GPU and run in CI). Triton compiles every kernel
#            variant on first use: 120 s ran out after 57 of ~110 tests on an H200 (2026-12-04)  <= 240 s
#   kernels  benchmarks/test_kernels.py: fused ops vs eager, torch.compile, SDPA, the embedding_bag
#            peer and its compile, the native CUDA embedding_concat (USERLLM_NATIVE_LIB = the
#            library just built), flash-attn when installed; interleaved rounds                 <= 150 s
#   e2e      benchmarks/test_end_to_end.py (~102M-parameter LLM, batch 64) and
#            benchmarks/test_compile.py (--compile vs eager)                                     <= 150 s
# OUT_DIR receives one log per stage, the pytest-benchmark JSON files (kernels.json, e2e.json),
# check.json (device, date, commit, each stage's exit status and seconds) and summary.md (the tables of
# RESULTS.md, from benchmarks/summarize.py). Exit status: 0 when every stage passed.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [--tiny]}
TINY=0
[[ "${2:-}" == "--tiny" ]] && TINY=1
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
BUDGET=${USERLLM_GPU_CHECK_BUDGET_S:-540}
START=$SECONDS
: > "$OUT/stages.tsv"
status=0

if (( TINY )); then
  export USERLLM_BENCH_TINY=1 CUDA_VISIBLE_DEVICES=""   # CPU, toy shapes, no compile peers
  BENCH=(--benchmark-only --benchmark-max-time=0.01 --benchmark-min-rounds=1 --benchmark-warmup=off)
else
  unset TRITON_INTERPRET
  python3 -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA GPU'" || {
    echo "gpu_check: no CUDA GPU (use --tiny for the CPU smoke mode)"; exit 2; }
  BENCH=(--benchmark-only --benchmark-max-time=0.5 --benchmark-min-rounds=3)
fi

# stage NAME LIMIT_S COMMAND...: run with its log in OUT, under min(LIMIT_S, what is left of the budget)
stage() {
  local name=$1 limit=$2 left rc t0
  shift 2
  left=$(( BUDGET - (SECONDS - START) ))
  (( limit > left )) && limit=$left
  if (( limit < 5 )); then
    echo "== $name: skipped (budget spent)"; printf '%s\tskipped\t0\n' "$name" >> "$OUT/stages.tsv"; status=1
    return
  fi
  echo "== $name (limit ${limit}s)"
  t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - t0 ))" >> "$OUT/stages.tsv"
  if (( rc != 0 )); then
    status=1; echo "$name: FAILED (exit $rc; 124 = time limit); tail of $OUT/$name.log:"; tail -15 "$OUT/$name.log"
  else
    tail -2 "$OUT/$name.log"
  fi
}

GEN=""; command -v ninja > /dev/null && GEN="-G Ninja"
if (( TINY )); then
  stage build 120 cmake -S . -B "$OUT/build" $GEN -DCMAKE_BUILD_TYPE=Release -DUSERLLM_CUDA=OFF \
    -DPython_EXECUTABLE="$(command -v python3)"
else
  # The CUDA op (kernels/csrc/embedding_concat_cuda.cu) for this GPU's architecture only: one nvcc pass over
  # torch's headers is ~30-60 CPU-s per architecture, and the default list (sm_80 + sm_90 + PTX) would take
  # most of the stage's 120 s. nvcc is looked up as kernels/cuda_check.py does (CUDACXX, CUDA_HOME, PATH,
  # /usr/local/cuda*/bin); without one the CPU op is still built and the stage fails with exit 3, so
  # that the missing native CUDA figures are visible (their tests skip).
  NVCC=$(python3 -c "from userllm.kernels.cuda_check import find_nvcc; print(find_nvcc() or '')")
  ARCH=$(python3 -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
  if [[ -n "$NVCC" ]]; then
    stage build 120 bash -c "cmake -S . -B '$OUT/build' $GEN -DCMAKE_BUILD_TYPE=Release -DUSERLLM_CUDA=ON \
      -DCMAKE_CUDA_COMPILER='$NVCC' -DCMAKE_CUDA_ARCHITECTURES=$ARCH -DPython_EXECUTABLE='$(command -v python3)' \
      && cmake --build '$OUT/build' -j"
  else
    stage build 120 bash -c "echo 'gpu_check: no nvcc found: building the CPU op only; the native CUDA op is not built'; \
      cmake -S . -B '$OUT/build' $GEN -DCMAKE_BUILD_TYPE=Release -DUSERLLM_CUDA=OFF \
      -DPython_EXECUTABLE='$(command -v python3)' && cmake --build '$OUT/build' -j && exit 3"
  fi
fi
if (( ! TINY )) && [[ -f "$OUT/build/_C.so" ]]; then
  export USERLLM_NATIVE_LIB="$OUT/build/_C.so"   # the tests and benchmarks use the library just built
fi

if (( TINY )); then
  stage tests 120 python3 -m pytest -q -p no:cacheprovider -x tests/kernels/test_dispatch.py \
    tests/kernels/test_native_cuda.py -k "select_backend or native_cuda"
  stage kernels 150 python3 -m pytest -q -p no:cacheprovider "${BENCH[@]}" --benchmark-json="$OUT/kernels.json" \
    benchmarks/test_kernels.py -k "test_embedding_concat and forward] or cross_attn_decode_N50-forward]"
  stage e2e 150 python3 -m pytest -q -p no:cacheprovider "${BENCH[@]}" --benchmark-json="$OUT/e2e.json" \
    benchmarks/test_end_to_end.py benchmarks/test_compile.py -k "training_step_kernels and auto or compile_training"
else
  # -v: a stage cut by its time limit prints no summary, so each test's line names what failed
  stage tests 240 python3 -m pytest -v -p no:cacheprovider -rs tests/kernels tests/integration/test_fused_training_step.py \
    tests/integration/test_compile.py --ignore=tests/kernels/test_compile_check.py --ignore=tests/kernels/test_cuda_check.py \
    --ignore=tests/kernels/test_gpu_check.py
  stage kernels 150 python3 -m pytest -q -p no:cacheprovider "${BENCH[@]}" --benchmark-json="$OUT/kernels.json" \
    benchmarks/test_kernels.py
  stage e2e 150 python3 -m pytest -q -p no:cacheprovider "${BENCH[@]}" --benchmark-json="$OUT/e2e.json" \
    benchmarks/test_end_to_end.py benchmarks/test_compile.py
fi

python3 - "$OUT" "$TINY" "$(( SECONDS - START ))" <<'EOF'
import datetime, json, subprocess, sys
from pathlib import Path

import torch

out, tiny, seconds = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
stages = [dict(zip(("stage", "exit", "seconds"), line.split("\t"))) for line in
          (out / "stages.tsv").read_text().splitlines()]
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
report = {"mode": "tiny (CPU)" if tiny else "gpu", "device": device, "torch": torch.__version__,
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "commit": commit, "seconds": seconds, "stages": stages}
(out / "check.json").write_text(json.dumps(report, indent=1) + "\n")
EOF
jsons=$(ls "$OUT"/kernels.json "$OUT"/e2e.json 2>/dev/null)
{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null), $(( SECONDS - START )) s"
  echo
  echo "| stage | exit | seconds |"; echo "| --- | --- | --- |"
  awk -F'\t' '{printf "| %s | %s | %s |\n", $1, $2, $3}' "$OUT/stages.tsv"
  echo
  [ -n "$jsons" ] && python3 benchmarks/summarize.py $jsons
} > "$OUT/summary.md"
cat "$OUT/summary.md"
exit $status
