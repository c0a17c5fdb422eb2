#!/usr/bin/env bash
# The 2 x H200 run of eval/bench_multigpu.py and tests/test_multidevice.py (issue 15), from a source checkout:
#   OUT=/some/dir bash eval/run_multigpu.sh info test devmap tp
# Each stage has its own time limit so one that hangs cannot eat the others' time. NVLink multicast stays off.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD KVCOMP_EVAL_NO_PROGRESS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-eval/results}
mkdir -p "$OUT"
for stage in "$@"; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  case $stage in
    info) nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvidia-smi topo -m
          python3 -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__, torch.cuda.device_count())" ;;
    test) timeout 150 python3 -m pytest -q -ra -p no:cacheprovider tests/test_multidevice.py --durations=8 2>&1 \
            | tee "$OUT/pytest_multidevice.log" ;;
    devmap) timeout 240 python3 eval/bench_multigpu.py --layers 24 --capacity --out "$OUT/bench_multigpu.json" 2>&1 \
            | grep -v "it/s\]" | tee "$OUT/bench_multigpu.log" ;;
    tp) timeout 200 torchrun --nproc-per-node 2 eval/bench_multigpu.py --tp --out "$OUT/bench_multigpu_tp.json" 2>&1 \
            | grep -v "it/s\]" | tee "$OUT/bench_multigpu_tp.log" ;;
    *) echo "unknown stage $stage (info, test, devmap, tp)"; exit 2 ;;
  esac
done
echo "=== done $(date -u +%H:%M:%S)"
