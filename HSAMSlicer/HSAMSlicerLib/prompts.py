"""Box and click prompts from Slicer: a warm ``hsam serve`` child process and applying its masks to one segment.

Qt-free (issue 26). :class:`PromptProcess` keeps ``python -m hsam serve`` running (the model, LiteMedSAM's decoder and
the slice embeddings stay loaded), sends one JSON request per line and reads one answer per line; a reader thread
waits on the pipe (blocked in I/O, it does not hold the GIL). If the process dies, the next request starts a new one,
reopens the volume, says so once in ``notes`` and goes on. Closing Slicer closes the pipe, which ends the process.
:func:`apply_organ_mask` writes an organ's mask into one segment only: the other segments are never touched (where
they overlap, Slicer's own overlap rules for the segmentation apply).
"""

from __future__ import annotations

import json
import queue
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from hsam.errors import HSAMError

ANSWER_TIMEOUT_S = 600.0  # the first prompt on a slice encodes it; a cold start loads the model


class PromptProcess:
    """One ``hsam serve`` child; :meth:`request` sends a request dict and returns its answer dict."""

    def __init__(self, model: str | None = None, folder: Path | None = None) -> None:
        self.model = model
        self.folder = Path(folder or tempfile.mkdtemp(prefix="hsam-prompts-"))
        self.notes: list[str] = []
        self._child: subprocess.Popen | None = None
        self._answers: queue.Queue = queue.Queue()
        self._volume: str | None = None

    def _start(self) -> None:
        from HSAMSlicerLib.process import _child_environment, python_executable

        command = [python_executable(), "-m", "hsam", "serve"] + (["--model", self.model] if self.model else [])
        log = open(self.folder / "serve-log.txt", "ab")  # noqa: SIM115 (kept open by the child)
        # the stdin pipe carries the requests, so the parent watch of other jobs (stdin EOF = stop) is off here;
        # the process still ends when the pipe closes (end of input)
        self._child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                       text=True, encoding="utf-8", bufsize=1,
                                       env=_child_environment({"HSAM_STOP_ON_STDIN_EOF": "0"}))
        log.close()
        self._answers = queue.Queue()
        threading.Thread(target=self._read, args=(self._child, self._answers), daemon=True).start()
        ready = self._next_answer()
        if ready.get("cmd") != "ready":
            raise HSAMError(f"the prompt process did not start: {ready}")

    @staticmethod
    def _read(child: subprocess.Popen, answers: queue.Queue) -> None:
        for line in child.stdout:
            answers.put(line)
        answers.put(None)  # end of output: the process ended

    def _next_answer(self) -> dict[str, Any]:
        try:
            line = self._answers.get(timeout=ANSWER_TIMEOUT_S)
        except queue.Empty:
            raise HSAMError(f"the prompt process gave no answer in {ANSWER_TIMEOUT_S:.0f} s") from None
        if line is None:
            code = self._child.wait() if self._child is not None else None
            raise BrokenPipeError(f"the prompt process ended (exit status {code})")
        return json.loads(line)

    def _send(self, payload: dict[str, Any]) -> dict[str, Any]:
        if self._child is None or self._child.poll() is not None:
            raise BrokenPipeError("the prompt process is not running")
        self._child.stdin.write(json.dumps(payload) + "\n")
        self._child.stdin.flush()
        return self._next_answer()

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Send one request; an ``{"error": ...}`` answer raises HSAMError. A dead process is restarted once."""
        if payload.get("cmd") == "open":
            self._volume = str(payload["volume"])
        try:
            if self._child is None:
                self._start()
            answer = self._send(payload)
        except (BrokenPipeError, OSError) as error:
            self.notes.append(f"{error}: restarted it (prompts on other slices must be given again)")
            self.close()
            self._start()
            if self._volume is not None and payload.get("cmd") != "open":
                self._send({"cmd": "open", "volume": self._volume})
            answer = self._send(payload)
        if "error" in answer:
            raise HSAMError(answer["error"])
        return answer

    def close(self) -> None:
        """End the child (closing its input ends it; killed if it does not go)."""
        child, self._child = self._child, None
        if child is None:
            return
        try:
            child.stdin.close()
            child.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            child.kill()
            child.wait()


def apply_organ_mask(segmentation_node, segment_id: str, volume_node,  # noqa: ANN001 (MRML nodes)
                     labels: np.ndarray, organ: int) -> int:
    """Set segment ``segment_id`` to ``labels == organ`` (labels [k, j, i] on ``volume_node``'s grid, as
    ``slicer.util.arrayFromVolume`` orders it); returns the voxel count. Other segments are not modified."""
    import slicer

    mask = (np.asarray(labels) == organ).astype(np.uint8)
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation_node, segment_id, volume_node)
    return int(mask.sum())


def export_volume(volume_node, folder: Path) -> Path:  # noqa: ANN001
    """Write the volume node (its IJK grid and geometry) to ``folder/volume.nrrd`` for ``{"cmd": "open"}``: voxel
    prompts are then the node's IJK indices, and the answers' label maps lie on the node's grid."""
    import SimpleITK as sitk

    from HSAMSlicerLib.export import _image

    path = Path(folder) / "volume.nrrd"
    sitk.WriteImage(_image(volume_node), str(path))
    return path


def read_label_array(path: Path) -> np.ndarray:
    """A label map written by ``{"cmd": "labels"}`` as an array [k, j, i] (``arrayFromVolume`` order)."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
