#!/usr/bin/env bash
# Where the BiGLA kernels' time goes, on a GPU: registers/spills per compiled kernel
# (probe_bigla.json) and Nsight Compute's speed-of-light, occupancy, warp-stall and memory sections
# of one forward and one backward kernel launch at two ViG-T shapes (ncu_*.txt).
# Usage: OUT=dir bash benchmarks/gpu_ncu.sh
set -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
python3 benchmarks/probe_bigla.py --shape "ViG-T @1024" --out "$OUT" | tail -n 40
for shape in "ViG-T @224" "ViG-T @1024"; do
  tag=$(echo "$shape" | tr -dc '0-9')
  timeout -k 5 100 "$NCU" --clock-control none -k regex:'_fwd_kernel|_bwd_kernel' --launch-skip 2 --launch-count 2 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    python3 benchmarks/probe_bigla.py --shape "$shape" > "$OUT/ncu_vig_t_$tag.txt" 2>&1
  echo "ncu $shape: rc $?"; grep -E "Duration|Registers Per|Achieved Occupancy|Memory Throughput|Compute \(SM\)|Stall|Issued Ipc|No Eligible" "$OUT/ncu_vig_t_$tag.txt" | head -40
done
