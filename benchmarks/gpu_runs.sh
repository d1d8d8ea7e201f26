#!/usr/bin/env bash
# The GPU measurements the speed issues ask for, in one go on a CUDA machine, each result file named
# after the card:
#   - the GSA module against its rivals (bench_gsa.py) in fp32 and in bf16 channels-last;
#   - `gsa profile` of the conv ResNet-50 and of GSA-ResNet-50, bf16 channels-last, eager and compiled;
#   - `gsa compare conv vs gsa`, bf16 channels-last, eager and compiled.
#   bash benchmarks/gpu_runs.sh [OUT_DIR] [BATCH]     (defaults: benchmarks/results/gpu, 64)
# The first warm-up iterations of the compiled runs pay the compilation (minutes).
set -euo pipefail
python - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("benchmarks/gpu_runs.sh: no CUDA device here; run it on a GPU machine")
EOF
card=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
out=${1:-benchmarks/results/gpu}
batch=${2:-64}
mkdir -p "$out"

python benchmarks/bench_gsa.py --device cuda --batch "$batch" \
    --out "$out/bench_gsa_${card}_fp32_b${batch}.csv"
python benchmarks/bench_gsa.py --device cuda --batch "$batch" --precision bf16 --channels-last \
    --out "$out/bench_gsa_${card}_bf16_cl_b${batch}.csv"

for compiled in "" "--compile"; do
    suffix=${compiled:+_compile}
    for model in conv gsa; do
        gsa profile --model "$model" --device cuda --batch-size "$batch" --precision bf16 --channels-last \
            $compiled --out "$out/profile_${model}_${card}_bf16_cl${suffix}.csv"
    done
    gsa compare conv vs gsa --device cuda --batch-size "$batch" --precision bf16 --channels-last \
        $compiled --out "$out/compare_${card}_bf16_cl${suffix}"
done
echo "results in $out"
