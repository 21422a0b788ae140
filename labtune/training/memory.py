"""How much memory a training run needs per rank, estimated before torchrun starts.

The train stage calls `plan` with the model's config, the tokenized data's longest example and the
memory the devices have. It resolves `gradient_checkpointing: auto` (the least recomputation that
fits) and fails with the numbers, and with the changes that would fit, when nothing does: minutes
before an out-of-memory error would, and without a half-started torchrun.

The estimate adds, per rank, in bytes (docs/training.md, "Memory"):
- parameters: fp32, sharded over the ranks (FSDP2), unless one CPU process trains unsharded;
- gradients: fp32, for the trainable parameters, sharded the same way;
- optimizer: AdamW's two fp32 moments per trainable parameter, sharded;
- gathered: FSDP2's unsharded compute copies: the root's (embeddings, final norm, output layer),
  kept through forward and backward, two decoder layers at a time (one prefetched), and the
  fp32 gradients being reduced; on one CPU process with bf16, autocast's bf16 weight copies;
- activations: what autograd keeps per token of each decoder layer, in the compute dtype; a
  checkpointed layer keeps only its input, and one layer is recomputed at a time in backward;
- logits: the loss's logits on label tokens (labtune/training/loss.py), in chunks when large;
- runtime: what the process holds besides tensors (CPU: Python, torch, transformers; GPU: the CUDA
  context, cuBLAS and NCCL buffers, outside torch's allocator).
CPU offload (`fsdp: ... offload`) moves parameters, gradients and optimizer state to host memory.
The export gathers the full fp32 state dict into rank 0's host memory and builds the final model
beside it: that is host memory on a GPU machine, and counted on a CPU one.

The terms follow the operations of transformers' LLaMA-family decoder layer (RMSNorm in fp32,
SwiGLU MLP, eager or SDPA attention) and were checked against the peak resident memory of CPU runs
(tests/test_memory.py: within 25%).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from labtune.recipe import TrainConfig

GIB = 2**30
CPU_RUNTIME = 0.5 * GIB  # a CPU worker before its first tensor: Python, torch, transformers, datasets, gloo
CUDA_RUNTIME = 1.5 * GIB  # CUDA context, cuBLAS workspaces and NCCL buffers: device memory torch does not allocate
CPU_RETAINED = 0.5  # the heap a CPU worker keeps beyond a step's peak, as a fraction of its transient memory
GPU_HEADROOM = 0.92  # the caching allocator's fragmentation: plan to 92% of a GPU's memory
LOGITS_PER_CHUNK = 1 << 24  # as labtune/training/loss.py


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model: counts from its config, built on the meta device."""

    params: int
    trainable: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int  # key/value heads x head dimension
    vocab: int
    layer_params: int  # one decoder layer
    root_params: int  # everything outside the decoder layers: embeddings, final norm, output layer

    @classmethod
    def of_model_dir(cls, model_dir: str | Path, train: TrainConfig | None = None) -> "Shape":
        from transformers import AutoConfig

        return cls.of_config(AutoConfig.from_pretrained(model_dir), train)

    @classmethod
    def of_config(cls, config: Any, train: TrainConfig | None = None) -> "Shape":
        """`train`: the recipe's TrainConfig; with `lora: true` only the adapters are trainable, with
        freeze_layers / freeze_embeddings only what is not frozen."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        total = sum(p.numel() for p in model.parameters())
        wanted = set(getattr(model, "_no_split_modules", None) or [])
        layers = [m for m in model.modules() if type(m).__name__ in wanted]
        layer_params = sum(p.numel() for p in layers[0].parameters()) if layers else 0
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        shape = cls(params=total, trainable=total, layers=len(layers), hidden=config.hidden_size,
                    intermediate=config.intermediate_size, heads=heads,
                    kv_dim=(getattr(config, "num_key_value_heads", None) or heads) * head_dim, vocab=config.vocab_size,
                    layer_params=layer_params, root_params=total - layer_params * len(layers))
        if train is not None and train.lora:
            shape = replace(shape, trainable=lora_trainable(shape, train))
        elif train is not None and (getattr(train, "freeze_layers", 0) or getattr(train, "freeze_embeddings", False)):
            # frozen weights get no gradient and no optimizer state (training.model.freeze)
            embeddings = config.vocab_size * config.hidden_size
            frozen = embeddings + layer_params * min(train.freeze_layers, len(layers))
            shape = replace(shape, trainable=total - frozen)
        return shape


@dataclass(frozen=True)
class Batch:
    """The largest micro-batch a rank computes: rows x padded length, and its label tokens."""

    rows: int
    length: int
    labels: int


@dataclass(frozen=True)
class Setup:
    """How the worker will run (training.model.build_model decides the same way)."""

    device: str  # "cuda" or "cpu"
    world: int
    bf16: bool
    every: int = 0  # checkpoint every n-th decoder layer; 0: none
    offload: bool = False
    attention: str = "sdpa"
    lora: bool = False

    @property
    def sharded(self) -> bool:
        # one CPU process trains unsharded; bf16 on it is autocast (training.model.build_model)
        return not (self.world == 1 and (self.device == "cpu" or not self.bf16)) or (self.offload and self.device == "cuda")

    @property
    def autocast(self) -> bool:
        return self.world == 1 and self.device == "cpu" and self.bf16


@dataclass
class Estimate:
    """Bytes per rank by part; `device` the peak on the training device, `host` what each rank's
    process holds in host memory besides (CPU offload, the export on rank 0)."""

    parts: dict[str, float]
    host: float = 0.0
    export_host: float = 0.0
    setup: Setup | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def device(self) -> float:
        return sum(self.parts.values())

    def gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 2) for k, v in self.parts.items()}

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in self.gib().items() if v >= 0.05)
        return f"{self.device / GIB:.1f} GiB ({parts})"


def activation_bytes_per_token(shape: Shape, compute: int, attention: str, length: int) -> float:
    """What autograd keeps for one token of one decoder layer that is not checkpointed."""
    d, i, kv = shape.hidden, shape.intermediate, shape.kv_dim
    grouped = kv < d  # eager attention repeats keys and values to every head (repeat_kv copies them)
    # RMSNorm computes in fp32. bf16: the input's fp32 copy, the normalised tensor cast back, the
    # output; fp32: the normalised tensor and the output
    norm = 8 * d
    if attention == "eager":
        keys_values = 2 * compute * (d if grouped else kv)
        # the scores' softmax in fp32 and its cast to the compute dtype
        scores = shape.heads * length * (4 + (compute if compute == 2 else 0))
    else:  # SDPA / flash: no scores kept, a log-sum-exp per head
        keys_values = 2 * compute * kv
        scores = 4 * shape.heads
    attention_part = compute * d + keys_values + scores + compute * d  # q, k and v, scores, output
    mlp = 4 * compute * i  # gate, up, silu(gate), their product
    return compute * d + norm + attention_part + compute * d + norm + mlp  # input, ..., residual sum


def estimate(shape: Shape, batch: Batch, setup: Setup) -> Estimate:
    """Peak bytes per rank for one training step (see the module's docstring)."""
    compute = 2 if setup.bf16 else 4
    shard = setup.world if setup.sharded else 1
    states = {"parameters": 4.0 * shape.params / shard, "gradients": 4.0 * shape.trainable / shard,
              "optimizer": 8.0 * shape.trainable / shard}
    gathered = 0.0
    if setup.sharded:
        # root kept gathered; two layers' compute copies (one prefetched); fp32 gradients reduced
        gathered = compute * (shape.root_params + 2 * shape.layer_params) + \
            4.0 * (shape.root_params + shape.layer_params) * shape.trainable / shape.params
    elif setup.autocast:
        gathered = 2.0 * shape.params  # autocast's bf16 copies of every weight, kept for backward
    tokens = batch.rows * batch.length
    per_token = activation_bytes_per_token(shape, compute, setup.attention, batch.length)
    every = setup.every
    checkpointed = (shape.layers // every) if every else 0
    if every == 1:
        checkpointed = shape.layers
    kept = (shape.layers - checkpointed) * per_token + checkpointed * compute * shape.hidden
    if checkpointed:
        kept += per_token  # backward recomputes one layer at a time
    kept += per_token  # backward's gradients of the layer being differentiated
    kept += (compute + 8) * shape.hidden  # embedding output and the final norm
    activations = tokens * kept
    rows = min(batch.labels, max(1, LOGITS_PER_CHUNK // shape.vocab)) if batch.labels * shape.vocab > LOGITS_PER_CHUNK \
        else batch.labels
    logits = rows * shape.vocab * (14 if compute == 2 else 12) + batch.labels * compute * shape.hidden
    parts = {**states, "gathered": gathered, "activations": float(activations), "logits": float(logits)}
    host = 0.0
    if setup.offload and setup.device == "cuda":
        host = states["parameters"] + states["gradients"] + states["optimizer"]
        for name in states:
            parts[name] = 0.0
    if setup.device == "cpu":
        # glibc keeps freed memory in the worker (its malloc settings, labtune/training/worker_config.py), and
        # micro-batches of different lengths leave holes in it: measured up to half the step's
        # transient memory again (docs/training.md, Memory)
        parts["allocator"] = CPU_RETAINED * (parts["gradients"] + activations + logits)
    parts["runtime"] = CUDA_RUNTIME if setup.device == "cuda" else CPU_RUNTIME
    # rank 0's export: the gathered fp32 state dict and the final model built beside it, in host memory
    export_host = 8.0 * shape.params
    return Estimate(parts, host=host, export_host=export_host, setup=setup)


def peak_cpu_rank(est: Estimate) -> float:
    """A CPU rank's peak resident memory: training, or loading the fp32 model before sharding, or
    (rank 0) the export beside the training state that is still held."""
    parts = est.parts
    states = parts["parameters"] + parts["optimizer"]
    load = parts["runtime"] + 4.0 * (parts["parameters"] * (est.setup.world if est.setup and est.setup.sharded else 1))
    return max(est.device, load, parts["runtime"] + states + est.export_host)


@dataclass(frozen=True)
class Devices:
    """The memory each rank may use, and where that figure came from."""

    kind: str  # "cuda" or "cpu"
    name: str
    per_rank: float  # bytes
    host_available: float  # bytes of host memory free now, for all ranks together
    count: int = 1


def host_available() -> float:
    import psutil

    return float(psutil.virtual_memory().available)


def gpus() -> list[tuple[str, int]]:
    """(name, total bytes) of each visible GPU, asked in a child process: the stage's own process
    must not hold a CUDA context on a GPU the workers train on."""
    code = ("import json, torch; print(json.dumps([[torch.cuda.get_device_name(i), "
            "torch.cuda.get_device_properties(i).total_memory] for i in range(torch.cuda.device_count())]))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        return [(name, int(total)) for name, total in json.loads(out.stdout.strip().splitlines()[-1])]
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return []


def devices(use_cuda: bool, processes: int, memory_per_rank_gib: float | None) -> Devices:
    """The devices the workers will use: the smallest visible GPU, or the host's available memory
    shared by the CPU ranks. `memory_per_rank_gib` (parallel.memory_per_rank_gib) overrides."""
    host = host_available()
    found = gpus() if use_cuda else []
    if found:
        name, total = min(found, key=lambda g: g[1])
        if memory_per_rank_gib:
            return Devices("cuda", f"parallel.memory_per_rank_gib ({name})", memory_per_rank_gib * GIB, host, len(found))
        return Devices("cuda", f"{name} ({total / GIB:.1f} GiB, planned to {GPU_HEADROOM:.0%})", total * GPU_HEADROOM,
                       host, len(found))
    if memory_per_rank_gib:
        return Devices("cpu", "parallel.memory_per_rank_gib (CPU)", memory_per_rank_gib * GIB, host)
    return Devices("cpu", f"the host's {host / GIB:.1f} GiB available, shared by {processes} CPU rank(s),",
                   host / max(1, processes), host)


def data_limits(tokens_dir: str | Path) -> tuple[int, int]:
    """The tokenize stage's longest training example and the most label tokens any example has."""
    import numpy as np
    from datasets import load_from_disk

    report = json.loads((Path(tokens_dir) / "report.json").read_text())["train"]
    labels = load_from_disk(str(Path(tokens_dir) / "train")).data.table.column("labels").combine_chunks()
    scored = np.asarray(labels.flatten()) != -100
    offsets = np.asarray(labels.offsets)
    per_example = np.add.reduceat(scored, offsets[:-1]) if len(scored) else np.zeros(1, dtype=int)
    return int(report["max_length"]), int(per_example.max(initial=0))


def checkpointing_modes(train: TrainConfig) -> list[int]:
    """Every n-th layer recomputed, from the least recomputation: none, selective, all."""
    if train.gradient_checkpointing == "auto":
        return sorted({0, train.gradient_checkpointing_every_n_layers, 1}, key=lambda n: (n != 0, -n))
    if train.gradient_checkpointing == "selective":
        return [train.gradient_checkpointing_every_n_layers]
    return [1 if train.gradient_checkpointing else 0]


def setup_of(train: TrainConfig, world: int, kind: str, every: int) -> Setup:
    attention = train.attn_implementation if train.attn_implementation != "auto" else ("sdpa" if kind == "cuda" else "eager")
    return Setup(device=kind, world=world, bf16=train.bf16, every=every, offload="offload" in train.fsdp.split(),
                 attention=attention, lora=train.lora)


def fits(est: Estimate, dev: Devices, processes: int) -> bool:
    if dev.kind == "cpu":
        return peak_cpu_rank(est) <= dev.per_rank
    return est.device <= dev.per_rank and est.host * processes + est.export_host <= dev.host_available


class DoesNotFit(ValueError):
    """The run would run out of memory; the message has the numbers and what would fit."""


def plan(train: TrainConfig, world: int, processes: int, shape: Shape, rows_of: Callable[[int], Any], dev: Devices
         ) -> tuple[TrainConfig, Estimate]:
    """`train` with gradient_checkpointing resolved (auto: the least recomputation that fits) and
    its estimate; DoesNotFit, naming the numbers and the changes that would fit, when it cannot.
    `rows_of(n)`: the worst Batch of n rows."""
    batch = rows_of(train.per_device_train_batch_size)
    est = None
    for every in checkpointing_modes(train):
        est = estimate(shape, batch, setup_of(train, world, dev.kind, every))
        if fits(est, dev, processes):
            mode = train.gradient_checkpointing
            if mode == "auto":
                mode = {0: False, 1: True}.get(every, "selective")
            return train.model_copy(update={"gradient_checkpointing": mode,
                                            "gradient_checkpointing_every_n_layers": every or
                                            train.gradient_checkpointing_every_n_layers}), est
    assert est is not None
    where = f"{dev.name} gives {dev.per_rank / GIB:.2f} GiB per rank"
    if dev.kind == "cpu":
        need = f"{peak_cpu_rank(est) / GIB:.2f} GiB per rank at peak (training: {est.describe()})"
    elif est.device > dev.per_rank:
        need = f"{est.describe()} per rank"
    else:
        need = (f"{est.host * processes / GIB:.1f} GiB of host memory for offloaded state and "
                f"{est.export_host / GIB:.1f} GiB for the export")
    options = alternatives(train, world, processes, shape, rows_of, dev, est.setup.every if est.setup else 0)
    hint = "; ".join(options) if options else "nothing tried fits alone: a smaller model, or a machine with more memory"
    raise DoesNotFit(f"train: the model does not fit: {need} estimated, but {where}. Would fit: {hint} "
                     "(estimates: docs/training.md, Memory; parallel.memory_per_rank_gib overrides the device's size)")


def alternatives(train: TrainConfig, world: int, processes: int, shape: Shape, rows_of: Callable[[int], Any], dev: Devices, every: int) -> list[str]:
    """The single changes that would fit, as overrides, each with its estimate per rank."""
    found: list[str] = []

    def attempt(label: str, changed: TrainConfig, new_world: int = world, new_processes: int = processes,
                new_shape: Shape = shape) -> bool:
        est = estimate(new_shape, rows_of(changed.per_device_train_batch_size),
                       setup_of(changed, new_world, dev.kind, every_of(changed, every)))
        if fits(est, dev, new_processes):
            found.append(f"{label} (~{(peak_cpu_rank(est) if dev.kind == 'cpu' else est.device) / GIB:.1f} GiB)")
            return True
        return False

    if every != 1:
        attempt("train.gradient_checkpointing=true", train.model_copy(update={"gradient_checkpointing": True}))
    batch = train.per_device_train_batch_size
    while batch > 1:
        batch //= 2
        accumulation = train.gradient_accumulation_steps * train.per_device_train_batch_size // batch
        if attempt(f"train.per_device_train_batch_size={batch} train.gradient_accumulation_steps={accumulation}",
                   train.model_copy(update={"per_device_train_batch_size": batch,
                                            "gradient_accumulation_steps": accumulation})):
            break
    if dev.kind == "cuda":
        nodes = max(1, world // processes)
        for more in (2, 4, 8, 16, 32, 64):
            total = more * processes * nodes
            label = (f"parallel.nproc_per_node={more * processes}" if more * processes <= dev.count
                     else f"{total} GPUs like this one (parallel.nnodes x parallel.nproc_per_node)")
            if attempt(label, train, new_world=total, new_processes=min(more * processes, dev.count or 1)):
                break
        if "offload" not in train.fsdp.split():
            attempt(f"train.fsdp='{train.fsdp} offload'", train.model_copy(update={"fsdp": f"{train.fsdp} offload"}))
    if not train.lora:
        lora = train.model_copy(update={"lora": True})
        attempt("train.lora=true", lora, new_shape=replace(shape, trainable=lora_trainable(shape, train)))
    return found


def every_of(train: TrainConfig, fallback: int) -> int:
    if train.gradient_checkpointing == "auto":
        return fallback
    return checkpointing_modes(train)[0]


def lora_trainable(shape: Shape, train: TrainConfig) -> int:
    """LoRA's trainable parameters for the recipe's targets, from the layer shapes: q/o are hidden x
    hidden, k/v hidden x kv, gate/up/down hidden x intermediate."""
    sizes = {"q_proj": (shape.hidden, shape.hidden), "o_proj": (shape.hidden, shape.hidden),
             "k_proj": (shape.hidden, shape.kv_dim), "v_proj": (shape.hidden, shape.kv_dim),
             "gate_proj": (shape.hidden, shape.intermediate), "up_proj": (shape.hidden, shape.intermediate),
             "down_proj": (shape.intermediate, shape.hidden)}
    return shape.layers * sum(train.lora_r * sum(sizes[t]) for t in train.lora_target_modules if t in sizes)
