#!/usr/bin/env bash
# Fashion-MNIST, conv against GSA: train both twins of the `fashion` preset on the real files (60,000
# training images; the 10,000 test images evaluated after every epoch), one after the other with every
# core, evaluate each run's best checkpoint, then compare the two runs (tables, learning-curve plots and
# a Markdown report in OUT_DIR/compare).
#   bash benchmarks/fashion.sh [OUT_DIR] [DATA_ROOT] [SEED]
# DATA_ROOT holds the four IDX files (gzipped or not; also under fashion-mnist/ or FashionMNIST/raw/);
# without it, GSA_DATA or else Debian's /usr/share/datasets/fashion-mnist (apt-get install
# dataset-fashion-mnist); an empty DATA_ROOT ("") means the same. SEED (default: the preset's, 0) sets
# recipe.seed for both twins. Each twin's run is designed to take at most 30 minutes on the 2-core CPU,
# trained as here, the same for both twins: bf16 autocast (torch's CPU autocast runs the convolutions and
# matrix products in bfloat16, which AVX-512 BF16 computes natively; the GSA kernels compute in float32),
# the channels-last layout and torch.compile. In fp32 without these flags the GSA twin's epochs take 100
# to 120 s here: 33 to 40 minutes for the 20.
set -euo pipefail
out=${1:-runs/fashion}
data=()
if [[ -n "${2:-}" ]]; then
    data=(--data "$2")
fi
seed=()
if [[ -n "${3:-}" ]]; then
    seed=(--set "recipe.seed=$3")
fi
mkdir -p "$out"
for model in conv gsa; do
    gsa train --preset fashion --model "$model" "${data[@]}" "${seed[@]}" --out "$out/fashion-$model" \
        --precision bf16 --channels-last --compile 2>&1 | tee "$out/fashion-$model.log"
    gsa eval "$out/fashion-$model" "${data[@]}" 2>&1 | tee -a "$out/fashion-$model.log"
done
gsa compare "$out/fashion-conv" "$out/fashion-gsa" --accuracy eval --out "$out/compare"
