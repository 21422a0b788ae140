"""Real parts for the tests: a moto S3 server over HTTP on 127.0.0.1, a real Prefect server,
and a tiny LLaMA with a SentencePiece tokenizer trained on the spot."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TINY_RECIPE = REPO / "examples" / "tiny.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def session_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep every labtune and Prefect file of the session out of the user's home."""
    home = tmp_path_factory.mktemp("labtune-home")
    os.environ["LABTUNE_HOME"] = str(home)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing-key-id")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    return home


@pytest.fixture(scope="session")
def s3_endpoint(session_home: Path):
    """A moto S3 server in its own process, spoken to over real HTTP with boto3."""
    port = free_port()
    binary = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto_server did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    import boto3

    name = "labtune-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


class RestartableS3:
    """A moto S3 endpoint a test can kill (SIGKILL, mid-request) and bring back with its objects."""

    def __init__(self, state_dir: Path):
        self.state_dir, self.port = state_dir, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        from labtune.store import local_s3

        self.proc = local_s3.start(self.port, self.state_dir)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def restartable_s3(tmp_path: Path):
    import boto3

    endpoint = RestartableS3(tmp_path / "s3-state")
    endpoint.start()
    boto3.client("s3", endpoint_url=endpoint.url).create_bucket(Bucket="labtune")
    yield endpoint
    if endpoint.proc.poll() is None:
        endpoint.kill()


@pytest.fixture(scope="session")
def prefect_api(session_home: Path):
    """A real Prefect server (labtune's own launcher) for the whole session."""
    from labtune.ops import server

    port = free_port()
    started = time.time()
    url, _ = server.start(port=port, timeout=120)
    print(f"\nPrefect server healthy {time.time() - started:.1f}s after start")
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    yield url
    server.stop()
    if previous is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = previous


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from labtune.models.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def notes_copy(tmp_path: Path) -> Path:
    target = tmp_path / "labnotes"
    shutil.copytree(REPO / "examples" / "labnotes", target)
    return target


def tiny_stage_inputs(root: Path, overrides: list[str] | tuple[str, ...] = ()):
    """(recipe, store, model URI, tokens URI): the tiny recipe's stages up to tokenize, in a store
    under root, for tests of the train stage."""
    from labtune.recipe import load_recipe
    from labtune.stages.data import build_data
    from labtune.stages.tokenize import build_tokenize
    from labtune.stages.weights import build_weights
    from labtune.store.backends import LocalStore

    recipe = load_recipe(TINY_RECIPE, [*overrides, f"store.uri={root / 'store'}"])
    store = LocalStore(root / "store")
    target_uri = build_weights(recipe, store).uri
    return recipe, store, target_uri, build_tokenize(recipe, store, target_uri, build_data(recipe, store).uri).uri


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: int = 600,
            stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "labtune.cli", *args], capture_output=True, text=True, input=stdin,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=REPO)
