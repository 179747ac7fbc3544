"""Judging a classifier: metrics with bootstrap intervals, temperature calibration, figures and the HTML
report. ``evaluation.evaluate`` is the entry point (``cxrcae.evaluate``)."""
