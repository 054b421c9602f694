#!/usr/bin/env bash
# On the GPU host, in one device call (nothing to carry; about 8 of its 10 minutes, every step capped):
#   bash build/hopper-check.sh
# The Hopper forward and backward (FlashAttn.Native/src/flash/hopper/) end to end:
#  1. builds libflashattn, flash_selftest and hopper_probe for sm_90a alone (every kernel once, not
#     the shipped 80;90a pair), and reads the Hopper kernels' ptxas report (registers, spills,
#     setmaxnreg honoured: no C7508) and SASS (HGMMA, UTMALDG, no local memory);
#  2. hopper_probe: TMA, the wgmma descriptors and fragment layouts one at a time (if the forward
#     fails, this says which layout is wrong, and which alternative would be right);
#  3. flash_selftest: first the backward's single-tile probe cases (bwd-probe: which of dV, dK, dQ
#     is off names the stage, see hopper/NOTES.md); then every case against the float64 reference,
#     each naming the forward and the backward that ran (a case the Hopper kernels cover fails if it
#     ran on the sm_80 path), under the default forward variant (persistent_expturn at d64 causal and at d128,
#     persistent192 at d64 without a causal mask; the "long" case's persistent192_snake with a causal mask:
#     flash_fwd_hopper.cu, fwd_variant); a few with
#     FLASHATTN_HOPPER=0, which must run (and pass) on the sm_80 path. If the backward's probe hangs
#     or crashes, the rest runs with FLASHATTN_HOPPER_BWD=0 (the Hopper forward alone) so that the
#     forward's results still come back;
#  3b. the dropout cases again with FLASHATTN_HOPPER_DROPOUT=0 (step 3 ran them on the Hopper kernels: the
#     "hdrop" cases on the Hopper forward and backward, the masked ones on the sm_80 forward, which writes the
#     mask, and the Hopper backward), so that the sm_80 kernels' dropout, the fallback, stays checked; then the
#     "hdrop" cases under FLASHATTN_HOPPER_FWD_VARIANT=persistent2 (its dropout kernel; logs appended to
#     selftest-variants.log);
#  4. flash_selftest --bench: forward TFLOP/s of each Hopper forward variant and sm_80, backward
#     TFLOP/s of each Hopper backward variant and sm_80 (each setting in a process of its own: the
#     library reads those variables once);
#  5. the backward's probe and grid (its bf16 half) again under the variants that are not the default
#     (persistent: dQ through a TMA reduce-add, its product before dV's and dK's, a persistent grid):
#     FLASHATTN_HOPPER_BWD_VARIANT=atomic (dQ by float atomics, the first kernel), =dqtma (the TMA
#     reduce-add) and =dqfirst (and dQ's product first):
#     after the bench, so that a slow self-test cannot starve it;
#  6. compute-sanitizer memcheck, racecheck and synccheck on small Hopper cases (forward variants, the
#     default backward), and memcheck and racecheck on one or two cases of each other backward variant
#     and on the dropout kernels;
#  7. last, the forward's grid again under FLASHATTN_HOPPER_FWD_VARIANT=persistent192_snake (192-row tiles on the
#     persistent grid in the snake order: the default for d64 causal from S 8192; its d64 half), =persistent192 (in
#     units: the grid's causal cases), =persistent (the turns around the
#     products: the dropout kernel's order; its grid and the persistent grid cases "pgrid"), =overlap and
#     =persistent_overlap (without the warpgroups' ping-pong), =persistent2 (a CTA's tiles overlapped; its grid,
#     "pgrid" and the odd head count "b5"), =rows192 (192-row tiles: its d64 half) and =pingpong (the
#     warpgroups taking turns on a grid of one CTA a tile), none of them a default, as the time left allows
#     (those passed before).
# Logs go to $OUT (8 files: the device tool returns 8 at most); a short summary is printed last.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-/tmp/hopper-check-out}
mkdir -p "$OUT"
# HOPPER_CHECK_BUILD=/tmp/flashattn-native reuses build/device-run.sh's build folder (the same configuration) on a machine
# still warm from that call: nothing left to compile.
build=${HOPPER_CHECK_BUILD:-/tmp/hopper-check-build}
summary=()
# Each step's time limit, capped so that the whole script ends inside the device call's 10 minutes
# (a step cut short still leaves its log, and the summary is printed).
budget=540
cap() { local left=$((budget - SECONDS)); echo $((left < $1 ? (left > 1 ? left : 1) : $1)); }

