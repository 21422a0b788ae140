"""Checkpoints read and written one tensor (or one block of rows) at a time.

Reading: safetensors shards are memory-mapped and every block read is copied out and its pages
released (`madvise(MADV_DONTNEED)`), so a whole model never becomes resident; pickled `.bin`
shards load with `torch.load(weights_only=True, mmap=True)`, one file at a time, never with a
full unpickle. Writing: the safetensors header is computed from the planned tensor list, then
tensor bytes are streamed in order, so peak memory is one block, not one shard or one model.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import struct
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labtune.errors import LabtuneError

MiB = 1024 * 1024
BLOCK_BYTES = 4 * MiB  # fp32 bytes per block of rows: small enough to stay in cache and reuse
# allocations (64 MiB blocks made merges 4x slower, each one fresh page-faulted memory)

_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
_CODES = {v: k for k, v in _DTYPES.items()}


class CheckpointError(LabtuneError):
    """A checkpoint file cannot be read or written; the message names the file (and tensor)."""


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def element_size(dtype: str) -> int:
    import torch

    return torch.empty((), dtype=torch_dtype(dtype)).element_size()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # torch dtype name: "float16"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * element_size(self.dtype)


def row_blocks(info: TensorInfo, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, int]]:
    """(start, stop) row ranges along dim 0 whose fp32 size is about block_bytes."""
    rows = info.shape[0] if info.shape else 1
    per_row = max(1, (info.numel // max(rows, 1)) * 4)
    step = max(1, block_bytes // per_row)
    if rows == 0:
        yield 0, 0
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


class SafetensorsFile:
    """One safetensors file: header parsed eagerly, tensor data memory-mapped on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > 100 * MiB:
                    raise ValueError("header length is implausible")
                held = os.fstat(handle.fileno()).st_size
                if 8 + length > held:
                    raise ValueError(f"truncated: its header alone is {length:,} bytes, the file holds {held:,}")
                header = json.loads(handle.read(length))
        except (OSError, ValueError, struct.error) as exc:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({exc})") from None
        self.data_start = 8 + length
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, TensorInfo] = {}
        self.offsets: dict[str, tuple[int, int]] = {}
        size = self.path.stat().st_size
        for name, entry in header.items():
            if entry["dtype"] not in _DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}")
            info = TensorInfo(name, _DTYPES[entry["dtype"]], tuple(entry["shape"]))
            begin, end = entry["data_offsets"]
            if end - begin != info.nbytes or self.data_start + end > size:
                raise CheckpointError(f"{self.path}: tensor {name} lies outside the file (truncated or corrupt shard?)")
            self.tensors[name] = info
            self.offsets[name] = (begin, end)
        self._map: mmap.mmap | None = None

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            with open(self.path, "rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._map

    def read(self, name: str, start: int | None = None, stop: int | None = None, dtype=None):
        """Rows [start, stop) of a tensor (all of it by default), as an owned CPU tensor, converted
        to dtype on the way out of the mapping when given (one pass, no extra copy)."""
        import torch

        info = self.tensors[name]
        begin, end = self.offsets[name]
        rows = info.shape[0] if info.shape else 1
        start, stop = start or 0, rows if stop is None else stop
        row_bytes = (end - begin) // max(rows, 1) if info.shape else end - begin
        offset = self.data_start + begin + start * row_bytes
        count = (stop - start) * row_bytes
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        if count == 0:
            return torch.empty(shape, dtype=dtype or torch_dtype(info.dtype))
        buffer = self._mapped()
        view = torch.frombuffer(buffer, dtype=torch.uint8, count=count, offset=offset)
        typed = view.view(torch_dtype(info.dtype)).reshape(shape)
        tensor = typed.to(dtype, copy=True) if dtype is not None else typed.clone()
        del view, typed
        page = mmap.PAGESIZE
        first = offset // page * page
        buffer.madvise(mmap.MADV_DONTNEED, first, offset + count - first)
        return tensor

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


class TorchBinFile:
    """One pickled PyTorch `.bin` file, loaded with weights_only=True (no arbitrary code)."""

    def __init__(self, path: str | os.PathLike):
        import torch

        self.path = Path(path)
        try:
            try:
                state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                state = torch.load(self.path, map_location="cpu", weights_only=True)  # legacy, non-zip format
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{self.path}: refused to load with weights_only=True ({first[:200]})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{self.path}: not a state dict of tensors")
        self.state = state
        self.metadata: dict[str, str] = {}
        self.tensors = {k: TensorInfo(k, dtype_name(v.dtype), tuple(v.shape)) for k, v in state.items()}

    def read(self, name: str, start: int | None = None, stop: int | None = None, dtype=None):
        tensor = self.state[name]
        if tensor.dim() and (start is not None or stop is not None):
            tensor = tensor[start:stop]
        return tensor.to(dtype, copy=True) if dtype is not None else tensor.clone()

    def close(self) -> None:
        self.state = {}


def weight_files(directory: str | os.PathLike, stem: str | None = None) -> list[Path]:
    """The weight shards of a checkpoint directory: safetensors if any, else pickled .bin."""
    directory = Path(directory)
    for suffix in (".safetensors", ".bin"):
        index = sorted(directory.glob(f"*{suffix}.index.json"))
        if index:
            try:
                names = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
            except (ValueError, KeyError):
                raise CheckpointError(f"{index[0]}: not a valid weight index") from None
            missing = [n for n in names if not (directory / n).is_file()]
            if missing:
                raise CheckpointError(f"{directory / missing[0]}: shard listed in {index[0].name} is missing")
            return [directory / n for n in names]
        files = sorted(p for p in directory.glob(f"*{suffix}") if p.is_file() and (stem is None or p.name.startswith(stem)))
        if files:
            return files
    return []


class Checkpoint:
    """Every tensor of a checkpoint directory, by name, opening one shard at a time."""

    def __init__(self, directory: str | os.PathLike, files: list[Path] | None = None):
        self.directory = Path(directory)
        self.files = files if files is not None else weight_files(self.directory)
        if not self.files:
            raise CheckpointError(f"{self.directory}: no weights found (*.safetensors or *.bin)")
        self.where: dict[str, Path] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for path in self.files:
            shard = _open(path)
            self.metadata.update(shard.metadata)
            for name, info in shard.tensors.items():
                self.where[name] = path
                self.tensors[name] = info
            shard.close()
        self._open: tuple[Path, Any] | None = None

    def _shard(self, name: str):
        path = self.where[name]
        if self._open is None or self._open[0] != path:
            self.close()
            self._open = (path, _open(path))
        return self._open[1]

    def read(self, name: str, start: int | None = None, stop: int | None = None, dtype=None):
        return self._shard(name).read(name, start, stop, dtype)

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open(path: Path):
    return SafetensorsFile(path) if path.suffix == ".safetensors" else TorchBinFile(path)


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '1GiB' or a byte count."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 2GB or 500MB)")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(match.group(1)) * scale)


