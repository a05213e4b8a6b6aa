#!/usr/bin/env bash
# One device call that runs both GPU benchmarks and leaves their JSON and logs in $OUT.
# Installs nothing from the network: ml_collections (absent from the device image) comes
# as a wheel in .whl/ when present (see the device tool's README). Budgeted for ~8 min.
#   OUT=/tmp/out bash benchmarks/gpu_session.sh
set -u
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
timeout 250 python3 benchmarks/gpu_train.py --impls cudnn,pallas,xla --budget-s 130 \
  2>&1 | tee "$OUT/gpu_train.log" | grep -v '^ ' | cut -c1-600
(cd benchmarks && timeout 190 python3 attention.py --budget-s 130 2>&1 | tee "$OUT/attention.log" | grep -E '^T=|Error|error' | cut -c1-400)
ls -la "$OUT"
