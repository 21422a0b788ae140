"""The command line as a person meets it: overrides anywhere, --version, help with an example for
every command, one-line errors with documented exit codes, and stage commands that never load
Prefect."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, TINY_RECIPE, free_port, run_cli

USAGE, FAILURE = 2, 1


def one_line_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The process failed with `code` and said so in one line naming the thing, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_a_stage_command_never_imports_prefect(tmp_path):
    """`labtune tokenize RECIPE` (weights, delta, data, tokenize) in a fresh interpreter, overrides
    after an option: the whole code path runs without Prefect in sys.modules."""
    script = f"""
import sys
import labtune.cli
assert "prefect" not in sys.modules, "importing labtune.cli loaded prefect"
try:
    labtune.cli.main(["tokenize", {str(TINY_RECIPE)!r}, "--json", "store.uri={tmp_path / 'store'}"])
except SystemExit as exc:
    assert exc.code in (None, 0), exc.code
loaded = sorted(m for m in sys.modules if m == "prefect" or m.startswith("prefect."))
print("PREFECT", loaded[:5])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "PREFECT []" in proc.stdout, proc.stdout
    result = json.loads(proc.stdout.splitlines()[0])
    assert result["stage"] == "tokenize" and (tmp_path / "store" / "tokenize").is_dir()


def test_overrides_and_options_in_any_order_and_version(tmp_path):
    store = tmp_path / "store"
    first = run_cli("data", str(TINY_RECIPE), "--json", f"store.uri={store}", "data.seed=7")
    assert first.returncode == 0, first.stderr
    again = run_cli("data", "--json", str(TINY_RECIPE), f"store.uri={store}", "data.seed=7")
    assert json.loads(again.stdout)["uri"] == json.loads(first.stdout)["uri"] and json.loads(again.stdout)["cached"]
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("labtune 0.")


COMMANDS = ["run", "weights", "delta", "data", "tokenize", "train", "evaluate", "import-model", "merge-delta",
            "make-delta", "merge-lora", "convert", "tokenize-files", "ask", "chat", "compare", "sweep", "deploy",
            "stack up", "stack down", "stack status", "server start", "server stop", "server status"]


def test_every_command_has_a_one_line_description_and_an_example():
    top = run_cli("--help")
    assert top.returncode == 0
    for command in COMMANDS:
        proc = run_cli(*command.split(), "--help")
        assert proc.returncode == 0, (command, proc.stderr)
        assert "Example:" in proc.stdout and f"labtune {command}" in proc.stdout, command
        if " " not in command:
            assert command in top.stdout


def test_usage_errors_exit_2_with_the_usage_line(tmp_path):
    proc = run_cli("tokenize", str(TINY_RECIPE), "--out", str(tmp_path / "x"))  # --out belongs to tokenize-files
    one_line_error(proc, USAGE, "labtune tokenize", "No such option: --out", "--help")
    assert not (tmp_path / "x").exists()
    one_line_error(run_cli("no-such-command"), USAGE, "no-such-command")
    one_line_error(run_cli("sweep", str(TINY_RECIPE)), USAGE, "--grid")
    bare = run_cli()
    assert bare.returncode == 0 and "Commands" in bare.stdout  # no command: the help


def test_a_yaml_syntax_error_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbase_model:\n  source: tiny://llama\n  tiny: {hidden_size: 64\ndata: [\n")
    line = one_line_error(run_cli("data", str(bad)), USAGE, f"{bad}:")
    location = line.split(f"{bad}:", 1)[1].split(":")
    assert location[0].isdigit() and location[1].isdigit(), line  # file:LINE:COLUMN as PyYAML reports them
    assert "not valid YAML" in line


def test_a_model_folder_without_a_tokenizer_is_named(tmp_path, tiny_model):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        (bare / name).unlink(missing_ok=True)
    line = one_line_error(run_cli("ask", str(bare), "Who presented?"), USAGE, str(bare), "no tokenizer")
    assert "sentencepiece" not in line.lower()
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "hi"},
                                                              {"from": "gpt", "value": "hello"}]}]))
    one_line_error(run_cli("tokenize-files", "--data", str(data), "--model", str(bare), "--out", str(tmp_path / "t")),
                   USAGE, str(bare), "no tokenizer")


