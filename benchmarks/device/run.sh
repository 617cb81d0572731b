#!/usr/bin/env bash
# The GPU checks of issues 3, 7 and 8, run ON the device machine in two calls (benchmarks/device/README.md):
#   bash benchmarks/device/run.sh 1   ResidMLP 1 on the GPU: the shipped config's recovery of seed 0 and its wall
#                                     time (issue 3's H100 yardstick; T1 seconds at most, default 300), step times and a
#                                     profile at batch 2048 (bench_step --profile); keeps the first
#                                     half of the SmolLM2 GGUF in /tmp/smol for call 2
#   bash benchmarks/device/run.sh 2   SmolLM2-135M: step throughput (lm_step: tokens/s, peak memory, fraction of
#                                     bf16 peak), a decomposition in the time left, its eval, and the digits ablation
# Results go to $OUT (at most 8 files come back). Here: SPD_DEVICE=cpu QUICK=1 SKIP_WHEELS=1 PY=.venv/bin/python
# runs the same flow, tiny (the wheels are for the device image's Python 3.12).
set -uo pipefail
PART=${1:?usage: run.sh 1|2}
OUT=${OUT:-/tmp/spd-device-out}
mkdir -p "$OUT"
PY=${PY:-python3}
DEV=${SPD_DEVICE:-cuda}
QUICK=${QUICK:-0}
BUDGET=${BUDGET:-100}  # part 2: seconds for the SmolLM2 decomposition itself
export PYTHONUNBUFFERED=1 SPD_CACHE=${SPD_CACHE:-/tmp/spd-cache}
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
    # Per-step time beside the reference's (18 ms/step on an H100 for ResidMLP 1 at C 100, batch 2048), with a
    # profile (ops and kernels per step, GPU busy fraction: is the step waiting on the host?), and the ResidMLP 2
    # paper config's step (C 400, batch 2048), to size its 5-seed runs; T2 seconds at most each.
    bench=(--steps 200 --warmup 20 --modes compile --device "$DEV")
    [ "$QUICK" = 1 ] && bench=(--steps 2 --warmup 1 --modes compile --device "$DEV")
    for cfg in resid_mlp1 resid_mlp2; do
        log "bench_step $cfg batch 2048"
        prof=(); [ $cfg = resid_mlp1 ] && prof=(--profile "$OUT/profile_resid_mlp1_$DEV.txt")
        timeout "${T2:-45}" "$PY" benchmarks/bench_step.py --config "configs/$cfg.yaml" --set train.batch_size=2048 \
            "${bench[@]}" "${prof[@]}" 2>&1 | grep -v Warning | tee -a "$OUT/run1.log" | tail -3
    done
    rec=()
    [ "$QUICK" = 1 ] && rec=(--set train.steps=50 --set train.checkpoint_every=1000000)
    log "recovery ResidMLP 1 seed 0 (shipped config)"
    timeout "${T1:-300}" "$PY" benchmarks/recovery.py configs/resid_mlp1.yaml --seeds 0 --set "train.device=$DEV" "${rec[@]}" \
        --runs-dir /tmp/runs --json-out "$OUT/recovery_resid_mlp1_$DEV.json" >> "$OUT/run1.log" 2>&1
    log "recovery rc $?"
    cp /tmp/runs/resid_mlp1-seed0/metrics.jsonl "$OUT/metrics_resid_mlp1_$DEV.jsonl"  # step times, also when cut off
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
lm=(--steps 20 --warmup 3); train_steps=2000; ablate_n=512; ga=200
if [ "$QUICK" = 1 ]; then
    over+=("train.batch_size=2" "train.faithfulness_warmup.steps=2" "eval.batch_size=2" "eval.n_batches=1"
         "eval.adversarial.n_steps=2")
    lm=(--steps 1 --warmup 1); ablate_n=16; ga=5
fi
log "lm_step"
timeout 150 "$PY" benchmarks/lm_step.py --config configs/smollm2.yaml --set "${over[@]}" "${lm[@]}" \
    --out "$OUT/lm_step_$DEV.json" --profile "$OUT/profile_smollm2_$DEV.txt" >> "$OUT/run2.log" 2>&1
log "lm_step rc $?"
step_s=$("$PY" -c "import json; print(json.load(open('$OUT/lm_step_$DEV.json'))['seconds_per_step'])" 2>/dev/null || echo 1)
steps=$("$PY" -c "print(max(10, min($train_steps, int($BUDGET / ($step_s * 1.15)))))")
[ "$QUICK" = 1 ] && steps=3
log "train $steps steps (${step_s} s/step measured)"
rm -rf /tmp/runs/smollm2
tset=(); for o in "${over[@]}" "train.steps=$steps" "train.checkpoint_every=100000" "train.log_every=$((steps / 20 + 1))"; do
    tset+=(--set "$o")
done
timeout $((BUDGET + 120)) "$PY" -m spd.cli train configs/smollm2.yaml "${tset[@]}" --out /tmp/runs/smollm2 \
    >> "$OUT/run2.log" 2>&1
log "train rc $?"
timeout 100 "$PY" -m spd.cli eval /tmp/runs/smollm2 --json --no-natural > "$OUT/eval_smollm2_$DEV.json" \
    2>> "$OUT/run2.log"
log "eval rc $?"
timeout 150 "$PY" -m spd.cli ablate /tmp/runs/smollm2 --forget next:digits --retain next-not:digits --n $ablate_n \
    --ga-steps $ga --no-natural --out /tmp/runs/smollm2/ablate >> "$OUT/run2.log" 2>&1
log "ablate rc $?"
cp /tmp/runs/smollm2/metrics.jsonl "$OUT/metrics_smollm2_$DEV.jsonl"
cp /tmp/runs/smollm2/ablate/*.md "$OUT/" 2>/dev/null
cp /tmp/runs/smollm2/ablate/*.json "$OUT/" 2>/dev/null
ls "$OUT" >> "$OUT/run2.log"
