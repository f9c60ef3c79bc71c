"""Peak memory and time of writing a big CT for the segmentation child, in Slicer's process (issue 27, point 6).

    python benchmarks/slicer_input_write.py [--shape 600 512 512] [--dtype int16]

Each way runs in a fresh interpreter that holds the volume's voxels (as Slicer's scene does) and writes them:
``simpleitk`` (the former path: geometry.image_from_array + sitk.WriteImage, uncompressed) and ``raw`` (the module's
path now: HSAMSlicerLib.nrrd_input.write_volume_nrrd from the voxel buffer). Prints one JSON line per way: seconds and
the peak resident memory above what the voxels themselves take (MiB, from ru_maxrss). Timings on a busy machine are
indications only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, {module!r})
way, shape, dtype, out = {way!r}, {shape!r}, {dtype!r}, Path({out!r})
from HSAMSlicerLib import geometry
from HSAMSlicerLib.nrrd_input import write_volume_nrrd
import SimpleITK as sitk
array = np.full(shape, -1000, dtype=dtype)
array[:, 100:400, 100:400] = 40
matrix = np.diag([0.7, 0.7, 1.0, 1.0])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
if way == "simpleitk":
    sitk.WriteImage(geometry.image_from_array(array, matrix), str(out), False)
else:
    write_volume_nrrd(array, matrix, out)
seconds = time.perf_counter() - started
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"way": way, "shape": list(shape), "dtype": dtype, "voxels_mib": round(array.nbytes / 2**20),
                  "seconds": round(seconds, 2), "extra_peak_mib": round((after - before) / 1024),
                  "file_mib": round(out.stat().st_size / 2**20)}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[600, 512, 512], help="K J I")
    parser.add_argument("--dtype", default="int16")
    args = parser.parse_args()
    module = str(Path(__file__).resolve().parents[1] / "HSAMSlicer")
    for way in ("simpleitk", "raw"):
        with tempfile.TemporaryDirectory() as folder:
            code = CHILD.format(module=module, way=way, shape=tuple(args.shape), dtype=args.dtype,
                                out=str(Path(folder) / "input.nrrd"))
            print(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout,
                  end="")


if __name__ == "__main__":
    main()
