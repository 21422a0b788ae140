"""The model the worker trains: loaded, frozen or given LoRA adapters, recomputed and compiled
as the recipe says, sharded with FSDP2 (or not, in one process), and exported at the end."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from labtune.precision import bf16_forced_off, native_bf16
from labtune.recipe import TrainConfig
from labtune.training.distributed import log
from labtune.training.throughput import FlopsModel
from labtune.training.worker_config import WorkerError


def layer_classes(model: torch.nn.Module, names: str | None) -> tuple[type, ...]:
    wanted = {n.strip() for n in (names or "").split(",") if n.strip()} or set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in wanted}
    if not classes:
        raise WorkerError(f"fsdp_transformer_layer_cls_to_wrap: no module of class {sorted(wanted)} in {type(model).__name__}")
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



def apply_lora(model: torch.nn.Module, train: TrainConfig) -> Any:
    """peft's LoraConfig from the recipe; every target module name must exist in the model. With
    freeze_layers, adapters go only into the layers above them (LoRA against the upper layers): the
    layers below hold nothing that trains, so their output is computed once (cache_frozen_layers)."""
    from peft import LoraConfig

    from labtune.training.throughput import decoder_layers

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(train.lora_target_modules) - names)
    if missing:
        raise WorkerError(f"lora_target_modules: no module named {missing} in {type(model).__name__}")
    upper = list(range(train.freeze_layers, len(decoder_layers(model)))) if train.freeze_layers else None
    return LoraConfig(r=train.lora_r, lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout,
                      target_modules=list(train.lora_target_modules), bias="none", task_type="CAUSAL_LM",
                      layers_to_transform=upper)



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
        raise WorkerError(f"freeze_layers {train.freeze_layers}: the model has {len(layers)} decoder layers")
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
        raise WorkerError("gradient_checkpointing 'auto' reached the worker unresolved: the train stage "
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
        raise WorkerError(f"final state dict does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if lora_config is not None:
        final.save_pretrained(out_dir / "adapter")
        final = final.merge_and_unload()
    final.to(save_dtype)
    final.config.use_cache = True
    final.generation_config.use_cache = True  # from_config copied the training config's False: generation would run without its KV cache
    final.save_pretrained(out_dir, max_shard_size="2GB")



@dataclass
class BuiltModel:
    """What build_model made: the model as it trains and what the loop and the export need."""

    model: torch.nn.Module
    train: TrainConfig  # the recipe's settings, bf16 off where the CPU has no native bf16
    base_config: Any
    save_dtype: torch.dtype
    lora_config: Any
    attention: str
    flops_model: FlopsModel
    peak: float | None
    autocast: bool
    sharded: bool
    sharding: dict[str, Any]


def without_emulated_bf16(train: TrainConfig, device: torch.device) -> TrainConfig:
    """bf16 off on a CPU without native bf16: emulated bf16 is several times slower than fp32, and
    the recipe asked for speed, not for bf16 numerics."""
    if train.bf16 and device.type == "cpu" and not native_bf16():
        why = "LABTUNE_NO_NATIVE_BF16 is set" if bf16_forced_off() else \
            f"this CPU has no native bf16 ({torch.backends.cpu.get_cpu_capability()}, no AVX512-BF16 or AMX)"
        log(f"{why}: training in fp32 instead")
        return train.model_copy(update={"bf16": False})
    return train


def build_model(model_dir: Path, train: TrainConfig, place: Any) -> BuiltModel:
    """The model in fp32 on the device: frozen layers, LoRA, recomputation and compilation as the
    recipe says, then sharded with FSDP2 (one process on a CPU or in fp32: not sharded)."""
    from transformers import AutoModelForCausalLM

    from labtune.training.throughput import peak_flops

    device, world = place.device, place.world
    train = without_emulated_bf16(train, device)
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
    compiled = compile_wanted(train, device)
    if compiled:
        compile_layers(model, train)
    log(f"torch_compile={train.torch_compile!r}: {'each decoder layer compiled' if compiled else 'eager'}; "
        f"gradient_checkpointing={train.gradient_checkpointing!r}: "
        f"{f'every {every} decoder layer(s) recomputed' if every else 'no recomputation'}")
    autocast = world == 1 and device.type == "cpu" and train.bf16
    sharded = not (world == 1 and (device.type == "cpu" or not train.bf16) and not offload)
    if not sharded:
        # one process: FSDP2 would copy every parameter in and out of its flat buffers around each
        # layer for nothing (32 demo steps: 67 s sharded, 46 s not); bf16 on one CPU is autocast
        # (fp32 weights and optimizer, bf16 matmuls: 2x faster with AVX512-BF16)
        log(f"one process in {'bf16 autocast' if autocast else 'fp32'}: the model is not sharded")
    else:
        shard_model(model, place.mesh, train, device)
        if offload:
            buffers_to(model, device)
            log("fsdp offload: parameters, gradients and optimizer state in host memory; the optimizer steps on the CPU")
    sharding = sharding_report(model, world)
    if sharding["dtensor_params"]:
        log(f"fsdp2: {sharding['full_numel']:,} parameters, local shard per rank {sharding['local_numel_per_rank']}")
    return BuiltModel(model=model, train=train, base_config=base_config, save_dtype=save_dtype, lora_config=lora_config,
                      attention=attention, flops_model=flops_model, peak=peak_flops(device), autocast=autocast,
                      sharded=sharded, sharding=sharding)
