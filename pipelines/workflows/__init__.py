"""Dagster pipelines of the job scripts in pipelines/ (see definitions.py)."""
