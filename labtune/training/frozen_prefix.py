"""Frozen lowest layers computed once, not once per epoch. Imports only torch.

With the embeddings and the lowest `freeze_layers` decoder layers frozen (and no dropout), what
those layers make of an example is the same every epoch: a fixed function of its tokens. The
demo's recipe spends half its training FLOPs on that forward pass, 8.5 times over. `FrozenPrefix`
runs it once per example before training and keeps the residual stream after the last frozen
layer (fp32, one [length, hidden] tensor per example); each step then starts the model at the first
trained layer from those states (`inputs_embeds`, the decoder's layer list narrowed for the call),
so the loss and every gradient are those of the full forward (tests/test_frozen_prefix.py holds
them to 1e-5, packed and padded).

Only where the model is one unsharded process: FSDP2 registers its hooks on the layer modules it
found at the first forward, so a sharded model always runs whole. Above CACHE_LIMIT_BYTES of states
(a 7B model's 4,096-wide stream over a large dataset) it is not kept either; the log says why.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

CACHE_LIMIT_BYTES = 2 << 30  # fp32 states kept in host (or device) memory at most


def inert_depth(model: torch.nn.Module, layers: list[torch.nn.Module]) -> int:
    """How many of the lowest decoder layers are frozen below every trained parameter (with the
    input embeddings frozen too): the part of the forward that never changes."""
    embed = model.get_input_embeddings()
    if embed is not None and embed.weight.requires_grad:
        return 0
    depth = 0
    for layer in layers:
        if any(p.requires_grad for p in layer.parameters()):
            break
        depth += 1
    return depth


def _layer_list(model: torch.nn.Module, first: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The module holding the decoder's layer list, and the attribute's name."""
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, torch.nn.ModuleList) and len(child) and child[0] is first:
                return module, name
    raise ValueError(f"{type(model).__name__}: no layer list starts with its first decoder layer")


def has_dropout(layers: list[torch.nn.Module], config: Any) -> bool:
    """Dropout makes the frozen layers' output differ from epoch to epoch: then nothing is cached."""
    if any(float(getattr(config, name, 0.0) or 0.0) > 0 for name in ("attention_dropout", "hidden_dropout",
                                                                      "resid_pdrop", "attn_pdrop")):
        return True
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for layer in layers for m in layer.modules())


def why_not(model: torch.nn.Module, layers: list[torch.nn.Module], sharded: bool, tokens: int) -> str | None:
    """None when the frozen prefix can be cached; otherwise the reason, for the log."""
    depth = inert_depth(model, layers)
    if depth == 0:
        return "no frozen layers below the trained ones"
    if sharded:
        return "the model is sharded (FSDP2 runs every layer)"
    if has_dropout(layers[:depth], model.config):
        return "the frozen layers have dropout"
    size = tokens * int(model.config.hidden_size) * 4
    if size > CACHE_LIMIT_BYTES:
        return f"their output would take {size / 2**30:.1f} GiB (more than {CACHE_LIMIT_BYTES / 2**30:.0f} GiB)"
    return None


@dataclass
class FrozenPrefix:
    """The states after the last frozen layer, per example, and the means to start there."""

    depth: int
    owner: torch.nn.Module
    attribute: str
    states: list[torch.Tensor]

    @contextmanager
    def _layers(self, chosen: slice) -> Iterator[None]:
        full = getattr(self.owner, self.attribute)
        setattr(self.owner, self.attribute, torch.nn.ModuleList(list(full)[chosen]))
        try:
            yield
        finally:
            setattr(self.owner, self.attribute, full)

    def skipping(self) -> Any:
        """While active, the model runs its layers from the first trained one: call it with
        `inputs_embeds` from `embeds`."""
        return self._layers(slice(self.depth, None))

    @classmethod
    @torch.no_grad()
    def build(cls, model: torch.nn.Module, layers: list[torch.nn.Module], examples: Any, device: torch.device,
              autocast: bool, batch_size: int = 16) -> FrozenPrefix:
        """Run every example through the embeddings and the frozen layers once (right-padded
        batches of similar length: padding never changes a real token's state)."""
        depth = inert_depth(model, layers)
        owner, attribute = _layer_list(model, layers[0])
        prefix = cls(depth, owner, attribute, [])
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        captured: list[torch.Tensor] = []

        def keep(module: torch.nn.Module, args: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)

        handle = layers[depth - 1].register_forward_hook(keep)
        lengths = [len(examples[i]["input_ids"]) for i in range(len(examples))]
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        states: list[torch.Tensor | None] = [None] * len(lengths)
        was_training = model.training
        model.eval()
        try:
            with prefix._layers(slice(0, depth)):
                for start in range(0, len(order), batch_size):
                    chosen = order[start : start + batch_size]
                    width = max(lengths[i] for i in chosen)
                    ids = torch.zeros((len(chosen), width), dtype=torch.long)
                    mask = torch.zeros((len(chosen), width), dtype=torch.long)
                    for row, i in enumerate(chosen):
                        ids[row, : lengths[i]] = torch.as_tensor(examples[i]["input_ids"])
                        mask[row, : lengths[i]] = 1
                    captured.clear()
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                    hidden = captured[-1].float()
                    for row, i in enumerate(chosen):
                        states[i] = hidden[row, : lengths[i]].clone()
        finally:
            handle.remove()
            model.train(was_training)
        prefix.states = [s for s in states if s is not None]
        return prefix

    def embeds(self, rows: list[list[int]], width: int) -> torch.Tensor:
        """The batch's starting states: row r holds its examples' states one after another (one
        example per row unpacked, several packed), right-padded with zeros to width."""
        hidden = self.states[0].shape[-1]
        out = torch.zeros((len(rows), width, hidden), dtype=torch.float32, device=self.states[0].device)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                n = self.states[i].shape[0]
                out[r, start : start + n] = self.states[i]
                start += n
        return out

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.states)
