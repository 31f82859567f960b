"""Hyperparameter search on Ray Tune over the training job: the search config and space
(config.py) and the driver (search.py)."""
