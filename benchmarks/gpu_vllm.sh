#!/usr/bin/env bash
# vLLM vs MedAsk on one GPU, and MedAsk in upstream mode in front of vLLM (about 10 minutes of GPU).
#
#   bash benchmarks/gpu_vllm.sh [checkpoint folder, default model_artifacts/default]
#
# Needs: an NVIDIA GPU, this repository with `make install` done (.venv), and the package index
# (vLLM goes into its own virtual environment, .venv-vllm, so its CUDA torch never touches ours).
# Prints tokens/s at 1/16/64 concurrent users for vLLM directly, MedAsk in front of vLLM, and
# MedAsk's own engine on the GPU, and which GPTQ kernel vLLM picked (Marlin or not).
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT="${1:-model_artifacts/default}"
PORT="${VLLM_PORT:-8011}"
LOG=runs/bench/vllm.log
mkdir -p runs/bench
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

if [ ! -x .venv-vllm/bin/vllm ]; then
  python3 -m venv .venv-vllm
  .venv-vllm/bin/pip install -q "vllm==${VLLM_VERSION:-0.11.0}"
fi

.venv-vllm/bin/vllm serve "$CKPT" --served-model-name medask-vllm --quantization "${VLLM_QUANTIZATION:-gptq_marlin}" \
  --dtype float16 --max-model-len "${VLLM_MAX_MODEL_LEN:-1024}" --port "$PORT" --gpu-memory-utilization 0.5 \
  >"$LOG" 2>&1 &
VLLM_PID=$!
trap 'kill $VLLM_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do
  curl -fsS "http://127.0.0.1:$PORT/v1/models" >/dev/null 2>&1 && break
  kill -0 $VLLM_PID 2>/dev/null || { tail -40 "$LOG"; exit 1; }
  sleep 2
done

echo "--- the kernel vLLM chose (its log):"
grep -iE "marlin|gptq|quantiz" "$LOG" | head -5 || echo "(no kernel line found in $LOG)"

MEDASK_DEVICE=cuda timeout 480 .venv/bin/python benchmarks/upstream_load.py \
  --upstream-url "http://127.0.0.1:$PORT" --upstream-name "vllm" --model "$CKPT" \
  --concurrency 1 16 64 --requests 16 64 128 --max-batch 64
