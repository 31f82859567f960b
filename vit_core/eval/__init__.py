"""Evaluation: classification metrics (top-k, per-class accuracy, loss, calibration),
batch inference and evaluation with Ray Data, and their MLflow runs.

    metrics.py   ClassificationMetrics: sums that add up over batches, workers and actors
    batch.py     evaluate_model / predict: a pool of Ray Data actors, the model loaded once each
    tracking.py  log_evaluation: an EvalReport as an MLflow run and tags on the model version
"""
