#!/usr/bin/env bash
# COCONUT vs replay without NSPT vs fine-tuning (no replay), class-incremental, over seeds: trains each
# with its recipe (configs/quickstart/coconut_<set>.yaml), evaluates every task snapshot with
# `vlp eval continual`, and prints mean +- std (over seeds) of average accuracy, final accuracy and
# forgetting, zero-shot and classifier head. Writes the data under OUT/data if missing; one thread per run.
# usage: [SEEDS="0 1 2"] [OUT=runs/compare_continual] [JOBS=1] [METHODS="coconut replay finetune"]
#        tools/compare_continual.sh digits|tones [KEY=VALUE ...]
# (KEY=VALUE: config overrides for the runs, e.g. continual.lr_schedule=global; METHODS: the arms to
# train now, the table also shows the others' earlier runs in OUT, e.g. to vary only COCONUT's nspt_weight)
set -euo pipefail -f  # -f: no globbing of overrides like [logits_fusion]
. "$(dirname "$0")/compare_lib.sh"
set_name=${1:?usage: tools/compare_continual.sh digits|tones [KEY=VALUE ...]}; shift
py=${PYTHON:-.venv/bin/python} seeds=${SEEDS:-0 1 2} out=${OUT:-runs/compare_continual} jobs=${JOBS:-1}
recipe=configs/quickstart/coconut_$set_name.yaml data=$out/data/$set_name
[ -f "$recipe" ] || { echo "no recipe $recipe" >&2; exit 2; }
[ -f "$data/classnames.txt" ] || "$py" -m vlp data "$set_name" --out "$data" > /dev/null
export OMP_NUM_THREADS=1
declare -A methods=([coconut]="" [replay]="objective.nspt_weight=0" [finetune]="continual.buffer_size=0")

one() {  # method seed overrides...: train, then the per-task eval into RUN.json
  train_eval "$out/$set_name/$1_s$2" continual run.seed="$2" run.checkpoint_every=0 ${methods[$1]} "${@:3}"
}

mkdir -p "$out/$set_name"
start=$(date +%s)
run_grid "$seeds" "${METHODS:-coconut replay finetune}" "$@"
echo "$set_name: $(echo $seeds | wc -w) seeds, $(( $(date +%s) - start )) s, $(date +%F)"
"$py" - "$out/$set_name" $seeds <<'EOF'
import json, os, statistics, sys
root, seeds = sys.argv[1], sys.argv[2:]
def cell(values):
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"
cols = [(way, key) for way in ("zeroshot", "classifier")
        for key in ("average_accuracy", "final_accuracy", "average_forgetting")]
print("| method | " + " | ".join(f"{w} {k.replace('average_', 'avg ').replace('_', ' ')}" for w, k in cols) + " |")
print("|---" * (len(cols) + 1) + "|")
for method, name in (("finetune", "fine-tuning (no replay)"), ("replay", "replay, no NSPT"), ("coconut", "COCONUT")):
    if not all(os.path.isfile(f"{root}/{method}_s{s}.json") for s in seeds):
        continue  # an arm not in METHODS, never run in OUT
    runs = [json.load(open(f"{root}/{method}_s{s}.json")) for s in seeds]
    print(f"| {name} | " + " | ".join(cell([r[w][k] for r in runs]) for w, k in cols) + " |")
EOF
