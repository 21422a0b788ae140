"""Supervised fine-tuning on PyTorch FSDP2, one process per device. Imports no Prefect.

    torchrun --nproc_per_node=2 -m labtune.training.worker --config train_config.json

The config (a WorkerConfig, written by the train stage) names the model directory, the tokenize
stage's training examples (a `datasets` folder of input_ids, labels and length), the output
directory and the hyperparameters (FastChat's names). Each decoder layer is one `fully_shard`
unit, then the root; gloo on CPU, NCCL on GPU. The labels mask everything but the assistant turns.
The final model is gathered to rank 0 with CPU offload and saved as safetensors. Rank 0 alone
prints and writes; other ranks speak only when they fail.

In the order torchtune's recipes read: `setup` (process group, model, sharding, optimizer),
`CheckpointRunner.resume`, `train_step` (one optimizer step over the accumulation window),
`log_step`, `CheckpointRunner.save`, `export`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from labtune.training import early_stopping
from labtune.training import frozen_prefix
from labtune.training import packing
from labtune.data.chat import IGNORE_INDEX
from labtune.training.frozen_prefix import FrozenPrefix
from labtune.training.loss import AnswerLoss
from labtune.training.throughput import FlopsModel, describe, mfu, peak_flops, peak_memory_gib, synchronize
from labtune.precision import bf16_forced_off, native_bf16
from labtune.recipe import WSD_DECAY_FRACTION, TrainConfig
from labtune.training.worker_config import WORKER_ERROR, WorkerConfig


@contextmanager
def writing(path: Path, needed: int) -> Iterator[None]:
    """A full disk while writing `needed` bytes under path: one line naming both, as the error."""
    from labtune.store.backends import disk_full, is_disk_full

    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        # torch's zip writer reports a short write as "unexpected pos": a full disk all the same
        if is_disk_full(exc) or _free_bytes(path) < needed:
            raise SystemExit(str(disk_full(path, needed))) from None
        raise


def _free_bytes(path: Path) -> int:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def tensor_bytes(state: Any) -> int:
    """Bytes of the tensors (this rank's shards) in a nested state dict."""
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(v) for v in state)
    return 0


def log(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)


def load_examples(train_dir: str) -> tuple[Any, list[int]]:
    """The tokenize stage's examples (input_ids, labels, length), memory-mapped Arrow."""
    from datasets import load_from_disk

    dataset = load_from_disk(train_dir)
    lengths = list(dataset["length"])
    # numpy rows straight from Arrow: no Python list of ints per token on the step's critical path
    return dataset.with_format("numpy", columns=["input_ids", "labels"]), lengths


