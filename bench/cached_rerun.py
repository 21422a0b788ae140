"""Cached re-run vs first run of the same recipe, on a fresh store.

    python bench/cached_rerun.py [RECIPE] [key=value ...]

The baseline is the first run (every stage computed); labtune's figure is the second run
(every stage found by its manifest and skipped). Prints both times and the ratio; the target
is a ratio of at most 0.25.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed_run(recipe: str, overrides: list[str]) -> tuple[float, dict]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "labtune.cli", "run", recipe, *overrides, "--json"],
                          capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"labtune run failed:\n{proc.stderr[-3000:]}")
    return seconds, json.loads(proc.stdout)


def main() -> None:
    recipe = sys.argv[1] if len(sys.argv) > 1 else str(REPO / "examples" / "tiny.yaml")
    store = tempfile.mkdtemp(prefix="labtune-bench-store-")
    overrides = [f"store.uri={store}", *sys.argv[2:]]
    first, first_out = timed_run(recipe, overrides)
    second, second_out = timed_run(recipe, overrides)
    cached = [name for name, stage in second_out["stages"].items() if stage["cached"]]
    print(f"recipe: {recipe}")
    print(f"first run (baseline, all stages computed): {first:7.2f} s")
    print(f"second run (labtune, stages cached: {len(cached)}/5): {second:7.2f} s")
    print(f"ratio second/first: {second / first:.3f} (target <= 0.25)")


if __name__ == "__main__":
    main()
