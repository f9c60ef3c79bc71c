"""A Windows job object that holds a child and every process it starts (Windows' process group).

``PythonSlicer`` starts the real interpreter as its own child; ``taskkill /T`` finds that child only through its
parent, so once the launcher has ended it is out of reach. A job object keeps the whole tree: the child is started
suspended, put in the job, then resumed, so every process it starts is in the job too. :meth:`terminate` ends them
all, :meth:`active` counts the ones still running, and closing the job's handle (also when Slicer exits or crashes)
ends them (``JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE``).

Written against the documented Win32 API with ctypes; not run here (the tests run on Linux). Any failure to set it up
leaves the caller on ``taskkill /T`` (:func:`create` returns None).
"""

from __future__ import annotations

import ctypes
import subprocess
from ctypes import wintypes

CREATE_SUSPENDED = 0x00000004
JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x00002000
JOB_OBJECT_BASIC_ACCOUNTING_INFORMATION = 1
JOB_OBJECT_EXTENDED_LIMIT_INFORMATION = 9


class _IoCounters(ctypes.Structure):
    _fields_ = [(name, ctypes.c_ulonglong) for name in (
        "ReadOperationCount", "WriteOperationCount", "OtherOperationCount", "ReadTransferCount",
        "WriteTransferCount", "OtherTransferCount")]  # fmt: skip


class _BasicLimits(ctypes.Structure):
    _fields_ = [("PerProcessUserTimeLimit", ctypes.c_int64), ("PerJobUserTimeLimit", ctypes.c_int64),
                ("LimitFlags", wintypes.DWORD), ("MinimumWorkingSetSize", ctypes.c_size_t),
                ("MaximumWorkingSetSize", ctypes.c_size_t), ("ActiveProcessLimit", wintypes.DWORD),
                ("Affinity", ctypes.c_size_t), ("PriorityClass", wintypes.DWORD),
                ("SchedulingClass", wintypes.DWORD)]  # fmt: skip


class _ExtendedLimits(ctypes.Structure):
    _fields_ = [("BasicLimitInformation", _BasicLimits), ("IoInfo", _IoCounters),
                ("ProcessMemoryLimit", ctypes.c_size_t), ("JobMemoryLimit", ctypes.c_size_t),
                ("PeakProcessMemoryUsed", ctypes.c_size_t), ("PeakJobMemoryUsed", ctypes.c_size_t)]  # fmt: skip


class _Accounting(ctypes.Structure):
    _fields_ = [("TotalUserTime", ctypes.c_int64), ("TotalKernelTime", ctypes.c_int64),
                ("ThisPeriodTotalUserTime", ctypes.c_int64), ("ThisPeriodTotalKernelTime", ctypes.c_int64),
                ("TotalPageFaultCount", wintypes.DWORD), ("TotalProcesses", wintypes.DWORD),
                ("ActiveProcesses", wintypes.DWORD), ("TotalTerminatedProcesses", wintypes.DWORD)]  # fmt: skip


class JobObject:
    """One job object; :func:`create` makes it and puts a suspended child in it."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def active(self) -> int:
        """Processes of the job still running (-1 when Windows cannot say: treat as running)."""
        info = _Accounting()
        ok = ctypes.windll.kernel32.QueryInformationJobObject(
            self.handle, JOB_OBJECT_BASIC_ACCOUNTING_INFORMATION, ctypes.byref(info), ctypes.sizeof(info), None)
        return int(info.ActiveProcesses) if ok else -1

    def terminate(self) -> None:
        ctypes.windll.kernel32.TerminateJobObject(self.handle, 1)

    def close(self) -> None:
        if self.handle:
            ctypes.windll.kernel32.CloseHandle(self.handle)
            self.handle = 0


def create(process: subprocess.Popen) -> JobObject | None:
    """Put ``process`` (started with :data:`CREATE_SUSPENDED`) in a new kill-on-close job and resume it. Returns
    None, with the process resumed, when a step fails."""
    kernel32 = ctypes.windll.kernel32
    kernel32.CreateJobObjectW.restype = wintypes.HANDLE
    target = int(process._handle)  # CreateProcess's handle: full access (Popen keeps it for wait/terminate)
    job = kernel32.CreateJobObjectW(None, None)
    try:
        limits = _ExtendedLimits()
        limits.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
        ok = bool(job) and bool(kernel32.SetInformationJobObject(
            job, JOB_OBJECT_EXTENDED_LIMIT_INFORMATION, ctypes.byref(limits), ctypes.sizeof(limits)))
        ok = ok and bool(kernel32.AssignProcessToJobObject(job, target))
    finally:
        ctypes.windll.ntdll.NtResumeProcess(target)  # the child runs in every case
    if not ok:
        if job:
            kernel32.CloseHandle(job)
        return None
    return JobObject(job)
