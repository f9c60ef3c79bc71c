#!/usr/bin/env bash
# Installs the DICOM validators that the SEG tests run on every SEG they write (issue 29; Testing/seg_validators.py):
# dciodvfy from Debian's dicom3tools, and dcmqi's segimage2itkimage (PyPI; Slicer's QuantitativeReporting reads SEGs
# with it). dcm2niix, python-gdcm (gdcmconv) and pylibjpeg-openjpeg make and cross-check the DICOM test series.
# The Python ones are in the test extra too; without these tools the tests skip those checks instead of failing.
# Run it as root inside the activated test venv: `bash .ci/install-validators.sh` (.ci/run does, before the tests).
set -euo pipefail

if ! command -v dciodvfy >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dicom3tools >/dev/null
fi
python -m pip install --quiet "dcmqi>=1.3" "dcm2niix>=1.0.20240202" "python-gdcm>=3.0.20" "pylibjpeg>=2" \
    "pylibjpeg-openjpeg>=2.3"

# fail here, not in the tests, when a tool installed but does not run
command -v dciodvfy >/dev/null
python - <<'PY'
import subprocess
import sys
from pathlib import Path

bin_dir = Path(sys.executable).parent
for tool, args in (("segimage2itkimage", ["--version"]), ("dcm2niix", ["-v"]), ("gdcmconv", ["--version"])):
    result = subprocess.run([str(bin_dir / tool), *args], capture_output=True, text=True, timeout=60)
    line = (result.stdout + result.stderr).strip().splitlines()[:1]
    print(f"{tool}: {line[0] if line else 'ran'}")
PY
echo "dciodvfy: $(command -v dciodvfy)"
