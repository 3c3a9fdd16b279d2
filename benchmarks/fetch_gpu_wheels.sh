#!/usr/bin/env bash
# The wheels the GPU machine lacks or holds at another version (it reaches no registry; Python 3.12 there; peft so
# that the LoRA layers are the ones tested here): into .whl/ (ignored by git), which
# the device call carries; about 52 MB. Run here, before a device session:  bash benchmarks/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for pkg in diffusers==0.42.1 peft==0.21.2 torchao==0.18.0 bitsandbytes==0.50.2; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "$pkg"
done
ls -la .whl
