"""The operations room: the local Prefect server and the whole stack (server, S3, workers)
that `labtune server` and `labtune stack` start and stop.

May import: labtune.errors, labtune.recipe, labtune.store.
"""
