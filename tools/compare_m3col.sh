#!/usr/bin/env bash
# M3CoL vs the same model without its contrastive term (objective.weight=0) vs a plain cross-entropy
# fusion baseline (only the fusion head's CE), over seeds, on digits-complementary with
# configs/quickstart/m3col_complementary.yaml (same model, steps and data for every arm). Prints mean +- std
# (over seeds) of each head's `vlp eval classify` accuracy on the val split. Writes the data under
# OUT/data if missing; one thread per run.
# usage: [SEEDS="0 1 2"] [OUT=runs/compare_m3col] [JOBS=1] tools/compare_m3col.sh [KEY=VALUE ...]
# (KEY=VALUE: config overrides for every arm, e.g. optim.steps=400; objective.* ones reach the M3CoL arm only)
set -euo pipefail -f  # -f: no globbing of overrides like [logits_fusion]
. "$(dirname "$0")/compare_lib.sh"
py=${PYTHON:-.venv/bin/python} seeds=${SEEDS:-0 1 2} out=${OUT:-runs/compare_m3col} jobs=${JOBS:-1}
recipe=configs/quickstart/m3col_complementary.yaml data=$out/data/digits-complementary
[ -f "$data/classnames.txt" ] || "$py" -m vlp data digits-complementary --out "$data" > /dev/null
export OMP_NUM_THREADS=1
declare -A arms=([m3col]="" [no_contrastive]="objective.weight=0" [fusion_ce]="objective.weight=0 objective.heads=[logits_fusion]")

one() {  # arm seed overrides...: train, then the heads' accuracy into RUN.json
  local run=$out/$1_s$2 extra=("${@:3}")
  [ "$1" = m3col ] || extra=($(printf '%s\n' "${extra[@]}" | grep -v '^objective\.' || true))
  train_eval "$run" classify run.seed="$2" "${extra[@]}" ${arms[$1]}
}

mkdir -p "$out"
start=$(date +%s)
run_grid "$seeds" "m3col no_contrastive fusion_ce" "$@"
echo "digits-complementary: $(echo $seeds | wc -w) seeds, $(( $(date +%s) - start )) s, $(date +%F); overrides: $*"
"$py" - "$out" $seeds <<'EOF'
import json, statistics, sys
root, seeds = sys.argv[1], sys.argv[2:]
def cell(values):
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"
print("| arm | fusion accuracy | image head | text head |")
print("|---|---|---|---|")
for arm, name in (("fusion_ce", "cross-entropy fusion only"), ("no_contrastive", "M3CoL, objective.weight=0"),
                  ("m3col", "M3CoL")):
    runs = [json.load(open(f"{root}/{arm}_s{s}.json")) for s in seeds]
    heads = ["fusion"] + ([] if arm == "fusion_ce" else ["image", "text"])  # fusion_ce trains no other head
    cells = [cell([r[f"{h}_accuracy"] for r in runs]) if h in heads else "not trained"
             for h in ("fusion", "image", "text")]
    print(f"| {name} | " + " | ".join(cells) + " |")
EOF