def collate(batch: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the batch (not to model_max_length)."""
    width = max(len(example["input_ids"]) for example in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.as_tensor(example["input_ids"])
        labels[row, :n] = torch.as_tensor(example["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def rank_batches(lengths: list[int], epoch: int, seed: int, rank: int, world: int, batch_size: int,
                 group_size: int = 16) -> list[list[int]]:
    """This rank's micro-batches for one epoch. Every rank gets the same number of batches
    (the shuffled order wraps around), so collectives never desynchronise, whatever the data size.
    Within each window of group_size steps, examples are sorted by length so that a batch holds
    examples of similar length and little compute goes to padding."""
    n_examples = len(lengths)
    rng = random.Random(seed + epoch)
    order = list(range(n_examples))
    rng.shuffle(order)
    per_step = world * batch_size
    steps = math.ceil(n_examples / per_step)
    order = (order * math.ceil(steps * per_step / n_examples))[: steps * per_step]
    window = per_step * group_size
    grouped = []
    for start in range(0, len(order), window):
        grouped += sorted(order[start : start + window], key=lambda i: lengths[i])
    steps_order = [grouped[i : i + per_step] for i in range(0, len(grouped), per_step)]
    rng.shuffle(steps_order)
    return [step[rank::world] for step in steps_order]


def layer_classes(model: torch.nn.Module, names: str | None) -> tuple[type, ...]:
    wanted = {n.strip() for n in (names or "").split(",") if n.strip()} or set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in wanted}
    if not classes:
        raise SystemExit(f"fsdp_transformer_layer_cls_to_wrap: no module of class {sorted(wanted)} in {type(model).__name__}")
    return tuple(classes)


def attention_implementation(train: TrainConfig, device: torch.device) -> str:
    """`auto`: PyTorch's SDPA on a GPU; on a CPU the plain matmul-softmax ("eager"), which gives
    the same losses (fp32, 1e-6) and is faster there: SDPA's CPU kernel allocates and zeroes
    buffers for every call (a demo step, 4 x 55 tokens: 0.52 s against 0.57 s; 2 x 512: 1.7 s
    against 2.1 s)."""
    if train.attn_implementation != "auto":
        return train.attn_implementation
    return "sdpa" if device.type == "cuda" else "eager"


def offloaded(train: TrainConfig) -> bool:
    """`fsdp: ... offload`: parameters, gradients and optimizer state live in host memory (FSDP2's
    CPUOffloadPolicy); each layer's parameters are copied to the GPU for its forward and backward,
    and the optimizer steps on the CPU."""
    return "offload" in train.fsdp.split()


def shard_model(model: torch.nn.Module, mesh: Any, train: TrainConfig, device: torch.device) -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if train.bf16 else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offloaded(train) else OffloadPolicy()
    reshard = "shard_grad_op" not in train.fsdp.split()
    classes = layer_classes(model, train.fsdp_transformer_layer_cls_to_wrap)
    for module in model.modules():
        if isinstance(module, classes):
            fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard, offload_policy=offload)


def buffers_to(model: torch.nn.Module, device: torch.device) -> None:
    """Buffers (rotary frequencies) on the compute device while the offloaded parameters stay on the CPU."""
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.device != device:
                module.register_buffer(name, buffer.to(device), persistent=name not in module._non_persistent_buffers_set)


def sharding_report(model: torch.nn.Module, world: int) -> dict[str, Any]:
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    full = sum(p.numel() for p in model.parameters())
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, local)
    return {"world_size": world, "full_numel": full, "local_numel_per_rank": gathered,
            "dtensor_params": all(hasattr(p, "to_local") for p in model.parameters())}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_updates: int) -> Any:
    """transformers' schedule by its name; warmup_stable_decay decays over the last
    WSD_DECAY_FRACTION of the steps unless lr_scheduler_kwargs names num_decay_steps."""
    from transformers import get_scheduler

    kwargs = dict(train.lr_scheduler_kwargs)
    if train.lr_scheduler_type == "warmup_stable_decay":
        kwargs.setdefault("num_decay_steps", max(1, math.ceil(WSD_DECAY_FRACTION * total_updates)))
    return get_scheduler(train.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(train.warmup_ratio * total_updates),
                         num_training_steps=total_updates, scheduler_specific_kwargs=kwargs)


class CheckpointRunner:
    """Sharded checkpoints with torch.distributed.checkpoint: written to this node's disk at every
    save_steps, uploaded to the store by a background thread while training continues, and
    resumed from at start (the newest complete one of this run)."""

    def __init__(self, cfg: WorkerConfig, rank: int, world: int, local_rank: int):
        self.cfg, self.rank, self.world, self.local_rank = cfg, rank, world, local_rank
        self.enabled = cfg.checkpoints_enabled
        self.prefix = cfg.checkpoint_prefix or ""
        self.local_root = Path(cfg.checkpoint_dir)
        self.uploader = None
        if self.enabled:
            from labtune.training.checkpoints import BackgroundUploader

            self.uploader = BackgroundUploader(cfg.store, self.prefix, rank, world, cfg.train.save_total_limit, log)

    def _store(self):
        from labtune.store.backends import open_store

        return open_store(self.cfg.store)

    def options(self) -> Any:
        """A LoRA run's checkpoints hold the adapter and its optimizer state, not the frozen base
        (which the run loads from the model stage anyway)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        lora = self.cfg.train.lora
        return StateDictOptions(ignore_frozen_params=lora, strict=not lora)

    def due(self, step: int, total: int) -> bool:
        return self.enabled and step < total and step % self.cfg.train.save_steps == 0

    def save(self, step: int, epoch: int, model: torch.nn.Module, optimizer: Any, scheduler: Any,
             history: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        assert self.uploader is not None
        self.uploader.wait()  # one checkpoint in flight at a time bounds the disk it takes
        self.uploader.raise_fatal()
        started = time.time()
        local = self.local_root / f"step-{step:07d}"
        model_state, optim_state = get_state_dict(model, optimizer, options=self.options())
        rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        with writing(local, tensor_bytes(model_state) + tensor_bytes(optim_state)):
            local.mkdir(parents=True, exist_ok=True)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(local))
            torch.save(rng, local / f"rng-rank{self.rank}.pt")
        files = sorted(local.glob(f"__{self.rank}_*.distcp")) + [local / f"rng-rank{self.rank}.pt"]
        if self.rank == 0:
            state = {"step": step, "epoch": epoch, "world_size": self.world, "scheduler": scheduler.state_dict(),
                     "history": history, **(extra or {})}
            (local / "trainer_state.json").write_text(json.dumps(state))
            files += [local / ".metadata", local / "trainer_state.json"]
        log(f"checkpoint step {step}: written locally in {time.time() - started:.1f}s, uploading in the background")
        self.uploader.start(step, local, files, {"epoch": epoch})

    def resume(self, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any] | None:
        """Load the newest complete checkpoint of this run, if any; returns its trainer state."""
        if not self.enabled:
            return None
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        from labtune.training import checkpoints

        found: list[Any] = [None]
        if self.rank == 0:  # one decision, broadcast, so every node resumes from the same step
            found[0] = checkpoints.download_newest_whole(self._store(), self.prefix,
                                                         lambda s: self.local_root / f"resume-{s:07d}", log)
        dist.broadcast_object_list(found, src=0)
        step = found[0]
        if step is None:
            return None
        local = self.local_root / f"resume-{step:07d}"
        if self.local_rank == 0 and self.rank != 0:  # another node: its own copy of the step rank 0 verified
            shutil.rmtree(local, ignore_errors=True)
            checkpoints.download(self._store(), self.prefix, step, local)
        dist.barrier()
        model_state, optim_state = get_state_dict(model, optimizer, options=self.options())
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(local))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=self.options())
        trainer_state = json.loads((local / "trainer_state.json").read_text())
        scheduler.load_state_dict(trainer_state["scheduler"])
        rng_file = local / f"rng-rank{self.rank}.pt"
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=True)
            random.setstate(rng["python"])
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        dist.barrier()
        if self.local_rank == 0:
            shutil.rmtree(local, ignore_errors=True)
        uri = f"{self.cfg.store.uri.rstrip('/')}/{self.prefix}/step-{step:07d}"
        log(f"resumed from checkpoint step {step} ({uri})")
        return trainer_state

    def finish(self) -> None:
        if self.uploader is not None:
            self.uploader.wait()
            self.uploader.raise_fatal()

    def committed(self) -> list[str]:
        return list(self.uploader.committed) if self.uploader is not None else []


