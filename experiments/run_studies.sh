#!/usr/bin/env bash
# Every study behind results/: the sweeps into the committed store results/studies/mlflow.db, on
# Fashion-MNIST from ../shared/data. Re-running resumes (finished configs are skipped).
#   bash experiments/run_studies.sh [study ...]     # default: all, in this order
# Then render the tables and figures: .venv/bin/python notebooks/render.py
# and re-check the cards, regenerating results/README.md's agree/differ text:
#   .venv/bin/benchkit verify --all --markdown --write results/README.md
set -euo pipefail
cd "$(dirname "$0")/.."
export BENCHKIT_DATA="${BENCHKIT_DATA:-$(cd ../shared/data && pwd)}"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$PWD/results/studies/mlflow.db}"
mkdir -p results/studies
# study -> extra sweep arguments (2 workers on 2 cores; granularity serial: it measures latency)
declare -A ARGS=(
  [fashion_lenet300]="--workers 2" [lottery]="--workers 2" [timing]="--workers 2" [iterative]="--workers 2"
  [strategies]="--workers 2" [strategies_lenet5]="--workers 2" [granularity]="--workers 1"
  [granularity_4x]="--workers 1" [rethinking]="--workers 2" [at_init_sanity]="--workers 2"
  [sparse_training]="--workers 2" [lm_pruning]="--workers 2" [lm_heads]="--workers 1" [vit_pruning]="--workers 2"
)
ORDER=(fashion_lenet300 lottery timing iterative strategies strategies_lenet5 granularity granularity_4x
       at_init_sanity sparse_training rethinking lm_pruning lm_heads vit_pruning)
status=0
for study in "${@:-${ORDER[@]}}"; do
  echo "== $study  $(date -u +%FT%TZ)  $(nproc) cores, $(uname -m)"
  start=$(date +%s)
  # a failed run does not stop the other studies; the exit status says something failed
  # shellcheck disable=SC2086
  .venv/bin/benchkit sweep "experiments/$study.yaml" ${ARGS[$study]} --no-plots output_dir=runs/studies || status=$?
  echo "== $study done in $(( $(date +%s) - start )) s"
done
# benchkit opens sqlite stores in WAL mode; fold the log back into the one file that is committed
.venv/bin/python -c "import sqlite3, sys; sqlite3.connect(sys.argv[1]).execute('PRAGMA journal_mode=DELETE')" \
  "${MLFLOW_TRACKING_URI#sqlite:///}" 2>/dev/null || true
exit "$status"
