#pragma once

// The norm kernels' variants by name. FLASHATTN_NORM_VARIANT=<name> makes norm.cu's launchers take one of them at every
// size instead of their tables; ops_bench times each that way, and device-run.sh's `variants` step runs the norm tests
// under each (`ops_bench --variants` lists them).
// rowsN: the rows family at N columns a thread; the l2 variants add the L2 prefetch of the next row; rowsca streams
// the backward's rows through shared memory (its forward is rows32's; where it does not apply, its backward is rows32's
// too), rowsca32 the same at 32 columns a thread at every size, rowscao3 at 80 registers for three blocks a
// multiprocessor up to 4096 columns, rowsca32e rowsca32 with dx0's dropout decisions made before the first pass
// (one norm with dropout; elsewhere it is rowsca32) (NOTES.md). rows32 with the backward's registers capped for three
// blocks a multiprocessor was a variant, and lost (NOTES.md).

namespace flashattn {

enum NormVariant : int {
  kAuto = -1, kBlock = 0, kRows16, kRows32, kRows16L2, kRows32L2, kRows64L2, kRowsCa, kRowsCa32, kRowsCaO3,
  kRowsCa32E, kNumVariants
};

constexpr const char* kNormVariantNames[kNumVariants] = {"block",    "rows16", "rows32",   "rows16l2", "rows32l2",
                                                         "rows64l2", "rowsca", "rowsca32", "rowscao3",
                                                         "rowsca32e"};

}  // namespace flashattn
