#!/usr/bin/env bash
# Submit a sweep to a Ray cluster as a Ray job, with this checkout as its code:
#   RAY_ADDRESS=http://127.0.0.1:8265 MLFLOW_TRACKING_URI=http://mlflow.example.org:5000 \
#     cluster/submit.sh search_spaces/quickstart.yaml [bibau sweep options, e.g. --set concurrency=8]
# RAY_ADDRESS is the cluster's dashboard (`ray dashboard cluster/ray-up/aws-gpu.yaml`, or
# `kubectl -n bibau port-forward svc/bibau-head-svc 8265`); SPEC is a path inside the
# repository, relative to its root.
# The job never sees this shell's environment. MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME and
# BIBAU_* (e.g. BIBAU_DATA, where the nodes find the data sets) reach it through the runtime
# env; the tracking URI and BIBAU_STORAGE (default /mnt/shared/bibau, a folder every node
# shares) are also given to the sweep as --set overrides, which yours (after SPEC) override.
# Credentials are not sent: the nodes hold them (cluster.env on `ray up`, Secrets on KubeRay),
# since a runtime env is visible to anyone who can read the dashboard.
# Extra `ray job submit` options (e.g. --no-wait) go in RAY_JOB_SUBMIT_OPTS.
set -euo pipefail

if [ "$#" -lt 1 ]; then
    echo "usage: $0 SPEC.yaml [bibau sweep options]" >&2
    exit 2
fi
: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray dashboard address, e.g. http://127.0.0.1:8265}"
: "${MLFLOW_TRACKING_URI:?set MLFLOW_TRACKING_URI to the MLflow server the sweep logs to}"
storage="${BIBAU_STORAGE:-/mnt/shared/bibau}"
# Ray 2.60 clusters use token authentication; the token comes from RAY_AUTH_TOKEN or ~/.ray/auth_token
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

runtime_env="$(python3 -c '
import json, os
names = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")
env = {k: v for k, v in os.environ.items() if v and (k in names or k.startswith("BIBAU_"))}
print(json.dumps({"env_vars": env}))
')"

# the repository root is the working dir: .rayignore keeps the upload to the code
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck disable=SC2086  # RAY_JOB_SUBMIT_OPTS is a list of options
exec ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env-json "$runtime_env" \
    ${RAY_JOB_SUBMIT_OPTS:-} \
    -- python -m orchestrator.cli sweep \
    --set "tracking.uri=$MLFLOW_TRACKING_URI" --set "storage=$storage" "$@"
