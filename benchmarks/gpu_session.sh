#!/usr/bin/env bash
# Issue 19's GPU measurements as one prepared run for a lent GPU machine (the `device` tool): the checks
# of benchmarks/gpu_check.py (CUDA training step, 2:4 semi-structured vs dense on LLM-sized shapes,
# bk.deploy of a 2:4 MLP), then experiments/deploy_study.py on CUDA in fp16 for every study model, N:M
# first. Each step has its own time limit and writes what it measured before it is stopped
# (a stopped study is marked PARTIAL), so one slow step costs only its own rows.
#
#     bash benchmarks/gpu_session.sh [OUT]     # OUT defaults to results/deploy/gpu
#
# A GPU machine without benchkit's pure-Python dependencies (fvcore, iopath, yacs, termcolor,
# torch_pruning) can be given them as a folder .site/ beside this repository's code; mlflow is not needed.
set -u
out=${1:-results/deploy/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -d .site ]; then export PYTHONPATH=$PWD/.site${PYTHONPATH:+:$PYTHONPATH}; fi
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$out/nvidia-smi.txt" 2>&1
timeout -k 5 "${GPU_CHECK_LIMIT:-90}" "$py" benchmarks/gpu_check.py > "$out/gpu_check.md" 2> "$out/gpu_check.err"
echo "gpu_check rc=$?"
# model/seconds/granularities, in order; GPU_STUDIES replaces the list (e.g. to finish what a limit cut)
all=n:m,element,channel,kernel,head,neuron
for spec in ${GPU_STUDIES:-charlm_wide/70/$all charlm/45/$all lenet300/20/$all lenet5/30/$all resnet18/45/$all}; do
  IFS=/ read -r model limit grans <<< "$spec"
  timeout -k 5 "$limit" "$py" experiments/deploy_study.py --device cuda --dtype float16 --models "$model" \
    --granularities "$grans" --out "$out/$model" > "$out/$model.log" 2>&1
  echo "$model rc=$? ($limit s limit)"
done
