#!/usr/bin/env bash
# Where a training step's time goes, on the GPU host (build/device-run.sh's `profile` step runs it):
#   bash build/step-profile.sh                 TRAIN_ARGS='key=value ...' adds or overrides train keys
# The ncu method of shared/notes/step-profile.md: `ncu --clock-control none --metrics gpu__time_duration.sum --csv`
# over `flashattn train ... trainer.max_steps=2` and `=4`; per kernel name the difference divided by 2 is one step
# (start-up, the final evaluation and the checkpoint cancel out). A third run without ncu (PROFILE_WALL_STEPS, 100)
# gives the wall time per step from step 30 on (tiered JIT has settled; logging every 10 steps, as a training run does,
# so that the host is not made to wait for the GPU at every step). build/step_profile.py aggregates: kernel time, launches and
# wall time per step, the host gap, tokens/s and the top kernels; $OUT/step-profile.tsv, the ncu CSVs beside it.
# Defaults: the note's configuration, GPT-2 124M as experiment=owt/gpt2s-flash on the embedded corpus in bf16, dropout
# 0, without accumulation (train.global_batch_size = datamodule.batch_size = 16: one optimizer step per micro-batch);
# TRAIN_ARGS='model.config.dropout=0.1' profiles the seed's dropout.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-/tmp/flashattn-out}
mkdir -p "$OUT"
app=${FLASHATTN_APP:-$root/.device/app}
ncu=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
runs=${PROFILE_RUNS_DIR:-/tmp/flashattn-profile}
wall_steps=${PROFILE_WALL_STEPS:-100}

# TRAIN_ARGS come last: a key given twice takes its last value
args=(experiment=owt/gpt2s-flash datamodule.dataset=kjv datamodule.sources=embedded:kjv datamodule.val_ratio=0.01
      trainer.precision=bf16 model.config.dropout=0 datamodule.batch_size=16 train.global_batch_size=16
      trainer.log_every_n_steps=10 trainer.progress_bar=false)
# shellcheck disable=SC2206 # word splitting of the overrides is intended
args+=(${TRAIN_ARGS:-})

train() {  # train <run name> <max_steps> [command prefix...]: one run in a fresh folder, its log in $OUT
  local name=$1 steps=$2; shift 2
  rm -rf "${runs:?}/$name"
  DATA_DIR=${DATA_DIR:-/tmp/flashattn-data} "$@" "$app/flashattn" train "${args[@]}" \
    trainer.default_root_dir="$runs/$name" trainer.max_steps="$steps" >"$OUT/profile-$name.log" 2>&1
}

# the wall-time run first: it also prepares the token cache the ncu runs then find
train wall "$wall_steps" || { tail -20 "$OUT/profile-wall.log"; echo "step profile: the training run failed"; exit 1; }
metrics=$(ls "$runs"/wall/*/metrics.jsonl 2>/dev/null | head -1)
[ -n "$metrics" ] || { echo "step profile: no metrics.jsonl under $runs/wall"; exit 1; }
cp "$metrics" "$OUT/profile-metrics.jsonl"
for steps in 2 4; do
  train "ncu$steps" "$steps" "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
    --target-processes all --log-file "$OUT/profile-ncu$steps.csv" ||
    { tail -20 "$OUT/profile-ncu$steps.log"; echo "step profile: ncu over max_steps=$steps failed"; exit 1; }
done
# PROFILE_HOST_STEPS=N: one more run of N steps under EventPipe's sample profiler (every managed thread's stack each
# millisecond; native frames show as the managed method that called into them): $OUT/host.nettrace.xz, read here with
# build/host_profile.py. A separate run, so that the wall time above is not measured under the profiler.
if [ -n "${PROFILE_HOST_STEPS:-}" ]; then
  rm -f "$OUT/host.nettrace" "$OUT/host.nettrace.xz"
  train host "$PROFILE_HOST_STEPS" env DOTNET_EnableEventPipe=1 DOTNET_EventPipeOutputPath="$OUT/host.nettrace" \
    DOTNET_EventPipeConfig='Microsoft-DotNETCore-SampleProfiler:0:5,Microsoft-Windows-DotNETRuntime:0x4c14fccbd:5' ||
    echo "step profile: the traced run failed"
  cp "$(ls "$runs"/host/*/metrics.jsonl | head -1)" "$OUT/host-metrics.jsonl" 2>/dev/null
  xz -T0 -6 "$OUT/host.nettrace" && ls -la "$OUT/host.nettrace.xz"
fi
grep -m1 "^attention:" "$OUT/profile-wall.log"
python3 "$root/build/step_profile.py" "$OUT/profile-ncu2.csv" 2 "$OUT/profile-ncu4.csv" 4 "$OUT/profile-metrics.jsonl" \
  "$OUT/step-profile.tsv" 25
