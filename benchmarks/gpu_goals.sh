#!/usr/bin/env bash
# The engine's GPU figures in one device call (sized for about 8 minutes on one H100, each step
# under its own time limit so that one slow step cannot eat the others'):
#   1. LRP against the input gradient at batch 1, 16 and 64: ResNet-50, ConvNeXt-T and ViT-B/16 at
#      224 px, relprop's default and LXT's choices (`cp-lrp`), random weights;
#   2. LXT beside `cp-lrp` on ViT-B/16 where LXT is installed (reported `unsupported` otherwise);
#   3. the paper's ImageNet protocol at ResNet-50 / 224 px: its 6 methods and both curves on 16
#      random images, projected to 1,000 images (throughput does not depend on weights or images).
#
#   bash benchmarks/gpu_goals.sh                 # OUT=runs/gpu_goals PYTHON=python3
#
# Needs torch and torchvision only (the source tree on PYTHONPATH, nothing from ../shared);
# each step writes $OUT/<step>.md, which docs/benchmarks.md quotes with this command.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_goals}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
"$PYTHON" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee "$OUT/versions.txt"
step() {  # name, time limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "# $name: $*" | tee "$OUT/$name.md"
    timeout "$limit" "$@" >> "$OUT/$name.md" 2>&1
    echo "# $name: exit $?" | tee -a "$OUT/$name.md"
}
step ratios 270 "$PYTHON" benchmarks/bench_lrp.py --arch resnet50 convnext_tiny vit_b_16 --size 224 \
    --batch 1 16 64 --repeats 5 --device "$DEVICE" --no-memory --methods input-gradient lrp cp-lrp
step lxt 60 "$PYTHON" benchmarks/bench_lrp.py --arch vit_b_16 --size 224 --batch 1 16 --repeats 5 \
    --device "$DEVICE" --no-memory --methods input-gradient cp-lrp lxt
step protocol 240 "$PYTHON" benchmarks/bench_throughput.py --device "$DEVICE" --synthetic --arch resnet50 \
    --size 224 --images 16 --batch-size 16 --repeats 1 --methods lrp-split,gradcam,scorecam,ig,gbp,lrp-captum \
    --out "$OUT/protocol_table.md"
