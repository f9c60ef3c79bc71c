"""Simulated-box accuracy of ``hsam prompt`` (issue 26): Dice per organ on the labelled CTs.

A person is simulated from the reference labels: for each organ a box on its first and last slice and about every
``--every-mm`` of its extent in between, each corner moved by a random whole number of pixels in [-jitter, +jitter]
and the box widened by ``--widen`` pixels; slices between two boxes get interpolated boxes (as in a prompt file).
Arms:
  boxes       all those boxes;
  half+prop   every second of them, without the first and last slice's box, "propagate": true beyond the ends;
              the aorta gets a "limits" "to" at its last slice below the arch (the person stops it there).
Aorta: scored below the arch only (:func:`cases.aorta_below_arch`; the arch's two vessels need a box each).
Each box is decoded, then re-boxed from its mask (``--rebox-mm``, the session's default; ``--no-rebox``: once).
``--square``: non-square slices padded to a square. ``--zoom FACTOR MIN_MM``: decode each box in a square crop
(:class:`hsam.prompting.zoom.Zoom`) instead of the whole slice; "frames" in the record = encoder runs the arm needs
without a cache (crops; whole slices count one each).

    python benchmarks/prompting/bench_boxes.py --data ../shared/data/real --cache runs/prompt-embeddings \
        --json benchmarks/prompting/results/boxes.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import CASES, Case, aorta_below_arch, dice, load_case  # noqa: E402
from embeddings_cache import load_frames_into, load_into, save_frames_from, save_from  # noqa: E402

from hsam.prompting.build import run_plan, session_on  # noqa: E402
from hsam.prompting.prompt_file import PromptPlan, interpolate_boxes  # noqa: E402
from hsam.prompting.session import REBOX_MM, PromptSession, SlicePrompt, box_of  # noqa: E402
from hsam.prompting.zoom import FrameEmbeddings, Zoom  # noqa: E402

ORGANS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5, "stomach": 6,
          "aorta": 7, "pancreas": 8}


DEFAULT_SIMULATION = argparse.Namespace(every_mm=25.0, jitter=5, widen=5.0, seed=0)  # main()'s defaults


def truth(case: Case, organ: int) -> np.ndarray:
    return aorta_below_arch(case.reference) if organ == 7 else case.reference == organ


def boxed_slices(mask: np.ndarray, slice_mm: float, every_mm: float) -> list[int]:
    """First and last slice of the organ and about every ``every_mm`` between."""
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    step = max(1, int(round(every_mm / slice_mm)))
    chosen = set(range(int(slices[0]), int(slices[-1]) + 1, step)) | {int(slices[-1])}
    return sorted(z for z in chosen if mask[z].any())


def plan_for(case: Case, organs: dict[str, int], arm: str, args: argparse.Namespace,
             rng: np.random.Generator) -> PromptPlan:
    plan = PromptPlan(propagate=arm == "half+prop")
    for organ in organs.values():
        mask = truth(case, organ)
        slices = boxed_slices(mask, case.slice_mm, args.every_mm)
        if arm == "half+prop":
            inner = slices[1:-1] or slices
            slices = inner[::2] if len(inner) > 1 else inner
        if arm == "half+prop" and organ == 7:
            plan.limits[organ] = (None, int(np.flatnonzero(mask.any(axis=(1, 2)))[-1]))
        for z in slices:
            x0, y0, x1, y1 = box_of(mask[z])
            shake = rng.integers(-args.jitter, args.jitter + 1, size=4)
            box = (x0 + shake[0] - args.widen, y0 + shake[1] - args.widen, x1 + shake[2] + args.widen,
                   y1 + shake[3] + args.widen)
            plan.prompts[(organ, z)] = SlicePrompt((min(box[0], box[2] - 1), min(box[1], box[3] - 1),
                                                    max(box[2], box[0] + 1), max(box[3], box[1] + 1)))
    interpolate_boxes(plan)
    return plan


def present_organs(case: Case) -> dict[str, int]:
    """The organs of :data:`ORGANS` that the case's reference labels hold."""
    return {name: value for name, value in ORGANS.items() if truth(case, value).any()}


