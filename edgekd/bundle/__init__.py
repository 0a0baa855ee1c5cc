"""Deployable bundle of a finished run: artifacts, ``manifest.json``, a C array for firmware, checksums.

Only :mod:`edgekd.bundle.checksums` and :mod:`edgekd.bundle.carray` are device-side (standard library
only); :mod:`edgekd.bundle.build` runs on the host, :mod:`edgekd.bundle.verify` wherever a runtime is.
"""
