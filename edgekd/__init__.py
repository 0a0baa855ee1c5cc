"""edgekd: distil a compact student from a teacher, compile it for an edge target, and prove how fast
and how accurate the deployed artifact is."""

# The OpenMP wait policy this process runs with, recorded for the report (see edgekd.threads).
from edgekd.threads import record_wait_policy

record_wait_policy()

from importlib.metadata import PackageNotFoundError, version  # noqa: E402

try:
    __version__ = version("edgekd")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"


def compress(*args, **kwargs):  # noqa: ANN002, ANN003 - lazy re-export of edgekd.objects.compress
    """Distil, export, quantise, compile, profile, bundle, report; see :func:`edgekd.objects.compress`."""
    from edgekd.objects import compress as run

    return run(*args, **kwargs)


def deploy(*args, **kwargs):  # noqa: ANN002, ANN003 - lazy re-export of edgekd.objects.deploy
    """Deploy a model trained elsewhere (no distillation); see :func:`edgekd.objects.deploy`."""
    from edgekd.objects import deploy as run

    return run(*args, **kwargs)


def benchmark(*args, **kwargs):  # noqa: ANN002, ANN003 - thin lazy re-export of edgekd.hardware.benchmark
    """Compress one student for several targets and compare them; see :func:`edgekd.hardware.benchmark`."""
    from edgekd.hardware import benchmark as run

    return run(*args, **kwargs)
