#!/bin/bash
# The one prepared GPU check (issue 21): bench.py gpu, then the paper profile narrowed, with RUNS_PER_GPU 1 and 4.
export PYTHONPATH=$PWD/.gpu/stub HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHON=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/env.txt
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" | tee -a $OUT/env.txt
t0=$(date +%s)
timeout 260 python3 bench.py gpu --out_dir=$OUT 2>&1 | tee $OUT/bench_gpu.log | grep -v "^\s*$" | tail -40
echo "bench gpu rc ${PIPESTATUS[0]} in $(( $(date +%s) - t0 )) s" | tee -a $OUT/env.txt
P="--model=random-roberta-base --max_train=4096"
t1=$(date +%s)
TASKS=sst2 SEEDS=0 BUDGETS="0.1 0.2 0.5" METHODS="lora fwlora adalora" TIMED=lora,fwlora,adalora OUT=$OUT/paper timeout 170 bash run_all.sh paper $P --epochs=1 > $OUT/paper.log 2>&1
echo "paper smoke rc $? in $(( $(date +%s) - t1 )) s (RUNS_PER_GPU=1, with timing)" | tee -a $OUT/env.txt
grep -E "budgets on|started|finished|FAILED|timing|error" $OUT/paper.log | head -40
t2=$(date +%s)
RUNS_PER_GPU=4 TASKS=sst2 SEEDS=0 BUDGETS="0.1 0.2 0.5" METHODS="lora fwlora adalora" TIMED= OUT=$OUT/paper4 timeout 120 bash run_all.sh paper $P --epochs=1 > $OUT/paper4.log 2>&1
echo "paper smoke rc $? in $(( $(date +%s) - t2 )) s (RUNS_PER_GPU=4, no timing)" | tee -a $OUT/env.txt
grep -E "finished|FAILED" $OUT/paper4.log | head
cd $OUT && tar czf paper.tgz paper paper4 && rm -rf paper paper4 && ls -la
