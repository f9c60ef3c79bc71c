"""``hsam serve``: a warm prompt process for the Slicer module, JSON lines over stdin/stdout (issue 26).

One request per line on stdin, one answer per line on stdout (nothing else is printed there), answered in order::

    {"cmd": "open", "volume": "ct.nrrd"}                 -> {"ok": true, "cmd": "open", "slices": 133, ...}
    {"cmd": "open", "volume": "ct.nrrd", "embeddings": "kept/"}
                                     -> {..., "kept_slices": 120} or {..., "kept_slices": 0, "kept_note": "why not"}
    {"cmd": "embeddings", "folder": "kept/"}            -> the same for the open volume (hsam segment --keep-embeddings)
    {"cmd": "prompt", "organ": "liver", "space": "voxel", "slice": 40, "box": [i0, j0, i1, j1]}
    {"cmd": "prompt", "organ": "liver", "space": "ras", "z": -120.0, "point": [x, y], "positive": false}
                                                         -> {"ok": true, "cmd": "prompt", "organ": 5, "slice": 40,
                                                             "voxels": 1481}
    {"cmd": "propagate", "organ": "liver", "slice": 40}  -> {"ok": true, ..., "slices": [41, 42, ..., 39, 38, ...]}
    {"cmd": "propagate", "organ": "aorta", "slice": 40, "space": "voxel", "from": 10, "to": 62}
    {"cmd": "propagate", "organ": "aorta", "slice": 40, "space": "ras", "from": -180.0, "to": -30.5}
    {"cmd": "propagate", "organ": "liver", "slice": 40, "progress": true}
                            -> {"cmd": "propagate", "progress": {"slice": 41, "done": 1}} per slice, then the answer
    {"cmd": "clear", "organ": "liver"}                   -> {"ok": true, ...}
    {"cmd": "undo"}                                      -> {"ok": true, ..., "restored": [[organ, slice], ...]}
    {"cmd": "undo", "step": 7}                           -> the same for every change whose request had "step" >= 7
    {"cmd": "mask", "organ": "liver", "slices": [40, 41], "output": "m.npy"}
                                                         -> {"ok": true, ..., "offset": [k, j, i], "shape": [...]}
    {"cmd": "labels", "output": "masks.nrrd"}            -> {"ok": true, ..., "written": "masks.nrrd"}
    {"cmd": "quit"}                                      -> {"ok": true, "cmd": "quit"} and exit 0

A box replaces the organ's prompt on its slice; a point adds to it. "prompt", "propagate" and "clear" may carry a
"step" number; "undo" puts back what the latest change replaced (or every change from "step" on: the Slicer module's
Undo, so a later propagation never starts from an undone prompt). "slice" in "propagate" is canonical (the
"slice" of the last "prompt" answer); its optional "from"/"to" (either or both, inclusive) stop it at slice k
("voxel", the default space) or at z mm ("ras"/"lps"), as a prompt file's "limits". A bad request gets ``{"error": "..."}`` and the process goes on; end of input
ends it. The model, decoder and embeddings stay loaded between requests (per opened volume).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable, TextIO


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` command (no torch import here)."""
    parser = subparsers.add_parser("serve", help="warm prompt process: JSON lines on stdin/stdout (for Slicer)",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model whose TinyViT encoder to use (as for hsam prompt)")
    parser.set_defaults(run=run)


class Server:
    """The state of one ``hsam serve`` process: the model, and a prompt session per opened volume."""

    def __init__(self, model_id: str | None) -> None:
        from hsam.prompting.decoder import load_prompt_decoder
        from hsam.weights.store import load_named_model

        self.model, self.card = load_named_model(model_id, device="cpu")
        self.decoder = load_prompt_decoder()
        self.session = None
        self.notify: Callable[[dict[str, Any]], None] = lambda line: None  # progress lines, before an answer

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("cmd")
        handler = getattr(self, f"do_{command}", None) if isinstance(command, str) else None
        if handler is None:
            raise ValueError(f"unknown cmd {json.dumps(command)}; use open, embeddings, prompt, propagate, clear, "
                             "undo, mask, labels, quit")
        if command not in ("open", "quit") and self.session is None:
            raise ValueError('no volume is open: send {"cmd": "open", "volume": PATH} first')
        return {"ok": True, "cmd": command, **handler(request)}

    def do_open(self, request: dict[str, Any]) -> dict[str, Any]:
        from hsam.prompting.build import open_session
        from hsam.volume import read_image

        self.session = open_session(read_image(str(request.get("volume"))), self.model, self.card, self.decoder)
        opened = {"slices": self.session.shape[0], "orientation": self.session.how.orientation}
        if request.get("embeddings"):
            opened.update(self._attach(str(request["embeddings"])))
        return opened

    def do_embeddings(self, request: dict[str, Any]) -> dict[str, Any]:
        return self._attach(str(request.get("folder")))

    def _attach(self, folder: str) -> dict[str, Any]:
        """Read slice embeddings an automatic run kept (hsam segment --keep-embeddings) instead of encoding."""
        from hsam.prompting.build import attach_kept

        why_not = attach_kept(self.session, folder)
        kept = self.session.embeddings.kept
        return {"kept_slices": len(kept) if kept is not None else 0, **({"kept_note": why_not} if why_not else {})}

    def _prompt(self, request: dict[str, Any]):  # noqa: ANN202 (PromptPlan)
        from hsam.prompting.prompt_file import parse_prompts

        entry = {k: v for k, v in request.items() if k not in ("cmd", "space")}
        return parse_prompts({"space": request.get("space", "voxel"), "prompts": [entry]}, self.session.how,
                             "request")

    def do_prompt(self, request: dict[str, Any]) -> dict[str, Any]:
        (organ, z), prompt = next(iter(self._prompt(request).prompts.items()))
        self.session.begin(request.get("step"))
        if prompt.box is not None:
            mask = self.session.set_prompt(organ, z, prompt)
        else:
            x, y, positive = prompt.points[0]
            mask = self.session.add_point(organ, z, x, y, positive)
        return {"organ": organ, "slice": z, "voxels": int(mask.sum())}

    def do_propagate(self, request: dict[str, Any]) -> dict[str, Any]:
        from hsam.labels import organ as organ_of
        from hsam.prompting.propagation import propagate

        organ, start = organ_of(request.get("organ")).index, int(request.get("slice", -1))
        if not self.session.mask(organ, start).any():
            raise ValueError(f"organ {organ} has no mask on slice {start} to propagate from")
        low, high = self._limits(request, start)
        self.session.begin(request.get("step"))
        done: list[int] = []

        def progress(z: int) -> None:
            done.append(z)
            if request.get("progress") is True:
                self.notify({"cmd": "propagate", "progress": {"slice": z, "done": len(done)}})

        filled = propagate(self.session, organ, start, +1, high, pixel_mm=self.session.pixel_mm, progress=progress)
        filled += propagate(self.session, organ, start, -1, low, pixel_mm=self.session.pixel_mm, progress=progress)
        return {"organ": organ, "slices": filled}

    def _limits(self, request: dict[str, Any], start: int) -> tuple[int | None, int | None]:
        """Canonical (lowest, highest) slice from "from"/"to" in the request's "space" (k or z mm); no limits:
        (None, None)."""
        from hsam.prompting.prompt_file import propagation_limits

        ends = {end: request[end] for end in ("from", "to") if end in request}
        if not ends:
            return None, None
        return propagation_limits(ends, self.session.how, request.get("space", "voxel"), start)

    def do_mask(self, request: dict[str, Any]) -> dict[str, Any]:
        """One organ's masks on canonical ``slices``, put back on the input grid and cropped to those slices: a
        uint8 .npy [k, j, i] holding 0 (voxel not on those slices), 1 (on them, outside the organ), 2 (organ),
        whose first voxel is input voxel ``offset`` (k, j, i). Small and exact: the Slicer module replaces just
        these voxels of one segment."""
        import numpy as np
        import SimpleITK as sitk

        from hsam.labels import organ as organ_of
        from hsam.volume.orientation import from_canonical

        organ, slices = organ_of(request.get("organ")).index, request.get("slices")
        if not isinstance(slices, list) or not slices or not all(isinstance(z, int) for z in slices):
            raise ValueError('"slices" must be a non-empty list of slice numbers')
        canonical = np.zeros(self.session.shape, dtype=np.uint8)
        for z in slices:
            if not 0 <= z < self.session.shape[0]:
                raise IndexError(f"slice {z} is outside the volume (0..{self.session.shape[0] - 1})")
            canonical[z] = 1 + self.session.mask(organ, z)
        on_input = sitk.GetArrayFromImage(from_canonical(canonical, self.session.how))
        found = np.nonzero(on_input)
        low = [int(a.min()) for a in found] if found[0].size else [0, 0, 0]
        high = [int(a.max()) + 1 for a in found] if found[0].size else [0, 0, 0]
        crop = np.ascontiguousarray(on_input[low[0]:high[0], low[1]:high[1], low[2]:high[2]])
        output = str(request.get("output"))
        np.save(output, crop)
        return {"organ": organ, "offset": low, "shape": list(crop.shape), "voxels": int((crop == 2).sum()),
                "written": output}

    def do_clear(self, request: dict[str, Any]) -> dict[str, Any]:
        from hsam.labels import organ as organ_of

        organ = organ_of(request.get("organ")).index
        self.session.begin(request.get("step"))
        self.session.clear(organ, request.get("slice"))
        return {"organ": organ}

    def do_undo(self, request: dict[str, Any]) -> dict[str, Any]:
        step = request.get("step")
        if step is not None and not isinstance(step, int):
            raise ValueError('"step" must be a whole number')
        return {"restored": [list(key) for key in self.session.undo(step)]}

    def do_labels(self, request: dict[str, Any]) -> dict[str, Any]:
        from hsam.volume import write_labels

        return {"written": str(write_labels(self.session.labels_image(), str(request.get("output"))))}

    def do_quit(self, request: dict[str, Any]) -> dict[str, Any]:
        return {}


def serve(server: Server, requests: TextIO, answers: TextIO) -> None:
    """Answer every line of ``requests`` until "quit" or the end of input."""
    from hsam.errors import HSAMError

    def notify(line: dict[str, Any]) -> None:
        answers.write(json.dumps(line) + "\n")
        answers.flush()

    server.notify = notify
    for line in requests:
        if not line.strip():
            continue
        started = time.perf_counter()
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("a request is one JSON object per line")
            answer = server.handle(request)
        except (HSAMError, ValueError, KeyError, IndexError, OSError) as error:
            answer = {"error": str(error).splitlines()[0] if str(error) else type(error).__name__}
        except Exception as error:  # noqa: BLE001 (the process stays up for the next request)
            answer = {"error": f"unexpected error ({type(error).__name__}: {error}); this is a bug"}
        answer["seconds"] = round(time.perf_counter() - started, 3)
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
        if answer.get("cmd") == "quit":
            return


def run(args: argparse.Namespace) -> int:
    """Load the model and decoder once, then answer requests. Answers go to stdout; anything else a library
    prints goes to stderr, so stdout carries the answers only."""
    import contextlib

    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    answers = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        server = Server(args.model)
        answers.write(json.dumps({"ok": True, "cmd": "ready"}) + "\n")
        answers.flush()
        serve(server, sys.stdin, answers)
    return 0
