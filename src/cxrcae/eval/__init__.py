"""Judging a classifier: metrics with bootstrap intervals, temperature calibration, figures and the HTML
report, and Grad-CAM heat maps. ``evaluation.evaluate`` is the entry point (``cxrcae.evaluate``)."""
