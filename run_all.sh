#!/usr/bin/env bash
# Reproduce the comparison table: tasks × budgets × seeds × methods, one train.py run each, then report.py.
#
#   bash run_all.sh                  # paper profile if a GPU and roberta-base are at hand, else the CPU profile
#   bash run_all.sh cpu              # offline: MiniLM, the GLUE copy in ./glue, capped data
#   bash run_all.sh paper --lr=3e-4  # any train.py Config field overrides the profile for the whole sweep
#   bash run_all.sh smoke            # tiny random model, a minute: checks the plumbing (tests use it)
#   bash run_all.sh paper --slurm    # or SLURM=1: the same runs as one SLURM job array, then a report job
#
# Before any run, `report.py plan` checks every run's config, and the data and model once. A run whose
# finished result in OUT records exactly this run's config is skipped (resume); a corrupt one is moved
# aside and redone; a result made with another config stops the sweep before any work. A failed run leaves
# <run>.error.json and its log, is listed at the end, and the sweep goes on. Ctrl-C or SIGTERM stops the
# sweep and its runs; run the same command again to finish. One sweep per OUT folder (a lock), and none while
# the jobs of an earlier --slurm submission for it are queued or running.
# Environment: TASKS, BUDGETS, SEEDS, METHODS narrow the sweep; OUT moves it; JOBS runs that many at once
# (on CPU each gets its share of the cores; with several GPUs one run per GPU); TIMED lists the methods timed
# side by side at the end (empty: none); PYTHON picks the interpreter. On SLURM, sbatch's own SBATCH_PARTITION,
# SBATCH_ACCOUNT and SBATCH_TIMELIMIT apply to every job; SBATCH_ARGS adds options (last, so they win).
set -u
cd "$(dirname "$0")"
PY=${PYTHON:-python}

# Started in the background (`bash run_all.sh &`), bash inherits an ignored SIGINT it cannot trap: restore it.
if [ "$(trap -p INT)" = "trap -- '' SIGINT" ] && [ -z "${RUN_ALL_REEXEC:-}" ]; then
  RUN_ALL_REEXEC=1 exec "$PY" -c 'import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp("bash", ["bash", *sys.argv[1:]])' "$0" "$@"
fi

