#!/usr/bin/env bash
# The long-range experiment: train conv and gsa on the `longrange` preset at several glyph distances,
# two runs at a time (one CPU thread each), then compare them by distance.
#   bash benchmarks/longrange_sweep.sh [OUT_DIR] [DISTANCES...]
set -euo pipefail
out=${1:-runs/longrange}
shift || true
distances=("${@:-5 9 13 17}")
read -r -a distances <<<"${distances[*]}"
mkdir -p "$out"
for distance in "${distances[@]}"; do
    for model in conv gsa; do
        gsa train --preset longrange --model "$model" --threads 1 \
            --set "data.distance=[$distance, $distance]" --out "$out/$model-d$distance" \
            > "$out/$model-d$distance.log" 2>&1 &
    done
    wait
done
gsa compare "$out"/*-d*/ --by data.distance --accuracy final --out "$out/compare"  # the trailing / skips the logs
