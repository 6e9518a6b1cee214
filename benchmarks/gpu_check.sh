#!/usr/bin/env bash
# The one call to make when a GPU is lent (one H100/H200; about 5.5 min on an H200 on 2026-11-30, each step
# under its own limit so the whole stays under 8; step 3 needs Ray, MLflow (with cryptography) and Optuna):
#
#   benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root
#   benchmarks/gpu_check.sh --compile       # also the torch.compile'd training loop (+1-2 min)
#   benchmarks/gpu_check.sh --tiny          # CPU, about a minute: checks the script (CI runs this)
#
# It measures, each step under its own time limit so one hang cannot eat the lease:
#   1. training throughput on CUDA: the project's loop against a DataLoader, preact_resnet18,
#      20,000 images (benchmarks/train_throughput.py; target ratio >= 3);
#   2. BI-BAU(U) at METHOD's full scale on ResNet-18 / CIFAR-10, as many of its 20 epochs as fit,
#      seconds per epoch against a plain training epoch (benchmarks/bibau_epoch.py; the paper:
#      418 s / 308 s; goal < 60 s for the 20 epochs);
#   3. 4 trials packed on one GPU (resources.gpus: 0.25) against one at a time
#      (benchmarks/gpu_packing.py).
# Every step records its row: by default into the benchmarks' histories (docs/results/*.jsonl), which
# regenerates docs/benchmarks.md; with --doc PATH as a Markdown row into that file instead; with --tiny
# and no --doc into $OUT/benchmarks.md, a copy of the page (a tiny run never writes into tracked docs).
# Everything it writes also lands in $OUT (default runs/gpu_check): the logs of each step,
# environment.txt (GPU, driver, torch), the doc with the new rows (benchmarks.md), rows.md (only the
# new rows) and, by default, rows.jsonl (the new history records: on the machine that keeps the tree,
# `python benchmarks/docs_page.py --add rows.jsonl` records them), so a machine that returns only $OUT
# hands back the whole result. Exit code: the number of steps that failed (0: all recorded).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false

TINY=0
COMPILE=0
PAGE="$ROOT/docs/benchmarks.md"
DOC=""
DATA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY=1 ;;
    --compile) COMPILE=1 ;;
    --doc) DOC="$2"; shift ;;
    --doc=*) DOC="${1#--doc=}" ;;
    --data) DATA=(--data "$2"); shift ;;
    --data=*) DATA=(--data "${1#--data=}") ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1'; allowed: --tiny, --compile, --doc PATH, --data PATH" >&2; exit 2 ;;
  esac
  shift
done
OUT="${OUT:-$ROOT/runs/gpu_check}"
mkdir -p "$OUT" || { echo "gpu_check.sh: cannot create OUT=$OUT" >&2; exit 2; }
if [ -z "$DOC" ] && [ "$TINY" = 1 ]; then  # a copy of the page: the tiny rows stay out of tracked docs
  DOC="$OUT/benchmarks.md"
  cp "$PAGE" "$DOC"
fi
DOC="${DOC:-$PAGE}"
DOC="$(cd "$(dirname "$DOC")" 2>/dev/null && pwd)/$(basename "$DOC")" || { echo "gpu_check.sh: --doc folder missing" >&2; exit 2; }
PY="${PYTHON:-python3}"
BEFORE="$(mktemp)"
[ -f "$DOC" ] && cp "$DOC" "$BEFORE" || : > "$BEFORE"
HISTORY=""
if [ "$DOC" = "$PAGE" ]; then  # the rows go to the histories: keep what they held, to hand back the new records
  HISTORY="$(mktemp -d)"
  cp "$ROOT"/docs/results/*.jsonl "$HISTORY"/ 2>/dev/null
fi

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "host: $(hostname); cores: $(getconf _NPROCESSORS_ONLN); load: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
  echo "git: $(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null) $(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | head -c 1 | sed 's/./(dirty)/')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu,mig.mode.current --format=csv 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'devices', torch.cuda.device_count(), 'bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported())" 2>&1
} > "$OUT/environment.txt"
cat "$OUT/environment.txt"

if [ "$TINY" = 1 ]; then
  THROUGHPUT=(--device cpu --model small_resnet --images 64 --epochs 1 --repeats 1 --batch-size 32 --workers 1)
  BIBAU=(--tiny --device cpu)
  PACKING=(--tiny)
  LIMITS=(600 600 900)  # a loaded CI machine is slow; the limits guard the GPU lease
else
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device here; use --tiny on a CPU" >&2
    exit 2
  fi
  THROUGHPUT=(--device cuda --model preact_resnet18 --images 20000 --epochs 2 --repeats 2 --workers 4)
  BIBAU=(--device cuda --budget-s 100)
  PACKING=()
  LIMITS=(140 170 170)  # 480 s in all: the whole check stays under 8 minutes
fi

FAILED=0
step() {  # step NAME LIMIT_S COMMAND...
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$OUT/$name.log"
  [ $rc -eq 0 ] || FAILED=$((FAILED + 1))
}

START=$SECONDS
step throughput "${LIMITS[0]}" "$PY" benchmarks/train_throughput.py "${THROUGHPUT[@]}" "${DATA[@]}" --doc "$DOC"
if [ "$COMPILE" = 1 ]; then
  step throughput_compiled "${LIMITS[0]}" "$PY" benchmarks/train_throughput.py "${THROUGHPUT[@]}" "${DATA[@]}" \
    --compile --pipelines loop --repeats 1 --doc "$DOC"
  BIBAU+=(--compile)
fi
step bibau_epoch "${LIMITS[1]}" "$PY" benchmarks/bibau_epoch.py "${BIBAU[@]}" "${DATA[@]}" --doc "$DOC"
step gpu_packing "${LIMITS[2]}" "$PY" benchmarks/gpu_packing.py "${PACKING[@]}" "${DATA[@]}" --doc "$DOC"

[ "$DOC" -ef "$OUT/benchmarks.md" ] || cp "$DOC" "$OUT/benchmarks.md" 2>/dev/null
diff "$BEFORE" "$DOC" | sed -n 's/^> //p' > "$OUT/rows.md"
rm -f "$BEFORE"
if [ -n "$HISTORY" ]; then
  "$PY" benchmarks/docs_page.py --new-since "$HISTORY" > "$OUT/rows.jsonl"
  rm -rf "$HISTORY"
fi
echo "gpu_check: $((3 + COMPILE - FAILED)) of $((3 + COMPILE)) steps recorded in $((SECONDS - START))s; new rows in $OUT/rows.md, the doc in $OUT/benchmarks.md"
exit $FAILED
