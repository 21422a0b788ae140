"""What the worker writes while it trains: a checkpoint every N steps (and resuming from the
newest), and a full disk reported as one line naming the folder and the bytes it needed."""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from labtune.training.distributed import log
from labtune.training.worker_config import WorkerConfig, WorkerError


@contextmanager
def writing(path: Path, needed: int) -> Iterator[None]:
    """A full disk while writing `needed` bytes under path: one line naming both, as the error."""
    from labtune.store.backends import disk_full, is_disk_full

    try:
        yield
    except (KeyboardInterrupt, SystemExit, WorkerError):
        raise
    except BaseException as exc:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        # torch's zip writer reports a short write as "unexpected pos": a full disk all the same
        if is_disk_full(exc) or _free_bytes(path) < needed:
            raise WorkerError(str(disk_full(path, needed))) from None
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