def test_compare_refuses_an_output_that_is_not_an_evaluation(tmp_path):
    made = run_cli("data", str(TINY_RECIPE), f"store.uri={tmp_path / 'store'}", "--json")
    uri = json.loads(made.stdout)["uri"]
    one_line_error(run_cli("compare", uri), USAGE, uri, "not an evaluate output", "data output")


def test_sweep_and_deploy_check_the_recipe_and_grid_before_contacting_prefect(tmp_path):
    port = str(free_port())  # nothing listens here: contacting Prefect would start a server
    home = {"LABTUNE_HOME": str(tmp_path / "home")}
    bad_value = run_cli("sweep", str(TINY_RECIPE), "--grid", "train.num_train_epochs=1,-2", "--port", port, env=home)
    one_line_error(bad_value, USAGE, "train.num_train_epochs")
    bad_grid = run_cli("sweep", str(TINY_RECIPE), "--grid", "train.num_train_epochs", "--port", port, env=home)
    one_line_error(bad_grid, USAGE, "--grid")
    unknown = run_cli("deploy", str(TINY_RECIPE), "train.num_train_epochs=2", "--port", port, env=home)
    one_line_error(unknown, USAGE, "train.num_train_epochs=2")  # deploy takes no overrides
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_RECIPE.read_text().replace("num_train_epochs: 1", "num_train_epochs: many"))
    one_line_error(run_cli("deploy", str(bad), "--port", port, env=home), USAGE, "train.num_train_epochs")
    assert not (tmp_path / "home" / "prefect").exists()  # no server was started


def test_a_wrong_alpaca_type_is_a_wrong_type_not_a_missing_field(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Add 2 and 3.", "input": "", "output": 5}]))
    line = one_line_error(run_cli("convert", "--alpaca", str(alpaca), "--out", str(tmp_path / "o")), USAGE,
                          str(alpaca), "record 0", "'output'")
    assert "must be a string" in line and "missing" not in line


def test_a_failure_at_run_time_exits_1(tmp_path):
    proc = run_cli("data", str(TINY_RECIPE), "store.uri=s3://labtune/runs", "store.endpoint_url=http://127.0.0.1:9")
    one_line_error(proc, FAILURE, "127.0.0.1:9")


@pytest.mark.parametrize("link", ["file", "folder"])
def test_notes_linked_from_outside_the_folder_are_refused_by_the_data_stage_and_the_watcher(tmp_path, link):
    from labtune.data.watch import note_listing

    notes = tmp_path / "notes"
    shutil.copytree(REPO / "examples" / "labnotes", notes)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "2023-09-01.md").write_text("# Lab meeting 2023-09-01\n- Presenter: Mallory\n")
    if link == "file":
        (notes / "2023-09-01.md").symlink_to(outside / "2023-09-01.md")
    else:  # a path through '..': a folder link climbing out of the notes folder
        (notes / "up").symlink_to("../outside")
    stage = run_cli("data", str(TINY_RECIPE), f"store.uri={tmp_path / 'store'}", f"data.sources.0.path={notes}")
    one_line_error(stage, USAGE, str(notes), "links outside the notes folder")
    with pytest.raises(Exception, match="links outside the notes folder"):
        note_listing(str(notes))
    assert not (tmp_path / "store" / "data").exists()


def test_links_that_stay_inside_the_notes_folder_are_read(tmp_path):
    from labtune.data.notes import note_files

    notes = tmp_path / "notes"
    (notes / "2023").mkdir(parents=True)
    (notes / "2023" / "a.md").write_text("# 2023-01-13\n- Presenter: A\n")
    (notes / "b.md").symlink_to("2023/a.md")
    (notes / "same").symlink_to("2023")  # a folder link inside: its notes are read once, at their real place
    (notes / ".#lock.md").symlink_to("nobody@host.123")  # an editor's lock file: hidden, not a note
    assert [p.relative_to(notes).as_posix() for p in note_files(notes)] == ["2023/a.md", "b.md"]