class ShardedWriter:
    """Writes a planned list of tensors as HF-style safetensors shards, streaming their bytes.

    Shards are cut at max_shard_bytes (like `save_pretrained`'s max_shard_size) and named
    `model-00001-of-0000N.safetensors` with a `model.safetensors.index.json`, or
    `model.safetensors` when one suffices. Tensors (or consecutive row blocks of one tensor)
    must be written in the planned order; `close` checks every byte arrived.
    """

    def __init__(self, out_dir: str | os.PathLike, plan: list[TensorInfo], max_shard_bytes: int = 2 * 10**9,
                 metadata: dict[str, str] | None = None, prefix: str = "model", progress=None):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.plan = plan
        shards: list[list[TensorInfo]] = [[]]
        size = 0
        for info in plan:
            if shards[-1] and size + info.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(info)
            size += info.nbytes
        n = len(shards)
        self.names = [f"{prefix}.safetensors"] if n == 1 else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shards = shards
        self.metadata = {"format": "pt", **(metadata or {})}
        self.prefix = prefix
        self._shard = -1
        self._handle = None
        self._hash = None
        self.digests: dict[str, str] = {}  # shard file name -> sha256, computed while writing
        # one I/O thread writes and hashes block N while the caller computes block N+1
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending: Future | None = None
        self.total_bytes = sum(info.nbytes for info in plan)
        self._progress = progress  # called with the bytes of each block written
        self._queue = [(i, info) for i, shard in enumerate(shards) for info in shard]
        self._pos = 0  # index into _queue of the tensor being written
        self._written = 0  # bytes of that tensor written so far

    def _header(self, shard: list[TensorInfo]) -> bytes:
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for info in shard:
            header[info.name] = {"dtype": _CODES[info.dtype], "shape": list(info.shape),
                                 "data_offsets": [offset, offset + info.nbytes]}
            offset += info.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw

    def write(self, name: str, tensor) -> None:
        """Append the bytes of tensor (the whole tensor, or its next block of rows)."""
        if self._pos >= len(self._queue):
            raise CheckpointError(f"{self.out}: tensor {name} was not planned")
        shard_index, info = self._queue[self._pos]
        if name != info.name or dtype_name(tensor.dtype) != info.dtype or tuple(tensor.shape[1:]) != info.shape[1:]:
            raise CheckpointError(f"{self.out}: expected tensor {info.name} ({info.dtype}, {info.shape}), "
                                  f"got {name} ({dtype_name(tensor.dtype)}, {tuple(tensor.shape)})")
        if shard_index != self._shard:
            self._finish_shard()
            self._shard = shard_index
            header = self._header(self.shards[shard_index])
            self._submit(lambda: self._open_shard(self.names[shard_index], header))
        import torch

        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._submit(lambda: self._append(data))
        self._written += data.nbytes
        if self._progress is not None:
            self._progress(data.nbytes)
        if self._written > info.nbytes:
            raise CheckpointError(f"{self.out}: tensor {name} got more bytes than its shape holds")
        if self._written == info.nbytes:
            self._pos += 1
            self._written = 0

    def _submit(self, work) -> None:
        if self._pending is not None:
            self._pending.result()  # re-raises a failed write here, in the caller
        self._pending = self._io.submit(work)

    def _open_shard(self, name: str, header: bytes) -> None:
        self._handle = open(self.out / name, "wb")
        self._hash = hashlib.sha256()
        self._append(header)

    def _append(self, data) -> None:
        self._handle.write(memoryview(data))
        self._hash.update(memoryview(data))

    def _close_shard(self, name: str) -> None:
        self._handle.close()
        self._handle = None
        self.digests[name] = self._hash.hexdigest()

    def _finish_shard(self) -> None:
        if self._shard >= 0 and self.names[self._shard] not in self.digests:
            name = self.names[self._shard]
            self._submit(lambda: self._close_shard(name))
            self._pending.result()

    def close(self) -> list[str]:
        """Finish the last shard and write the index; returns the shard file names."""
        self._finish_shard()
        self._io.shutdown()
        from labtune.store.hashing import remember_sha256

        for name, digest in self.digests.items():
            remember_sha256(self.out / name, digest)
        if self._pos != len(self._queue):
            missing = self._queue[self._pos][1].name
            raise CheckpointError(f"{self.out}: tensor {missing} was planned but never fully written")
        if len(self.names) > 1:
            index = {"metadata": {"total_size": sum(i.nbytes for i in self.plan)},
                     "weight_map": {info.name: self.names[s] for s, shard in enumerate(self.shards) for info in shard}}
            (self.out / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return self.names


def convert_checkpoint(src: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None,
                       max_shard_bytes: int = 2 * 10**9, drop: set[str] | None = None) -> list[str]:
    """Re-write a checkpoint (safetensors or weights_only .bin) as safetensors shards, tensor by
    tensor, casting floating-point tensors to dtype when given."""
    with Checkpoint(src) as checkpoint:
        names = [n for n in checkpoint.tensors if n not in (drop or set())]
        plan = []
        for name in names:
            info = checkpoint.tensors[name]
            cast = dtype if dtype and torch_dtype(info.dtype).is_floating_point else info.dtype
            plan.append(TensorInfo(name, cast, info.shape))
        writer = ShardedWriter(out, plan, max_shard_bytes)
        for info in plan:
            for start, stop in row_blocks(info):
                writer.write(info.name, checkpoint.read(info.name, start, stop).to(torch_dtype(info.dtype)))
        return writer.close()


def check_model_folder(folder: str | os.PathLike) -> None:
    """A model folder is whole before anything calls it complete or loads it: config.json parses,
    every weight file opens, its header's tensors lie inside its length (SafetensorsFile checks
    that), and the tensors agree with config.json (vocabulary, width, layer count). Raises
    CheckpointError naming the file; a PEFT adapter folder (no config.json) is checked for its files."""
    folder = Path(folder)
    config: dict[str, Any] = {}
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{folder / 'config.json'}: not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{folder / 'config.json'}: not a JSON object")
    tensors: dict[str, tuple[Path, TensorInfo]] = {}
    for path in weight_files(folder):
        shard = _open(path)
        shard.close()
        tensors.update({name: (path, info) for name, info in shard.tensors.items()})
    if not tensors:
        raise CheckpointError(f"{folder}: no weights found (*.safetensors or *.bin)")
    vocab, width = config.get("vocab_size"), config.get("hidden_size")
    for name, (path, info) in tensors.items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight")) and isinstance(vocab, int) and isinstance(width, int) \
                and info.shape != (vocab, width):
            raise CheckpointError(f"{path}: tensor {name} is {list(info.shape)} but config.json says "
                                  f"vocab_size {vocab} x hidden_size {width}")
    layers = config.get("num_hidden_layers")
    found = {int(m.group(1)) for m in (re.search(r"\.layers\.(\d+)\.", n) for n in tensors) if m}
    if isinstance(layers, int) and found and found != set(range(layers)):
        missing, extra = sorted(set(range(layers)) - found), sorted(found - set(range(layers)))
        odd = f"layer {missing[0]} is missing" if missing else f"layer {extra[0]} is not in config.json"
        raise CheckpointError(f"{folder}: config.json says {layers} layers but the weights hold {len(found)} "
                              f"(layers {min(found)}-{max(found)}; {odd})")
