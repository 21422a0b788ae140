"""What the torchrun worker and the train stage agree on, importable without torch."""

# A worker that fails prints one line starting with this, so the stage can report the cause
# rather than torchrun's own ChildFailedError banner.
WORKER_ERROR = "labtune worker error"
