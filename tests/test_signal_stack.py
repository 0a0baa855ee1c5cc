"""OpenVINO's CPU plugin and the thread's alternate signal stack (edgekd.backends.signal_stack): after
two Cores released in the order they were made, a Python signal handler must still run, not crash."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgekd.backends.signal_stack import STACK_BYTES, keep_signal_stack
from tests.test_openvino import needs_openvino

# Two Cores released in creation order (what OpenVINO's plugin mishandles), then a Python-level SIGCHLD
# handler (what torch's DataLoader installs) and child exits: each exit runs the handler on the thread's
# alternate signal stack. Without keep_signal_stack that stack is the first Core's, unmapped: SIGSEGV.
TWO_CORES_THEN_SIGNALS = """
import ctypes, signal, subprocess, sys
import numpy as np
from openvino import opset13 as ops
import openvino as ov
from edgekd.backends.signal_stack import compile_on_cpu, _StackT, _stacks, STACK_BYTES

p = ops.parameter([1, 3], np.float32)
model = ov.Model([ops.relu(p)], [p])
first = compile_on_cpu(model)
second = compile_on_cpu(model)
del first
del second
import gc; gc.collect()
current = _StackT()
ctypes.CDLL(None).sigaltstack(None, ctypes.byref(current))
ours = [ctypes.addressof(ctypes.c_char.from_buffer(stack)) for stack in _stacks.values()]
assert current.ss_sp in ours and current.ss_size == STACK_BYTES, (current.ss_sp, ours)
calls = []
signal.signal(signal.SIGCHLD, lambda *args: calls.append(1))
for _ in range(5):
    subprocess.run([sys.executable, "-c", "pass"], check=True)
print("ok", len(calls) >= 1)
"""


@needs_openvino
def test_python_signal_handlers_run_after_openvino_cores_are_released() -> None:
    result = subprocess.run(
        [sys.executable, "-c", TWO_CORES_THEN_SIGNALS], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert result.stdout.strip() == "ok True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sigaltstack handling is for Linux")
def test_keep_signal_stack_is_idempotent_per_thread() -> None:
    assert keep_signal_stack() and keep_signal_stack()
    assert STACK_BYTES >= 64 * 1024
