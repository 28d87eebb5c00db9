#!/usr/bin/env bash
# The full tin10 grid of docs/results.md: all 250 val images, every LRP variant and every
# baseline, each with and without Heat Quantization, both protocols, sharded over NPROC
# processes with torchrun, resumable (rerun the same line, with any NPROC, after a failure).
#
#   bash benchmarks/run_grid.sh                       # DEVICE=cuda NPROC=2 OUT=runs/grid250
#   DEVICE=cpu NPROC=2 OUT=runs/grid250 nice bash benchmarks/run_grid.sh
#   python benchmarks/run_grid.py tables runs/grid250 > runs/grid250/tables.md
#
# Then paste the tables into docs/results.md (section "The 250-image grid").
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
exec python benchmarks/run_grid.py run --device "${DEVICE:-cuda}" --nproc "${NPROC:-2}" \
    --out "${OUT:-runs/grid250}" --shared "$SHARED" "$@"
