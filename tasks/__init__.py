"""The five stages. Each module holds a plain function (`build_*`) that tests and the CLI call
without a Prefect server, and a thin Prefect task around it."""
