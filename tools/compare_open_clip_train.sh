#!/usr/bin/env bash
# open_clip_train vs vlp on the CLIP quickstart, one after the other, same shards and settings:
# wall time, samples/s and zero-shot top-1 of each (both scored by `vlp eval zeroshot` on the
# held-out digits), and the speed ratio. Target: vlp >= 1.1x open_clip_train's samples/s, top-1
# within 0.01.
#
#   tools/compare_open_clip_train.sh [--steps N] [--seeds "0 1 2"] [--work DIR]
#   (default 300 steps, seed 0, DIR out/compare; one pair per seed under DIR/sSEED, then the mean)
#
# open_clip_train runs from its own venv ($OC_VENV, default out/venv-open_clip, built on first use):
# $TORCH_PKGS (the Makefile's pair) + open_clip_torch[training]==3.3.0 + webdataset==0.2.86. Its
# run: the quickstart model registered with open_clip.add_model_config, AdamW lr 2e-3, wd 0.1,
# betas (0.9, 0.98), eps 1e-6, warmup 30, cosine, clip 1.0, batch 128, fp32, 2 workers,
# --dataset-resampled with STEPS*128/3 samples an epoch for 3 epochs (300 steps: 12800 x 3), a
# checkpoint every epoch. vlp's: configs/quickstart/clip_digits.yaml with optim.steps=STEPS, a
# checkpoint every STEPS/3 steps and no eval inside the run (open_clip_train's has none either).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=300
SEEDS=0
WORK=out/compare
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) STEPS=$2; shift 2 ;;
    --seeds) SEEDS=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    *) echo "compare_open_clip_train.sh: unknown option $1 (--steps N, --seeds LIST, --work DIR)" >&2; exit 2 ;;
  esac
done
for s in $SEEDS; do
  [[ "$s" =~ ^[0-9]+$ ]] || { echo "--seeds must be non-negative integers, got '$SEEDS'" >&2; exit 2; }
done
[ "$STEPS" -ge 3 ] && [ $((STEPS % 3)) -eq 0 ] || { echo "--steps must be a multiple of 3 (3 epochs), got $STEPS" >&2; exit 2; }
PY=${PYTHON:-.venv/bin/python}
OC_VENV=${OC_VENV:-out/venv-open_clip}
TORCH_PKGS=${TORCH_PKGS:-"torch==2.14.1 torchvision==0.29.1"}
RECIPE=configs/quickstart/clip_digits.yaml
BATCH=128
EPOCHS=3
PER_EPOCH=$((STEPS / EPOCHS * BATCH))
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
DATA=$WORK/digits

if [ ! -f "$OC_VENV/.installed" ]; then
  echo "[compare] building $OC_VENV (open_clip_torch[training]==3.3.0, webdataset==0.2.86)" >&2
  python3 -m venv "$OC_VENV"
  "$OC_VENV/bin/pip" install -q --upgrade pip
  # shellcheck disable=SC2086
  "$OC_VENV/bin/pip" install -q $TORCH_PKGS
  "$OC_VENV/bin/pip" install -q "open_clip_torch[training]==3.3.0" "webdataset==0.2.86"
  touch "$OC_VENV/.installed"
fi
[ -f "$DATA/train/nshards.txt" ] || "$PY" -m vlp data digits --out "$DATA" >&2
NSHARDS=$(cat "$DATA/train/nshards.txt")
SHARDS="$DATA/train/{0..$((NSHARDS - 1))}.tar"
"$PY" tools/open_clip_compare.py model-config "$RECIPE" "$WORK/vlp_quickstart.json"

now() { date +%s.%N; }

