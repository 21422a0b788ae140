"""The whole finetune flow through Prefect's GPU work pool, on a GPU machine, in one command.

    bash bench/gpu_wheels.sh            # here, once: wheels of what the GPU machine's image lacks, into .whl/
    python3 -m pip install -q --no-index --find-links .whl prefect datasets boto3 pydantic gguf bm25s
    python3 bench/gpu_pool.py [--layers 22] [--epochs 3] [--batch 8]

Builds a random LLaMA of TinyLlama-1.1B's shape in bf16 (as bench/train_mfu.py does) and a recipe
that trains it on examples/labnotes in bf16 with `parallel.nproc_per_node: auto` (one process per
visible GPU, NCCL) and every other setting at its default, then does what a lab's machine does:
`labtune stack up` (a Prefect server, the labtune-cpu and labtune-gpu pools, a process worker for
each, the deployments, with the train and evaluate stages sent to labtune-gpu), `prefect deployment
run finetune/labtune-finetune`, and waits for it. It prints each stage's time (from its manifest),
where the train and evaluate flow runs ran, the training's tokens/s, MFU and peak memory against the
memory plan, and the evaluation summary. Everything lives in a temporary LABTUNE_HOME, stopped at
the end. Target: under 8 minutes on one H200 (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def recipe_text(model_dir: Path, store: Path, epochs: int, batch: int) -> str:
    return f"""name: gpu-pool-bench
base_model: {{source: {model_dir}}}
data:
  sources: [{{type: lab_notes, path: {REPO / 'examples' / 'labnotes'}, eval_fraction: 0.0}}]
  eval_fraction: 0.0
train:
  num_train_epochs: {epochs}
  per_device_train_batch_size: {batch}
  bf16: true
  save_steps: 20
parallel: {{nproc_per_node: auto}}
evaluation:
  max_new_tokens: 16
  batch_size: 32
  questions:
    - {{question: "Who is the presenter on 4/14/2023 lab meeting?", expected: Lena Fischer}}
store: {{uri: {store}}}
deployments: {{train: train/labtune-train, evaluate: evaluate/labtune-evaluate}}
"""


async def deployment_runs(api: str) -> list[tuple[str, object]]:
    """(flow name, flow run) of every deployment run that started (the watcher's scheduled ones have not)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}):
        async with get_client() as client:
            runs = [r for r in await client.read_flow_runs() if r.deployment_id is not None and r.start_time is not None]
            return [((await client.read_flow(r.flow_id)).name, r) for r in sorted(runs, key=lambda r: r.start_time)]


async def wait_for(api: str, run_id: str, timeout: float) -> object:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}):
        async with get_client() as client:
            deadline = time.time() + timeout
            while True:
                run = await client.read_flow_run(run_id)
                if run.state and run.state.is_final():
                    return run
                if time.time() > deadline:
                    raise SystemExit(f"finetune still {run.state.name if run.state else None} after {timeout:.0f}s")
                await asyncio.sleep(2)


def stage_times(store_root: Path) -> dict[str, float]:
    times: dict[str, float] = {}
    for manifest in sorted(store_root.glob("*/*/manifest.json")):
        stage = manifest.parent.parent.name
        if stage in {"checkpoints"}:
            continue
        seconds = json.loads(manifest.read_text()).get("timings", {}).get("seconds")
        if seconds is not None:
            times[stage] = times.get(stage, 0.0) + float(seconds)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22, help="decoder layers of the 1.1B shape")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="per-device micro-batch")
    parser.add_argument("--timeout", type=float, default=420, help="seconds to wait for the finetune run")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="labtune-gpu-pool-"))
    os.environ["LABTUNE_HOME"] = str(work / "home")  # server database, worker logs: all temporary
    started = time.time()

    from train_mfu import SHAPES, build_model

    params = build_model(work / "model", dict(SHAPES["1b"], num_hidden_layers=args.layers), seq=2048)
    recipe = work / "recipe.yaml"
    recipe.write_text(recipe_text(work / "model", work / "store", args.epochs, args.batch))
    print(f"model: random LLaMA, {params / 1e9:.2f}B parameters, bf16 ({time.time() - started:.0f} s)", flush=True)

    from labtune.ops import stack

    stack_started = time.time()
    status = stack.up(str(recipe), port=4317, s3_port=None, say=lambda line: print(line, flush=True))
    api = status["server"]["api_url"]
    stack_seconds = time.time() - stack_started
    try:
        env = {**os.environ, "PREFECT_API_URL": api}
        run_started = time.time()
        proc = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "finetune/labtune-finetune"],
                              capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        if proc.returncode != 0:
            raise SystemExit(f"prefect deployment run failed: {proc.stderr[-1500:]}")
        run_id = next(line.split()[-1] for line in proc.stdout.splitlines() if "UUID" in line)
        run = asyncio.run(wait_for(api, run_id, args.timeout))
        run_seconds = time.time() - run_started
        print(f"\nfinetune/labtune-finetune: {run.state.name} in {run_seconds:.0f} s "
              f"(stack up {stack_seconds:.0f} s before it)")
        for flow, flow_run in asyncio.run(deployment_runs(api)):
            pickup = (flow_run.start_time - flow_run.expected_start_time).total_seconds()
            print(f"  {flow} ({flow_run.name}): pool {flow_run.work_pool_name}, {flow_run.state.name}, "
                  f"{flow_run.total_run_time.total_seconds():.0f} s, started {pickup:.0f} s after it was scheduled")
        for stage, seconds in stage_times(work / "store").items():
            print(f"  stage {stage}: {seconds:.1f} s")
        for manifest in (work / "store" / "train").glob("*/manifest.json"):
            metrics = json.loads((manifest.parent / "train_metrics.json").read_text())
            memory = json.loads(manifest.read_text()).get("memory", {})
            mfu = metrics.get("mfu")
            print(f"  training: {metrics['optimizer_steps']} steps, world {metrics['world_size']}, "
                  f"{metrics['useful_tokens_per_s']:,.0f} tokens/s, MFU {f'{mfu:.1%}' if mfu is not None else 'unknown'}, "
                  f"peak {metrics.get('peak_memory_gib')} GiB per GPU (planned {memory.get('estimate_gib')} GiB, "
                  f"gradient_checkpointing {memory.get('gradient_checkpointing')!r}), export peak "
                  f"{metrics.get('export_peak_memory_gib')} GiB")
        for path in (work / "store" / "evaluate").glob("*/summary.json"):
            summary = json.loads(path.read_text())
            print("  evaluation: " + ", ".join(f"{column} {summary[f'{column}_correct']}/{summary['total']}"
                                               for column in summary["columns"]) +
                  " (a random model knows nothing: this checks the path, not the answers)")
        if not run.state.is_completed():
            raise SystemExit(f"finetune ended {run.state.name}: {run.state.message}; worker logs in {stack.stack_dir()}")
    finally:
        stack.down(say=lambda line: None)
        print(f"total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
