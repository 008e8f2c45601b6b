#!/usr/bin/env bash
# Reproduce the comparison table: tasks × budgets × seeds × methods, one train.py run each, then report.py.
#
#   bash run_all.sh                  # paper profile if a GPU and roberta-base are at hand, else the CPU profile
#   bash run_all.sh cpu              # offline: MiniLM, local GLUE, capped data, 1 seed (~60-75 min on 2 cores)
#   bash run_all.sh paper --lr=3e-4  # any train.py Config field overrides the profile for the whole sweep
#   bash run_all.sh smoke            # tiny random model, a couple of minutes: checks the plumbing (tests use it)
#
# Resumable: a run whose result (results/<profile>/<run>.json, written only on success, atomically) exists
# is skipped; kill it and start it again to finish the table. A failed run leaves <run>.error.json, is
# listed at the end, and the sweep goes on. Ctrl-C stops the sweep. With several GPUs, one run per GPU.
# TASKS, BUDGETS, SEEDS, METHODS and OUT in the environment narrow or move the sweep.
set -u
cd "$(dirname "$0")"

PROFILE=auto
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then PROFILE=$1; shift; fi
OVERRIDES=("$@")
LOCAL_GLUE=${GLUE_DIR:-../shared/data/glue}

if [ "$PROFILE" = auto ]; then
  if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    if python -c "from transformers import AutoConfig; AutoConfig.from_pretrained('roberta-base')" >/dev/null 2>&1; then
      PROFILE=paper; echo "profile: paper (a CUDA GPU is available and roberta-base loads)"
    else
      PROFILE=cpu; echo "profile: cpu (a GPU is available but roberta-base cannot be loaded: no hub access?)"
    fi
  else
    PROFILE=cpu; echo "profile: cpu (no CUDA GPU; the paper profile needs one)"
  fi
fi

# Per profile: model, seeds, and the arguments of each task's runs.
case "$PROFILE" in
  paper)  # the hypothesis: roberta-base, full data, 3 epochs, batch 32, lr 2e-4 (train.py's defaults)
    MODEL=roberta-base; DEF_SEEDS="0 1 2"
    GLUE_ARG=(); [ -n "${GLUE_DIR:-}" ] && GLUE_ARG=(--glue_dir="$GLUE_DIR")
    SST2_ARGS=(); COLA_ARGS=() ;;
  cpu)    # MiniLM on 2 CPU cores: a capped training set and a small model's learning rate
    MODEL=minilm; DEF_SEEDS="0"; GLUE_ARG=(--glue_dir="$LOCAL_GLUE")
    SST2_ARGS=(--max_train=8000 --epochs=1 --lr=2e-3)
    COLA_ARGS=(--max_train=4000 --epochs=2 --lr=5e-4) ;;
  smoke)  # a tiny random BERT: numbers mean nothing, the plumbing is exercised end to end
    MODEL=tiny-bert; DEF_SEEDS="0"; GLUE_ARG=(--glue_dir="$LOCAL_GLUE")
    SST2_ARGS=(--max_train=128 --max_eval=64 --epochs=2 --lr=2e-3)
    COLA_ARGS=(--max_train=128 --max_eval=64 --epochs=2 --lr=2e-3) ;;
  *) echo "unknown profile '$PROFILE': use paper, cpu, smoke or nothing (auto)" >&2; exit 2 ;;
esac

TASKS=${TASKS:-"sst2 cola"}
BUDGETS=${BUDGETS:-"0.1 0.2 0.5"}
SEEDS=${SEEDS:-$DEF_SEEDS}
METHODS=${METHODS:-"lora adalora fwlora l2lora"}
OUT=${OUT:-results/$PROFILE}
mkdir -p "$OUT"

# The sweep, in the order it runs: LoRA first within each (task, budget, seed), so ratios come early.
RUNS=()
for task in $TASKS; do
  for budget in $BUDGETS; do
    for seed in $SEEDS; do
      for method in $METHODS; do
        RUNS+=("$task $budget $seed $method")
      done
    done
  done
done

run_one() {  # task budget seed method [gpu]; returns train.py's exit code (130 = interrupted)
  local task=$1 budget=$2 seed=$3 method=$4 gpu=${5:-}
  local name="${task}_${method}_b${budget}_s${seed}"
  if [ -f "$OUT/$name.json" ]; then echo "skip $name (done)"; return 0; fi
  local args=(); [ "$task" = sst2 ] && args=("${SST2_ARGS[@]}") || args=("${COLA_ARGS[@]}")
  echo "=== $name $(date +%H:%M:%S)"
  CUDA_VISIBLE_DEVICES=${gpu:-${CUDA_VISIBLE_DEVICES:-}} python train.py --model="$MODEL" --task="$task" \
    --method="$method" --budget="$budget" --seed="$seed" --out_dir="$OUT" "${GLUE_ARG[@]}" "${args[@]}" \
    "${OVERRIDES[@]}" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 3 "$OUT/$name.log" | sed 's/^/    /'
  [ $rc -ne 0 ] && [ $rc -ne 130 ] && echo "FAILED $name (exit $rc): see $OUT/$name.log"
  return $rc
}

trap 'echo; echo "interrupted: finished runs are kept; run the same command again to resume"; exit 130' INT
START=$(date +%s)
NGPU=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$PROFILE" != smoke ] && [ "$NGPU" -gt 1 ]; then
  echo "$NGPU GPUs: one run per GPU"
  for ((g = 0; g < NGPU; g++)); do
    ( for ((i = g; i < ${#RUNS[@]}; i += NGPU)); do
        run_one ${RUNS[$i]} "$g"; [ $? -eq 130 ] && exit 130
      done ) &
  done
  wait
else
  for spec in "${RUNS[@]}"; do
    run_one $spec
    [ $? -eq 130 ] && { echo "interrupted: run the same command again to resume"; exit 130; }
  done
fi
echo "sweep finished in $(( ($(date +%s) - START) / 60 )) min"
python report.py "$OUT"
