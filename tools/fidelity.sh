#!/usr/bin/env bash
# The long offline fidelity runs (issue 15): every paper figure at sizes that can decide the papers' claims, on both
# embedded models, job by job (cheapest and most decisive first). Never run by CI or `make test`.
#
#   setsid nohup tools/fidelity.sh > /dev/null 2>&1 &     # start in the background; progress: runs/fidelity.log
#   tools/fidelity.sh fig1c,heal_curves                   # only these runs
#   FIDELITY_LOG=runs/fidelity_b.log tools/fidelity.sh lu_table,fig2   # a second runner on other jobs (2 cores)
#
# Every completed point lands in results/cache (tracked in git: JSON keyed on content), so an interrupted run loses at
# most the point in progress: run the script again and it continues where it stopped (finished points are read back,
# finished figures are only redrawn). Commit what landed with: git add results/cache figures && git commit.
set -u
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
JOBS=${1:-fig1c,unhealed_loss,heal_curves,lu_finetune,heal_seeds,heal_rank,fig2,lu_table,fig7,fig4}
MODELS=${MODELS:-smollm2-135m gemma3-270m}
LOG=${FIDELITY_LOG:-runs/fidelity.log}
mkdir -p runs results/cache
log() { echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) $*" >> "$LOG"; }
# Background priority: `nice` ranks processes only within one autogroup (one per session), and setsid and papermill's
# notebook kernels each start a session of their own, so a niced run still took an equal share of the cores from
# `make test`. Lower the autogroups of this script and all its descendants too (Linux with autogroup; else a no-op).
background() {
  local p
  for p in $(ps -e -o pid=,ppid= | awk -v root=$$ '{up[$1] = $2} END {for (p in up) {q = p; while (q in up && q != root && q > 1) q = up[q]; if (q == root) print p}}'); do
    { echo 19 > "/proc/$p/autogroup"; } 2>/dev/null
  done; return 0
}
( while background; sleep 20; do :; done ) & watcher=$!
trap 'kill $watcher 2>/dev/null' EXIT
log "start pid $$ jobs=$JOBS models=$MODELS (cache: results/cache)"
for job in ${JOBS//,/ }; do
  for model in $MODELS; do
    # a run without a parameter set for this model is skipped (e.g. fig7 offline lists both; others may not)
    if ! PYTHONPATH=$PWD nice -n 19 "$PY" -m layerprune.cli run paper_runs.yaml --profile offline --only "$job" --model "$model" \
         --cache-dir results/cache --prepare-only > /dev/null 2>&1; then
      log "skip $job $model (no offline parameter set)"; continue
    fi
    log "begin $job $model"; t0=$(date +%s)
    if PYTHONPATH=$PWD nice -n 19 "$PY" -m layerprune.cli run paper_runs.yaml --profile offline --only "$job" --model "$model" \
         --cache-dir results/cache >> "$LOG" 2>&1; then
      log "done $job $model in $(( $(date +%s) - t0 ))s ($(find results/cache -name "*.json" | wc -l) cached points)"
    else
      log "FAILED $job $model after $(( $(date +%s) - t0 ))s (see runs/ for the executed notebook); continuing"
    fi
  done
done
log "end pid $$"
