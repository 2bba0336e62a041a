# Mean device time per kernel from FLA_TRACE_KERNELS=1 output (each two-level launch waited
# for and timed), e.g. FLA_TRACE_KERNELS=1 fla bench cuda --lengths 4096 2>&1 | awk -f bench/kernel-times.awk
/ grid / { n[$1]++; t[$1]+=$(NF-1) } END { for (k in n) printf "%-14s %4d launches %8.4f ms mean\n", k, n[k], t[k]/n[k] }
