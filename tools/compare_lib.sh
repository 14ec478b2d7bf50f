# Sourced by tools/compare_*.sh: the seeds x arms grid of a method comparison.
# run_grid "SEEDS" "ARMS" [KEY=VALUE ...]: calls the script's `one ARM SEED [KEY=VALUE ...]` for every
# pair, JOBS at a time (the script's $jobs); the first failed run stops the script (set -e).
run_grid() {
  local grid_seeds=$1 grid_arms=$2 grid_seed grid_arm pids=()  # bash locals are seen by `one`: own names
  shift 2
  for grid_seed in $grid_seeds; do
    for grid_arm in $grid_arms; do
      one "$grid_arm" "$grid_seed" "$@" & pids+=($!)
      while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
    done
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
}

# train_eval RUN TASK [KEY=VALUE ...]: `vlp train` of the script's $recipe on $data into RUN (log RUN.log),
# then `vlp eval TASK` of it on $data/val, its JSON line into RUN.json (log RUN.eval.log)
train_eval() {
  local run=$1 task=$2
  shift 2
  "$py" -m vlp train "$recipe" run.dir="$run" run.resume=false data.train="$data/train" data.val="$data/val" \
    logging.progress=false 'eval.tasks=[]' "$@" > "$run.log" 2>&1 || { echo "failed: $run (see $run.log)" >&2; return 1; }
  "$py" -m vlp eval "$task" --checkpoint "$run" --data "$data/val" --json 2> "$run.eval.log" | tail -1 > "$run.json"
  [ -s "$run.json" ] || { echo "eval failed: $run (see $run.eval.log)" >&2; return 1; }
}