def apply_lora(model: torch.nn.Module, train: TrainConfig) -> Any:
    """peft's LoraConfig from the recipe; every target module name must exist in the model."""
    from peft import LoraConfig

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(train.lora_target_modules) - names)
    if missing:
        raise SystemExit(f"lora_target_modules: no module named {missing} in {type(model).__name__}")
    return LoraConfig(r=train.lora_r, lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout,
                      target_modules=list(train.lora_target_modules), bias="none", task_type="CAUSAL_LM")


def freeze(model: torch.nn.Module, train: TrainConfig) -> str | None:
    """train.freeze_embeddings / freeze_layers: those weights keep their values and get no
    gradient (and no optimizer state); returns what was frozen, for the log."""
    from labtune.training.throughput import decoder_layers

    if not (train.freeze_embeddings or train.freeze_layers):
        return None
    frozen = []
    if train.freeze_embeddings or train.freeze_layers:
        model.get_input_embeddings().weight.requires_grad_(False)
        frozen.append("the input embeddings" + (" (and the tied output layer)" if model.config.tie_word_embeddings else ""))
    layers = decoder_layers(model)
    if train.freeze_layers > len(layers):
        raise SystemExit(f"freeze_layers {train.freeze_layers}: the model has {len(layers)} decoder layers")
    for layer in layers[: train.freeze_layers]:
        layer.requires_grad_(False)
    if train.freeze_layers:
        frozen.append(f"decoder layers 0-{train.freeze_layers - 1} of {len(layers)}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"frozen: {' and '.join(frozen)}; {trainable:,} of {sum(p.numel() for p in model.parameters()):,} parameters train"


def compile_wanted(train: TrainConfig, device: torch.device) -> bool:
    """`auto`: on a GPU, where compiled layers are measured faster; not on a CPU, where inductor
    spends minutes building C++ for a run that is over in minutes."""
    return device.type == "cuda" if train.torch_compile == "auto" else bool(train.torch_compile)


def checkpointing_every(train: TrainConfig) -> int:
    """Every how many decoder layers activations are recomputed; 0 for none. `true` means every
    layer, as in FastChat; `selective` every gradient_checkpointing_every_n_layers-th layer.
    `auto` is resolved by the train stage's memory estimate (labtune/training/memory.py) before launch."""
    if train.gradient_checkpointing == "auto":
        raise SystemExit("gradient_checkpointing 'auto' reached the worker unresolved: the train stage "
                         "(labtune.stages.train.fit_memory) resolves it")
    if train.gradient_checkpointing == "selective":
        return train.gradient_checkpointing_every_n_layers
    return 1 if train.gradient_checkpointing else 0


def compile_layers(model: torch.nn.Module, train: TrainConfig) -> None:
    """torch.compile each decoder layer (as torchtune does): the layers share one compiled graph and
    FSDP2's collectives stay between them, outside the graphs."""
    classes = layer_classes(model, train.fsdp_transformer_layer_cls_to_wrap)
    for module in model.modules():
        if isinstance(module, classes):
            module.compile()


def export_model(state: dict[str, torch.Tensor], base_config: Any, save_dtype: torch.dtype, lora_config: Any,
                 out_dir: Path) -> None:
    """Rank 0: the gathered full state dict saved as a plain transformers model (sharded
    safetensors + config). A LoRA run's adapter is saved under adapter/ and merged into the
    base weights in float32 before the cast, so the output loads without peft."""
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_config(base_config, dtype=torch.float32)
    if lora_config is not None:
        from peft import get_peft_model

        final = get_peft_model(final, lora_config)
    missing, unexpected = final.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise SystemExit(f"final state dict does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if lora_config is not None:
        final.save_pretrained(out_dir / "adapter")
        final = final.merge_and_unload()
    final.to(save_dtype)
    final.config.use_cache = True
    final.generation_config.use_cache = True  # from_config copied the training config's False: generation would run without its KV cache
    final.save_pretrained(out_dir, max_shard_size="2GB")


@dataclass
class Tally:
    """Counts of one rank over some optimizer steps, for throughput and MFU."""

    steps: int = 0
    tokens: int = 0  # non-pad
    computed: int = 0  # padding included
    labels: int = 0  # tokens the loss is computed on
    rows: int = 0  # sequences

    def add(self, other: "Tally") -> None:
        for name in ("steps", "tokens", "computed", "labels", "rows"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summed(self, device: torch.device) -> "Tally":
        """The same counts added over every rank."""
        counts = torch.tensor([self.steps, self.tokens, self.computed, self.labels, self.rows], dtype=torch.float64,
                              device=device)
        dist.all_reduce(counts)
        return Tally(self.steps, *(int(c) for c in counts[1:].tolist()))

    def flops(self, model: FlopsModel) -> float:
        return model.flops(self.tokens, self.labels, self.tokens / max(self.rows, 1))


@dataclass
class Run:
    """Everything `setup` builds for the loop: where it runs, what it trains, how."""

    cfg: WorkerConfig
    rank: int
    world: int
    local_rank: int
    device: torch.device
    tokenizer: Any
    examples: Any
    lengths: list[int]
    pad_id: int
    model: torch.nn.Module
    base_config: Any
    save_dtype: torch.dtype
    lora_config: Any
    sharding: dict[str, Any]
    optimizer: Any
    scheduler: Any
    updates_per_epoch: int
    total_updates: int
    autocast: bool = False  # bf16 autocast around the forward (one CPU process asked for bf16)
    loss: AnswerLoss | None = None
    flops_model: FlopsModel | None = None
    peak: float | None = None  # the device's dense bf16 FLOP/s; None: MFU is not reported
    history: list[dict[str, Any]] = field(default_factory=list)
    step: int = 0
    total: Tally = field(default_factory=Tally)  # this process's counts since it started
    flops_done: float = 0.0  # training FLOPs of every rank since step 0 (a resumed run continues the count)
    labels_done: int = 0  # label tokens likewise
    dev: Any = None  # early stopping's questions (tokenized), None without eval_strategy
    dev_flops: float = 0.0
    schedule: early_stopping.StoppableSchedule | None = None  # the WSD schedule early stopping can end
    stopping: early_stopping.Stopping | None = None
    best_weights: dict[str, torch.Tensor] | None = None
    prefix: FrozenPrefix | None = None  # the frozen layers' output per example, computed once
    prefix_flops: float = 0.0  # what computing it cost
    dev_prefix: FrozenPrefix | None = None  # the same for the dev questions
    dev_prefix_flops: float = 0.0


def setup(cfg: WorkerConfig) -> Run:
    """Process group and device, the examples, the model (LoRA, checkpointing, compile), FSDP2
    sharding, the optimizer and the schedule."""
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    train = cfg.train
    use_cuda = torch.cuda.is_available() and cfg.backend != "gloo"
    backend = "nccl" if use_cuda else "gloo"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        if train.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
    dist.init_process_group(backend=backend)
    mesh = init_device_mesh(device.type, (world,))
    torch.manual_seed(train.seed)

    model_dir = Path(cfg.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, lengths = load_examples(cfg.train_dir)
    if not lengths:
        raise SystemExit(f"{cfg.train_dir}: no training examples")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    log(f"world_size={world} backend={backend} device={device.type} examples={len(lengths)}")
    if train.bf16 and device.type == "cpu" and not native_bf16():
        # emulated bf16 is several times slower than fp32: the recipe asked for speed, not for bf16 numerics
        why = "LABTUNE_NO_NATIVE_BF16 is set" if bf16_forced_off() else \
            f"this CPU has no native bf16 ({torch.backends.cpu.get_cpu_capability()}, no AVX512-BF16 or AMX)"
        log(f"{why}: training in fp32 instead")
        train = train.model_copy(update={"bf16": False})
    attention = attention_implementation(train, device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attention)
    save_dtype = model.config.dtype if isinstance(model.config.dtype, torch.dtype) else torch.float32
    model.config.use_cache = False
    base_config = model.config
    frozen = freeze(model, train)
    if frozen:
        log(frozen)
    lora_config = apply_lora(model, train) if train.lora else None
    if lora_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"lora: r={lora_config.r} alpha={lora_config.lora_alpha} on {sorted(lora_config.target_modules)}: "
            f"{trainable:,} trainable parameters of {sum(p.numel() for p in model.parameters()):,}")
    every = checkpointing_every(train)
    if every:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                              every_n_layers=every)
    offload = offloaded(train) and device.type == "cuda"
    if not offload:
        model.to(device)  # offloaded: the parameters stay in host memory, sharded there below
    flops_model = FlopsModel.of(model)  # before sharding: full sizes
    peak = peak_flops(device)
    compiled = compile_wanted(train, device)
    if compiled:
        compile_layers(model, train)
    log(f"torch_compile={train.torch_compile!r}: {'each decoder layer compiled' if compiled else 'eager'}; "
        f"gradient_checkpointing={train.gradient_checkpointing!r}: "
        f"{f'every {every} decoder layer(s) recomputed' if every else 'no recomputation'}")
    autocast = world == 1 and device.type == "cpu" and train.bf16
    if world == 1 and (device.type == "cpu" or not train.bf16) and not offload:
        # one process: FSDP2 would copy every parameter in and out of its flat buffers around each
        # layer for nothing (32 demo steps: 67 s sharded, 46 s not); bf16 on one CPU is autocast
        # (fp32 weights and optimizer, bf16 matmuls: 2x faster with AVX512-BF16)
        log(f"one process in {'bf16 autocast' if autocast else 'fp32'}: the model is not sharded")
        sharded = False
    else:
        sharded = True
        shard_model(model, mesh, train, device)
        if offload:
            buffers_to(model, device)
            log("fsdp offload: parameters, gradients and optimizer state in host memory; the optimizer steps on the CPU")
    sharding = sharding_report(model, world)
    if sharding["dtensor_params"]:
        log(f"fsdp2: {sharding['full_numel']:,} parameters, local shard per rank {sharding['local_numel_per_rank']}")

    bs, gas = train.per_device_train_batch_size, train.gradient_accumulation_steps
    micro_per_epoch = micro_batches_per_epoch(train, lengths, world)
    updates_per_epoch = math.ceil(micro_per_epoch / gas)
    total_updates = max(1, math.ceil(train.num_train_epochs * updates_per_epoch))
    optimizer = torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.learning_rate, betas=(0.9, 0.999),
                                  eps=1e-8, fused=True)  # one kernel for all updates: 4x faster than the per-tensor loop on CPU too
    schedule = None
    if train.eval_strategy != "no" and train.lr_scheduler_type == "warmup_stable_decay":
        scheduler, schedule = early_stopping.stoppable_scheduler(optimizer, train, total_updates)
    else:
        scheduler = make_scheduler(optimizer, train, total_updates)
    rows = f"packed rows of up to {train.packing_length} tokens" if train.packing else "examples"
    log(f"training: {total_updates} optimizer steps ({updates_per_epoch} per epoch), "
        f"micro-batch {bs} {rows} x accumulation {gas} x world {world}, {attention} attention, logits on label tokens only"
        + ("; fewer if early stopping ends it (dev questions: train.eval_strategy)" if train.eval_strategy != "no" else ""))
    log(f"throughput: synchronized wall time at each logged step; FLOPs per token 6 x {flops_model.trained:,} trained "
        f"+ 4 x {flops_model.frozen:,} frozen + 2 x {flops_model.inert:,} frozen below them matmul parameters "
        f"+ 12 x layers x hidden x length (docs/training.md); {describe(peak, device)}")
    run = Run(cfg, rank, world, local_rank, device, tokenizer, examples, lengths, pad_id, model, base_config, save_dtype,
              lora_config, sharding, optimizer, scheduler, updates_per_epoch, total_updates, autocast, AnswerLoss(model),
              flops_model, peak, schedule=schedule)
    if train.eval_strategy != "no":
        if not cfg.dev_dir or not Path(cfg.dev_dir).is_dir():
            raise SystemExit("train.eval_strategy: the tokenize stage has no dev questions (data.augment.dev_questions)")
        run.dev = load_examples(cfg.dev_dir)[0]
        run.stopping = early_stopping.Stopping(train.early_stopping_patience, train.early_stopping_threshold)
    if train.cache_frozen_layers and (train.freeze_layers or train.freeze_embeddings):
        cache_frozen_prefix(run, sharded)
    return run


def cache_frozen_prefix(run: Run, sharded: bool) -> None:
    """train.cache_frozen_layers: the frozen layers run once per example (and per dev question),
    here, instead of every step; the FLOP count then charges them once."""
    from labtune.training.throughput import decoder_layers

    layers = decoder_layers(run.model)
    dev_lengths = [len(run.dev[i]["input_ids"]) for i in range(len(run.dev))] if run.dev is not None else []
    tokens, dev_tokens = sum(run.lengths), sum(dev_lengths)
    reason = frozen_prefix.why_not(run.model, layers, sharded, tokens + dev_tokens)
    if reason:
        log(f"frozen layers run every step: {reason}")
        return
    started = time.time()
    run.prefix = FrozenPrefix.build(run.model, layers, run.examples, run.device, run.autocast)
    depth = run.prefix.depth
    run.prefix_flops = run.flops_model.prefix_flops(depth, tokens, tokens / len(run.lengths))
    if run.dev is not None:
        run.dev_prefix = FrozenPrefix.build(run.model, layers, run.dev, run.device, run.autocast)
        run.dev_prefix_flops = run.flops_model.prefix_flops(depth, dev_tokens, dev_tokens / max(len(dev_lengths), 1))
    run.flops_model = run.flops_model.without_prefix(depth)
    kept = run.prefix.nbytes() + (run.dev_prefix.nbytes() if run.dev_prefix else 0)
    log(f"frozen layers 0-{depth - 1} computed once for the {len(run.lengths)} examples"
        f"{f' and {len(dev_lengths)} dev questions' if dev_lengths else ''} in {time.time() - started:.1f}s "
        f"({kept / 2**20:.0f} MiB kept); each step starts at layer {depth} (train.cache_frozen_layers)")


def micro_batches_per_epoch(train: TrainConfig, lengths: list[int], world: int) -> int:
    """Micro-batches per rank and epoch: of examples, or with packing of the rows the first
    epoch's order packs into (every epoch is held to that many)."""
    per_step = world * train.per_device_train_batch_size
    if train.packing:
        return math.ceil(len(packing.pack_rows(lengths, 0, train.seed, int(train.packing_length))) / per_step)
    return math.ceil(len(lengths) / per_step)


def epoch_batches(run: Run, epoch: int) -> list[Any]:
    """This rank's micro-batches of one epoch (index lists; rows of index lists when packed)."""
    train = run.cfg.train
    if train.packing:
        return packing.rank_rows(run.lengths, epoch, train.seed, run.rank, run.world, train.per_device_train_batch_size,
                                 int(train.packing_length), steps=math.ceil(run.updates_per_epoch
                                                                            * train.gradient_accumulation_steps))
    return rank_batches(run.lengths, epoch, train.seed, run.rank, run.world, train.per_device_train_batch_size)


def make_batch(run: Run, micro: list[Any]) -> dict[str, torch.Tensor]:
    packed = run.cfg.train.packing
    if packed:
        batch = packing.collate_packed([[run.examples[i] for i in row] for row in micro], run.pad_id)
    else:
        batch = collate([run.examples[i] for i in micro], run.pad_id)
    if run.prefix is not None:
        batch["inputs_embeds"] = run.prefix.embeds(micro if packed else [[i] for i in micro], batch["input_ids"].shape[1])
    return batch


def train_step(run: Run, window: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, Tally]:
    """One optimizer step over an accumulation window of micro-batches; returns this rank's share
    of the step's loss, the gradient norm, and the window's counts."""
    device, world = run.device, run.world
    # The step's loss is the mean over every label token of every rank and micro-batch, as one
    # process with the whole batch would compute it: each micro-batch sums its token losses
    # and divides by the step's global label count. FSDP averages gradients over ranks, hence
    # the factor world. (A mean of per-micro-batch means would weigh short answers more.)
    local_labels = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window)
    label_tokens = torch.tensor(float(local_labels), device=device)
    dist.all_reduce(label_tokens)
    loss_sum = torch.zeros((), device=device)
    tally = Tally(steps=1, labels=local_labels)
    for cpu_batch in window:
        batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
        skipping = run.prefix.skipping() if "inputs_embeds" in batch and run.prefix else contextlib.nullcontext()
        with skipping, torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.autocast):
            loss = run.loss(run.model, batch, label_tokens.clamp(min=1))
        (loss * world).backward()
        loss_sum += loss.detach()
        tally.tokens += int(cpu_batch["attention_mask"].sum())
        tally.computed += cpu_batch["attention_mask"].numel()
        tally.rows += int(cpu_batch["segments"]) if "segments" in cpu_batch else cpu_batch["attention_mask"].shape[0]
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.train.max_grad_norm or float("inf"))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm, tally


