/ grid / { n[$1]++; t[$1]+=$(NF-1) } END { for (k in n) printf "%-14s %4d launches %8.4f ms mean\n", k, n[k], t[k]/n[k] }
