#!/usr/bin/env bash
# One row of the paper's Tables 1 and 2 at the paper's scale, in one GPU call (under 9 minutes on one
# H100/H200): ResNet-18 on all 50,000 CIFAR-10 images, the attack at the paper's settings, BI-BAU(U) at
# METHOD's defaults, FT, RA and QRA; BI-BAU's seconds against 20 plain epochs (benchmarks/paper_scale.py).
#
#   benchmarks/paper_scale.sh                     # BadNets, on the GPU machine, from the repository root
#   benchmarks/paper_scale.sh --attack wanet      # the next call: WaNet
#   benchmarks/paper_scale.sh --tiny              # CPU, about two minutes: checks the script (CI runs this)
#
# Options: --attack NAME, --tiny, --data PATH (the CIFAR-10 archive; default: the usual places),
# --doc PATH (where the rows go; default docs/benchmarks.md, none with --tiny), --wheels DIR (Python
# packages the machine lacks, installed with --no-index first; default ./wheels when it exists).
# Everything it prints also lands in $OUT (default runs/paper_scale): paper_scale.log, environment.txt,
# rows.md (the new rows' summary lines) and, when the rows went to the histories (docs/results/, the
# default without --tiny), rows.jsonl: the new records, which `python benchmarks/docs_page.py --add
# rows.jsonl` records on the machine that keeps the tree. Exit code: the Python script's (0: measured).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
ARGS=()
WHEELS="$ROOT/wheels"
DOC=""
TINY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY=1; ARGS+=(--tiny) ;;
    --quiet) ARGS+=(--quiet) ;;
    --attack|--data|--device) ARGS+=("$1" "$2"); shift ;;
    --attack=*|--data=*|--device=*) ARGS+=("$1") ;;
    --doc) DOC="$2"; shift ;;
    --doc=*) DOC="${1#--doc=}" ;;
    --wheels) WHEELS="$2"; shift ;;
    --wheels=*) WHEELS="${1#--wheels=}" ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "paper_scale.sh: unknown argument '$1'; allowed: --attack NAME, --tiny, --data PATH, --device DEV, --doc PATH, --wheels DIR" >&2; exit 2 ;;
  esac
  shift
done
OUT="${OUT:-$ROOT/runs/paper_scale}"
mkdir -p "$OUT" || { echo "paper_scale.sh: cannot create OUT=$OUT" >&2; exit 2; }

# a GPU machine with PyTorch but without the project's other dependencies: install them from carried wheels
if ! "$PY" -c "import yaml, safetensors, PIL, numpy" 2>/dev/null; then
  if [ -d "$WHEELS" ]; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" pyyaml safetensors pillow numpy 2>&1 | tail -n 3
  else
    echo "paper_scale.sh: pyyaml, safetensors, pillow or numpy missing and no wheels folder ($WHEELS); carry one:" \
         "pip download -d wheels --only-binary=:all: pyyaml safetensors pillow numpy" >&2
    exit 2
  fi
fi

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "host: $(hostname); cores: $(getconf _NPROCESSORS_ONLN); load: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
  echo "git: $(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" 2>&1
} > "$OUT/environment.txt"
cat "$OUT/environment.txt"

if [ -n "$DOC" ]; then
  ARGS+=(--doc "$DOC")
elif [ "$TINY" = 0 ]; then
  ARGS+=(--doc "$ROOT/docs/benchmarks.md")
fi
# the rows also come back in $OUT: a machine that returns only $OUT hands back the whole result
ROWS_DOC="$OUT/rows.md"
: > "$ROWS_DOC"
HISTORY="$(mktemp -d)"
cp "$ROOT"/docs/results/*.jsonl "$HISTORY"/ 2>/dev/null
"$PY" benchmarks/paper_scale.py "${ARGS[@]}" 2>&1 | tee "$OUT/paper_scale.log"
RC=${PIPESTATUS[0]}
"$PY" benchmarks/docs_page.py --new-since "$HISTORY" > "$OUT/rows.jsonl"
rm -rf "$HISTORY"
[ -s "$OUT/rows.jsonl" ] || rm -f "$OUT/rows.jsonl"
sed -n 's/^paper_scale \(.*\)$/\1/p' "$OUT/paper_scale.log" >> "$ROWS_DOC"
echo "paper_scale.sh: exit $RC; summary lines in $ROWS_DOC"
exit $RC