def stopping_state(run: Run) -> dict[str, Any]:
    """What a checkpoint keeps of early stopping and the FLOP count (the best weights are not kept:
    after a resume the best is chosen among the evaluations from there on)."""
    return {"flops_done": run.flops_done, "labels_done": run.labels_done, "dev_flops": run.dev_flops,
            "total_updates": run.total_updates,
            "stopping": run.stopping.state() if run.stopping else None,
            "schedule": vars(run.schedule).copy() if run.schedule else None}


def resume_stopping(run: Run, state: dict[str, Any]) -> None:
    run.flops_done, run.labels_done = state.get("flops_done", 0.0), state.get("labels_done", 0)
    run.dev_flops = state.get("dev_flops", 0.0)
    run.total_updates = state.get("total_updates", run.total_updates)
    if run.stopping and state.get("stopping"):
        run.stopping = early_stopping.Stopping(**state["stopping"])
    if run.schedule and state.get("schedule"):
        vars(run.schedule).update(state["schedule"])


def evaluate_dev(run: Run) -> None:
    """Score the dev questions (this rank's share, the counts summed over ranks), then let
    early stopping decide: keep the best weights, start the decay on a plateau, or end."""
    train = run.cfg.train
    n, bs = len(run.dev), train.per_device_train_batch_size
    mine = list(range(run.rank, n, run.world))
    rounds = math.ceil(math.ceil(n / run.world) / bs)  # the same number of forward passes on every rank (FSDP)
    counts = torch.zeros(5, dtype=torch.float64, device=run.device)  # correct, asked, tokens, label tokens, loss
    run.model.eval()
    for r in range(rounds):
        chunk = mine[r * bs : (r + 1) * bs]
        rows = chunk or mine[:1] or [0]
        batch = collate([run.dev[i] for i in rows], run.pad_id)
        skipping = contextlib.nullcontext()
        if run.dev_prefix is not None:
            batch["inputs_embeds"] = run.dev_prefix.embeds([[i] for i in rows], batch["input_ids"].shape[1])
            skipping = run.dev_prefix.skipping()
        with skipping, torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.autocast):
            exact, loss = run.loss.exact(run.model, {k: v.to(run.device) for k, v in batch.items()})
        if chunk:
            counts += torch.tensor([float(exact.sum()), len(chunk), float(batch["attention_mask"].sum()),
                                    float((batch["labels"][:, 1:] != IGNORE_INDEX).sum()), float(loss)],
                                   dtype=torch.float64, device=run.device)
    run.model.train()
    dist.all_reduce(counts)
    correct, asked, tokens, labels = (int(c) for c in counts[:4].tolist())
    loss = float(counts[4]) / max(labels, 1)
    run.dev_flops += run.flops_model.forward_flops(tokens, labels, tokens / max(asked, 1))
    stopping = run.stopping
    assert stopping is not None
    best = stopping.record(run.step, correct, asked, loss)
    if best and train.load_best_model_at_end:
        run.best_weights = early_stopping.local_copy(run.model)
    log(f"dev: step {run.step}: {correct}/{asked} held-out questions answered word for word "
        f"({correct / max(asked, 1):.0%}, loss {loss:.3f}; best {stopping.best:.0%} at step {stopping.best_step})")
    if stopping.plateaued():
        stopping.stopped_at = run.step
        if run.schedule is not None:
            end = run.schedule.decay_now(run.step)
            log(f"early stopping: no gain in {stopping.misses} evaluations; the learning rate decays over "
                f"{end - run.step} steps and training ends at step {end}")
        else:
            end = run.step
            log(f"early stopping: no gain in {stopping.misses} evaluations; training ends at step {end}")
        run.total_updates = end


