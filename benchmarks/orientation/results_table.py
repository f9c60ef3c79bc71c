"""Write benchmarks/orientation/results.md from results.json (written by measure_check.py).

    python benchmarks/orientation/results_table.py
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
rows = json.loads((HERE / "results.json").read_text())
out = ["# Orientation self-check: measurements", "",
       "Bundled demo model (`hsam-lite-demo`), CPU, speed mode auto, on a 2-core machine shared with other jobs (run",
       "times vary with the load). Each scan as given and as copies whose voxel arrays are mirrored or turned in-plane",
       "under the same header (a scan whose header lies). Produced by:", "",
       "```bash",
       "python benchmarks/orientation/measure_check.py -o benchmarks/orientation/results.json \\",
       "    ../shared/data/real/totalsegmentator/example_ct_sm.nii.gz ../shared/data/real/dcmqi/ct-3slice \\",
       "    ../shared/data/real/totalsegmentator/example_ct.nii.gz",
       "python benchmarks/orientation/results_table.py",
       "```", "",
       "Scores: organ voxels / mean confidence inside organs on the checked slice(s), for the copy as the check received",
       "it and for the three variants it tried.", "",
       "| scan | copy | slices | run s | check s | check share | checked slice | fired (layout named) | as given | mirrored L-R | mirrored F-B | turned 180 |",
       "|---|---|---:|---:|---:|---:|---|---|---|---|---|---|"]
for r in rows:
    sc = r["scores"]
    cell = lambda k: f"{sc[k]['organ_voxels']} / {sc[k]['mean_confidence']:.3f}"
    out.append(f"| {r['scan']} | {r['copy']} | {r['slices']} | {r['run_s']:.1f} | {r['check_s']:.1f} | "
               f"{100 * r['check_s'] / r['run_s']:.1f} % | {r['checked_slices']} | {r['fired'] or '-'} | "
               f"{cell('as given')} | {cell('mirrored left-right')} | {cell('mirrored front-back')} | {cell('turned 180 degrees')} |")
right = sum((r["fired"] is None) == (r["copy"] == "as given") and (r["fired"] in (None, r["copy"])) for r in rows)
out += ["", f"Right verdicts: {right} of {len(rows)} (silent on the scans as given, the undoing layout named on each copy)."]
(HERE / "results.md").write_text("\n".join(out) + "\n")
print("\n".join(out[-3:]))
