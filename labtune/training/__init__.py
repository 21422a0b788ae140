"""The training room: the torchrun worker and what it needs, imported by no Prefect code.

- `worker`: the torchrun entry point (FSDP2, the loop, checkpoints, export); `launch`: starting it under
  torchrun from the train stage and reading its failures;
- `worker_config`: the settings the train stage hands the worker;
- `loss`, `packing`, `frozen_prefix`, `distill`, `early_stopping`: what one step computes and when to stop;
- `memory`, `throughput`: what a run will need and what it achieved; `checkpoints`: resumable saves;
- `trackers`: TensorBoard and MLflow (train.report_to).

May import: labtune.errors, labtune.precision, labtune.recipe, labtune.store, labtune.data.
"""
