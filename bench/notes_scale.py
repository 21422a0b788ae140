"""How the watcher's fingerprint and the data stage grow with the number of lab-note files.

    python bench/notes_scale.py [--counts 500,2000,5000] [--s3]

Generates N dated meeting notes (a folder, and with --s3 the same under an s3:// prefix on a local
moto endpoint), then times, for each N: the watcher's listing and fingerprint (twice: the second
time the folder is unchanged), and the data stage on an empty store (conversion, cleaning, the
question-answer pairs, the commit). Prints seconds and milliseconds per file, so the growth is
visible; the cost should be linear in the files, with no step that grows faster.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PEOPLE = ["Maya Okafor", "Daniel Brooks", "Lena Fischer", "Arjun Mehta", "Sofia Rossi", "Kenji Watanabe", "Ana Silva"]


def write_notes(folder: Path, count: int, seed: int = 0) -> None:
    """`count` notes, one per day from 2000-01-01, each with a presenter, recorder and topic."""
    import datetime

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    day = datetime.date(2000, 1, 1)
    for i in range(count):
        date = day + datetime.timedelta(days=i)
        presenter, recorder = rng.sample(PEOPLE, 2)
        (folder / f"{date.isoformat()}.md").write_text(
            f"# Lab meeting {date.isoformat()}\n\nPresenter: {presenter}\nRecorder: {recorder}\n"
            f"Topic: experiment {i} on sample {rng.randint(1, 999)}\nAttendees: {', '.join(PEOPLE[:5])}\n\n"
            f"## Notes\n- Result {i} looked {rng.choice(['good', 'noisy', 'promising'])}.\n\n"
            f"## Action items\n- {presenter}: repeat run {i}.\n")


def upload(folder: Path, store) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: store.upload(p, p.name), sorted(folder.iterdir())))


def measure(source: str, work: Path, settings, change) -> tuple[float, float, float, float, int]:
    """(first fingerprint s, unchanged fingerprint s, data stage s, data stage after one note
    changed s, meetings converted). `change()` edits one note."""
    import json

    from labtune.data.watch import fingerprint, note_listing
    from labtune.recipe import load_recipe
    from labtune.stages.data import build_data
    from labtune.store.backends import open_store
    from labtune.store.outputs import fetch

    started = time.time()
    fingerprint(note_listing(source, settings))
    first = time.time() - started
    started = time.time()
    fingerprint(note_listing(source, settings))
    second = time.time() - started
    store_dir = work / f"store-{time.monotonic_ns()}"
    recipe = load_recipe(REPO / "examples" / "tiny.yaml", [f"store.uri={store_dir}", f"data.sources.0.path={source}"]
                         + ([f"store.endpoint_url={settings.endpoint_url}"] if settings and settings.endpoint_url else []))
    store = open_store(str(store_dir))
    started = time.time()
    result = build_data(recipe, store, log=lambda line: None)
    data_seconds = time.time() - started
    report = json.loads((fetch(store, result.uri) / "report.json").read_text())
    change()
    started = time.time()
    build_data(recipe, open_store(str(store_dir) + "-changed"), log=lambda line: None)
    changed_seconds = time.time() - started
    return first, second, data_seconds, changed_seconds, report_meetings(report)


def report_meetings(report: list) -> int:
    return sum(int(source.get("files", 0)) for source in report if source.get("type") == "lab_notes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="500,2000,5000")
    parser.add_argument("--s3", action="store_true", help="also from an s3:// prefix on a local moto endpoint")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="labtune-notes-scale-"))
    endpoint, moto = None, None
    if args.s3:
        import os

        import boto3

        for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                            ("AWS_DEFAULT_REGION", "us-east-1")):
            os.environ.setdefault(name, value)  # moto accepts any credentials

        from labtune.store import local_s3

        port = random.randint(20000, 40000)
        moto = local_s3.start(port, work / "s3", log_path=work / "s3.log")
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="notes")
    from labtune.store.backends import StoreSettings, open_store

    print(f"{'source':<8} {'files':>6} {'fingerprint s':>14} {'unchanged s':>12} {'data stage s':>13} "
          f"{'1 changed s':>12} {'ms/file':>8}")
    try:
        for count in [int(c) for c in args.counts.split(",")]:
            folder = work / f"notes-{count}"
            write_notes(folder, count)
            first_note = sorted(folder.iterdir())[0]

            def edit_local(note: Path = first_note) -> None:
                note.write_text(note.read_text() + "- one more action item.\n")

            sources = [("local", str(folder), None, edit_local)]
            if endpoint:
                uri = f"s3://notes/n{count}"
                settings = StoreSettings(uri, endpoint_url=endpoint)
                upload(folder, open_store(settings))

                def edit_remote(note: Path = first_note, settings=settings) -> None:
                    note.write_text(note.read_text() + "- and another.\n")
                    open_store(settings).upload(note, note.name)

                sources.append(("s3", uri, settings, edit_remote))
            for label, source, settings, change in sources:
                first, second, data_seconds, changed, meetings = measure(source, work, settings, change)
                print(f"{label:<8} {count:>6} {first:>14.2f} {second:>12.2f} {data_seconds:>13.2f} {changed:>12.2f} "
                      f"{1000 * (first + data_seconds) / count:>8.2f}  ({meetings} notes converted)", flush=True)
    finally:
        if moto is not None:
            moto.terminate()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