one_seed() {  # SEED: open_clip_train, then vlp, both scored; RUN/compare.json
  local SEED=$1 RUN=$WORK/s$1 t0 t1
  mkdir -p "$RUN"

  echo "[compare] seed $SEED, open_clip_train: $STEPS steps" >&2
  rm -rf "$RUN/oc_logs"
  t0=$(now)
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} "$OC_VENV/bin/python" tools/open_clip_compare.py train "$WORK/vlp_quickstart.json" \
    --model vlp_quickstart --train-data "$SHARDS" --dataset-type webdataset --dataset-resampled \
    --train-num-samples "$PER_EPOCH" --epochs "$EPOCHS" --batch-size "$BATCH" --lr 2e-3 --wd 0.1 \
    --beta1 0.9 --beta2 0.98 --eps 1e-6 --warmup 30 --lr-scheduler cosine --grad-clip-norm 1.0 \
    --precision fp32 --workers 2 --seed "$SEED" --device cpu --save-frequency 1 --zeroshot-frequency 0 \
    --val-frequency 0 --report-to "" --logs "$RUN/oc_logs" --name oc --log-every-n-steps 10 >"$RUN/oc_train.log" 2>&1 \
    || { tail -30 "$RUN/oc_train.log" >&2; echo "compare: open_clip_train FAILED (log: $RUN/oc_train.log)" >&2; exit 1; }
  t1=$(now)
  OC_WALL=$(echo "$t1 - $t0" | bc)

  echo "[compare] seed $SEED, vlp: $STEPS steps" >&2
  rm -rf "$RUN/vlp_run"
  t0=$(now)
  "$PY" -m vlp train "$RECIPE" run.dir="$RUN/vlp_run" data.train="$DATA/train" data.val="$DATA/val" \
    optim.steps="$STEPS" run.seed="$SEED" run.checkpoint_every=$((STEPS / EPOCHS)) eval.every_steps=0 "eval.tasks=[]" \
    logging.progress=false >"$RUN/vlp_train.log" 2>&1 \
    || { tail -30 "$RUN/vlp_train.log" >&2; echo "compare: vlp train FAILED (log: $RUN/vlp_train.log)" >&2; exit 1; }
  t1=$(now)
  VLP_WALL=$(echo "$t1 - $t0" | bc)

  echo "[compare] zero-shot (vlp eval zeroshot on $DATA/val)" >&2
  "$PY" tools/open_clip_compare.py to-vlp "$RUN/oc_logs/oc/checkpoints/epoch_$EPOCHS.pt" "$RECIPE" "$RUN/oc_as_vlp"
  "$PY" -m vlp eval zeroshot --checkpoint "$RUN/oc_as_vlp" --data "$DATA/val" --json >"$RUN/oc_zeroshot.json"
  "$PY" -m vlp eval zeroshot --checkpoint "$RUN/vlp_run" --data "$DATA/val" --json >"$RUN/vlp_zeroshot.json"

  "$PY" - "$RUN" "$STEPS" "$BATCH" "$OC_WALL" "$VLP_WALL" "$SEED" <<'PYEOF' | tee "$RUN/compare.json"
import json, os, sys
work, steps, batch, oc_wall, vlp_wall, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
top1 = {k: json.loads(open(os.path.join(work, f"{k}_zeroshot.json")).read().strip().splitlines()[-1])["top1"]
        for k in ("oc", "vlp")}
samples = steps * batch
r = {"seed": seed, "steps": steps, "batch": batch,
     "open_clip_train": {"wall_s": round(oc_wall, 1), "samples_per_s": round(samples / oc_wall, 1), "top1": top1["oc"]},
     "vlp": {"wall_s": round(vlp_wall, 1), "samples_per_s": round(samples / vlp_wall, 1), "top1": top1["vlp"]},
     "speed_ratio": round(oc_wall / vlp_wall, 3), "top1_diff": round(top1["vlp"] - top1["oc"], 4)}
r["targets_met"] = r["speed_ratio"] >= 1.1 and abs(r["top1_diff"]) <= 0.01
print(json.dumps(r))
PYEOF
}

for s in $SEEDS; do one_seed "$s"; done
# the mean over seeds (the 1-seed case prints the same numbers again)
"$PY" - "$WORK" $SEEDS <<'PYEOF' | tee "$WORK/compare.json"
import json, statistics, sys
work, seeds = sys.argv[1], sys.argv[2:]
runs = [json.load(open(f"{work}/s{s}/compare.json")) for s in seeds]
mean = lambda f: round(statistics.mean(f(r) for r in runs), 4)
r = {"seeds": [int(s) for s in seeds], "steps": runs[0]["steps"], "batch": runs[0]["batch"],
     "open_clip_train": {k: mean(lambda r: r["open_clip_train"][k]) for k in ("wall_s", "samples_per_s", "top1")},
     "vlp": {k: mean(lambda r: r["vlp"][k]) for k in ("wall_s", "samples_per_s", "top1")},
     "speed_ratio": {"mean": mean(lambda r: r["speed_ratio"]), "min": min(r["speed_ratio"] for r in runs)},
     "top1_diff": mean(lambda r: r["top1_diff"])}
r["targets_met"] = r["speed_ratio"]["min"] >= 1.1 and abs(r["top1_diff"]) <= 0.01
print(json.dumps(r))
PYEOF
