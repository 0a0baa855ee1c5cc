"""The MCU toolchain runs in a child process, never in edgekd's own.

litert-torch (which imports jax and jaxlib), LiteRT's interpreter and TensorFlow Lite Micro's Python
interpreter are native libraries that edgekd only needs for the ``cortex-m*`` targets. With them in the
same process as the rest of a run, our test suite died of a corrupted Python heap: a segmentation fault
long after the MCU tests had passed, in unrelated standard-library code (``selectors`` during a
``subprocess.run``; found from the core dump). Which of the three libraries corrupts the heap is not
known; keeping all of them out of edgekd's process makes the question moot for every later stage.

:func:`call` runs one function in a forked child and returns its result (or raises its exception);
:class:`IsolatedRunner` keeps one child serving ``run(batch)`` calls for the profile stage. ``fork``
(not ``spawn``) so the child inherits the student and the calibration frames without pickling them (a
user's model class need not be importable by name). The child limits PyTorch to one intra-op thread
(GNU OpenMP's thread pool does not survive a fork) and leaves with ``os._exit``, so nothing of the
parent's state is torn down twice.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np

from edgekd.errors import BackendUnavailable

_CONTEXT = multiprocessing.get_context("fork")


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (edgekd's one-line errors do), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def _single_threaded() -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def _run_once(conn: Any, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    _single_threaded()
    try:
        answer: tuple[bool, Any] = (True, fn(*args, **kwargs))
    except BaseException as exc:  # every failure goes back to the parent as it was
        answer = (False, _portable(exc))
    conn.send(answer)
    conn.close()
    os._exit(0)


def _ended(process: Any, what: str) -> BackendUnavailable:
    process.join()
    return BackendUnavailable(
        f"the MCU toolchain's child process ended without an answer while {what} (exit code "
        f"{process.exitcode}); rerun, and if it repeats report it with the versions of litert-torch, "
        f"ai-edge-litert and tflite-micro"
    )


def call(fn: Callable[..., Any], *args: Any, what: str = "converting", **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` computed in a forked child; its result, or its exception raised here."""
    receive, send = _CONTEXT.Pipe(duplex=False)
    process = _CONTEXT.Process(target=_run_once, args=(send, fn, args, kwargs), daemon=True)
    process.start()
    send.close()
    try:
        ok, value = receive.recv()
    except EOFError:
        raise _ended(process, what) from None
    finally:
        receive.close()
    process.join()
    if not ok:
        raise value
    return value


def _serve(conn: Any, factory: Callable[..., Any], args: tuple) -> None:
    _single_threaded()
    try:
        runner = factory(*args)
        conn.send((True, runner.info))
    except BaseException as exc:
        conn.send((False, _portable(exc)))
        os._exit(0)
    while True:
        try:
            batch = conn.recv()
        except EOFError:
            break
        if batch is None:
            break
        try:
            conn.send((True, runner.run(batch)))
        except BaseException as exc:
            conn.send((False, _portable(exc)))
    conn.close()
    os._exit(0)


class IsolatedRunner:
    """A runner (``factory(*args)``, e.g. TFLM's) living in a child process; ``run`` sends it a batch.

    ``info`` is the runner's own, plus ``process: child``; latency measured through it includes the
    pipe round trip (tens of microseconds), which is immaterial next to an interpreter on the host and
    in any case not a microcontroller's latency (that is the cycle estimate)."""

    out_of_process = True

    def __init__(self, factory: Callable[..., Any], *args: Any) -> None:
        self._conn, child = _CONTEXT.Pipe(duplex=True)
        self._process = _CONTEXT.Process(target=_serve, args=(child, factory, args), daemon=True)
        self._process.start()
        child.close()
        ok, value = self._receive("loading the model")
        if not ok:
            self._process.join()
            raise value
        self.info = {**value, "process": "child (edgekd.mcu.isolated)"}

    def _receive(self, what: str) -> tuple[bool, Any]:
        try:
            return self._conn.recv()
        except EOFError:
            raise _ended(self._process, what) from None

    def run(self, batch: np.ndarray) -> np.ndarray:
        self._conn.send(np.asarray(batch))
        ok, value = self._receive("running a batch")
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """Stop the child (idempotent)."""
        if self._process.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):
                self._conn.send(None)
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        self._conn.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: nothing left to report to
            self.close()