def default_plan(case: Case, arm: str) -> tuple[dict[str, int], PromptPlan]:
    """The organs present and ``arm``'s simulated plan with this script's default simulation."""
    organs = present_organs(case)
    return organs, plan_for(case, organs, arm, DEFAULT_SIMULATION, np.random.default_rng(DEFAULT_SIMULATION.seed))


def frames_used(session: PromptSession) -> int:
    """Distinct (slice, frame) pairs the session's prompts were decoded in: the encoder runs without a cache."""
    return len({(z, session.frame_for(prompt)) for (_, z), prompt in session.prompts.items()})


def run_case(case: Case, args: argparse.Namespace) -> dict:
    session = session_on(case.canonical, case.how)
    cached = load_into(session.embeddings, args.cache, case.name)
    session.zoom = Zoom(*args.zoom) if args.zoom else None
    session.rebox_mm, session.square = (None if args.no_rebox else args.rebox_mm), args.square
    zoom_tag = [f"{args.zoom[0]:g}x{args.zoom[1]:g}mm"] if args.zoom else []
    tag = "-".join(zoom_tag + (["square"] if args.square else []))
    if tag:  # crops or squares: their own embeddings (kept all, cached on disk per setting)
        session.frames = FrameEmbeddings(session.embeddings, max_frames=100_000)
        cached += load_frames_into(session.frames, args.cache, case.name, tag)
    organs = present_organs(case)
    result: dict = {"case": case.name, "frames": tag or "whole", "rebox_mm": session.rebox_mm,
                    "cached_embeddings": cached, "arms": {}}
    for arm in args.arms:
        started = time.perf_counter()
        session.masks.clear()
        session.prompts.clear()
        plan = plan_for(case, organs, arm, args, np.random.default_rng(args.seed))
        run_plan(session, plan)
        labels = session.labels()
        scores = {name: round(dice(labels == value, truth(case, value)), 4) for name, value in organs.items()}
        boxes = {name: sum(1 for (o, _), p in plan.prompts.items() if o == value and p.source == "user")
                 for name, value in organs.items()}
        result["arms"][arm] = {"dice": scores, "user_boxes": boxes, "prompted": len(session.prompts),
                               "frames": frames_used(session), "seconds": round(time.perf_counter() - started, 1)}
        print(case.name, tag or "whole", f"rebox {session.rebox_mm}", arm, json.dumps(scores), json.dumps(boxes),
              "prompted", len(session.prompts), "frames", frames_used(session), flush=True)
        save_from(session.embeddings, args.cache, case.name)
        if tag:
            save_frames_from(session.frames, args.cache, case.name, tag)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/real"))
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--arms", nargs="+", default=["boxes", "half+prop"], choices=["boxes", "half+prop"])
    parser.add_argument("--every-mm", type=float, default=DEFAULT_SIMULATION.every_mm)
    parser.add_argument("--jitter", type=int, default=DEFAULT_SIMULATION.jitter)
    parser.add_argument("--widen", type=float, default=DEFAULT_SIMULATION.widen)
    parser.add_argument("--seed", type=int, default=DEFAULT_SIMULATION.seed)
    parser.add_argument("--zoom", type=float, nargs=2, default=None, metavar=("FACTOR", "MIN_MM"),
                        help="decode each box in a square crop of FACTOR x its longer side, at least MIN_MM")
    parser.add_argument("--rebox-mm", type=float, default=REBOX_MM, help="the session's rebox_mm (default %(default)s)")
    parser.add_argument("--no-rebox", action="store_true", help="decode each box once (rebox_mm None)")
    parser.add_argument("--square", action="store_true", help="pad non-square slices to a square (session.square)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=None, help="folder of cached slice embeddings (float16)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [run_case(load_case(args.data, name), args) for name in args.cases]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "results": results}
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