gpu=$(nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null | head -1)
echo "# $(date -u +%F) GPU: $gpu; $(nvcc --version | tail -1)" | tee "$OUT/build.log"

# 1. Build (-DFLASHATTN_CUDA_ARCHS is passed every time: CMake caches it, and a warm machine keeps the folder).
start=$SECONDS
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DFLASHATTN_CUDA=ON -DFLASHATTN_CUDA_ARCHS=90a \
  >>"$OUT/build.log" 2>&1 &&
  cmake --build "$build" --target flash_selftest hopper_probe -j"$(nproc)" >>"$OUT/build.log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then
  grep -E "error|Error" "$OUT/build.log" | head -30
  echo "build FAILED (rc $rc); log: $OUT/build.log"
  exit 1
fi
summary+=("build (90a): ok, $((SECONDS - start)) s")
# ptxas's report for each Hopper kernel: the line after "Compiling entry function '...hopper...'".
ptxas=$build/ptxas-hopper.txt
python3 - "$OUT/build.log" >"$ptxas" <<'PYEOF'
import re, sys
lines = open(sys.argv[1], errors="replace").read().splitlines()
for i, l in enumerate(lines):
    m = re.search(r"Compiling entry function '(\w*hopper\w*|\w*probe\w*)'", l)
    if m:
        info = []
        for x in lines[i + 1:i + 8]:
            if "Compiling entry function" in x:
                break
            if "registers" in x or "spill" in x:
                info.append(x.replace("ptxas info    :", "").strip())
        print(m.group(1)[:100], "|", " ; ".join(info))
