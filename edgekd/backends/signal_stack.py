"""Keep a valid alternate signal stack on a thread after OpenVINO's CPU plugin ran on it.

OpenVINO's CPU plugin (``ov::intel_cpu::SigAltStackSetup`` in ``sigstack_manager.cpp``, one per
``ov.Core`` that loads the CPU device; seen in 2026.4.1) maps an alternate signal stack of its own on
the thread that loads it and, when destroyed, restores the stack it found there if its own is still
current, then unmaps its own. Two Cores released in the order they were made therefore leave the
thread on the first one's stack, unmapped by then (or mapped again for something else). Python (3.10+)
runs every Python-level signal handler on the alternate stack (SA_ONSTACK), so the next such signal
on that thread — SIGCHLD once torch's DataLoader has installed its handler, SIGINT from Ctrl-C — ends
the process in SIGSEGV (si_code SI_KERNEL, no traceback) or writes its signal frame over reused
memory (a corrupted heap, a crash later in unrelated code). That is what crashed edgekd's test suite
in one process (a core dump showed ``subprocess.run`` dying in ``_Py_dict_lookup``).

:func:`keep_signal_stack`, called after anything that may load the CPU plugin (``compile_model``,
``nncf.quantize*``, which makes Cores of its own), puts the thread back on a stack of ours that is
never freed: a plugin's destructor then finds its own stack not current and leaves the thread's alone.
A no-op off Linux. Worth reporting upstream: the destructor should not restore a stack it saved once
that stack may be gone.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# Far above any signal frame (OpenVINO sizes its own from AT_MINSIGSTKSZ, AMX state included: ~11 KiB).
STACK_BYTES = 256 * 1024
SS_ONSTACK = 1  # sigaltstack flag: the thread is running on its alternate stack now
_stacks: dict[int, mmap.mmap] = {}  # per thread id; never unmapped: a signal may land on one at any time
_lock = threading.Lock()


class _StackT(ctypes.Structure):  # struct stack_t of <signal.h>
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def keep_signal_stack() -> bool:
    """Put this thread on its own never-freed alternate signal stack unless it is on it already (or
    running on its alternate stack now); whether the thread is on ours afterwards (False off Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    current = _StackT()
    if libc.sigaltstack(None, ctypes.byref(current)) != 0 or current.ss_flags & SS_ONSTACK:
        return False
    with _lock:
        stack = _stacks.setdefault(threading.get_ident(), mmap.mmap(-1, STACK_BYTES))
    address = ctypes.addressof(ctypes.c_char.from_buffer(stack))
    if current.ss_sp == address:
        return True
    return libc.sigaltstack(ctypes.byref(_StackT(address, 0, STACK_BYTES)), None) == 0


@contextmanager
def openvino_signal_stack() -> Iterator[None]:
    """``with openvino_signal_stack(): core.compile_model(...)``: the thread is on our stack after."""
    try:
        yield
    finally:
        keep_signal_stack()


def compile_on_cpu(model: object, config: dict | None = None) -> object:
    """``ov.Core().compile_model(model, "CPU", config)`` with the thread's signal stack kept valid."""
    import openvino as ov

    with openvino_signal_stack():
        return ov.Core().compile_model(model, "CPU", config or {})