declare -A RUNNING=()  # train.py processes now running: pid -> "slot name"
stop() {  # Ctrl-C or SIGTERM: stop every run (each records its .error.json), keep what is finished
  trap '' INT TERM
  [ ${#RUNNING[@]} -gt 0 ] && kill -TERM "${!RUNNING[@]}" 2>/dev/null
  wait
  echo; echo "interrupted: finished runs are kept; run the same command again to resume"
  exit 130
}
trap stop INT TERM

PROFILE=auto
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then PROFILE=$1; shift; fi
SLURM=${SLURM:-0}
OVERRIDES=()
for a in "$@"; do if [ "$a" = --slurm ]; then SLURM=1; else OVERRIDES+=("$a"); fi; done
if [ "$SLURM" = 1 ]; then
  command -v sbatch >/dev/null || { echo "error: --slurm needs SLURM, and sbatch is not on PATH: run this on" \
    "the cluster's login node (or load its slurm module), or drop --slurm to run here" >&2; exit 2; }
  [ "$PROFILE" = auto ] && { echo "error: with --slurm, name the profile first (bash run_all.sh paper --slurm):" \
    "this machine's GPU says nothing about the compute nodes'" >&2; exit 2; }
fi

if [ "$PROFILE" = auto ]; then
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    if "$PY" -c "from transformers import AutoConfig; AutoConfig.from_pretrained('roberta-base')" >/dev/null 2>&1; then
      PROFILE=paper; echo "profile: paper (a CUDA GPU is available and roberta-base loads)"
    else
      PROFILE=cpu; echo "profile: cpu (a GPU is available but roberta-base cannot be loaded: no hub access?)"
    fi
  else
    PROFILE=cpu; echo "profile: cpu (no CUDA GPU; the paper profile needs one)"
  fi
fi

# Per profile: model, seeds, budgets, each task's arguments, the methods timed side by side at the end, and
# on SLURM what one run's array task (SLURM_RUN) and the final timing-and-report job (SLURM_END) ask for.
case "$PROFILE" in
  paper)  # the hypothesis: roberta-base, full data, 3 epochs, batch 32, lr 2e-4 (train.py's defaults)
    MODEL=roberta-base; DEF_SEEDS="0 1 2"; DEF_BUDGETS="0.1 0.2 0.5"
    SST2_ARGS=""; COLA_ARGS=""; DEF_TIMED=lora,fwlora,adalora,fwrank
    SLURM_RUN="--gres=gpu:1 --cpus-per-task=4 --mem=32G"; SLURM_END=$SLURM_RUN ;;
  cpu)    # MiniLM on 2 CPU cores, sized to rank the methods in an hour (README: how it was chosen). One budget,
          # 0.5% (rank 3): CoLA at rank 1 stayed below MCC 0.2; on MiniLM 0.1% and 0.2% are the same rank 1.
    MODEL=minilm; DEF_SEEDS="0 1 2"; DEF_BUDGETS="0.5"
    SST2_ARGS="--max_train=6000 --epochs=1 --lr=2e-3"
    COLA_ARGS="--epochs=2 --lr=1e-3"; DEF_TIMED=lora,fwlora,adalora,fwrank
    # On SLURM: one thread per run, as here; a run's peak memory here was 1.1-1.4 GB (published/cpu/*.json).
    SLURM_RUN="--cpus-per-task=1 --mem=4G"; SLURM_END="--cpus-per-task=2 --mem=8G" ;;
  smoke)  # a tiny random BERT: numbers mean nothing, the plumbing is exercised end to end
    MODEL=tiny-bert; DEF_SEEDS="0"; DEF_BUDGETS="0.5"
    SST2_ARGS="--max_train=128 --max_eval=64 --epochs=2 --lr=2e-3"
    COLA_ARGS="--max_train=128 --max_eval=64 --epochs=2 --lr=2e-3"; DEF_TIMED=""
    SLURM_RUN="--cpus-per-task=1 --mem=2G"; SLURM_END=$SLURM_RUN ;;
  *) echo "unknown profile '$PROFILE': use paper, cpu, smoke or nothing (auto)" >&2; exit 2 ;;
esac

TASKS=${TASKS:-"sst2 cola"}
BUDGETS=${BUDGETS:-$DEF_BUDGETS}
TIMED=${TIMED-$DEF_TIMED}  # methods timed side by side at the end; TIMED= (empty) for none
SEEDS=${SEEDS:-$DEF_SEEDS}
METHODS=${METHODS:-all}  # all: every method of report.METHODS, in its order (LoRA first)
OUT=${OUT:-results/$PROFILE}
mkdir -p "$OUT" || exit 2

# One sweep per folder: the kernel drops the lock when the sweep dies, kill -9 included.
exec 9>>"$OUT/.lock"
if command -v flock >/dev/null && ! flock -n 9; then
  echo "error: another sweep (pid $(cat "$OUT/.lock.pid" 2>/dev/null || echo '?')) is running on $OUT;" \
       "wait for it, stop it, or use another OUT" >&2
  exit 1
fi
echo $$ >"$OUT/.lock.pid"
# Jobs of an earlier --slurm submission still queued or running own this folder's missing runs.
if [ -s "$OUT/slurm/jobs" ] && command -v squeue >/dev/null; then
  BUSY=$(squeue -h -o %F -j "$(paste -sd, "$OUT/slurm/jobs")" 2>/dev/null | sort -u | paste -sd, -)
  if [ -n "$BUSY" ]; then
    echo "error: SLURM jobs $BUSY, submitted earlier for $OUT, are still queued or running: wait for them" \
         "(squeue -j $BUSY) or cancel them (scancel ${BUSY//,/ }), then run this again" >&2
    exit 1
  fi
fi

task_args() {  # the profile's arguments for task $1, an override replacing the profile's value, then overrides
  local a args=()
  for a in --model="$MODEL" $([ "$1" = sst2 ] && echo "$SST2_ARGS" || echo "$COLA_ARGS"); do
    [[ " ${OVERRIDES[*]} " == *" ${a%%=*}="* ]] || args+=("$a")
  done
  echo "${args[*]} --task=$1 --out_dir=$OUT ${OVERRIDES[*]}"
}

