#!/usr/bin/env bash
# Fetch the Python packages bench/device_check.sh needs and a GPU machine without network
# may lack, as wheels for its Python (3.12, x86-64), into .whl/ (git-ignored). The check
# installs them offline. Usage: bench/device_wheels.sh [NAME==VERSION ...]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
pkgs=("$@")
(( ${#pkgs[@]} )) || pkgs=(rich==13.9.4 markdown-it-py==3.0.0 mdurl==0.1.2 pygments==2.18.0 pytest==8.3.4
                          pluggy==1.5.0 iniconfig==2.0.0 ninja==1.11.1.3 expecttest==0.3.0)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl "${pkgs[@]}"
ls -l .whl
