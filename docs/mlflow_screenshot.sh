#!/usr/bin/env bash
# A screenshot of the MLflow UI on a sweep's tracking database (for docs/): starts `mlflow ui` on a
# free port, lets headless Chromium render the experiment's runs (optionally filtered), saves a PNG.
#   docs/mlflow_screenshot.sh runs/sweeps/mlflow.db OUT.png [EXPERIMENT_ID] [FILTER]
#   docs/mlflow_screenshot.sh runs/sweeps/mlflow.db docs/img/mlflow-quickstart.png 1 "tags.pareto = 'true'"
#   RUN=<attack run id> docs/mlflow_screenshot.sh runs/sweeps/mlflow.db docs/img/mlflow-attack-run.png 1
#     (an attack run's page: its description holds the Pareto figure and the front's linked table)
# Needs chromium (Debian: apt-get install chromium).
set -euo pipefail
db=$(realpath "$1"); out=$2; exp=${3:-1}; filter=${4:-}
port=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
mlflow ui --backend-store-uri "sqlite:///$db" --host 127.0.0.1 --port "$port" --workers 1 >/tmp/mlflow-ui-$port.log 2>&1 &
ui=$!
trap 'kill $ui 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 1; done
curl -sf "http://127.0.0.1:$port/health" >/dev/null || { echo "mlflow ui did not start (/tmp/mlflow-ui-$port.log)" >&2; exit 1; }
# the runs page in the model-training view: MLflow 3.17's UI opens an experiment in its GenAI view
# unless the URL asks for workflowType=machine_learning, whatever the experiment's experimentKind tag
query="?workflowType=machine_learning"
[ -n "$filter" ] && query="$query&searchFilter=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$filter")"
mkdir -p "$(dirname "$out")"
chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1000 \
  --virtual-time-budget=20000 --screenshot="$out" "http://127.0.0.1:$port/#/experiments/$exp/runs${RUN:+/$RUN}$query" 2>/dev/null
echo "wrote $out"
