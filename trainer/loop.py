"""The training loop of one rank: device, process group, model, data, steps, eval, checkpoints.

Every launcher (``trainer/launch.py``: in-process, torchrun, Ray Train) ends in ``run_worker``, once
per process. Output: ``<out>/log.jsonl`` (one line per step), ``<out>/eval.jsonl``, ``<out>/final/``
(open_clip local-dir export) and what ``trainer/checkpoint.py`` writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pairsift.common.storage import write_atomic
from pairsift.trainer.checkpoint import (
    CKPT_DIR,
    FINAL_DIR,
    TrainResult,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    truncate_log,
)
from pairsift.trainer.config import ConfigError, TrainConfig
from pairsift.trainer.data import (
    StreamSpec,
    TrainLoader,
    TrainTransform,
    check_layout,
    expand_shards,
    shard_sizes,
    steps_per_epoch,
)
from pairsift.trainer.loss import accumulated_backward, make_loss
from pairsift.trainer.model import build_model, export_local_dir


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warmup, then cosine to zero (open_clip_train's cosine_lr)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    e, es = step - warmup, max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * e / es)) * base_lr


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # no weight decay on gains, biases and the temperature (as open_clip_train)
    def exclude(n: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": cfg.weight_decay}]
    # fused: one kernel for all params; on CPU the default path is ~35 ms/step slower on the tiny model
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)


def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but no CUDA device is visible")
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def autocast_for(cfg: TrainConfig, device: torch.device):
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision in ("bf16", "fp16") and device.type != "cuda":
        raise ConfigError(f"precision '{precision}' (autocast) needs a GPU; use fp32 or auto on CPU")
    if precision == "fp32":
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed(device_type: str) -> Dist:
    """Join the process group torchrun or Ray Train set up; a plain process is rank 0 of 1."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size())
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        if os.environ.get("MASTER_ADDR", "127.0.0.1").startswith("127.") or os.environ.get("MASTER_ADDR") == "localhost":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # single machine: keep gloo on loopback
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return Dist(dist.get_rank(), dist.get_world_size())
    return Dist()


