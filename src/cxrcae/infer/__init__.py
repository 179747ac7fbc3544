"""Running a trained model over files: a checkpoint loaded for inference and the logits of a file list
(``batches``; decoding itself is ``cxrcae.data.stream``), class predictions (``prediction``,
``cxrcae.predict``), their CSV/JSON/JSONL ``writers``, Grad-CAM heat maps (``explain``), encoder features
(``embed``) and autoencoder reconstructions (``reconstruct``)."""
