"""What a run measures of itself: memory per phase, engine bytes, a profiled step, and the metric trackers."""
