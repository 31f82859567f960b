"""Evaluation: classification metrics (top-k, per-class accuracy, loss, calibration),
their pictures, batch inference with Ray Data, and the paired test promotion rests on."""
