"""Benchmarks: figures for the training steps and for prediction, optionally beside the Keras reference.

Speed is never asserted in tests (these machines are noisy); it is measured here and compared as ratios taken
side by side in one run. ``run_bench`` (``suite``) is the whole benchmark and ``cxrcae bench`` prints its
rows. One module per job:

* ``workloads``: what each training task trains (model, the engine's objective, optimiser), named once;
* ``training``: ``bench_train_step``, the training engine's own step (``train_one_epoch``) on an in-memory
  batch, beside the same model's forward pass alone;
* ``flops``: ``count_flops`` / ``train_flops``, per-image FLOPs from PyTorch's ``FlopCounterMode``, so each
  training row has its GFLOP/s (``gflops``) beside the forward pass's (``forward_gflops``; their ratio is
  ``forward_fraction``);
* ``input_pipeline``: ``bench_pipeline``, the CAE trained through the real loader with real files, each
  pass's images/s as a fraction of the in-memory step rate of the same setting (``pipeline_fraction``);
* ``prediction``: ``bench_predict``, ``predict`` end to end per backend, with each fast path's agreement;
* ``memory``: ``bench_predict_memory``, the peak resident memory of ``cxrcae predict`` at two input counts;
* ``keras_peer``: the paper's own models in TensorFlow (``keras_reference.py``) run by a Python that has
  TensorFlow, at least four times per task, every run listed and the best kept for the ratios;
* ``report``: ``BenchReport`` and the "vs keras" ratios.
"""

from cxrcae.bench.flops import FlopCount, count_flops, train_flops
from cxrcae.bench.input_pipeline import PIPELINE_TASK, bench_pipeline
from cxrcae.bench.keras_peer import MIN_RUNS, KerasPeer, best_of, keras_reference
from cxrcae.bench.memory import bench_predict_memory
from cxrcae.bench.prediction import PREDICT_BACKENDS, bench_predict
from cxrcae.bench.report import BenchReport
from cxrcae.bench.suite import run_bench
from cxrcae.bench.training import DEFAULT_SETTINGS, bench_train_step
from cxrcae.bench.workloads import TRAIN_TASKS

__all__ = [
    "DEFAULT_SETTINGS",
    "MIN_RUNS",
    "PIPELINE_TASK",
    "PREDICT_BACKENDS",
    "TRAIN_TASKS",
    "BenchReport",
    "FlopCount",
    "KerasPeer",
    "bench_pipeline",
    "bench_predict",
    "bench_predict_memory",
    "bench_train_step",
    "best_of",
    "count_flops",
    "keras_reference",
    "run_bench",
    "train_flops",
]