def run_worker(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    """Train on this rank; every launcher calls this once per process."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg)
    dd = init_distributed(device.type)
    out = Path(cfg.out)
    autocast, scaler = autocast_for(cfg, device)
    seed_everything(cfg.seed)

    # The data first: an empty training set fails now, not after a model has loaded.
    shards = expand_shards(cfg.data.train)
    sizes = shard_sizes(shards)
    total_samples = sum(sizes)
    if total_samples == 0:
        raise ConfigError(f"no training samples: the {len(shards)} shard(s) of data.train ({cfg.data.train}) "
                          "are empty; point data.train at the shards a pipeline run wrote (<run>/shards)")

    bundle = build_model(cfg.model, cfg.pretrained, cfg.loss, device)
    model = bundle.model
    model.output_dict = True
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    optimizer = make_optimizer(model, cfg, device)

    per_epoch = steps_per_epoch(total_samples, cfg.batch_size)
    total_steps = cfg.steps or max(1, round(cfg.epochs * per_epoch))
    hosts = max(1, cfg.data.workers)
    readers = cfg.data.readers or dd.world * hosts
    micro = cfg.batch_size // cfg.accum_steps
    if cfg.batch_size % (cfg.accum_steps * dd.world):
        raise ConfigError(f"batch_size {cfg.batch_size} must divide by accum_steps × world_size "
                          f"= {cfg.accum_steps * dd.world}")
    check_layout(readers, dd.world, hosts, micro, len(shards))

    start_step, cursors, history = 0, None, []
    ckpt = latest_checkpoint(out)
    if ckpt is not None and not resume:
        raise ConfigError(f"{out} already holds checkpoints of a run; resume it (--resume) or pick a new 'out'")
    if resume and ckpt is None and dd.main:
        print(f"resume: no checkpoint in {out / CKPT_DIR}, starting from step 0", flush=True)
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        if state["readers"] != readers:
            raise ConfigError(f"{ckpt} was written with data.readers={state['readers']}; set it again to resume")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][dd.rank] if dd.rank < len(state["rng"]) else state["rng"][0])
        start_step = int(state["step"])
        cursors = {int(j): tuple(c) for j, c in state["cursors"].items()}
        history = [float(x) for x in state["losses"]]

    ddp = model
    if dd.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None, forward_sync_buffers=False)
        # open_clip's gather_with_grad uses this API; the warning is open_clip's to fix, not the user's
        warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")
    loss_fn = make_loss(cfg.loss, dd.rank, dd.world, cfg.local_loss, cfg.gather_with_grad)

    spec = StreamSpec(shards=shards, sizes=sizes, readers=readers, chunk=micro // readers, seed=cfg.seed,
                      shuffle_shards=cfg.data.shuffle_shards, captions=cfg.data.captions,
                      use_keep_prob=cfg.data.use_keep_prob)
    transform = TrainTransform(bundle.preprocess_cfg)
    loader = TrainLoader(spec, dd.world, dd.rank, cfg.data.workers, cursors, transform, bundle.tokenizer)

    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / CKPT_DIR).mkdir(exist_ok=True)
        write_atomic(out / "train-config.json", cfg.model_dump_json(indent=2))
        truncate_log(out, start_step)
    ctx = _LoopContext(cfg, dd, out, model, ddp, optimizer, scaler, loader, transform, bundle, device, autocast,
                       loss_fn, total_steps, per_epoch, readers)
    if cfg.eval is not None and dd.main:  # fail now, not after hours of training
        from pairsift.trainer.eval import load_eval_set

        ctx.eval_set = load_eval_set(cfg.eval.data, cfg.eval.max_samples)
    try:
        result = ctx.loop(start_step, history)
    finally:
        loader.close()
    return result


def _backward_fn(scaler):
    return (lambda loss: scaler.scale(loss).backward()) if scaler is not None else (lambda loss: loss.backward())


@dataclass
class _LoopContext:
    cfg: TrainConfig
    dd: Dist
    out: Path
    model: torch.nn.Module
    ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    loader: TrainLoader
    transform: TrainTransform
    bundle: Any
    device: torch.device
    autocast: Any
    loss_fn: torch.nn.Module
    total_steps: int
    per_epoch: int
    readers: int
    losses: list[float] = field(default_factory=list)
    eval_set: Any = None  # loaded once, on the first evaluation

    def loop(self, start_step: int, history: list[float]) -> TrainResult:
        cfg, dd = self.cfg, self.dd
        losses = list(history)
        bar = None
        if dd.main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        no_sync = getattr(self.ddp, "no_sync", None)
        backward = _backward_fn(self.scaler)
        last_eval = None
        t0, done, data_wait = time.perf_counter(), 0, 0.0
        self.losses = losses  # the checkpoint carries the whole per-step history
        for step in range(start_step, self.total_steps):
            lr = lr_at(step, cfg.lr, cfg.warmup, self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            tw = time.perf_counter()
            micro = []
            for _ in range(cfg.accum_steps):
                b = self.loader.next_batch()
                micro.append((self.transform.normalize(b["images"].to(self.device, non_blocking=True)),
                              b["texts"].to(self.device, non_blocking=True)))
            data_wait += time.perf_counter() - tw
            loss = accumulated_backward(self.ddp, micro, self.loss_fn, self.autocast, backward, no_sync)
            self._optimizer_step()
            with torch.no_grad():  # keep the temperature in open_clip's range
                self.model.logit_scale.clamp_(0, math.log(100))
            loss = dd.mean(loss)
            losses.append(loss)
            done += 1
            sps = done * cfg.batch_size / (time.perf_counter() - t0)
            if dd.main:
                self._log(step + 1, loss, lr, sps)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{sps:,.0f}")
                    bar.update(1)
            at_end = step + 1 == self.total_steps
            if cfg.eval is not None and (at_end or (cfg.eval.every and (step + 1) % cfg.eval.every == 0)):
                last_eval = self._evaluate(step + 1)
            if at_end or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0):
                self._checkpoint(step + 1)
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t0
        return self._finish(losses, done * cfg.batch_size / elapsed if done else 0.0, last_eval,
                            data_wait / max(elapsed, 1e-9))

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _log(self, step: int, loss: float, lr: float, sps: float) -> None:
        if step % self.cfg.log_every == 0 or step == self.total_steps:
            rec = {"step": step, "loss": loss, "lr": lr, "samples_per_s": round(sps, 1),
                   "epoch": round(step / self.per_epoch, 4)}
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    def _evaluate(self, step: int) -> dict[str, Any] | None:
        from pairsift.trainer.eval import evaluate, load_eval_set

        result = None
        if self.dd.main:
            e = self.cfg.eval
            if self.eval_set is None:
                self.eval_set = load_eval_set(e.data, e.max_samples)
            result = evaluate(self.model, self.bundle.val_transform, self.bundle.tokenizer, self.eval_set,
                              batch_size=e.batch_size, device=self.device)
            with open(self.out / "eval.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **result}) + "\n")
        self.dd.barrier()
        return result

    def _checkpoint(self, step: int) -> None:
        cursors = {}
        for part in self.dd.gather(dict(self.loader.cursors)):
            cursors.update(part)
        rngs = self.dd.gather(rng_state())
        if self.dd.main:
            state = {"step": step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                     "scheduler": {"step": step, "total_steps": self.total_steps},
                     "rng": rngs, "readers": self.readers,
                     "losses": torch.tensor(self.losses, dtype=torch.float64),
                     "cursors": {int(j): list(c) for j, c in cursors.items()}}
            save_checkpoint(self.out, step, state, self.cfg.keep_checkpoints)
        self.dd.barrier()

    def _finish(self, losses: list[float], sps: float, last_eval, data_wait_share: float) -> TrainResult:
        skipped: dict[str, int] = {}
        sources: dict[str, int] = {}
        for part in self.dd.gather((dict(self.loader.skipped), dict(self.loader.sources))):
            for k, v in part[0].items():
                skipped[k] = skipped.get(k, 0) + v
            for k, v in part[1].items():
                sources[k] = sources.get(k, 0) + v
        result = TrainResult(out_dir=str(self.out), final_dir=str(self.out / FINAL_DIR), steps=self.total_steps,
                             samples_seen=self.total_steps * self.cfg.batch_size, losses=losses,
                             skipped=skipped, caption_sources=sources, samples_per_s=sps, eval=last_eval,
                             world_size=self.dd.world)
        if self.dd.main:
            export_local_dir(self.model, self.bundle.model_cfg, self.bundle.preprocess_cfg, self.out / FINAL_DIR)
            write_atomic(self.out / "result.json", json.dumps({**asdict(result)}, indent=2))
            print(f"trained {self.total_steps} steps: loss {losses[-1]:.4f}, {sps:,.0f} samples/s "
                  f"(waiting on data {100 * data_wait_share:.0f}% of the time), model in {result.final_dir}",
                  flush=True)
        self.dd.barrier()
        return result
