"""MLflow: runs, metrics, pictures, the model registry and the served model."""