PYEOF
cat "$ptxas"
warnings=$(grep -cE "C7508|C7509|C7510|C7515|wgmma.*serializ|setmaxnreg.*ignored" "$OUT/build.log")
spills=$(grep -vc " 0 bytes spill stores, 0 bytes spill loads" "$ptxas")
registers=$(grep -o 'Used [0-9]* registers' "$ptxas" | sort | uniq -c | tr -s ' \n' ' ')
summary+=("ptxas: $(wc -l <"$ptxas") hopper kernels, $registers; with spills: $spills; setmaxnreg/wgmma warnings: $warnings")
sass_line=""
for o in "$build"/FlashAttn.Native/CMakeFiles/flashattn_hopper.dir/src/flash/hopper/instantiations/*.o; do
  n=$(basename "$o" .cu.o); n=${n#flash_}
  cuobjdump --dump-sass "$o" >"$build/sass-$n.txt" 2>/dev/null
  f=$build/sass-$n.txt
  sass_line+="$n: HGMMA $(grep -c HGMMA "$f") UTMALDG $(grep -c UTMALDG "$f") UTMAREDG $(grep -c UTMAREDG "$f")"
  sass_line+=" SETMAXREG $(grep -c USETMAXREG "$f")"
  sass_line+=" named BAR.SYNC/ARV $(grep -cE 'BAR\.(SYNC|ARV)[.A-Z_]* R[0-9]|BAR\.ARV 0x[1-9]' "$f")"
  sass_line+=" LDL/STL $(grep -cE '\b(LDL|STL)\b' "$f"); "
done
cp "$build/sass-fwd_hopper_hdim128_bf16.txt" "$OUT/sass-fwd-hdim128-bf16.txt" 2>/dev/null
cp "$build/sass-bwd_hopper_hdim128_bf16.txt" "$OUT/sass-bwd-hdim128-bf16.txt" 2>/dev/null
summary+=("SASS: $sass_line")

bin=$build/FlashAttn.Native

# 2. The layout probe.
timeout "$(cap 60)" "$bin/hopper_probe" >"$OUT/probe.log" 2>&1
summary+=("hopper_probe (rc $?): $(grep -c '^PASS' "$OUT/probe.log") pass, $(grep -c '^FAIL' "$OUT/probe.log") fail")

# 3. Correctness. A kernel that hangs is cut off by timeout (rc 124); the steps that would hang
# the same way are then skipped, so that the call ends inside its 10 minutes with the logs.
start=$SECONDS
timeout "$(cap 60)" "$bin/flash_selftest" "bwd-probe" >"$OUT/selftest-variants.log" 2>&1
rc=$?
summary+=("selftest bwd-probe (rc $rc, $((SECONDS - start)) s): $(tail -1 "$OUT/selftest-variants.log")")
bwd_env=()
if [ $rc -eq 124 ] || [ $rc -eq 2 ]; then  # hung, or a CUDA error (CK exits 2): later cases would die with it
  bwd_env=(FLASHATTN_HOPPER_BWD=0)
  summary+=("the Hopper backward hung or crashed on its probe: the rest runs with FLASHATTN_HOPPER_BWD=0")
fi
start=$SECONDS
if grep -q "never completed" "$OUT/probe.log"; then
  echo "skipped: hopper_probe's TMA barrier never completed, the forward would hang" >"$OUT/selftest.log"
  rc=124
else
  env ${bwd_env[@]+"${bwd_env[@]}"} timeout "$(cap 240)" "$bin/flash_selftest" >"$OUT/selftest.log" 2>&1
  rc=$?
fi
hung=$([ $rc -eq 124 ] && echo 1 || echo 0)
summary+=("selftest (rc $rc, $((SECONDS - start)) s): $(tail -1 "$OUT/selftest.log"); \
$(grep -c '^PASS.*\[hopper\]' "$OUT/selftest.log") passed on the hopper forward, \
$(grep -c '^PASS.*\[sm80\]' "$OUT/selftest.log") on sm80's; $(grep -c '^PASS.* bwd:hopper' "$OUT/selftest.log") \
on the hopper backward, $(grep -c '^PASS.* bwd:sm80' "$OUT/selftest.log") on sm80's")
FLASHATTN_HOPPER=0 timeout "$(cap 60)" "$bin/flash_selftest" "sq1025 sk1025" >>"$OUT/selftest-variants.log" 2>&1
summary+=("selftest with FLASHATTN_HOPPER=0 (rc $?): $(tail -1 "$OUT/selftest-variants.log"); \
$(grep -c '^PASS.*\[sm80\]' "$OUT/selftest-variants.log") passed on sm80")

# 3b. Dropout on the sm_80 kernels (FLASHATTN_HOPPER_DROPOUT=0), then persistent2's.
if [ "$hung" = 0 ]; then
  start=$SECONDS
  log=$build/selftest-dropout.log
  env ${bwd_env[@]+"${bwd_env[@]}"} FLASHATTN_HOPPER_DROPOUT=0 timeout "$(cap 90)" "$bin/flash_selftest" "dropout" \
    >"$log" 2>&1
  rc=$?
  [ $rc -eq 124 ] && hung=1
  summary+=("selftest dropout, FLASHATTN_HOPPER_DROPOUT=0 (rc $rc, $((SECONDS - start)) s): $(tail -1 "$log"); \
$(grep -c '^PASS.*\[sm80\]' "$log") passed on the sm80 forward, $(grep -c '^PASS.* bwd:sm80' "$log") on \
the sm80 backward")
  { echo "== FLASHATTN_HOPPER_DROPOUT=0 (rc $rc)"; cat "$log"; } >>"$OUT/selftest-variants.log"
fi
if [ "$hung" = 0 ]; then
  start=$SECONDS
  log=$build/selftest-dropout-persistent2.log
  env ${bwd_env[@]+"${bwd_env[@]}"} FLASHATTN_HOPPER_FWD_VARIANT=persistent2 \
    timeout "$(cap 60)" "$bin/flash_selftest" "hdrop" >"$log" 2>&1
  rc=$?
  [ $rc -eq 124 ] && hung=1
  summary+=("selftest hdrop, FLASHATTN_HOPPER_FWD_VARIANT=persistent2 (rc $rc, \
$((SECONDS - start)) s): $(tail -1 "$log"); $(grep -c '^PASS.*\[hopper\]' "$log") passed on the hopper forward")
  { echo "== FLASHATTN_HOPPER_FWD_VARIANT=persistent2 (rc $rc)"; cat "$log"; } \
    >>"$OUT/selftest-variants.log"
fi

if [ "$hung" = 1 ]; then
  summary+=("bench and sanitizers skipped: the self-test hung (last lines in selftest.log)")
else
  # 4. Benchmark.
  start=$SECONDS
  env ${bwd_env[@]+"${bwd_env[@]}"} timeout "$(cap 150)" "$bin/flash_selftest" --bench >"$OUT/bench.log" 2>&1
  summary+=("bench: rc $?, $((SECONDS - start)) s")

  # 5. The backward variants' probe and grid (skipped when the default backward hung or crashed).
  : >"$OUT/selftest-grids.log"
  for variant in atomic dqtma dqfirst; do
    [ "$hung" = 1 ] || [ ${#bwd_env[@]} -gt 0 ] && break
    start=$SECONDS
    log=$build/selftest-bwd-$variant.log
    : >"$log"
    for filter in bwd-probe "bf16&bgrid"; do  # the grid's bf16 half: fp16 is the same code, another type
      FLASHATTN_HOPPER_BWD_VARIANT=$variant timeout "$(cap 90)" "$bin/flash_selftest" "$filter" >>"$log" 2>&1
      rc=$?
      [ $rc -eq 0 ] || break
    done
    [ $rc -eq 124 ] && hung=1
    summary+=("selftest bwd-probe + bgrid, FLASHATTN_HOPPER_BWD_VARIANT=$variant (rc $rc, $((SECONDS - start)) s): \
$(grep -c '^PASS' "$log") passed, $(grep -c '^FAIL' "$log") failed; \
$(grep -c '^PASS.* bwd:hopper' "$log") on the hopper backward")
    { echo "== FLASHATTN_HOPPER_BWD_VARIANT=$variant (rc $rc)"; cat "$log"; } >>"$OUT/selftest-grids.log"
  done

  # 6. Sanitizers on small Hopper cases (bf16 and fp16, causal, GQA, partial tiles): the forward's
  # three-warpgroup kernel (rows192, d64), the persistent one (both head dims; 144 tiles on at most 132
  # CTAs, so some CTAs run two, and the query blocks that see no key run none; persistent192_snake, its d64 192-row
  # kernel in the snake order, on the same d64 case), the default persistent_expturn
  # (its turns around the exponentials: the same cases, and d128's 288-tile grid), persistent2 (d64, 288
  # tiles: 2-3 a CTA, with and without keys, two tiles with keys in a row, a Q buffer reused), and the backward (d64
  # and d128, GQA 4:2, 2 key blocks of 3 (d64) or 6 (d128) query blocks: the two-stage ring wraps);
  # the default backward (persistent) again on 256 tiles (several a CTA; d128: 3 query blocks a tile,
  # the ring wraps); then the backward's other variants, memcheck and racecheck: atomic, dqtma and
  # dqfirst on the same bf16 cases as the first.
  if command -v compute-sanitizer >/dev/null; then
    for run in "FLASHATTN_HOPPER_FWD_VARIANT=pingpong:sq384 sk200 h4/2 causal bgrid:memcheck racecheck synccheck" \
      "FLASHATTN_HOPPER_FWD_VARIANT=rows192:d64 sq97 sk97 h8/2 causal:memcheck racecheck synccheck" \
      "FLASHATTN_HOPPER_FWD_VARIANT=persistent192:d64 sq1025 sk97 h8/2 causal grid:memcheck racecheck synccheck" \
      "FLASHATTN_HOPPER_FWD_VARIANT=persistent192_snake:d64 sq1025 sk97 h8/2 causal grid:memcheck racecheck" \
      "FLASHATTN_HOPPER_FWD_VARIANT=persistent:sq1025 sk97 h8/2 causal:memcheck racecheck synccheck" \
      "FLASHATTN_HOPPER_FWD_VARIANT=persistent_expturn:sq1025 sk97 h8/2 causal:memcheck racecheck synccheck" \
      "FLASHATTN_HOPPER_FWD_VARIANT=persistent_expturn:d128 sq700 sk500 h12/4 causal pgrid:memcheck racecheck" \
      "FLASHATTN_HOPPER_FWD_VARIANT=persistent2:d64 sq700 sk500 h12/4 causal pgrid:memcheck racecheck synccheck" \
      "FLASHATTN_HOPPER_BWD_VARIANT=persistent:bf16 d128 sq130 sk2048 h8/2 causal bgrid:memcheck racecheck" \
      "FLASHATTN_HOPPER_BWD_VARIANT=atomic:bf16&sq384 sk200 h4/2 causal bgrid:memcheck racecheck" \
      "FLASHATTN_HOPPER_BWD_VARIANT=dqtma:bf16&sq384 sk200 h4/2 causal bgrid:memcheck racecheck" \
      "FLASHATTN_HOPPER_BWD_VARIANT=dqfirst:bf16&sq384 sk200 h4/2 causal bgrid:memcheck racecheck" \
      "FLASHATTN_HOPPER_DROPOUT=1:bf16&sq200 sk200 h2/2 causal dropout0.17 hdrop:memcheck racecheck"; do
      setting=${run%%:*}
      rest=${run#*:}
      filter=${rest%%:*}
      [ ${#bwd_env[@]} -gt 0 ] && [[ $setting == *BWD_VARIANT* || $setting == *DROPOUT* ]] && continue
      for tool in ${rest#*:}; do
        log=$build/sanitize-${setting#FLASHATTN_HOPPER_}-$tool.log
        env ${bwd_env[@]+"${bwd_env[@]}"} "$setting" timeout "$(cap 60)" compute-sanitizer \
          --tool $tool --error-exitcode 9 "$bin/flash_selftest" "$filter" >"$log" 2>&1
        rc=$?
        summary+=("compute-sanitizer $tool '$filter' ($setting): rc $rc; \
$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1)")
        { echo "== $tool '$filter' ($setting) (rc $rc)"; head -c 1000000 "$log"; } >>"$OUT/sanitize.log"
      done
    done
  else
    summary+=("compute-sanitizer: not on PATH")
  fi

  # 7. The forward variants' grids, as the time left allows (step 3 ran the default: at the grids' lengths
  # persistent_expturn, persistent192 at d64 without a causal mask; persistent192_snake is the default with a causal
  # mask at long ones, so it comes first).
  for run in "persistent192_snake:d64 &grid" "persistent192:d64 &grid" "persistent: grid" "persistent:pgrid" \
    "overlap: grid" "persistent_overlap: grid" \
    "persistent2: grid" "persistent2:pgrid" "persistent2:b5" \
    "rows192:d64 &grid" "pingpong: grid"; do
    [ "$hung" = 1 ] || [ $((budget - SECONDS)) -lt 20 ] && break
    variant=${run%%:*}
    start=$SECONDS
    log=$build/selftest-$variant-$(echo "${run#*:}" | tr -cd 'a-z0-9').log
    env ${bwd_env[@]+"${bwd_env[@]}"} FLASHATTN_HOPPER_FWD_VARIANT=$variant timeout "$(cap 90)" "$bin/flash_selftest" "${run#*:}" >"$log" 2>&1
    rc=$?
    [ $rc -eq 124 ] && hung=1
    summary+=("selftest '${run#*:}', FLASHATTN_HOPPER_FWD_VARIANT=$variant (rc $rc, $((SECONDS - start)) s): \
$(tail -1 "$log"); $(grep -c '^PASS.*\[hopper\]' "$log") on the hopper path")
    { echo "== '${run#*:}', FLASHATTN_HOPPER_FWD_VARIANT=$variant (rc $rc)"; cat "$log"; } >>"$OUT/selftest-grids.log"
  done
fi

echo
grep -hE "^FAIL" "$OUT/selftest.log" "$OUT/selftest-variants.log" "$OUT/selftest-grids.log" 2>/dev/null | head -20
grep -E "^(FAIL|INFO)" "$OUT/probe.log" | head -12
grep -E "^bench" "$OUT/bench.log" 2>/dev/null
grep -E '^(# bf16 TFLOP|B[0-9])' "$OUT/bench.log" 2>/dev/null
echo "== summary"
printf '%s\n' "${summary[@]}"