def peak_memory_per_rank(run: Run) -> list[float]:
    gathered = [torch.zeros(1, dtype=torch.float64, device=run.device) for _ in range(run.world)]
    dist.all_gather(gathered, torch.tensor([peak_memory_gib(run.device)], dtype=torch.float64, device=run.device))
    return [round(float(g), 2) for g in gathered]


def log_step(run: Run, epoch: float, loss_sum: torch.Tensor, grad_norm: torch.Tensor, window: Tally,
             elapsed: float) -> None:
    """The step's record (loss over all ranks, learning rate, gradient norm, throughput) into the
    history and onto stdout as a `progress` line the stage reads. `elapsed`: the window's wall
    time, read after the device finished (synchronize)."""
    dist.all_reduce(loss_sum)  # the ranks' shares add up to the step's mean loss
    counts = window.summed(run.device)
    norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    flops = counts.flops(run.flops_model)
    run.flops_done += flops
    run.labels_done += counts.labels
    utilization = mfu(flops, elapsed, run.peak, run.world)
    record = {
        "step": run.step, "total_steps": run.total_updates, "epoch": round(epoch, 3),
        "loss": round(float(loss_sum), 5), "learning_rate": run.scheduler.get_last_lr()[0],
        "grad_norm": round(float(norm), 4), "tokens": counts.tokens, "step_time_s": round(elapsed / max(window.steps, 1), 4),
        "tokens_per_s": round(counts.tokens / max(elapsed, 1e-9), 1),
        "mfu": round(utilization, 4) if utilization is not None else None,
        "peak_memory_gib": peak_memory_per_rank(run),
        "padding_fraction": round(1 - counts.tokens / max(counts.computed, 1), 3),
        # what the steps so far cost and taught: held-out accuracy is plotted against these
        "label_tokens": run.labels_done, "flops": run.flops_done, "sequences": counts.rows,
    }
    run.history.append(record)
    log("progress " + json.dumps(record))


