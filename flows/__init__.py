"""Prefect flows: read each top to bottom like its DAG."""