# The sweep, in the order it runs: LoRA first within each (task, budget, seed). One line of train.py
# arguments per run; report.py plan names each run (train.run_name) and says which are done.
SPECS=()
for task in $TASKS; do
  for budget in $BUDGETS; do
    for seed in $SEEDS; do
      for method in $METHODS; do
        SPECS+=("$(task_args "$task") --method=$method --budget=$budget --seed=$seed")
      done
    done
  done
done
PLAN=$(printf '%s\n' "${SPECS[@]}" | "$PY" report.py plan "$OUT") || exit 2

# Time ratios: whole runs of the first budget trained side by side in one process, alone on the machine
# (the sweep's runs share it); report.py takes its ratios from these files. One line per task still to time:
# the task and bench.py's arguments.
timing() {
  local task
  for task in $TASKS; do
    [ -z "$TIMED" ] && break
    if ls "$OUT"/bench_runs_"$task"_* >/dev/null 2>&1; then echo "skip side-by-side timing of $task (done)" >&2
    else echo "$task runs --methods=$TIMED $(task_args "$task") --budget=${BUDGETS%% *} --seed=${SEEDS%% *}"; fi
  done
}

# --slurm: the runs still to do as one job array (task i: the i-th run's train.py command, as below), then
# one job after it for the timing and report.py. The job scripts are written to OUT/slurm/ for reading.
submit() {  # name-of-script sbatch-options...: print the job id, or show SLURM's refusal and return 1
  local id
  # shellcheck disable=SC2086
  if ! id=$(sbatch --parsable --chdir="$PWD" "${@:2}" ${SBATCH_ARGS:-} "$1" 2>"$1.err"); then
    echo "error: SLURM refused the submission of $1:" >&2; sed 's/^/  /' "$1.err" >&2; rm -f "$1.err"; return 1
  fi
  rm -f "$1.err"; echo "${id%%;*}"  # --parsable prints id[;cluster]
}
if [ "$SLURM" = 1 ]; then
  TODO=$(grep '^todo ' <<<"$PLAN"); N=$(grep -c . <<<"$TODO"); TIMING=$(timing)
  if [ "$N" = 0 ] && [ -z "$TIMING" ]; then
    echo "nothing to submit: every run of this sweep has its result in $OUT, so the table is complete" \
         "($PY report.py $OUT prints it)"
    exit 0
  fi
  DIR=$OUT/slurm; STAMP=$(date +%Y%m%d-%H%M%S); mkdir -p "$DIR" || exit 2
  job_script() {  # $1: its name; the body on stdin
    # shellcheck disable=SC2016  # variables of the job's environment, expanded when it runs
    { echo '#!/bin/bash'; echo 'export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1} PYTHONUNBUFFERED=1'; cat; } \
      >"$DIR/$1-$STAMP.sh"
  }
  { echo "case \$SLURM_ARRAY_TASK_ID in"  # task i: the i-th run to do, its train.py command as the local sweep's
    i=0; while read -r _ name args; do echo "  $i) exec $PY train.py $args >$OUT/$name.log 2>&1 ;;"; i=$((i + 1))
    done <<<"$TODO"
    echo "esac"; } | job_script runs
  { while read -r task args; do [ -z "$task" ] || echo "$PY bench.py $args >$OUT/bench_runs_$task.log 2>&1"
    done <<<"$TIMING"
    echo "exec $PY report.py $OUT"; } | job_script end
  discard() { rm -f "$DIR"/*-"$STAMP".sh; rmdir "$DIR" 2>/dev/null; exit 1; }  # a refusal leaves nothing
  ARRAY=""
  # shellcheck disable=SC2046,SC2086  # SLURM_RUN, SLURM_END and SBATCH_ARGS are lists of options
  if [ "$N" -gt 0 ]; then
    ARRAY=$(submit "$DIR/runs-$STAMP.sh" --job-name="fwlora-$PROFILE" --array=0-$((N - 1)) \
            --output="$DIR/%A_%a.out" $SLURM_RUN) || discard
  fi
  # shellcheck disable=SC2046,SC2086
  END=$(submit "$DIR/end-$STAMP.sh" --job-name="fwlora-$PROFILE-report" --output="$DIR/%j-report.out" \
        ${ARRAY:+--dependency=afterany:$ARRAY} $([ -n "$TIMING" ] && echo "$SLURM_END" || echo --mem=2G)) \
    || { [ -n "${ARRAY:-}" ] && scancel "$ARRAY"; discard; }
  printf '%s\n' ${ARRAY:+"$ARRAY"} "$END" >>"$DIR/jobs"
  [ -n "${ARRAY:-}" ] && echo "submitted job array $ARRAY: $N runs, one per task ($DIR/runs-$STAMP.sh)"
  echo "submitted job $END: ${TIMING:+side-by-side timing, then }the report${ARRAY:+, after the array ends}"
  echo "watch: squeue -j ${ARRAY:+$ARRAY,}$END   logs: $OUT/<run>.log   table: $OUT/table.md, written by job $END"
  echo "stop:  scancel ${ARRAY:+$ARRAY }$END; the same command submits again what is missing"
  exit 0
fi

NGPU=0
[ "$PROFILE" = paper ] && NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$NGPU" -gt 1 ]; then JOBS=$NGPU; echo "$NGPU GPUs: one run per GPU"; fi
# On CPU, runs at once, one thread each: 2 single-thread runs finished in 0.65× the time of the same runs one
# after the other on 2 threads (README, Speed). On one GPU, one run at a time.
[ "$PROFILE" = paper ] && JOBS=${JOBS:-1} || JOBS=${JOBS:-$(nproc)}
THREADS=$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))
FREE=($(seq 0 $((JOBS - 1))))
FAILED=()

finish() {  # pid exit-code: report one finished run, free its slot
  local slot name
  read -r slot name <<<"${RUNNING[$1]}"
  unset "RUNNING[$1]"
  FREE+=("$slot")
  tail -n 3 "$OUT/$name.log" | sed 's/^/    /'
  [ "$2" -ne 0 ] && { echo "FAILED $name (exit $2): see $OUT/$name.log"; FAILED+=("$name"); }
}

START=$(date +%s)
while read -r state name args; do
  if [ "$state" = done ]; then echo "skip $name (done)"; continue; fi
  if [ ${#RUNNING[@]} -ge "$JOBS" ]; then wait -n -p pid; rc=$?; finish "$pid" "$rc"; fi
  slot=${FREE[0]}; FREE=("${FREE[@]:1}")
  echo "=== $name $(date +%H:%M:%S)"
  if [ "$NGPU" -gt 1 ]; then export CUDA_VISIBLE_DEVICES=$slot; fi
  # shellcheck disable=SC2086  # $args is a list of --field=value words
  OMP_NUM_THREADS=$THREADS PYTHONUNBUFFERED=1 "$PY" train.py $args >"$OUT/$name.log" 2>&1 &
  RUNNING[$!]="$slot $name"
done <<<"$PLAN"
while [ ${#RUNNING[@]} -gt 0 ]; do wait -n -p pid; rc=$?; finish "$pid" "$rc"; done

echo "sweep finished in $(( ($(date +%s) - START) / 60 )) min ($JOBS at a time)"
[ ${#FAILED[@]} -gt 0 ] && echo "failed runs (${#FAILED[@]}): ${FAILED[*]}"

while read -r task args; do  # the side-by-side timing (timing, above), one task at a time, alone
  [ -z "$task" ] && continue
  echo "=== side-by-side timing: $task, $TIMED $(date +%H:%M:%S)"
  # shellcheck disable=SC2086
  PYTHONUNBUFFERED=1 "$PY" bench.py $args >"$OUT/bench_runs_$task.log" 2>&1 &
  RUNNING[$!]="0 bench_runs_$task"
  wait -n -p pid; rc=$?; finish "$pid" "$rc"
done <<<"$(timing)"
echo "all finished in $(( ($(date +%s) - START) / 60 )) min"
"$PY" report.py "$OUT"
