"""The second front-door pass: nothing broken is marked complete, and every input is checked before
work starts. Each case checks the exit code and that the one line names the file, field or variable."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import TINY_RECIPE, run_cli
from test_cli import USAGE, one_line_error


@pytest.fixture
def cut_model(tiny_model: Path, tmp_path: Path) -> Path:
    """The tiny model with its model.safetensors cut to 1,000 bytes, as a failed copy leaves it."""
    folder = tmp_path / "m2"
    shutil.copytree(tiny_model, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return folder


def test_a_truncated_model_is_refused_at_import_with_no_manifest(cut_model, tmp_path):
    out = tmp_path / "i7"
    one_line_error(run_cli("import-model", str(cut_model), str(out)), USAGE, "model.safetensors", "truncated")
    assert not (out / "manifest.json").exists()


def test_a_truncated_model_is_refused_by_the_weights_stage_with_no_manifest(cut_model, tmp_path):
    store = tmp_path / "store"
    proc = run_cli("weights", str(TINY_RECIPE), f"base_model.source={cut_model}", f"store.uri={store}")
    one_line_error(proc, USAGE, str(cut_model / "model.safetensors"), "truncated")
    assert not list(store.rglob("manifest.json"))


@pytest.mark.parametrize("command", ["ask", "chat", "export"])
def test_a_truncated_model_is_named_before_it_loads_and_export_leaves_no_folder(cut_model, tmp_path, command):
    out = tmp_path / "gguf"
    args = {"ask": ["ask", str(cut_model), "Who presented?"], "chat": ["chat", str(cut_model)],
            "export": ["export", str(cut_model), "--out", str(out)]}[command]
    one_line_error(run_cli(*args, stdin="Who presented?\n"), USAGE, str(cut_model / "model.safetensors"), "truncated")
    assert not out.exists()


def test_weights_that_disagree_with_config_json_are_named(tiny_model, tmp_path):
    import json

    folder = tmp_path / "m3"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] += 2
    (folder / "config.json").write_text(json.dumps(config))
    one_line_error(run_cli("import-model", str(folder), str(tmp_path / "out")), USAGE, str(folder), "layers")
    (folder / "config.json").write_text("{not json")
    one_line_error(run_cli("import-model", str(folder), str(tmp_path / "out")), USAGE, "config.json", "not valid JSON")
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("override, needle", [
    ("train.num_train_epochs=.inf", "train.num_train_epochs"), ("train.num_train_epochs=1e999", "train.num_train_epochs"),
    ("train.learning_rate=nan", "train.learning_rate"), ("base_model.source=tiny://gpt", "tiny://llama"),
    ("base_model.tiny.hidden_size=-4", "tiny.hidden_size"), ("store.endpoint_url=not-a-url", "store.endpoint_url"),
    ("store.uri=ftp://bucket/x", "store.uri"), ("store.uri=s3:///x", "store.uri"),
])
def test_a_number_or_uri_out_of_range_is_named_at_load(tmp_path, override, needle):
    one_line_error(run_cli("train", str(TINY_RECIPE), override), USAGE, str(TINY_RECIPE), needle)


@pytest.mark.parametrize("command", [["--version"], ["server", "status"]])
@pytest.mark.parametrize("variable, value", [("LABTUNE_PREFECT_PORT", "abc"), ("LABTUNE_PREFECT_PORT", "99999"),
                                             ("LABTUNE_UNRESPONSIVE_SECONDS", "soon")])
def test_a_bad_environment_variable_is_named(command, variable, value):
    one_line_error(run_cli(*command, env={variable: value}), USAGE, f"{variable}={value!r}")


def test_store_ls_and_gc_fail_fast_on_an_unreachable_endpoint(tmp_path):
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    for args in (["store", "ls"], ["store", "gc", "--keep-last", "1"]):
        proc = run_cli(*args, "--store", "s3://bucket/x", "--endpoint-url", "http://127.0.0.1:9", env=env, timeout=60)
        one_line_error(proc, 1, "s3://bucket/x", "cannot reach", "http://127.0.0.1:9")


def test_a_given_input_is_checked_before_anything_is_called_cached(tmp_path):
    store = f"store.uri={tmp_path / 'store'}"
    one_line_error(run_cli("delta", str(TINY_RECIPE), store, "--weights", "/nowhere"), USAGE, "/nowhere", "no such folder")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    one_line_error(run_cli("tokenize", str(TINY_RECIPE), store, "--data", str(elsewhere)), USAGE, str(elsewhere),
                   "not inside the store")
    data = run_cli("data", str(TINY_RECIPE), store, "--json")
    assert data.returncode == 0, data.stderr
    import json

    data_uri = json.loads(data.stdout)["uri"]
    one_line_error(run_cli("train", str(TINY_RECIPE), store, "--tokens", data_uri), USAGE, data_uri,
                   "a data output, where a tokenize output is wanted")


@pytest.mark.parametrize("question, needle", [("caf\udce9", "not valid UTF-8 (byte 0xe9"), ("", "empty"), ("   ", "empty")])
def test_ask_refuses_an_empty_or_undecodable_question_before_loading(tmp_path, question, needle):
    import os
    import subprocess
    import sys

    from conftest import REPO

    # the question as raw bytes on the command line, as a shell passes $'caf\xe9'
    argv = [sys.executable, "-m", "labtune.cli", "ask", str(tmp_path / "no-model"), os.fsencode(question)]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)
    one_line_error(proc, USAGE, "the question", needle)


def test_chat_names_a_line_that_is_not_utf8_and_goes_on(tiny_model):
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, "-m", "labtune.cli", "chat", str(tiny_model), "--max-new-tokens", "4"],
                          input=b"caf\xe9\nWho presented?\n", capture_output=True, cwd=REPO, timeout=300)
    stderr = proc.stderr.decode()
    assert proc.returncode == 0, stderr
    assert "chat: that line: not valid UTF-8 (byte 0xe9" in stderr and "Traceback" not in stderr
    assert len([line for line in proc.stdout.decode().splitlines() if line.strip()]) <= 1  # one answer, to the good line


def test_stack_up_refuses_one_port_for_two_services():
    one_line_error(run_cli("stack", "up", "--port", "4201", "--s3-port", "4201"), USAGE, "--s3-port 4201")


def test_dates_that_cannot_exist_are_named_in_the_report(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.md").write_text("# Lab meeting, Feb 30, 2023\nPresenter: Ana Lima\n")
    (notes / "b.md").write_text("# Lab meeting 31/31/2023\nPresenter: Ana Lima\n")
    (notes / "2023-02-30.md").write_text("# Lab meeting\nPresenter: Ana Lima\n")
    (notes / "c.md").write_text("# Lab meeting 3/10/2023\nPresenter: Ana Lima\n")
    proc = run_cli("convert", "--notes", str(notes), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "out" / "report.md").read_text()
    for name, bad, where in (("a.md", "Feb 30, 2023", "line 1"), ("b.md", "31/31/2023", "line 1"),
                             ("2023-02-30.md", "2023-02-30", "the file name")):
        line = next(ln for ln in report.splitlines() if f"{name}:" in ln)
        assert f"'{bad}' ({where}) is not a date that exists" in line, line


def test_a_cached_output_edited_after_its_manifest_is_built_again(tmp_path):
    import json

    store = f"store.uri={tmp_path / 'store'}"
    first = run_cli("data", str(TINY_RECIPE), store, "--json")
    uri = json.loads(first.stdout)["uri"]
    train = Path(uri) / "train.json"
    original = train.read_text()
    edited = json.loads(original)
    edited[0]["conversations"][1]["value"] = edited[0]["conversations"][1]["value"][::-1]  # same size, new bytes
    train.write_text(json.dumps(edited, indent=None if "\n" not in original else 2))
    again = run_cli("data", str(TINY_RECIPE), store, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["cached"] is False
    assert "train.json" in again.stderr and "building it again" in again.stderr
    assert train.read_text() == original  # rebuilt as the manifest says
    assert json.loads(run_cli("data", str(TINY_RECIPE), store, "--json").stdout)["cached"] is True


def test_a_20_mb_note_on_one_line_is_read_with_a_word_first(tmp_path):
    """Its heading's date is read where the scan reaches it, not after scanning 20 MB for more dates."""
    from labtune.data.notes import read_meetings

    notes = tmp_path / "notes"
    notes.mkdir()
    words = "alpha beta gamma presented results threshold cells order plan next week".split()
    (notes / "big.md").write_text("# Lab meeting 3/10/2023 " + " ".join(words[i % len(words)] for i in range(3_000_000)))
    meeting = read_meetings(notes / "big.md")[0]
    assert meeting.date.isoformat() == "2023-03-10"
    proc = run_cli("convert", "--notes", str(notes), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "data: reading big.md (" in proc.stderr


def test_two_first_runs_at_once_start_one_prefect_server(tmp_path):
    """Two commands on a fresh labtune home, together: one server, one database migration, both use it."""
    import subprocess
    import sys

    from conftest import REPO, free_port

    env = {**__import__("os").environ, "LABTUNE_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_API_URL", None)
    code = f"from labtune.ops import server; print(server.start(port={free_port()})[0])"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=REPO, env=env) for _ in range(2)]
    try:
        results = [proc.communicate(timeout=300) for proc in procs]
        assert all(proc.returncode == 0 for proc in procs), results
        urls = {out.strip() for out, _ in results}
        assert len(urls) == 1, results
        log = (tmp_path / "home" / "prefect" / "server.log").read_text()
        assert "Application startup failed" not in log and log.count("Check out the dashboard") == 1
    finally:
        subprocess.run([sys.executable, "-m", "labtune.cli", "server", "stop"], cwd=REPO, env=env, timeout=60)


