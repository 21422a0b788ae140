"""The front door, as a new user meets it with mistakes: every one is a single line naming the
file, option or key (with the allowed range), exit 2, no traceback; nothing is accepted in
silence; the Prefect server helper never uses, nor orphans, a server it did not start."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from conftest import TINY_RECIPE, free_port, run_cli
from test_cli import USAGE, one_line_error


def test_a_recipe_that_is_not_utf8_is_named(tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes(TINY_RECIPE.read_text().replace("name: tiny", "name: caf\xe9").encode("latin-1"))
    one_line_error(run_cli("data", str(recipe)), USAGE, str(recipe), "not UTF-8")


def test_a_key_given_twice_names_both_lines(tmp_path):
    recipe = tmp_path / "twice.yaml"
    recipe.write_text(TINY_RECIPE.read_text().replace("  learning_rate: 1.0e-3\n", "  learning_rate: 1.0e-3\n  learning_rate: 1\n"))
    lines = recipe.read_text().splitlines()
    first = next(i for i, line in enumerate(lines, 1) if line.strip().startswith("learning_rate"))
    one_line_error(run_cli("data", str(recipe)), USAGE, str(recipe), "duplicate key 'learning_rate'",
                   f"lines {first} and {first + 1}")


@pytest.mark.parametrize("key", ["train..learning_rate", ".train.learning_rate", "train.learning_rate."])
def test_an_override_key_with_an_empty_part_is_refused(tmp_path, key):
    one_line_error(run_cli("data", str(TINY_RECIPE), f"{key}=1", f"store.uri={tmp_path}"), USAGE, key, "empty part")


def test_os_errors_on_a_users_path_are_one_line_naming_the_path(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    notes = str(TINY_RECIPE.parent / "labnotes")
    one_line_error(run_cli("convert", "--notes", notes, "--out", str(a_file / "out")), USAGE, str(a_file), "Not a directory")
    one_line_error(run_cli("data", str(TINY_RECIPE), f"store.uri={a_file}"), USAGE, str(a_file))
    read_only = Path("/sys/labtune-store")  # sysfs: read-only even for root, where chmod is not
    proc = run_cli("data", str(TINY_RECIPE), f"store.uri={read_only}")
    one_line_error(proc, USAGE, str(read_only))


def test_an_invalid_prefect_api_url_is_named(tmp_path):
    proc = run_cli("run", str(TINY_RECIPE), f"store.uri={tmp_path}", env={"PREFECT_API_URL": "not a url"})
    one_line_error(proc, USAGE, "PREFECT_API_URL", "'not a url'", "http")


@pytest.mark.parametrize("option, value, needle", [("--top-k", "-1", "--top-k"), ("--batch-size", "0", "--batch-size"),
                                                   ("--max-new-tokens", "0", "--max-new-tokens")])
def test_ask_checks_its_limits_before_any_model_loads(tmp_path, option, value, needle):
    started = time.time()
    proc = run_cli("ask", str(tmp_path / "no-model-here"), "Who presented?", option, value)
    line = one_line_error(proc, USAGE, needle)
    assert "no-model-here" not in line  # the limit, not the (missing) model, is what is reported
    assert time.time() - started < 60


@pytest.mark.parametrize("args, needles", [
    (["--eval-fraction", "1.5"], ["--eval-fraction", "below 1", "1.5"]),
    (["--eval-fraction", "-0.1"], ["--eval-fraction", "at least 0", "-0.1"]),
    (["--no-qa", "--no-note-conversations"], ["--no-qa", "--no-note-conversations"]),
])
def test_convert_option_errors_name_the_option_and_its_range(tmp_path, args, needles):
    proc = run_cli("convert", "--notes", str(TINY_RECIPE.parent / "labnotes"), "--out", str(tmp_path / "out"), *args)
    line = one_line_error(proc, USAGE, *needles)
    assert "pydantic" not in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["store", "ls"], ["store", "gc", "--keep-last", "1"]])
def test_the_store_commands_refuse_a_store_that_does_not_exist(tmp_path, command):
    one_line_error(run_cli(*command, "--store", str(tmp_path / "typo")), USAGE, str(tmp_path / "typo"), "no such folder")


def test_ask_says_so_when_the_answer_is_empty(tmp_path, tiny_model):
    """A model whose final norm is zero gives every token the same logit: greedy picks token 0,
    <unk>, which decodes to nothing. The terminal gets a sentence, not a blank line."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from labtune.cli.models import EMPTY_ANSWER

    model = tmp_path / "mute"
    shutil.copytree(tiny_model, model)
    weights = next(model.glob("*.safetensors"))
    tensors = load_file(weights)
    tensors["model.norm.weight"] = torch.zeros_like(tensors["model.norm.weight"])
    save_file(tensors, weights, metadata={"format": "pt"})
    proc = run_cli("ask", str(model), "Who presented?", "--max-new-tokens", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == EMPTY_ANSWER
    answer = json.loads(run_cli("ask", str(model), "Who presented?", "--max-new-tokens", "1", "--json").stdout)
    assert answer["answer"] == ""  # scripts still get the answer as it is


def _home(tmp_path: Path, name: str) -> dict[str, str]:
    return {"LABTUNE_HOME": str(tmp_path / name), "PREFECT_API_URL": ""}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_the_server_helper_never_uses_or_orphans_a_server_it_did_not_start(tmp_path):
    """A port held by another program is named and left alone: labtune's server starts on the
    next free port, `server status` and `server stop` speak of that one; seen from another
    labtune home, it is somebody else's server, reported as such and never stopped."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    ours = _home(tmp_path, "ours")
    try:
        start = run_cli("server", "start", "--port", str(port), env=ours, timeout=300)
        assert start.returncode == 0, start.stderr[-2000:]
        assert f"port {port} on 127.0.0.1 is taken by a program that is not Prefect, pid {os.getpid()}" in start.stderr
        status = json.loads(run_cli("server", "status", "--port", str(port), env=ours).stdout)
        assert status["started_by_labtune"] and status["healthy"] and _alive(status["pid"])
        moved = int(status["api_url"].rsplit(":", 1)[1].split("/")[0])
        assert moved != port and f"API {status['api_url']}" in start.stdout
        recorded = json.loads((tmp_path / "ours" / "prefect" / "server.pid").read_text())
        assert recorded == {"pid": status["pid"], "port": moved, "host": "127.0.0.1"}

        theirs = _home(tmp_path, "theirs")  # another labtune home: our server is not its own
        seen = json.loads(run_cli("server", "status", "--port", str(moved), env=theirs).stdout)
        assert not seen["started_by_labtune"] and not seen["healthy"] and seen["pid"] is None
        assert "a Prefect server labtune did not start" in seen["other"] and str(status["pid"]) in seen["other"]
        assert "no Prefect server started by labtune" in run_cli("server", "stop", env=theirs).stdout
        assert _alive(status["pid"])

        again = run_cli("server", "start", "--port", str(port), env=ours)  # ours again: reused, no second one
        assert "already running" in again.stdout and status["api_url"] in again.stdout
        assert "Prefect server stopped" in run_cli("server", "stop", env=ours).stdout
        deadline = time.time() + 30
        while _alive(status["pid"]) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(status["pid"])
        after = json.loads(run_cli("server", "status", "--port", str(moved), env=ours).stdout)
        assert after["pid"] is None and not after["healthy"] and "other" not in after
    finally:
        busy.close()
        leftover = tmp_path / "ours" / "prefect" / "server.pid"
        if leftover.exists():
            os.killpg(json.loads(leftover.read_text())["pid"], signal.SIGKILL)


def test_a_server_that_dies_at_start_is_never_recorded(tmp_path):
    """The Prefect server cannot open its database: one line saying it exited and why, and no
    pid file pointing at the dead process."""
    home = _home(tmp_path, "home")
    env = {**home, "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path}/missing/dir/prefect.db"}
    proc = run_cli("server", "start", "--port", str(free_port()), env=env, timeout=300)
    line = one_line_error(proc, 1, "Prefect server exited with code", "server.log")
    assert line
    assert not (tmp_path / "home" / "prefect" / "server.pid").exists()
    status = json.loads(run_cli("server", "status", env=home).stdout)
    assert status["pid"] is None and not status["started_by_labtune"]


def _on_a_terminal(args: list[str], timeout: float = 600) -> str:
    """Run the CLI with stdout and stderr on a pseudo-terminal, as a person at a shell; its output."""
    import fcntl
    import pty
    import struct
    import subprocess
    import sys
    import termios

    from conftest import REPO

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.Popen([sys.executable, "-m", "labtune.cli", *args], stdin=subprocess.DEVNULL, stdout=follower,
                            stderr=follower, cwd=REPO, env={**os.environ, "COLUMNS": "120"})
    os.close(follower)
    chunks = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(timeout=60)
    os.close(leader)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    return b"".join(chunks).decode(errors="replace")


def test_training_shows_a_bar_and_an_estimate_on_a_terminal_not_a_json_line_per_step(tmp_path):
    out = _on_a_terminal(["train", str(TINY_RECIPE), f"store.uri={tmp_path / 'store'}", "train.num_train_epochs=3"])
    assert "progress {" not in out  # the JSON lines are for logs and artifacts
    assert "train:" in out and "it/s" not in out.split("train:")[0][-5:]
    assert "optimizer steps, about" in out and "a step (measured on steps" in out  # the estimate, once
    assert out.count("optimizer steps, about") == 1
    bar = [line for line in out.replace("\r", "\n").splitlines() if line.startswith("train:") and "step" in line and "|" in line]
    assert bar and "loss=" in bar[-1], out[-2000:]
    assert "Writing model shards" not in out
