"""Retrieval evaluation: Recall@k and mAP of query images against a gallery (PaddleX's ``evaluate``).

- :func:`shitu.evaluation.metrics.retrieval_metrics`: metrics from feature matrices (numpy only).
- :func:`shitu.evaluation.evaluate.evaluate_dataset`: embed a ShiTuRecDataset's gallery and query lists with a
  recognizer and compute the metrics; :func:`shitu.evaluation.evaluate.write_evaluate_result` writes PaddleX's
  ``evaluate_result.json``.

Submodules are imported lazily (``from shitu.evaluation.metrics import ...``) so ``shitu --help`` stays fast.
"""
