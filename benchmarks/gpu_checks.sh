#!/usr/bin/env bash
# GPU and native-bf16 CPU checks in one short run (about 5 minutes on one H100/H200):
# training throughput on CUDA (bf16 autocast + compile vs eager fp32), throughput on the host CPU with its
# native bf16 (2 threads, as on the 2-core target), and the training/generation/model tests on CUDA.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "CPU bf16 flags: $(grep -o -E 'avx512_bf16|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
echo "== training throughput on CUDA (base preset)"
timeout 200 python3 benchmarks/train_throughput.py --device cuda --preset base --batch-size 16 --seq-len 512 \
    --steps 10 --warmup 3
echo "== training throughput on this host's CPU, 2 threads, no compile (small preset)"
timeout 150 python3 benchmarks/train_throughput.py --device cpu --threads 2 --preset small --steps 3 --no-compile
echo "== tests on CUDA (training uses device auto)"
timeout 150 python3 -m pytest -q -x -m "not slow" tests/train tests/serve tests/model -p no:cacheprovider
