"""Running a trained model over files: streamed batches where a bad file is a row (``batches``), class
predictions (``prediction``, ``cxrcae.predict``), their CSV/JSON/JSONL ``writers``, encoder features
(``embed``) and autoencoder reconstructions (``reconstruct``)."""
