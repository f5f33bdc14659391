"""Train the tiny CLIP of notebook 01 with DistributedDataParallel (DDP) on several processes.

Two ways to start it on one machine:

    torchrun --standalone --nproc_per_node=2 -m course_utils.train_clip_ddp --profile cpu
    python -m course_utils.train_clip_ddp --nproc-per-node 2 --profile cpu

The first uses PyTorch's launcher, which also works across machines. The second starts the
processes itself with :func:`course_utils.launch.launch_local`, on one machine only, and keeps
the rendezvous server on 127.0.0.1, whereas torchrun's server (PyTorch 2.13) listens on every
interface. With
``--nproc-per-node 1`` and no torchrun, the run uses no process group at all and is the
single-process reference.

Each process (rank) encodes its share of every global batch and computes
:func:`~course_utils.vlm.distributed.distributed_clip_loss` (global or local-loss variant), and
DDP averages the gradients. The backend is gloo on CPU and NCCL on CUDA, one GPU per process.
Only rank 0 logs. It prints each rank's loss and the global loss (the mean over ranks), writes
the per-step losses to ``--metrics-out`` as JSON, and saves a checkpoint that
:func:`load_trained_clip` (and notebook 01) can load.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from course_utils import paths
from course_utils.env import PROFILES, seed_everything
from course_utils.launch import LOOPBACK_ADDRESS, exit_finished_worker, launch_local, run_module_in_subprocess
from course_utils.train import _lr_factor  # linear warm-up, then cosine decay, as in fit()
from course_utils.vlm.clip import PATCH_STEMS, TinyCLIP, TinyCLIPConfig, images_to_tensor
from course_utils.vlm.distributed import distributed_clip_loss, local_batch_size
from course_utils.vlm.text import WordTokenizer

logger = logging.getLogger("course_utils.train_clip_ddp")

DEFAULT_CHECKPOINT = "tiny_clip_ddp"
LOSS_VARIANTS = ("global", "local")

# Sizes per profile. The run shows that distributed training matches one process; it is not
# tuned for retrieval quality (notebook 01 trains its own tiny CLIP for that). The CPU presets
# use the linear patch stem because the conv stem contains BatchNorm, whose batch statistics
# can only be synchronised across ranks on GPUs (see _sync_batch_norm).
PROFILE_DEFAULTS: dict[str, dict[str, Any]] = {
    "ci": dict(
        steps=3,
        batch_size=16,
        num_scenes=128,
        image_size=32,
        lr=1e-3,
        model=dict(patch_size=8, vision_stem="linear", vision_dim=32, vision_depth=1, vision_heads=2, text_dim=32, text_depth=1, text_heads=2, embed_dim=32),
    ),
    "cpu": dict(
        steps=80,
        batch_size=32,
        num_scenes=512,
        image_size=32,
        lr=1e-3,
        model=dict(patch_size=8, vision_stem="linear", vision_dim=64, vision_depth=2, vision_heads=4, text_dim=64, text_depth=1, text_heads=4, embed_dim=64),
    ),
    "gpu": dict(
        steps=1000,
        batch_size=256,
        num_scenes=20000,
        image_size=64,
        lr=5e-4,
        model=dict(patch_size=8, vision_stem="conv", vision_dim=128, vision_depth=4, vision_heads=4, text_dim=128, text_depth=2, text_heads=4, embed_dim=128),
    ),
}


@dataclass
class TrainConfig:
    """Everything one run needs; every rank builds the same config from the same arguments."""

    profile: str = "cpu"
    steps: int = 80
    batch_size: int = 32  # global batch: the sum of the local batches of all ranks
    num_scenes: int = 512
    image_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of the steps with a linear learning-rate warm-up
    grad_clip: float | None = 1.0
    loss: str = "global"  # "global" or "local" (see course_utils.vlm.distributed)
    seed: int = 0
    device: str = "auto"  # "auto", "cpu" or "cuda"
    backend: str = "auto"  # "auto" (NCCL on CUDA, gloo on CPU), "gloo" or "nccl"
    log_every: int = 1
    checkpoint: str | None = DEFAULT_CHECKPOINT
    metrics_out: str | None = None
    timeout_s: float = 300.0  # how long a collective may wait for the other ranks
    model: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Data and model
# ---------------------------------------------------------------------------------------------


def build_dataset(config: TrainConfig) -> tuple[TensorDataset, WordTokenizer]:
    """Return ShapesWorld as tensors ``(images, input_ids, attention_mask)`` and its tokenizer.

    Every rank builds the same scenes and vocabulary from the same seed, so no rank has to send
    data to another. Each scene uses its canonical caption, which keeps the batches identical
    to those of a single-process run.
    """
    from course_utils.data import make_shapes_world

    scenes = make_shapes_world(config.num_scenes, split="train", seed=config.seed, image_size=config.image_size)
    captions = list(scenes["caption"])
    tokenizer = WordTokenizer.from_texts(captions, max_length=config.model.get("max_length", 32))

    images = images_to_tensor(list(scenes["image"]))  # (N, 3, H, W) in [-1, 1]
    input_ids, attention_mask = tokenizer(captions)  # (N, T) each
    return TensorDataset(images, input_ids, attention_mask), tokenizer


def build_model(config: TrainConfig, vocab_size: int) -> TinyCLIP:
    model_config = TinyCLIPConfig(vocab_size=vocab_size, image_size=config.image_size, **config.model)
    return TinyCLIP(model_config)


def _sync_batch_norm(model: torch.nn.Module, device: torch.device, rank: int, world_size: int) -> torch.nn.Module:
    """Make BatchNorm layers use the statistics of the global batch, where PyTorch can.

    In training mode BatchNorm normalises with the mean and variance of the batch it sees. Under
    DDP that is the local batch, so a model with BatchNorm would no longer match one process.
    ``SyncBatchNorm`` all-reduces the statistics, but PyTorch implements it only for GPU-like
    devices; on the CPU the layers stay per-rank and a warning says so.
    """
    has_batch_norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if world_size == 1 or not has_batch_norm:
        return model
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if rank == 0:
        logger.warning(
            "注意：模型含有 BatchNorm，而 PyTorch 的 SyncBatchNorm 不支援 CPU，所以每個 rank 用自己的 local batch "
            "算統計量，結果不會和單一 process 完全相同。想要完全相同，請用 --vision-stem linear。"
        )
    return model


def load_trained_clip(name: str = DEFAULT_CHECKPOINT, profile: str | None = None):
    """Load a checkpoint saved by this script.

    Returns ``(model, tokenizer, config)`` with the model in eval mode on CPU, or ``None`` when
    no usable checkpoint exists (see :func:`course_utils.checkpoints.load_checkpoint`).
    """
    from course_utils.checkpoints import load_checkpoint

    loaded = load_checkpoint(name, lambda stored: TinyCLIP.from_config(stored["model"]), profile=profile)
    if loaded is None:
        return None
    model, stored_config = loaded
    return model.eval(), WordTokenizer.from_config(stored_config["tokenizer"]), stored_config


# ---------------------------------------------------------------------------------------------
# Device and backend
# ---------------------------------------------------------------------------------------------


def resolve_device_and_backend(config: TrainConfig, local_rank: int) -> tuple[torch.device, str]:
    """Return this rank's device and the backend: NCCL with one GPU per process, else gloo.

    Raises ``ValueError`` when CUDA is requested but missing, when a rank has no GPU of its
    own, or when NCCL is combined with the CPU.

    NOTE: the tests run gloo on the CPU only, so the CUDA path (NCCL, SyncBatchNorm, bf16
    autocast) is not covered by them.
    """
    device_type = config.device
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {config.device!r}.")

    backend = config.backend
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be auto, gloo or nccl, got {config.backend!r}.")
    if backend == "nccl" and device_type != "cuda":
        raise ValueError("the NCCL backend needs CUDA tensors; use --device cuda, or --backend gloo on the CPU.")

    if device_type == "cpu":
        return torch.device("cpu"), backend
    if not torch.cuda.is_available():
        raise ValueError("--device cuda was requested, but this torch build sees no CUDA device; use --device cpu.")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"local rank {local_rank} has no GPU: this machine shows {torch.cuda.device_count()} CUDA device(s), "
            f"and NCCL needs one GPU per process. Start at most {torch.cuda.device_count()} processes per "
            f"machine, or train on the CPU with --device cpu."
        )
    return torch.device("cuda", local_rank), backend


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _configure_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False


def _all_rank_values(value: torch.Tensor, world_size: int) -> list[float]:
    """Return ``value`` (0-dim, detached) from every rank, index = rank."""
    if world_size == 1:
        return [value.item()]
    values = [torch.empty_like(value) for _ in range(world_size)]
    dist.all_gather(values, value)
    return [v.item() for v in values]


def train(config: TrainConfig, rank: int = 0, world_size: int = 1, local_rank: int = 0) -> dict[str, Any]:
    """Train on this rank and return the metrics (complete on rank 0).

    Call it inside an initialised process group when ``world_size > 1``. With ``world_size == 1``
    it needs no process group, wraps nothing in DDP and computes ``clip_loss`` on the whole
    batch: the single-process reference.
    """
    _configure_logging(rank)
    start = time.perf_counter()
    device, backend = resolve_device_and_backend(config, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    batch_per_rank = local_batch_size(config.batch_size, world_size)

    seed_everything(config.seed)
    dataset, tokenizer = build_dataset(config)
    if len(dataset) // world_size < batch_per_rank:
        raise ValueError(
            f"num_scenes={config.num_scenes} gives each of the {world_size} rank(s) {len(dataset) // world_size} "
            f"scenes, fewer than its local batch of {batch_per_rank}; raise --num-scenes or lower --batch-size."
        )

    # Same seed on every rank, so every rank starts from the same weights (DDP also copies
    # rank 0's weights to the others when it wraps the model).
    seed_everything(config.seed)
    model = build_model(config, tokenizer.vocab_size).to(device).train()
    model = _sync_batch_norm(model, device, rank, world_size)
    if world_size > 1:
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        ddp_model = model

    # The sampler gives rank r the positions r, r + W, r + 2W, ... of one shuffled order of the
    # data, so the W local batches of a step together hold the same scenes as the global batch
    # of one process (in another order, which the loss does not depend on).
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=config.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=batch_per_rank, sampler=sampler, drop_last=True)

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup_steps = max(1, int(config.warmup * config.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config.steps, warmup_steps))

    if world_size > 1:
        logger.info(
            "開始訓練：%d 個 process（backend %s，device %s），全域 batch %d = %d × 每個 rank 的 batch %d，%s 版本的損失，%d 步",
            world_size, backend, device, config.batch_size, world_size, batch_per_rank, config.loss, config.steps,
        )
    else:
        logger.info(
            "開始訓練：單一 process（不用 torch.distributed，device %s），batch %d，clip_loss，%d 步",
            device, config.batch_size, config.steps,
        )
    metrics: dict[str, Any] = {
        "world_size": world_size,
        "backend": backend if world_size > 1 else None,
        "device": str(device),
        "loss_variant": config.loss,
        "global_batch_size": config.batch_size,
        "local_batch_size": batch_per_rank,
        "step": [],
        "global_loss": [],
        "rank_losses": [],
    }

    step, epoch = 0, 0
    while step < config.steps:
        sampler.set_epoch(epoch)
        for images, input_ids, attention_mask in loader:
            if step >= config.steps:
                break
            images = images.to(device, non_blocking=True)  # (B, 3, H, W)
            input_ids = input_ids.to(device, non_blocking=True)  # (B, T)
            attention_mask = attention_mask.to(device, non_blocking=True)  # (B, T)

            with _autocast(config, device):
                image_features, text_features = ddp_model(images, input_ids, attention_mask)  # (B, D) each
            loss = distributed_clip_loss(
                image_features.float(), text_features.float(), model.logit_scale, local_loss=config.loss == "local"
            )
            if not torch.isfinite(loss):
                raise ValueError(f"loss became {loss.item()} at step {step} on rank {rank}; lower --lr.")

            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the gradients over the ranks here
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()

            rank_losses = _all_rank_values(loss.detach(), world_size)
            global_loss = sum(rank_losses) / world_size
            metrics["step"].append(step)
            metrics["global_loss"].append(global_loss)
            metrics["rank_losses"].append(rank_losses)
            if step % config.log_every == 0 or step == config.steps - 1:
                per_rank = "  ".join(f"rank {r}: {value:.6f}" for r, value in enumerate(rank_losses))
                logger.info("步驟 %d/%d | 全域損失 %.6f | %s", step + 1, config.steps, global_loss, per_rank)
            step += 1
        epoch += 1

    metrics["seconds"] = time.perf_counter() - start
    metrics["checkpoint"] = None
    if rank == 0:
        if config.checkpoint:
            from course_utils.checkpoints import save_checkpoint

            stored = {"model": model.config_dict(), "tokenizer": tokenizer.to_config(), "training": _training_record(config, world_size)}
            metrics["checkpoint"] = save_checkpoint(config.checkpoint, model, stored, config.profile)
            logger.info("checkpoint 已儲存：%s", metrics["checkpoint"])
        if config.metrics_out:
            Path(config.metrics_out).parent.mkdir(parents=True, exist_ok=True)
            Path(config.metrics_out).write_text(json.dumps(metrics, indent=1), encoding="utf-8")
        logger.info("完成，用了 %.1f 秒", metrics["seconds"])
    return metrics


def _autocast(config: TrainConfig, device: torch.device):
    """bf16 autocast on CUDA in the gpu profile, as ``course_utils.env`` does; no-op elsewhere."""
    enabled = config.profile == "gpu" and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _training_record(config: TrainConfig, world_size: int) -> dict[str, Any]:
    record = {k: v for k, v in asdict(config).items() if k not in ("model", "metrics_out", "checkpoint")}
    record["world_size"] = world_size
    return record


def _launched_train(rank: int, world_size: int, config: TrainConfig) -> None:
    device, _ = resolve_device_and_backend(config, rank)
    if device.type == "cpu":
        # Each process would start one thread per core; splitting the cores avoids
        # oversubscription (torchrun sets OMP_NUM_THREADS=1 for the same reason).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    train(config, rank=rank, world_size=world_size, local_rank=rank)


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _run_under_torchrun(config: TrainConfig) -> None:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_batch_size(config.batch_size, world_size)
    device, backend = resolve_device_and_backend(config, local_rank)
    if world_size == 1:
        train(config, rank=0, world_size=1, local_rank=local_rank)
        return

    # torchrun sets both variables; a launch by hand that sets only RANK and WORLD_SIZE
    # stays on this machine (29500 is PyTorch's usual default port).
    os.environ.setdefault("MASTER_ADDR", LOOPBACK_ADDRESS)
    os.environ.setdefault("MASTER_PORT", "29500")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=config.timeout_s))
    try:
        train(config, rank=rank, world_size=world_size, local_rank=local_rank)
        dist.barrier()  # no rank leaves while another still works (rank 0 may be saving)
    finally:
        dist.destroy_process_group()
    exit_finished_worker()


def run(config: TrainConfig, nproc_per_node: int = 1) -> None:
    """Train as one rank of torchrun, in ``nproc_per_node`` new local processes, or in this one.

    Raises ``ValueError`` before any process starts when the world size does not divide the
    global batch size, when a process would have no device, or when ``nproc_per_node`` > 1 is
    combined with torchrun (which has already started the processes).
    """
    if _under_torchrun():
        if nproc_per_node != 1:
            raise ValueError(
                f"--nproc-per-node {nproc_per_node} starts processes without torchrun, but this process "
                f"already runs under torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']}); pass the process "
                f"count to torchrun only."
            )
        _run_under_torchrun(config)
        return

    local_batch_size(config.batch_size, nproc_per_node)
    backends = {resolve_device_and_backend(config, local_rank)[1] for local_rank in range(nproc_per_node)}
    if nproc_per_node == 1:
        train(config)
        return
    launch_local(_launched_train, nproc_per_node, args=(config,), backend=backends.pop(), collective_timeout_s=config.timeout_s)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m course_utils.train_clip_ddp",
        description="Train the tiny CLIP of notebook 01 with DistributedDataParallel. Run it under "
        "torchrun, or pass --nproc-per-node to start the processes on this machine.",
    )
    parser.add_argument("--profile", choices=PROFILES, default=None, help="size preset (default: COURSE_PROFILE, else cpu)")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="processes to start on this machine when not under torchrun (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: from the profile)")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch size, split evenly over the processes (default: from the profile)")
    parser.add_argument("--num-scenes", type=int, default=None, help="ShapesWorld training scenes (default: from the profile)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate of AdamW (default: from the profile)")
    parser.add_argument("--vision-stem", choices=PATCH_STEMS, default=None, help="patch stem of the TinyViT; conv contains BatchNorm (default: from the profile)")
    parser.add_argument("--loss", choices=LOSS_VARIANTS, default="global", help="global: full logit matrix on every rank; local: local rows against gathered columns")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and sampler")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = CUDA when available")
    parser.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto", help="auto = NCCL on CUDA, gloo on CPU")
    parser.add_argument("--log-every", type=int, default=None, help="log every N steps (default: about 10 lines per run)")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"checkpoint name under {paths.CHECKPOINT_DIR} (default {DEFAULT_CHECKPOINT})")
    parser.add_argument("--no-checkpoint", action="store_true", help="do not save a checkpoint")
    parser.add_argument("--metrics-out", default=None, help="JSON file for the per-step losses (written by rank 0)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a collective waits for the other ranks (default 300)")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Fill a :class:`TrainConfig` from the profile preset and the explicit arguments."""
    profile = args.profile or os.environ.get("COURSE_PROFILE", "").strip().lower() or "cpu"
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}.")
    preset = PROFILE_DEFAULTS[profile]

    def pick(name: str):
        value = getattr(args, name)
        return preset[name] if value is None else value

    config = TrainConfig(
        profile=profile,
        steps=pick("steps"),
        batch_size=pick("batch_size"),
        num_scenes=pick("num_scenes"),
        image_size=preset["image_size"],
        lr=pick("lr"),
        loss=args.loss,
        seed=args.seed,
        device=args.device,
        backend=args.backend,
        checkpoint=None if args.no_checkpoint else args.checkpoint,
        metrics_out=args.metrics_out,
        timeout_s=args.timeout,
        model=dict(preset["model"]),
    )
    if args.vision_stem is not None:
        config.model["vision_stem"] = args.vision_stem
    config.log_every = args.log_every or max(1, config.steps // 10)
    for name in ("steps", "batch_size", "num_scenes"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}.")
    if config.num_scenes < config.batch_size:
        raise ValueError(
            f"--num-scenes {config.num_scenes} is smaller than the global batch size {config.batch_size}; "
            f"raise --num-scenes or lower --batch-size."
        )
    if args.nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}.")
    return config


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        run(config, nproc_per_node=args.nproc_per_node)
    except ValueError as error:
        # Every rank reaches the same conclusion; rank 0 alone reports it, as one clear line.
        if int(os.environ.get("RANK", "0")) == 0:
            parser.exit(2, f"{parser.prog}: error: {error}\n")
        return 2
    return 0


# ---------------------------------------------------------------------------------------------
# Running it from a notebook
# ---------------------------------------------------------------------------------------------


def run_in_subprocess(argv: Sequence[str], timeout_s: float = 600.0, echo: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m course_utils.train_clip_ddp ARGV`` in a child process and wait for it.

    See :func:`course_utils.launch.run_module_in_subprocess` for the output, the time limit and
    how the worker processes are stopped.
    """
    return run_module_in_subprocess("course_utils.train_clip_ddp", argv, timeout_s=timeout_s, echo=echo)


if __name__ == "__main__":
    # Call the imported module rather than this __main__ copy, so that the spawned workers
    # unpickle functions and the config class from course_utils.train_clip_ddp.
    from course_utils import train_clip_ddp

    sys.exit(train_clip_ddp.main())
