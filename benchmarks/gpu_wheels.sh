#!/usr/bin/env bash
# Download, here, the wheels that benchmarks/gpu_check.py needs on the lent GPU machine and its image lacks.
#
#     bash benchmarks/gpu_wheels.sh            # -> .whl/ at the repository root (ignored through .git/info/exclude)
#
# The GPU machine has Python 3.12 on x86_64, torch, torchvision, triton, transformers, accelerate, peft and
# scikit-image, and no network. Its transformers (5.17) is too old for dynrefer_hf (SubConfigSpec, so 5.24
# travels too), and it lacks datasets (tests/tiny.py imports dynrefer_hf.shapes, which needs it),
# evaluate, imagehash and pycocotools (with their own missing needs: dill, multiprocess, PyWavelets). The
# versions are the ones the test suite ran with. pycocoevalcap is left out: its wheel is 104 MB, over the
# 64 MiB a device call may carry, and only the caption metrics (not run by gpu_check.py) need it.
# docs/performance.md ("GPU") has the device command that installs these with pip --no-index --target.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
exclude="$(git rev-parse --git-common-dir)/info/exclude"
grep -qxF "/$dest/" "$exclude" 2>/dev/null || echo "/$dest/" >>"$exclude"
mkdir -p "$dest"
wheels=(
    transformers==5.24.0  # the image's 5.17 lacks transformers.configuration_utils.SubConfigSpec
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    evaluate==0.4.6
    ImageHash==4.3.2 PyWavelets==1.9.0
    pycocotools==2.0.11
)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "${wheels[@]}"
# the device's copy of the tree has no .git: the command there records this commit (--commit "$(cat .whl/COMMIT)")
commit=$(git rev-parse --short HEAD)
git diff --quiet HEAD -- || commit="$commit+dirty"
echo "$commit" >"$dest/COMMIT"
ls -l "$dest"
du -sh "$dest"
