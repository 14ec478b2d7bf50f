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
