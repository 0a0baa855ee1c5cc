"""Device-side measurement: latency (with its protocol), accuracy, peak memory. Needs only numpy."""

from edgekd.profile.accuracy import evaluate_classifier, predict
from edgekd.profile.latency import measure_latency, peak_rss_mb

__all__ = ["evaluate_classifier", "measure_latency", "peak_rss_mb", "predict"]
