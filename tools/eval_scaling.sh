#!/usr/bin/env bash
# Zero-shot eval of RUN on N copies of DATA/train (a list spec) on 1 and 2 ranks, one thread per rank;
# start-up is measured on one shard and subtracted, so what is left is the eval itself. WORKERS (default 0:
# each rank decodes in its own process, so 1 rank uses one core and 2 ranks two) is passed as --workers.
# usage: [WORKERS=N] tools/eval_scaling.sh RUN_DIR DATA_DIR [COPIES=5]
set -euo pipefail
run=$1 data=$2 copies=${3:-5}
py=${PYTHON:-.venv/bin/python} workers=${WORKERS:-0}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/all" "$tmp/one"
for i in $(seq "$copies"); do for f in "$data"/train/*.tar; do ln -s "$(realpath "$f")" "$tmp/all/c${i}_$(basename "$f")"; done; done
ln -s "$(realpath "$(ls "$data"/train/*.tar | sort | head -1)")" "$tmp/one/0.tar"
spec=$tmp/all one=$tmp/one
export OMP_NUM_THREADS=1
t() { local s=$(date +%s.%N); "$@" > /dev/null || { echo "failed: $*" >&2; exit 1; }; echo "$(date +%s.%N) - $s" | bc; }
for ranks in 1 2; do
  if [ "$ranks" = 1 ]; then launch=("$py" -m vlp); else
    launch=("$py" -m torch.distributed.run --nproc_per_node 2 --master_port 29799 -m vlp); fi
  full=$(t "${launch[@]}" eval zeroshot --checkpoint "$run" --data "$spec" --classnames "$data"/classnames.txt --templates "$data"/zeroshot_classification_templates.txt --workers "$workers" --json)
  base=$(t "${launch[@]}" eval zeroshot --checkpoint "$run" --data "$one" --classnames "$data"/classnames.txt --templates "$data"/zeroshot_classification_templates.txt --workers "$workers" --json)
  echo "{\"ranks\": $ranks, \"workers\": $workers, \"wall_s\": $full, \"startup_and_one_shard_s\": $base, \"eval_s\": $(echo "$full - $base" | bc)}"
done
