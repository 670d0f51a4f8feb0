#!/usr/bin/env bash
# The checks that need a CUDA device, in one run:
#   1. the CUDA tests: tests/test_cuda.py (every curvature backend, sampling, online
#      LAM, save/load, the index and the baselines on the GPU against the CPU) and the
#      faiss-gpu test of tests/test_index.py (skipped where faiss has no GPU support);
#   2. `lam-study reproduce fashionmnist --quick --device cuda`, timed end to end;
#   3. benchmarks/training.py --device cuda: images/s of plain training and of the
#      online-LAM step on the GPU;
#   4. benchmarks/gpu_index_check.py, where faiss has GPU support: Flat and IVF on the GPU
#      against the CPU, then 1M items in IVF1024,PQ16 with 3-bit variances added in 20
#      parts to one GPU (and, with several, to all of them replicated and sharded);
#   5. the distributed fit with NCCL, one rank per GPU (1 where there is one): each
#      rank's posterior against one process over all the batches (tests/distributed_worker.py).
#   6. with two GPUs or more: the sharded index gathered over 2 NCCL ranks against one
#      process (tests/test_index_sharding.py with LAM_DIST_BACKEND=nccl).
#
# Usage: bash benchmarks/gpu_check.sh [OUTDIR]   (default: gpu-check)
# It runs in the current Python environment with the repository on PYTHONPATH. Set
# LAM_PLUGIN_WHEELS to a folder of wheels to install them first (into a private
# folder, without touching the environment), for a machine with no package index.
set -uo pipefail
out=${1:-gpu-check}
mkdir -p "$out"
if [ -n "${LAM_PLUGIN_WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/lam-plugin-site \
        "$LAM_PLUGIN_WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/lam-plugin-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1

python3 - <<'EOF' 2>&1 | tee "$out/environment.txt"
import faiss, torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none usable"
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", name)
print("faiss", faiss.__version__, "GPUs visible to faiss:", faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0)
EOF

timeout "${PYTEST_TIMEOUT:-180}" python3 -m pytest -q -m cuda tests/test_cuda.py tests/test_index.py \
    -rs --durations=8 -p no:cacheprovider 2>&1 | tee "$out/pytest-cuda.log"

start=$(date +%s)
timeout "${QUICK_TIMEOUT:-240}" python3 -m lam_study.cli reproduce fashionmnist --quick --device cuda \
    --out "$out/quick" --no-progress 2>&1 | tee "$out/quick.log"
echo "quick run on cuda: exit ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s" | tee -a "$out/quick.log"

timeout 180 python3 benchmarks/training.py --device cuda --images 8192 --repeats 3 2>&1 | tee "$out/training.log"

if python3 -c "import faiss, sys; sys.exit(0 if getattr(faiss, 'get_num_gpus', lambda: 0)() > 0 else 1)"; then
    timeout 420 python3 benchmarks/gpu_index_check.py 2>&1 | tee "$out/gpu-index.log"
fi

ngpu=$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")
mkdir -p "$out/distributed"
LAM_DIST_BACKEND=nccl timeout 180 python3 -m torch.distributed.run --standalone --nproc-per-node "$ngpu" \
    tests/distributed_worker.py fit "$out/distributed" 2>&1 | tee "$out/distributed.log"
python3 - "$out/distributed" "$ngpu" <<'EOF' 2>&1 | tee -a "$out/distributed.log"
import sys
import torch
sys.path.insert(0, "tests")
from distributed_worker import batches, model, settings
from lam_plugin import LaplaceEmbedder
out, n = sys.argv[1], int(sys.argv[2])
single = LaplaceEmbedder(model().cuda(), **settings()).fit([(x.cuda(), y) for x, y in batches()])
for r in range(n):
    got = torch.load(f"{out}/rank{r}.pt")["curvature"]
    err = float((got - single.curvature.cpu()).norm() / single.curvature.norm())
    print(f"NCCL rank {r} of {n}: curvature relative difference {err:.2e} (target 1e-5)")
EOF

if [ "$ngpu" -ge 2 ]; then
    LAM_DIST_BACKEND=nccl timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_index_sharding.py 2>&1 \
        | tee "$out/index-shards-nccl.log"
fi
