#!/usr/bin/env bash
# The GPU checks of issues 3, 7 and 8, run ON the device machine in two or three calls (benchmarks/device/README.md):
#   bash benchmarks/device/run.sh 1   ResidMLP 1 step timings (bench_step: the step as a CUDA graph at batch 512 and
#                                     2048), the GPU tests of train.cuda_graph, then starts in the
#                                     background (setsid: they outlive the call and run on through calls 2 and 3)
#                                     ResidMLP 1 (shipped config) and ResidMLP 2 (paper config), seeds 0-4, with
#                                     train.cuda_graph; keeps the first half of SmolLM2's GGUF in /tmp/smol
#   bash benchmarks/device/run.sh 2   SmolLM2-135M: a decomposition of BUDGET seconds of steps (its final evaluation:
#                                     eval_smollm2_*.json), the digits ablation with both baselines, then collects the
#                                     background runs (bg.tar.gz)
#   bash benchmarks/device/run.sh 3   (if time is left) waits for the background runs and collects them again
# Results go to $OUT (at most 8 files come back). Here: SPD_DEVICE=cpu QUICK=1 SKIP_WHEELS=1 PY=.venv/bin/python
# runs the same flow, tiny (the wheels are for the device image's Python 3.12).
set -uo pipefail
PART=${1:?usage: run.sh 1|2|3}
OUT=${OUT:-/tmp/spd-device-out}
mkdir -p "$OUT"
PY=${PY:-python3}
DEV=${SPD_DEVICE:-cuda}
QUICK=${QUICK:-0}
BUDGET=${BUDGET:-280}    # part 2: seconds of SmolLM2 decomposition steps
STEP_S=${STEP_S:-1.0}    # part 2: seconds per step assumed (0.75-0.85 alone on the H200; the background runs share it)
BG=${BG:-/tmp/bg}
START=$(date +%s)
CALL_S=${CALL_S:-600}    # part 2: the call's timeout_s; the ablation and the wait for the background runs fit inside
export PYTHONUNBUFFERED=1 SPD_CACHE=${SPD_CACHE:-/tmp/spd-cache} SPD_TARGET_CACHE=${SPD_TARGET_CACHE:-$PWD/.device/targets}
if [ "${SKIP_WHEELS:-0}" != 1 ] && compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/run$PART.log"; }
{ nvidia-smi -L 2>/dev/null; "$PY" -c "import torch, sys; print(sys.version.split()[0], torch.__version__,
    torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"; } >> "$OUT/run$PART.log" 2>&1

if [ "$PART" = 1 ]; then
    mkdir -p /tmp/smol && cp .device/a/* /tmp/smol/ 2>/dev/null && log "stashed $(ls /tmp/smol | tr '\n' ' ')"
    # (The eager step's profile at batch 2048, 2026-12-04: bench_step.py --modes compile --profile FILE; 19.5 ms/step,
    # the GPU busy 4.5% of it: benchmarks/results/gpu_h200_2026-12-04b.json.)
    gbench=(--steps 500 --warmup 20 --device "$DEV")
    [ "$QUICK" = 1 ] && gbench=(--steps 2 --warmup 1 --device "$DEV")
    # The same step captured as one CUDA graph and replayed (bench_step --modes graph: what the < 30 s yardstick
    # needs), at the shipped batch 512 and at 2048, in processes of their own (a failed capture stays there).
    for bs in 512 2048; do
        log "bench_step resid_mlp1 batch $bs graph graph_static"
        timeout "${T3:-75}" "$PY" benchmarks/bench_step.py --config configs/resid_mlp1.yaml \
            --set train.batch_size=$bs --modes graph graph_static "${gbench[@]}" 2>&1 | grep -v Warning \
            | tee -a "$OUT/run1.log" | tail -3
    done
    # The captured step against the eager one on a GPU (same trajectory; a failed capture fails the test).
    log "pytest tests/test_graphs.py"
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_graphs.py >> "$OUT/run1.log" 2>&1
    log "pytest rc $?"
    rm -rf "$BG" && mkdir -p "$BG"
    # Background runs (setsid: they outlive this call and run on while the machine is held), one process per seed,
    # all with train.cuda_graph (a failed capture falls back to eager steps, with a warning in the log):
    #   ResidMLP 1's shipped config, seeds 0-4 (issue 3's < 30 s yardstick);
    #   ResidMLP 2's paper config (C 400, batch 2048, 50k steps), seeds 0-4 (issue 3's >= 4 of 5).
    q=(); [ "$QUICK" = 1 ] && q=(--set train.steps=30 --set train.checkpoint_every=1000000)
    graph=true; [ "$DEV" = cpu ] && graph=false  # (the CPU miniature checks the flow, not the graphs)
    for seed in ${SEEDS:-0 1 2 3 4}; do
        for toy in resid_mlp1 resid_mlp2; do
            setsid nohup "$PY" benchmarks/recovery.py "configs/$toy.yaml" --seeds "$seed" --set "train.device=$DEV" \
                --set train.cuda_graph=$graph --set train.threads=2 "${q[@]}" --runs-dir "$BG/$toy" \
                --json-out "$BG/recovery_${toy}_graph_s$seed.json" > "$BG/${toy}_s$seed.log" 2>&1 < /dev/null &
        done
    done
    sleep 5
    log "background runs started: $(pgrep -fc recovery.py) recovery processes"
    exit 0
fi
collect() {  # the background runs' logs, results and metrics so far, as one file
    tar czf "$OUT/bg.tar.gz" -C "$BG" --exclude='*.safetensors' --exclude='checkpoint*' . 2>/dev/null
    log "collected $(tar tzf "$OUT/bg.tar.gz" 2>/dev/null | wc -l) background files"
}
if [ "$PART" = 3 ]; then  # a last call on the still-warm machine: wait for the background runs, collect them
    while pgrep -f recovery.py > /dev/null && [ "$(date +%s)" -lt "$((START + CALL_S - 10))" ]; do sleep 5; done
    log "background recovery processes still running: $(pgrep -fc recovery.py)"
    collect
    exit 0
fi

# ---- part 2: SmolLM2 ---------------------------------------------------------------------------------------
name=$(cut -d' ' -f3 .device/b/SHA256)
gguf=/tmp/smol/$name
if [ ! -f "$gguf" ]; then
    cat /tmp/smol/"$name".part0 .device/b/"$name".part1 > "$gguf" || { log "no first half: run part 1 first"; exit 1; }
fi
(cd /tmp/smol && sha256sum -c -) < .device/b/SHA256 >> "$OUT/run2.log" 2>&1 || { log "GGUF checksum mismatch"; exit 1; }
over=("target.kwargs.model=$gguf" "train.device=$DEV")
[ "${LM_GRAPH:-0}" = 1 ] && over+=("train.cuda_graph=true")  # try the captured step on SmolLM2 (set STEP_S to match)
train_steps=2000; ablate_n=512; ga=200
if [ "$QUICK" = 1 ]; then
    over+=("train.batch_size=2" "train.faithfulness_warmup.steps=2" "eval.batch_size=2" "eval.n_batches=1"
         "eval.adversarial.n_steps=2")
    ablate_n=16; ga=5
fi
steps=$("$PY" -c "print(max(10, min($train_steps, int($BUDGET / $STEP_S))))")
[ "$QUICK" = 1 ] && steps=3
log "train $steps steps (${STEP_S} s/step assumed)"
rm -rf /tmp/runs/smollm2
tset=(); for o in "${over[@]}" "train.steps=$steps" "train.checkpoint_every=$((steps / 4 + 1))" \
         "train.log_every=$((steps / 20 + 1))"; do
    tset+=(--set "$o")
done
timeout $((BUDGET + 220)) "$PY" -m spd.cli train configs/smollm2.yaml "${tset[@]}" --out /tmp/runs/smollm2 \
    >> "$OUT/run2.log" 2>&1
log "train rc $?"
cp /tmp/runs/smollm2/metrics.jsonl "$OUT/metrics_smollm2_$DEV.jsonl"
cp /tmp/runs/smollm2/eval.json "$OUT/eval_smollm2_$DEV.json" 2>/dev/null
collect
left=$((START + CALL_S - 25 - $(date +%s)))  # ablate from the last checkpoint if train was cut off
log "ablate (at most $left s)"
timeout "$left" "$PY" -m spd.cli ablate /tmp/runs/smollm2 --forget next:digits --retain next-not:digits \
    --n $ablate_n --ga-steps $ga --no-natural --out /tmp/runs/smollm2/ablate >> "$OUT/run2.log" 2>&1
log "ablate rc $?"
tar czf "$OUT/ablate.tar.gz" -C /tmp/runs/smollm2/ablate --exclude='*.safetensors' --exclude='model*' . 2>/dev/null
log "ablate files: $(tar tzf "$OUT/ablate.tar.gz" 2>/dev/null | tr '\n' ' ')"
# the background runs: wait for them until 15 s before the call's end, then take what there is
while pgrep -f recovery.py > /dev/null && [ "$(date +%s)" -lt "$((START + CALL_S - 15))" ]; do sleep 5; done
log "background recovery processes still running: $(pgrep -fc recovery.py)"
collect
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv >> "$OUT/run2.log" 2>&1
ls -la "$OUT" >> "$OUT/run2.log"
