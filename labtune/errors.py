"""Errors a person can act on: each message is one line naming the file, record, key or URI."""


class LabtuneError(RuntimeError):
    """Bad input or a missing thing. Retrying will not help, so Prefect tasks do not retry it."""


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry crashes and network faults, never bad input."""
    from labtune.store import StoreError, StoreUnavailable

    try:
        state.result()
    except StoreUnavailable:  # the store already waited out store.retry_seconds
        return False
    except StoreError:
        return True
    except LabtuneError:
        return False
    except Exception:
        return True
    return False
