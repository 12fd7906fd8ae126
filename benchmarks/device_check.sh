#!/usr/bin/env bash
# The one script a GPU session runs (63 s on an H200, at most 8 minutes): TI step time and peak memory on the
# Infinity-2B architecture at 0.25M and 1M, each --ti_mode, with and without
# --gradient_checkpointing, the step / forward ratio, and seconds per generated image at 1M.
#   bash benchmarks/device_check.sh            # needs CUDA
#   bash benchmarks/device_check.sh --dry-run  # the same code on the tests' tiny model, CPU (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the packages of this tree, installed or not
if [[ "${1:-}" == "--dry-run" ]]; then
  exec python benchmarks/device_check.py --model tiny --device cpu --pn 0.06M --sampling_pn 0.06M --repeats 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
timeout 480 python benchmarks/device_check.py --model infinity_2b --device cuda --pn 0.25M 1M --sampling_pn 1M --repeats 3
