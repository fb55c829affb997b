#!/usr/bin/env bash
# The GPU section of `headpag bench` on a lent GPU machine, in one call (see bench/README.md, "On a GPU machine").
#
# The machine has torch and triton but no diffusers: the wheels of diffusers and importlib_metadata travel in
# .whl/ (carry=[".whl"]). headpag is installed from this checkout into /tmp/site, next to them. Results go to
# $OUT (the device tool's folder that comes back), else to bench/results/gpu/.
#
#   HEADPAG_SOURCE_COMMIT=<short hash> bash bench/gpu_run.sh
set -o pipefail
export PYTHONUNBUFFERED=1
out="$(realpath -m "${OUT:-bench/results/gpu}")"
mkdir -p "$out"
site=/tmp/site
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade --target "$site" . || exit 1
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
cd /tmp || exit 1  # not the checkout: its headpag/ lacks headpag/kernels (a package-dir mapping), /tmp/site has both
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.csv"
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available())" || exit 1
python3 -m headpag.apps.cli bench --sections gpu --out "$out" 2>&1 | tee "$out/bench.log"
