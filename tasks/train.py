"""Stage 4, train: torchrun + FSDP2 fine-tuning, every rank's output streamed line by line.

The stage writes the worker's config, launches `torchrun --nproc_per_node=N -m
labtune.train_worker`, passes each output line to the log (the Prefect task log when run as a
task), and fails with the worker's last lines if torchrun fails. The trained model (safetensors,
config, tokenizer, train_metrics.json) is then committed to the store.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

import labtune
from labtune.errors import LabtuneError, retry_transient
from labtune.recipe import Recipe
from labtune.train_worker_protocol import WORKER_ERROR
from labtune.stage import Log, StageResult, code_version, default_log, fetch, run_stage, stage_key
from labtune.store import Store, open_recipe_store


class TrainError(LabtuneError):
    """torchrun failed; the message carries the worker's last error lines."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_config(recipe: Recipe, model_dir: Path, train_dir: Path, output_dir: Path,
                  gradient_accumulation_steps: int | None = None, checkpoint_prefix: str | None = None) -> dict[str, Any]:
    train = recipe.train.model_dump(mode="json")
    if gradient_accumulation_steps is not None:
        train["gradient_accumulation_steps"] = gradient_accumulation_steps
    return {
        **train,
        "model_dir": str(model_dir),
        "train_dir": str(train_dir),
        "output_dir": str(output_dir),
        "backend": recipe.parallel.backend,
        "store": {"uri": recipe.store.uri, "endpoint_url": recipe.store.endpoint_url, "region": recipe.store.region},
        "checkpoint_prefix": checkpoint_prefix,
        "checkpoint_dir": str(output_dir.parent / "checkpoints"),
    }


def torchrun_command(nproc: int, config_path: Path, port: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={port}",
        "-m", "labtune.train_worker", "--config", str(config_path),
    ]


def run_torchrun(command: list[str], env: dict[str, str], log: Log, on_progress: Callable[[dict], None] | None = None) -> None:
    """Run torchrun, one log record per output line, live; raise TrainError with the tail on failure."""
    tail: collections.deque[str] = collections.deque(maxlen=25)
    worker_errors: list[str] = []
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if not line:
                continue
            tail.append(line)
            if line.startswith(WORKER_ERROR):
                worker_errors.append(line)
            log(line)
            if on_progress and line.startswith("progress "):
                try:
                    record = json.loads(line[len("progress "):])
                except ValueError:
                    continue  # a malformed progress line is still in the log; only the bar skips it
                on_progress(record)
        code = proc.wait()
    except BaseException:
        proc.terminate()
        proc.wait(timeout=30)
        raise
    if code != 0:
        reason = worker_errors[0] if worker_errors else (list(tail)[-1] if tail else "no output")
        raise TrainError(f"torchrun exited with code {code}: {reason.strip()}")


def train_env(nproc: int) -> dict[str, str]:
    env = dict(os.environ)
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    return env


def fitting_accumulation(recipe: Recipe, examples: int, log: Log) -> int:
    """gradient_accumulation_steps for this data: the recipe's, when one optimizer step's worth of
    examples exists (the seed's "size of tensor a must match" failure came from an epoch shorter
    than one accumulation window), else lowered when the recipe allows it, else an error."""
    world, batch = recipe.parallel.nproc_per_node, recipe.train.per_device_train_batch_size
    steps = recipe.train.gradient_accumulation_steps
    need = world * batch * steps
    if examples >= need:
        return steps
    numbers = (f"{examples} training examples are fewer than one optimizer step takes: parallel.nproc_per_node {world} "
               f"x train.per_device_train_batch_size {batch} x train.gradient_accumulation_steps {steps} = {need}")
    fitting = examples // (world * batch)
    if not recipe.train.allow_lower_accumulation or fitting < 1:
        hint = "lower per_device_train_batch_size or nproc_per_node" if fitting < 1 else \
            "set train.allow_lower_accumulation: true, or lower those numbers"
        raise TrainError(f"{numbers}; add data or {hint}")
    log(f"train: {numbers}; gradient_accumulation_steps lowered to {fitting} (train.allow_lower_accumulation)")
    return fitting


def build_train(recipe: Recipe, store: Store, model_uri: str, tokens_uri: str, log: Log = default_log,
                on_progress: Callable[[dict], None] | None = None) -> StageResult:
    """Fine-tune the model at model_uri on the tokenize stage's output at tokens_uri."""
    parameters = {"train": recipe.train.model_dump(mode="json"), "parallel": recipe.parallel.model_dump(mode="json")}
    package = Path(labtune.__file__).parent
    code = code_version(__file__, package / "train_worker.py")
    key = stage_key("train", code, {"model": model_uri, "tokens": tokens_uri}, parameters)

    def build(out: Path) -> dict[str, Any]:
        tokens_dir = fetch(store, tokens_uri, log)
        examples = json.loads((tokens_dir / "report.json").read_text())["train"]["examples"]
        accumulation = fitting_accumulation(recipe, examples, log)
        model_dir = fetch(store, model_uri, log)
        config_path = out.parent / "train_config.json"
        config = worker_config(recipe, model_dir, tokens_dir / "train", out, accumulation, f"checkpoints/{key}")
        config["store"]["uri"] = store.uri  # the store this stage writes to (a test may pass its own)
        config_path.write_text(json.dumps(config, indent=2))
        nproc = recipe.parallel.nproc_per_node
        command = torchrun_command(nproc, config_path, free_port())
        log("launching: " + " ".join(command[1:]))
        run_torchrun(command, train_env(nproc), log, on_progress)
        metrics = json.loads((out / "train_metrics.json").read_text())
        return {"metrics": {k: metrics[k] for k in ("optimizer_steps", "examples", "train_seconds", "world_size",
                                                    "resumed_from_step", "checkpoints")},
                "final_loss": metrics["history"][-1]["loss"] if metrics["history"] else None}

    return run_stage(store, "train", key, build, inputs={"model": model_uri, "tokens": tokens_uri},
                     parameters=parameters, log=log)


@contextlib.contextmanager
def tqdm_progress() -> Iterator[Callable[[dict], None]]:
    """A tqdm bar of optimizer steps on stderr (shown only on a terminal)."""
    from tqdm import tqdm

    bar = None

    def update(record: dict) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=record["total_steps"], desc="train", unit="step", disable=not sys.stderr.isatty())
        bar.n = record["step"]
        bar.set_postfix(loss=record["loss"])

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


@task(name="train", retries=1, retry_delay_seconds=30, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def train_task(recipe: Recipe, model_uri: str, tokens_uri: str) -> StageResult:
    logger = get_run_logger()
    progress_id = create_progress_artifact(progress=0.0, key="train-progress", description="Training: optimizer steps done")

    with tqdm_progress() as bar:
        def on_progress(record: dict) -> None:
            bar(record)
            update_progress_artifact(progress_id, progress=100.0 * record["step"] / record["total_steps"])

        result = build_train(recipe, open_recipe_store(recipe), model_uri, tokens_uri, log=logger.info, on_progress=on_progress)
    update_progress_artifact(progress_id, progress=100.0)
    create_markdown_artifact(
        key="trained-model",
        markdown=f"# Fine-tuned model\n\n`{result.uri}`\n\n{'(cached: trained earlier with the same inputs)' if result.cached else ''}",
        description="Where the fine-tuned model lies in the store",
    )
    return result
