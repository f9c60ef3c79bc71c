"""Write benchmarks/orientation/results.md from results.json (written by measure_check.py).

    python benchmarks/orientation/results_table.py
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
data = json.loads((HERE / "results.json").read_text())
COPIES = ("as given", "mirrored left-right", "mirrored front-back", "turned 180 degrees")

out = ["# Orientation self-check and laterality check: measurements", "",
       "Bundled demo model (`hsam-lite-demo`), CPU, speed mode auto, 2 threads, on a 2-core machine shared with other",
       "jobs (wall times vary with the load and with pauses for other jobs' quiet timings; CPU seconds of this process",
       "do not). Each scan as given and as copies whose voxel arrays are mirrored or turned in-plane under the same",
       "header (a scan whose header lies); example_ct also cut to sub-ranges of its slices (scans that start or stop at",
       "other heights). Produced by:", "",
       "```bash",
       "python benchmarks/orientation/measure_check.py -o benchmarks/orientation/results.json \\",
       "    ../shared/data/real/totalsegmentator/example_ct_sm.nii.gz ../shared/data/real/dcmqi/ct-3slice \\",
       "    ../shared/data/real/totalsegmentator/example_ct.nii.gz --cuts 0:90,0:100,20:112,30:100,40:112,50:112,60:112,70:112",
       "python benchmarks/orientation/results_table.py",
       "```", "",
       "## Cost (real runs of `segment_volume`, scan as given)", "",
       "| scan | slices | checked slices | check passes / run passes | run s (CPU s) | check s (CPU s) | check share, wall (CPU) |",
       "|---|---:|---|---:|---:|---:|---:|"]
for r in data["live"]:
    passes = 3 * len(r["checked_slices"] or [])
    out.append(f"| {r['scan']} | {r['slices']} | {r['checked_slices']} | {passes} / {r['slices']} = "
               f"{100 * passes / r['slices']:.0f} % | {r['run_s']:.1f} ({r['run_cpu_s']:.1f}) | "
               f"{r['check_s']:.1f} ({r['check_cpu_s']:.1f}) | {100 * r['check_s'] / r['run_s']:.1f} % "
               f"({100 * r['check_cpu_s'] / r['run_cpu_s']:.1f} %) |")
    if r["warnings"]:
        out.append(f"| ^ warnings: {'; '.join(r['warnings'])} | | | | | | |")
out += ["", "## Detection (the check replayed on every copy and cut; its passes answered from the model's predictions",
        "of every slice in each layout)", "",
        "Scores: organ voxels / mean confidence inside organs on the checked slices, pooled, for the copy as the check",
        "received it and for the three layouts it tried. Laterality: share of liver+gallbladder / of spleen on the",
        "patient's right of the body's midline, in patient coordinates.", "",
        "| scan | slices | copy | checked slices | fired | right | as given | mirrored L-R | mirrored F-B | turned 180 | laterality (liver+gb / spleen on the right) |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
right = wrong_alarms = copies_found = copies = 0
for r in data["replay"]:
    expected = None if r["copy"] == "as given" else r["copy"]
    ok = r["fired"] == expected
    right += ok
    if expected is None:
        wrong_alarms += r["fired"] is not None
    else:
        copies += 1
        copies_found += ok
    cells = " | ".join(f"{r['scores'][c]['organ_voxels']} / {r['scores'][c]['mean_confidence']:.3f}"
                       if c in r["scores"] else "-" for c in COPIES)
    lat = r["laterality"]
    side = (f"{lat['liver and gallbladder']['share_on_right']:.2f} / {lat['spleen']['share_on_right']:.2f}"
            if lat else "-") + (" **warns**" if r["laterality_warning"] else "")
    out.append(f"| {r['scan']} | {r['cut'][0]}-{r['cut'][1] - 1} | {r['copy']} | {r['checked_slices']} | "
               f"{r['fired'] or '-'} | {'yes' if ok else '**no**'} | {cells} | {side} |")
lat_alarms = sum(bool(r["laterality_warning"]) for r in data["replay"])
out += ["", f"Right verdicts: {right} of {len(data['replay'])}: false alarms on the scans as given {wrong_alarms} of "
        f"{len(data['replay']) - copies}; mirrored or turned copies named correctly {copies_found} of {copies}. "
        f"Laterality warnings: {lat_alarms} of {len(data['replay'])} (the demo model is mostly position-driven: on no "
        "copy are both its liver and its spleen on the wrong side, so only the slice check sees these copies; the "
        "laterality check is tested on TotalSegmentator's labels in Testing/test_laterality_check.py)."]
(HERE / "results.md").write_text("\n".join(out) + "\n")
print("\n".join(out[-1:]))
