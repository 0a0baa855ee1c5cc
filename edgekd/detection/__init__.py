"""Object detection: set criterion and box utilities (``criterion``, ``boxes``), data and metrics.

Imports nothing heavy at package import; use the submodules (e.g. ``edgekd.detection.criterion``).
"""
