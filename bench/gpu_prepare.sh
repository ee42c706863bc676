#!/usr/bin/env bash
# Pack what bench/gpu_run.sh needs on a GPU machine that cannot reach a package index:
# .gpu/wheels (drseg's dependencies that such a machine's PyTorch image lacks, for its
# Python), .gpu/idrid (the IDRiD lesion set, 26 MB) and .gpu/photographs (the validation
# split's photographs, whose probabilities the suite writes). .gpu/ is git-ignored.
#
#   bench/gpu_prepare.sh [IDRID_DIR] [PYTHON_VERSION]     (defaults ../shared/data/idrid, 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
idrid=${1:-../shared/data/idrid}
python_version=${2:-3.12}
pip=".venv/bin/python -m pip"
test -d "$idrid/A. Segmentation" || { echo "$idrid: not the IDRiD lesion set (no 'A. Segmentation' folder); pass its path" >&2; exit 2; }

# The versions this checkout is tested with (the venv's), so the GPU run imports the same code.
packages=(boto3 botocore s3transfer jmespath pydantic pydantic_core annotated-types typing-inspection segmentation_models_pytorch)
pins=()
for name in "${packages[@]}"; do
  pins+=("$name==$($pip show "$name" | sed -n 's/^Version: //p')")
done
rm -rf .gpu/wheels && mkdir -p .gpu/wheels
$pip download -q --no-deps --only-binary=:all: --python-version "$python_version" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .gpu/wheels "${pins[@]}"

rm -rf .gpu/idrid && cp -r "$idrid" .gpu/idrid
# The validation split is ingest's (seeded, stratified): read it from an ingest at a small width.
rm -rf .gpu/photographs .gpu/split && mkdir -p .gpu/photographs
.venv/bin/drseg ingest --source .gpu/idrid --out .gpu/split --width 512 >/dev/null
.venv/bin/python - <<'PY'
import json, shutil
from pathlib import Path
manifest = json.loads(Path(".gpu/split/manifest.json").read_text())
photos = Path(".gpu/idrid/A. Segmentation/1. Original Images/a. Training Set")
for record in manifest["records"]:
    if record["split"] == "val":
        shutil.copy(photos / f"{record['id']}.jpg", ".gpu/photographs/")
PY
rm -rf .gpu/split
du -sh .gpu/wheels .gpu/idrid .gpu/photographs
