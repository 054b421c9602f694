#!/usr/bin/env bash
# On the GPU host, in one device call (nothing to carry; about 5 of its 10 minutes):
#   bash build/hopper-check.sh
# The Hopper forward (FlashAttn.Native/src/flash/hopper/) end to end:
#  1. builds libflashattn, flash_selftest and hopper_probe for sm_90a alone (every kernel once, not
#     the shipped 80;90a pair), and reads the Hopper kernels' ptxas report (registers, spills,
#     setmaxnreg honoured: no C7508) and SASS (HGMMA, UTMALDG, no local memory);
#  2. hopper_probe: TMA, the wgmma descriptors and fragment layouts one at a time (if the forward
#     fails, this says which layout is wrong, and which alternative would be right);
#  3. flash_selftest: every case against the float64 reference, each naming the forward that ran
#     (a case the Hopper kernel covers fails if it ran on the sm_80 path); a few again with
#     FLASHATTN_HOPPER=0, which must run (and pass) on the sm_80 path;
#  4. flash_selftest --bench: forward TFLOP/s, Hopper against sm_80, and the backward;
#  5. compute-sanitizer memcheck, racecheck and synccheck on small Hopper cases.
# Full logs go to $OUT; a short summary is printed last.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-/tmp/hopper-check-out}
mkdir -p "$OUT"
build=/tmp/hopper-check-build
summary=()

gpu=$(nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null | head -1)
echo "# $(date -u +%F) GPU: $gpu; $(nvcc --version | tail -1)" | tee "$OUT/env.txt"

# 1. Build (-DFLASHATTN_CUDA_ARCHS is passed every time: CMake caches it, and a warm machine keeps the folder).
start=$SECONDS
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DFLASHATTN_CUDA=ON -DFLASHATTN_CUDA_ARCHS=90a \
  >"$OUT/build.log" 2>&1 &&
  cmake --build "$build" --target flash_selftest hopper_probe -j"$(nproc)" >>"$OUT/build.log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then
  grep -E "error|Error" "$OUT/build.log" | head -30
  echo "build FAILED (rc $rc); log: $OUT/build.log"
  exit 1
fi
summary+=("build (90a): ok, $((SECONDS - start)) s")
# ptxas's report for each Hopper kernel: the line after "Compiling entry function '...hopper...'".
python3 - "$OUT/build.log" >"$OUT/ptxas-hopper.txt" <<'PYEOF'
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
cat "$OUT/ptxas-hopper.txt"
warnings=$(grep -cE "C7508|C7509|C7510|C7515|wgmma.*serializ|setmaxnreg.*ignored" "$OUT/build.log")
spills=$(grep -vc " 0 bytes spill stores, 0 bytes spill loads" "$OUT/ptxas-hopper.txt")
summary+=("ptxas: $(wc -l <"$OUT/ptxas-hopper.txt") hopper/probe kernels, $(grep -o 'Used [0-9]* registers' "$OUT/ptxas-hopper.txt" | sort | uniq -c | tr -s ' \n' ' '); with spills: $spills; setmaxnreg/wgmma warnings: $warnings")
sass_line=""
for o in "$build"/FlashAttn.Native/CMakeFiles/flashattn_hopper.dir/src/flash/hopper/instantiations/*.o; do
  cuobjdump --dump-sass "$o" >"$OUT/sass.tmp" 2>/dev/null
  n=$(basename "$o" .cu.o); n=${n#flash_fwd_hopper_}
  sass_line+="$n: HGMMA $(grep -c HGMMA "$OUT/sass.tmp") UTMALDG $(grep -c UTMALDG "$OUT/sass.tmp") SETMAXREG $(grep -c USETMAXREG "$OUT/sass.tmp") LDL/STL $(grep -cE '\b(LDL|STL)\b' "$OUT/sass.tmp"); "
done
cp "$OUT/sass.tmp" "$OUT/sass-hdim128-bf16.txt" 2>/dev/null
rm -f "$OUT/sass.tmp"
summary+=("SASS: $sass_line")

bin=$build/FlashAttn.Native

# 2. The layout probe.
timeout 60 "$bin/hopper_probe" >"$OUT/probe.log" 2>&1
summary+=("hopper_probe (rc $?): $(grep -c '^PASS' "$OUT/probe.log") pass, $(grep -c '^FAIL' "$OUT/probe.log") fail")

# 3. Correctness.
start=$SECONDS
timeout 300 "$bin/flash_selftest" >"$OUT/selftest.log" 2>&1
rc=$?
summary+=("selftest (rc $rc, $((SECONDS - start)) s): $(tail -1 "$OUT/selftest.log"); \
$(grep -c '^PASS.*\[hopper\]' "$OUT/selftest.log") passed on the hopper path, \
$(grep -c '^PASS.*\[sm80\]' "$OUT/selftest.log") on sm80")
FLASHATTN_HOPPER=0 timeout 120 "$bin/flash_selftest" "sq1025 sk1025" >"$OUT/selftest-hopper0.log" 2>&1
summary+=("selftest with FLASHATTN_HOPPER=0 (rc $?): $(tail -1 "$OUT/selftest-hopper0.log"); \
$(grep -c '^PASS.*\[sm80\]' "$OUT/selftest-hopper0.log") passed on sm80")

# 4. Benchmark.
timeout 180 "$bin/flash_selftest" --bench >"$OUT/bench.log" 2>&1
summary+=("bench: rc $?")

# 5. Sanitizers on small Hopper cases (bf16 and fp16, d128, causal, GQA, partial tiles).
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck synccheck; do
    timeout 150 compute-sanitizer --tool $tool --error-exitcode 9 "$bin/flash_selftest" "d128 sq97 sk97 h8/2 causal" \
      >"$OUT/sanitize-$tool.log" 2>&1
    rc=$?
    summary+=("compute-sanitizer $tool: rc $rc; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize-$tool.log" | tail -1)")
  done
else
  summary+=("compute-sanitizer: not on PATH")
fi

echo
grep -E "^(FAIL|PASS.*\[sm80\].*grid)" "$OUT/selftest.log" | head -20
grep -E "^(FAIL|bench)" "$OUT/probe.log" "$OUT/bench.log" | head -20
sed -n '/^# bf16 TFLOP/,$p' "$OUT/bench.log"
echo "== summary"
printf '%s\n' "${summary[@]}"