def export(run: Run, train_seconds: float, epochs_run: int, resumed_from: int | None, checkpoints: list[str]) -> None:
    """The full state dict gathered to rank 0 (on the CPU), saved as a plain transformers model
    with the tokenizer and train_metrics.json."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    totals = run.total.summed(run.device)
    utilization = mfu(totals.flops(run.flops_model), train_seconds, run.peak, run.world)
    peak_memory = peak_memory_per_rank(run)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)  # the export's own peak, below
    # gathered one parameter at a time and moved to host memory at once: the GPU never holds more
    # than the training state plus one full parameter (the seed ran out of memory here)
    state = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # on a CPU the resident set cannot be reset: the export's peak is only reported on a GPU
    export_peak = peak_memory_per_rank(run) if run.device.type == "cuda" else None
    if run.rank == 0:
        out_dir = Path(run.cfg.output_dir)
        with writing(out_dir, sum(t.numel() for t in state.values()) * run.save_dtype.itemsize):
            out_dir.mkdir(parents=True, exist_ok=True)
            export_model(state, run.base_config, run.save_dtype, run.lora_config, out_dir)
            run.tokenizer.save_pretrained(out_dir)
        metrics = {"history": run.history, "sharding": run.sharding, "optimizer_steps": run.step, "epochs_run": epochs_run,
                   "examples": len(run.examples), "train_seconds": round(train_seconds, 2), "world_size": run.world,
                   "resumed_from_step": resumed_from,
                   "useful_tokens": totals.tokens, "computed_tokens": totals.computed, "label_tokens": totals.labels,
                   "useful_tokens_per_s": round(totals.tokens / max(train_seconds, 1e-9), 1),
                   "mfu": round(utilization, 4) if utilization is not None else None,
                   "peak_flops": run.peak, "flops_per_token": "6 x matmul parameters (4 if frozen, 2 if frozen below "
                   "every trained one; output layer on label tokens only) + 12 x layers x hidden x length",
                   "train_flops": run.flops_done, "train_label_tokens": run.labels_done, "dev_flops": run.dev_flops,
                   "early_stopping": run.stopping.state() if run.stopping else None, "peak_memory_gib": peak_memory,
                   "frozen_prefix": {"layers": run.prefix.depth, "flops": run.prefix_flops,
                                     "tokens": sum(run.lengths)} if run.prefix else None,
                   "export_peak_memory_gib": export_peak,
                   "checkpoints": checkpoints}
        (out_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
        log(f"saved final model to {out_dir} after {run.step} steps in {train_seconds:.1f}s")


def train(cfg: WorkerConfig) -> None:
    run = setup(cfg)
    train_cfg = cfg.train
    checkpointing = CheckpointRunner(cfg, run.rank, run.world, run.local_rank)
    resumed = checkpointing.resume(run.model, run.optimizer, run.scheduler)
    if resumed is not None:
        run.step, run.history = resumed["step"], resumed["history"]
        resume_stopping(run, resumed)
        if resumed["world_size"] != run.world:
            log(f"note: the checkpoint was written by {resumed['world_size']} ranks, this run has {run.world}: "
                "the weights and optimizer are resharded; the data order from here differs from the original run's")
    run.flops_done += run.prefix_flops  # computed again after a resume: spent again
    run.dev_flops += run.dev_prefix_flops

    run.model.train()
    gas = train_cfg.gradient_accumulation_steps
    started = time.time()
    window = Tally()
    window_loss = torch.zeros((), device=run.device)
    window_start = time.time()
    epoch = run.step // run.updates_per_epoch
    skip = run.step % run.updates_per_epoch  # optimizer steps of this epoch already done before the checkpoint
    while run.step < run.total_updates:
        batches = epoch_batches(run, epoch)
        for start in range(skip * gas, len(batches), gas):
            if run.step >= run.total_updates:
                break
            micro_batches = [make_batch(run, micro) for micro in batches[start : start + gas]]
            loss_sum, grad_norm, tally = train_step(run, micro_batches)
            run.step += 1
            run.total.add(tally)
            window.add(tally)
            window_loss = loss_sum
            if run.step % train_cfg.logging_steps == 0 or run.step == run.total_updates:
                synchronize(run.device)  # only at logged steps: nothing per micro-batch
                log_step(run, epoch + (start + len(micro_batches)) / len(batches), window_loss, grad_norm, window,
                         time.time() - window_start)
                window = Tally()
                window_start = time.time()
            if early_stopping.eval_due(train_cfg, run.step, run.updates_per_epoch, run.total_updates):
                evaluate_dev(run)
            if checkpointing.due(run.step, run.total_updates):
                checkpointing.save(run.step, epoch, run.model, run.optimizer, run.scheduler, run.history,
                                   stopping_state(run))
        epoch += 1
        skip = 0
    if run.best_weights is not None and run.stopping and run.stopping.best_step != run.step:
        early_stopping.restore(run.model, run.best_weights)
        log(f"early stopping: the weights of step {run.stopping.best_step} scored best on the dev questions "
            f"({run.stopping.best:.0%}): exporting those (load_best_model_at_end)")
    checkpointing.finish()
    synchronize(run.device)
    export(run, time.time() - started, epoch, resumed["step"] if resumed else None, checkpointing.committed())
    dist.barrier()
    dist.destroy_process_group()


def leave(code: int) -> None:
    """Exit without the interpreter's teardown. There, a process group still referenced by the
    device mesh was destroyed with a C++ thread running, and the rank aborted ("terminate called
    without an active exception", SIGABRT): about 1 run in 10 under load, after the model was saved
    or after the rank had reported its error. That was the flaky `make test`."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="train_config.json (a WorkerConfig) written by the train stage")
    args = parser.parse_args()
    rank = os.environ.get("RANK", "0")
    try:
        train(WorkerConfig.read(Path(args.config)))
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(f"{WORKER_ERROR} (rank {rank}): {exc.code}", flush=True)
            leave(1)
        raise
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # Exception, and torch.distributed.checkpoint's CheckpointException
        traceback.print_exc()
        first_line = (str(exc).splitlines() or [""])[0]
        print(f"{WORKER_ERROR} (rank {rank}): {type(exc).__name__}: {first_line}", flush=True)
        leave(1)
    leave(0)  # everything is saved and every rank is past the last barrier


if __name__ == "__main__":
    main()