def test_a_training_failure_is_one_line_naming_the_file_that_keeps_torchruns_output(tmp_path):
    proc = run_cli("train", str(TINY_RECIPE), f"store.uri={tmp_path / 'store'}",
                   "train.fsdp_transformer_layer_cls_to_wrap=NoSuchDecoderLayer")
    assert proc.returncode == USAGE, proc.stderr
    for noise in ("Traceback", "ChildFailedError", "Root Cause", "torch.distributed"):
        assert noise not in proc.stderr.replace("launching: -m torch.distributed.run", ""), proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "fsdp_transformer_layer_cls_to_wrap: no module of class" in last and "torchrun's whole output: " in last
    kept = Path(last.rsplit("torchrun's whole output: ", 1)[1].rstrip(")"))
    assert "Traceback" in kept.read_text() and "NoSuchDecoderLayer" in kept.read_text()


def at_server(url: str):
    """This process's Prefect client at the test server: Prefect reads PREFECT_API_URL once, when it
    is first imported, and an earlier test may have imported it before the server fixture set it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: url})


def _started_run(tmp_path: Path):
    """`labtune run` of the tiny recipe in its own process group, read until its data stage runs."""
    import signal
    import subprocess
    import sys

    from conftest import REPO

    # Ctrl-C as in a terminal's foreground job: a test session started in the background (`make test &`,
    # nohup) ignores SIGINT, and a child would inherit that
    proc = subprocess.Popen([sys.executable, "-m", "labtune.cli", "run", str(TINY_RECIPE), f"store.uri={tmp_path / 'store'}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "Task run 'data" in line:
            return proc, seen
    raise AssertionError("".join(seen))


def test_ctrl_c_says_interrupted_and_cancels_the_flow_run(prefect_api, tmp_path):
    import os
    import signal

    from labtune.ops import server

    proc, _ = _started_run(tmp_path)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends its foreground group
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, rest
    assert rest.strip().splitlines()[-1] == "labtune: interrupted", rest
    assert "Crash detected" not in rest, rest  # Prefect's word for it; the runs are Cancelled instead
    with at_server(prefect_api):
        runs = server._flow_runs(["CANCELLED", "CRASHED", "RUNNING"], server.process_tag(proc.pid))
    assert runs and {run.state_type.value for run in runs} == {"CANCELLED"}, [(r.name, r.state_type) for r in runs]


def test_a_killed_runs_flow_run_is_marked_crashed_by_the_next_command(prefect_api, tmp_path):
    import os
    import signal

    from labtune.ops import server

    proc, _ = _started_run(tmp_path)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    with at_server(prefect_api):
        assert server._flow_runs(["RUNNING"], server.process_tag(proc.pid))  # Prefect alone leaves it running
        server.ensure_api(say=lambda line: None)  # what the next `labtune run` does first
        runs = server._flow_runs(["CRASHED", "RUNNING"], server.process_tag(proc.pid))
    assert runs and {run.state_type.value for run in runs} == {"CRASHED"}


def test_merge_delta_with_a_truncated_delta_is_refused_with_no_manifest(tiny_model, cut_model, tmp_path):
    out = tmp_path / "merged"
    proc = run_cli("merge-delta", "--base", str(tiny_model), "--delta", str(cut_model), "--out", str(out))
    one_line_error(proc, USAGE, str(cut_model / "model.safetensors"), "truncated")
    assert not (out / "manifest.json").exists()
