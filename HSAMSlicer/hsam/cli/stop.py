"""Stop a command promptly: on SIGTERM or SIGINT, and (for a child of the Slicer module) when its parent goes away.

A stop request raises KeyboardInterrupt in the main thread, so every ``finally`` runs: staged outputs are removed and
a previous output stays as it was. Python delivers that only between bytecodes; if the main thread is inside one
long C call (an ONNX export, a large ``torch.load``), a watchdog thread ends the process after
:data:`GRACE_S` seconds anyway. Files that were being written are hidden temp files, never a file under the output's
name, and the next writer in that folder removes the temp files of processes that are gone.

The parent watch: a program that starts ``hsam`` with ``HSAM_STOP_ON_STDIN_EOF=1`` and a pipe on its stdin stops the
command by closing that pipe, and the pipe also closes when the parent dies, however it dies (the Slicer module
relies on this so that a crashed or killed Slicer never leaves a child running).
"""

from __future__ import annotations

import _thread
import os
import signal
import socket
import sys
import threading
import time

GRACE_S = 4.0
STDIN_EOF_ENV = "HSAM_STOP_ON_STDIN_EOF"
INTERRUPTED_STATUS = 130
_wakeup_sockets: tuple[socket.socket, socket.socket] | None = None  # kept open for the process's lifetime


def _raise_interrupt(signum, frame) -> None:  # noqa: ANN001 (signal handler signature)
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def _exit_after_grace() -> None:
    time.sleep(GRACE_S)
    os._exit(INTERRUPTED_STATUS)


def _start_grace_timer() -> None:
    threading.Thread(target=_exit_after_grace, name="hsam stop deadline", daemon=True).start()


def _watch_signals(receiver: socket.socket, stop_signals: set[int]) -> None:
    while True:
        try:
            data = receiver.recv(64)
        except OSError:
            return
        if not data:
            return
        if stop_signals & set(data):
            _start_grace_timer()
            return


def _watch_stdin() -> None:
    try:
        while os.read(sys.stdin.fileno(), 4096):
            pass  # the parent never writes; anything it sends is ignored
    except OSError:
        pass
    _thread.interrupt_main()
    _start_grace_timer()


def install() -> None:
    """Install the handlers (main thread only; call once at the start of ``hsam.cli.main``)."""
    global _wakeup_sockets
    if threading.current_thread() is not threading.main_thread():
        return
    stop_signals = {signal.SIGINT}
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _raise_interrupt)
        stop_signals.add(signal.SIGTERM)
    receiver, sender = socket.socketpair()
    sender.setblocking(False)
    try:
        signal.set_wakeup_fd(sender.fileno(), warn_on_full_buffer=False)
    except (ValueError, OSError):  # e.g. an embedding that owns the wakeup fd: no deadline, the handlers still work
        receiver.close()
        sender.close()
    else:
        _wakeup_sockets = (receiver, sender)
        threading.Thread(target=_watch_signals, args=(receiver, stop_signals), name="hsam signal watch",
                         daemon=True).start()
    if os.environ.get(STDIN_EOF_ENV) == "1" and sys.stdin is not None:
        threading.Thread(target=_watch_stdin, name="hsam parent watch", daemon=True).start()
