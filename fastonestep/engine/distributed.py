"""Distributed backends: `single`, `ddp`, `deepspeed` (ZeRO 1/2/3), one engine per trainable network.

A method never talks to torch.distributed or DeepSpeed: it asks the backend for a `Trainable` per network it
trains (`backend.trainable(name, network, optim_cfg)`) and uses only that object's interface:

    t.module              what the training forward calls (a DeepSpeed engine under `deepspeed`)
    t.network             the plain network: frozen use (gradients to its input only), sampling, attributes
    t.backward(loss)      accumulate gradients of `loss` (already scaled to its share of the global batch)
    t.step(step)          reduce, warm-up lr, clip, skip non-finite, optimiser step, zero grads -> grad norm
    t.frozen()            context: parameters frozen (no gradient lands on them, nothing is reduced)
    t.full_parameters()   context: the full fp32 parameters (ZeRO-3 gathers them; bf16: the fp32 masters) for EMA
    t.whole()             context: the network itself with those parameters in place, for exports
    t.master_slices()     this rank's slices of the fp32 master weights under ZeRO (the sharded EMA), else None
    t.state_dict() / t.load_state_dict(state)

Global-batch semantics: train.batch_size is the effective batch of every optimiser step on every backend;
each of the world_size ranks processes its contiguous slice of it (split further into micro-chunks of
train.batch_per_gpu when that is smaller), so the number of processes changes only how the work is split.

Launch: `torchrun --nproc_per_node N -m fastonestep train ...` (or the `deepspeed` launcher, which sets the
same RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT variables). Checkpoint directories must be
on a file system every rank sees (DeepSpeed writes one shard per rank; rank 0 publishes).
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
import shutil
import socket

import torch
import torch.distributed as dist
from torch import nn

from fastonestep.config import Config, ConfigError, OptimConfig
from fastonestep.engine.checkpoint import CheckpointError, list_checkpoints, save_checkpoint
from fastonestep.engine import zero_weight_norm
from fastonestep.engine.zero_master import local_master
from fastonestep.networks.checkpointing import set_activation_checkpointing

DEEPSPEED_DIR = "ds"  # run_dir/ds/<network>/step00000012: DeepSpeed shards of each engine
_TAG_RE = re.compile(r"^(\.tmp-)?step\d{8}$")


# ----------------------------------------------------------------------------------------------------------
# optimiser recipe shared by every backend (methods/base.py re-exports these for unconverted methods)


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


def scheduled_lr(cfg: OptimConfig, step: int) -> float:
    """The lr of optimiser step `step` (0-based): a linear warm-up over `warmup_steps`, then EDM2's
    inverse-square-root decay lr / sqrt(step / decay_steps) once step exceeds `decay_steps` (0: no decay)."""
    scale = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.decay_steps:
        scale /= math.sqrt(max(step / cfg.decay_steps, 1.0))
    return cfg.lr * scale


def optimizer_step(opt: torch.optim.Optimizer, net: nn.Module, cfg: OptimConfig, step: int) -> float:
    """Warm-up, clip, NaN guard, step. Returns the pre-clip gradient norm (inf/nan: the step was skipped).

    The finiteness check is the one host synchronisation of a step: skipping a bad update has to be decided
    before Adam's moments see it. Everything else a step reports stays on the device until a log line."""
    params = [p for p in net.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    norm = float(norm)
    if math.isfinite(norm):
        for group in opt.param_groups:
            group["lr"] = scheduled_lr(cfg, step)
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


# ----------------------------------------------------------------------------------------------------------
# trainables


class Trainable:
    """A network with its own optimiser on the `single` backend: today's single-process recipe exactly."""

    def __init__(self, name: str, network: nn.Module, optim_cfg: OptimConfig, backend: "Backend"):
        self.name, self.network, self.optim_cfg, self.backend = name, network, optim_cfg, backend
        self.opt = make_optimizer(network.parameters(), optim_cfg)

    @property
    def module(self) -> nn.Module:
        return self.network

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def reduce_gradients(self) -> None:
        """Makes every rank's gradients the mean over ranks (no-op on one process)."""

    def step(self, step: int) -> float:
        self.reduce_gradients()
        return optimizer_step(self.opt, self.network, self.optim_cfg, step)

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def frozen(self):
        """Parameters frozen for a forward whose loss belongs to another network: gradients still flow
        through this network to its input, but none lands on (or is reduced for) its parameters."""
        flags = [p.requires_grad for p in self.network.parameters()]
        self.network.requires_grad_(False)
        try:
            yield self.network
        finally:
            for p, flag in zip(self.network.parameters(), flags):
                p.requires_grad_(flag)

    @contextlib.contextmanager
    def full_parameters(self):
        """The full parameters in `network.parameters()` order (here: the parameters themselves)."""
        yield [p.detach() for p in self.network.parameters()]

    def master_slices(self, part: str = ""):
        """This rank's slices of the fp32 master weights, as [(flat slice, index of its first element)] per
        parameter under `part` (a submodule name, "" for all), when an optimizer partitions them (DeepSpeed ZeRO);
        None where every rank holds whole parameters (here)."""
        return None

    @contextlib.contextmanager
    def whole(self):
        """The network itself, every parameter whole and at its full-precision value (`full_parameters`) in
        place for a while, then as it was: what an export reads. Collective where full_parameters is."""
        with self.full_parameters() as full:
            params = list(self.network.parameters())
            kept = [p.data for p in params]
            try:
                for p, value in zip(params, full):
                    p.data = value
                yield self.network
            finally:
                for p, data in zip(params, kept):
                    p.data = data

    def state_dict(self) -> dict:
        return {"module": self.network.state_dict(), "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "deepspeed" in state:
            raise CheckpointError(f"the '{self.name}' state of this checkpoint is a DeepSpeed checkpoint "
                                  f"({state['deepspeed']['dir']}); resume it with distributed.backend=deepspeed")
        self.network.load_state_dict(state["module"])
        self.opt.load_state_dict(state["optimizer"])

    def save_shards(self, run_dir: str, step: int) -> None:
        """Collective part of a checkpoint (DeepSpeed shards); nothing for torch optimisers."""

    def publish_shards(self, run_dir: str, step: int, keep_steps) -> None:
        """Rank 0, after every rank saved: make the step's shards visible, drop shards of old checkpoints."""


class DDPTrainable(Trainable):
    """Data parallel by one flat all-reduce of the gradients at step time (as StyleGAN-style trainers do).

    Chosen over torch's DistributedDataParallel wrapper because these methods run a network several times per
    iteration (under no_grad to sample, frozen inside another network's loss, several accumulation chunks):
    DDP's reducer hooks fire on every backward, need no_sync for accumulation and find_unused_parameters for
    partial use, and cannot tell a frozen pass from a training one. Reducing once, right before clipping,
    gives exactly the single-process gradient of the global batch (up to summation order) with one
    collective per step. Parameters start equal on every rank (broadcast from rank 0)."""

    def __init__(self, name, network, optim_cfg, backend):
        super().__init__(name, network, optim_cfg, backend)
        if backend.world_size > 1:
            for tensor in list(network.parameters()) + list(network.buffers()):
                dist.broadcast(tensor.data, src=0)

    def reduce_gradients(self) -> None:
        if self.backend.world_size == 1:
            return
        # Every rank runs the same code, so the set of parameters with a gradient is the same everywhere.
        grads = [p.grad for p in self.network.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(self.backend.world_size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def _check_no_zero_dim_parameters(network: nn.Module, name: str) -> None:
    """DeepSpeed (0.19) broadcasts every parameter from rank 0 as `p.data.view(torch.uint8)`, which fails for
    0-d tensors; say which parameter instead of failing deep inside deepspeed.initialize."""
    bad = [n for n, p in network.named_parameters() if p.dim() == 0]
    if bad:
        raise ValueError(f"network '{name}' has 0-d parameters ({', '.join(bad[:3])}), which DeepSpeed cannot "
                         "broadcast; give them shape [1]")


class DeepSpeedTrainable(Trainable):
    """One deepspeed.initialize engine per network, with a torch Adam (make_optimizer) inside ZeRO.

    Gradient accumulation is caller-owned (managed_gradient_accumulation=false): every `backward` adds to the
    gradients, `step` is the boundary where ZeRO reduces, clips (gradient_clipping = optim.grad_clip), skips
    a non-finite norm and steps. The lr schedule (scheduled_lr) is applied to the engine's parameter groups
    before the step.
    """

    def __init__(self, name, network, optim_cfg, backend):
        import deepspeed

        self.name, self.optim_cfg, self.backend = name, optim_cfg, backend
        config = backend.deepspeed_config(optim_cfg)
        _check_no_zero_dim_parameters(network, name)
        self.engine, self.opt, _, _ = deepspeed.initialize(
            model=network, optimizer=make_optimizer(network.parameters(), optim_cfg), config=config,
            dist_init_required=False)
        self.network = self.engine.module
        self.stage = config["zero_optimization"]["stage"]
        self.bf16 = config.get("bf16", {}).get("enabled", False)
        self._tag = None
        self._files = None  # {file: size} of the last published checkpoint directory
        self._master_slices = {}  # part -> master_slices(part)
        self._forced_norm = zero_weight_norm.forced_norm_layers(self.network)  # EDM2 layers (unit-RMS rows)
        zero_weight_norm.attach(self._forced_norm, backend.rank)

    @property
    def module(self) -> nn.Module:
        return self.engine  # its forward registers the hooks ZeRO's backward needs

    def backward(self, loss):
        self.engine.backward(loss, scale_wrt_gas=False)  # the method already scaled its chunk

    def step(self, step):
        for group in self.engine.optimizer.param_groups:
            group["lr"] = scheduled_lr(self.optim_cfg, step)
        skipped = self.engine.skipped_steps
        self.engine.step()
        if self.engine.skipped_steps == skipped:  # a step was taken: EDM2 layers rescale at their next forward
            zero_weight_norm.mark_stale(self._forced_norm)
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def zero_grad(self):
        self.engine.zero_grad()

    @contextlib.contextmanager
    def full_parameters(self):
        params = list(self.network.parameters())
        if self.bf16:  # the fp32 master weights, not their bf16 copies (ZeRO-3: gathered whatever the stage)
            from deepspeed.utils import safe_get_full_fp32_param

            masters = [safe_get_full_fp32_param(p) for p in params]
            missing = [n for (n, _), m in zip(self.network.named_parameters(), masters) if m is None]
            if missing:  # DeepSpeed answers only for parameters that require grad
                raise RuntimeError(f"DeepSpeed engine '{self.name}' has no fp32 master weight for "
                                   f"{', '.join(missing[:3])}: a trained network's parameters must require grad")
            yield masters
        elif self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield [p.detach() for p in params]
        else:
            yield [p.detach() for p in params]

    def master_slices(self, part=""):
        # views into the optimizer's flat fp32 buffers, which its steps update in place: kept until a load
        if part not in self._master_slices:
            prefix = part + "." if part else ""
            self._master_slices[part] = [local_master(p, self.backend.rank)
                                         for n, p in self.network.named_parameters() if n.startswith(prefix)]
        return self._master_slices[part]

    # Checkpoints: shards are written under a temporary tag, renamed by rank 0 once every rank is done, and
    # only then referenced by the checkpoint-*.pt that rank 0 writes atomically: a crash leaves the previous
    # checkpoint intact and at worst an unreferenced directory, which the next save removes.
    def _dir(self, run_dir):
        return os.path.join(run_dir, DEEPSPEED_DIR, self.name)

    def save_shards(self, run_dir, step):
        tmp = f".tmp-step{step:08d}"
        if self.backend.rank == 0:
            shutil.rmtree(os.path.join(self._dir(run_dir), tmp), ignore_errors=True)
        self.backend.barrier()
        self.engine.save_checkpoint(self._dir(run_dir), tag=tmp, save_latest=False)
        self._tag = f"step{step:08d}"

    def publish_shards(self, run_dir, step, keep_steps):
        base = self._dir(run_dir)
        final = os.path.join(base, f"step{step:08d}")
        shutil.rmtree(final, ignore_errors=True)  # an unreferenced leftover of a crashed save
        os.replace(os.path.join(base, f".tmp-step{step:08d}"), final)
        keep = {f"step{s:08d}" for s in keep_steps} | {f"step{step:08d}"}
        for entry in os.listdir(base):  # tag directories only (DeepSpeed also copies its zero_to_fp32.py here)
            if _TAG_RE.match(entry) and entry not in keep:
                shutil.rmtree(os.path.join(base, entry), ignore_errors=True)
        self._files = shard_files(final)  # recorded in the checkpoint: a resume checks the directory is whole

    def state_dict(self):
        if self._tag is None:
            raise RuntimeError(f"DeepSpeed engine '{self.name}': save_shards must run before state_dict")
        return {"deepspeed": {"dir": os.path.join(DEEPSPEED_DIR, self.name), "tag": self._tag,
                              "files": self._files, "world_size": self.backend.world_size}}

    def load_state_dict(self, state):
        if "deepspeed" not in state:
            raise CheckpointError(f"the '{self.name}' state of this checkpoint was written by a torch optimiser "
                                  "(distributed.backend single/ddp); resume it with the same backend")
        ref = state["deepspeed"]
        directory = os.path.join(self.backend.run_dir, ref["dir"], ref["tag"])
        check_same_world_size(directory, ref.get("world_size"), self.backend.world_size)
        check_shard_files(directory, ref.get("files"))  # absent: a checkpoint written before they were recorded
        try:
            path, _ = self.engine.load_checkpoint(os.path.join(self.backend.run_dir, ref["dir"]), tag=ref["tag"],
                                                  load_optimizer_states=True, load_lr_scheduler_states=False)
        except Exception as e:  # a damaged shard: DeepSpeed's error would not say which checkpoint
            reason = str(e) or type(e).__name__  # (some ranks' DeepSpeed errors carry no text)
            raise CheckpointError(f"DeepSpeed checkpoint '{directory}' cannot be loaded: {reason}") from None
        if path is None:
            raise CheckpointError(f"DeepSpeed checkpoint '{directory}' cannot be loaded (missing or incomplete)")
        self._tag = ref["tag"]
        self._master_slices = {}  # the load may have replaced the optimizer's buffers
        zero_weight_norm.mark_stale(self._forced_norm)


def check_same_world_size(directory: str, written_by: int | None, running: int) -> None:
    """ZeRO partitions the optimizer state per process, and DeepSpeed loads it on the same number of processes
    only: refused here with both counts, on every rank alike (DeepSpeed's own refusal comes later and, on some
    ranks, without a reason). None: a checkpoint written before the count was recorded."""
    if written_by is not None and written_by != running:
        raise CheckpointError(
            f"DeepSpeed checkpoint '{directory}' was written by {written_by} process(es) and this run has {running}: "
            "ZeRO's optimizer state is partitioned per process, so a distributed.backend=deepspeed run resumes on "
            f"the same number of processes (start it with {written_by}); ddp and single runs resume on any number")


def shard_files(directory: str) -> dict[str, int]:
    """{path relative to `directory`: size} of every file DeepSpeed wrote for one checkpoint tag."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, directory)] = os.path.getsize(path)
    return found


def check_shard_files(directory: str, recorded: dict[str, int] | None) -> None:
    """Every file recorded when the checkpoint was written is there at its size: a partial copy or a truncated
    shard is named before DeepSpeed reads it. (Sizes, not checksums: hashing every optimizer shard at every
    checkpoint would cost seconds per GB.)"""
    if recorded is None:
        return
    for name, size in sorted(recorded.items()):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"DeepSpeed checkpoint '{directory}' is incomplete: '{name}' is missing")
        if os.path.getsize(path) != size:
            raise CheckpointError(f"DeepSpeed checkpoint '{directory}' is damaged: '{name}' has "
                                  f"{os.path.getsize(path)} bytes, {size} when it was written")


# ----------------------------------------------------------------------------------------------------------
# backends


class Backend:
    """Process layout (rank, world size, device), collectives, engines and checkpoints for one run."""

    kind = "single"
    trainable_class = Trainable

    def __init__(self, cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1):
        self.cfg, self.device, self.rank, self.world_size = cfg, device, rank, world_size
        self.precision = resolve_precision(cfg, device)
        self.global_batch = cfg.train.batch_size
        self.local_batch, self.micro_batch = split_batch(cfg, world_size)
        self.trainables: dict[str, Trainable] = {}
        self.run_dir = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def trainable(self, name: str, network: nn.Module, optim_cfg: OptimConfig) -> Trainable:
        if name in self.trainables:
            raise ValueError(f"a trainable network named '{name}' already exists")
        if self.cfg.train.activation_checkpointing:  # marked before an engine wraps it (ZeRO-3 hooks the blocks)
            set_activation_checkpointing(network)
        t = self.trainable_class(name, network, optim_cfg, self)
        self.trainables[name] = t
        return t

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def gathered(self):
        """Every trained network whole and in full precision in place for a while (ZeRO-3 gathers its shards,
        bf16 puts the fp32 master weights in; collective: all ranks enter)."""
        with contextlib.ExitStack() as stack:
            for t in self.trainables.values():
                stack.enter_context(t.whole())
            yield

    # collectives (no-ops on one process)
    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return tensor

    def reduce_to_main(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in `tensor` on rank 0 (other ranks' tensors are left unspecified)."""
        if self.world_size > 1:
            dist.reduce(tensor, dst=0)
        return tensor

    def gather_object(self, obj) -> list | None:
        """Every rank's `obj`, indexed by rank, on rank 0 (None on the other ranks); rank 0's is `obj` itself."""
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        if self.is_main:
            gathered[0] = obj
        return gathered

    def broadcast_object(self, obj):
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # checkpoints
    def save_checkpoint(self, run_dir: str, step: int, make_state) -> None:
        """Every rank calls this. Engines write their shards (collective), then rank 0 publishes them and
        writes checkpoint-<step>.pt atomically (the file that makes the step visible to a resume)."""
        for t in self.trainables.values():
            t.save_shards(run_dir, step)
        self.barrier()
        if self.is_main:  # state_dict() holds no collective: rank 0 alone builds and writes it
            # the older one that stays beside this one (newer ones: damaged files this run resumed past)
            kept = [s for s, _ in list_checkpoints(run_dir) if s < step][-1:]
            for t in self.trainables.values():
                t.publish_shards(run_dir, step, kept)
            save_checkpoint(run_dir, step, make_state())
        self.barrier()


class DDPBackend(Backend):
    kind = "ddp"
    trainable_class = DDPTrainable


class DeepSpeedBackend(Backend):
    kind = "deepspeed"
    trainable_class = DeepSpeedTrainable

    def __init__(self, cfg, device, rank=0, world_size=1):
        super().__init__(cfg, device, rank, world_size)
        self.base_config = load_deepspeed_config(cfg, self.precision)

    def deepspeed_config(self, optim_cfg: OptimConfig) -> dict:
        """The engine config of one network: the JSON's settings plus the keys our config owns."""
        c = json.loads(json.dumps(self.base_config))
        c.setdefault("zero_optimization", {})["stage"] = self.cfg.distributed.zero_stage
        c["gradient_clipping"] = optim_cfg.grad_clip
        c["bf16"] = {**c.get("bf16", {}), "enabled": self.precision == "bf16"}
        c["train_batch_size"] = self.global_batch
        c["train_micro_batch_size_per_gpu"] = self.micro_batch
        c["gradient_accumulation_steps"] = self.local_batch // self.micro_batch
        c["managed_gradient_accumulation"] = False
        if self.precision == "bf16":
            accumulate_in_fp32(c)
        c.setdefault("steps_per_print", 10**12)  # our stats log, not DeepSpeed's
        c.setdefault("wall_clock_breakdown", False)
        return c


BACKENDS = {"single": Backend, "ddp": DDPBackend, "deepspeed": DeepSpeedBackend}


def resolve_precision(cfg: Config, device: torch.device) -> str:
    p = cfg.distributed.precision
    if p == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if p == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("config key 'distributed.precision' is 'bf16' but this GPU does not support bf16")
    return p


def split_batch(cfg: Config, world_size: int) -> tuple[int, int]:
    """(per-rank batch, micro-batch) of the global train.batch_size; errors name the keys."""
    b, per_gpu = cfg.train.batch_size, cfg.train.batch_per_gpu
    if b % world_size:
        raise ConfigError(f"config key 'train.batch_size' = {b} is not divisible by the {world_size} processes")
    local = b // world_size
    micro = per_gpu or local
    if micro > local or local % micro:
        raise ConfigError(f"config key 'train.batch_per_gpu' = {per_gpu} must divide train.batch_size / "
                          f"world_size = {b} / {world_size} = {local} (accumulation rounds must be whole)")
    return local, micro


def accumulate_in_fp32(c: dict) -> None:
    """bf16 engines accumulate and reduce gradients in fp32 unless the JSON says otherwise (an explicit
    data_types.grad_accum_dtype / communication_data_type is kept). DeepSpeed's default is bf16 for both: every
    extra micro-batch of train.batch_per_gpu would then add a bf16 rounding to the gradient (measured 0.41% ->
    1.4% relative error from 1 to 128 micro-batches), so the per-GPU batch would change the result, and it
    would differ from DDP under bf16 autocast, which accumulates in fp32. Under ZeRO-1 this makes DeepSpeed
    pick its BF16_Optimizer (fp32 gradients kept whole on each rank, optimizer state and masters partitioned)
    instead of DeepSpeedZeroOptimizer; ZeRO-2/3 keep theirs with fp32 gradient partitions."""
    c.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    c.setdefault("communication_data_type", "fp32")


# keys of the DeepSpeed JSON that our config owns: a JSON that sets them differently is refused
_OWNED = {("zero_optimization", "stage"): "distributed.zero_stage",
          ("bf16", "enabled"): "distributed.precision",
          ("gradient_clipping",): "optim.grad_clip (per network)",
          ("train_batch_size",): "train.batch_size",
          ("train_micro_batch_size_per_gpu",): "train.batch_per_gpu",
          ("gradient_accumulation_steps",): "train.batch_per_gpu"}


def load_deepspeed_config(cfg: Config, precision: str) -> dict:
    """The JSON of distributed.deepspeed_config ({} when empty), validated against our config (never silently
    overridden): zero_optimization.stage must equal distributed.zero_stage and bf16.enabled the resolved
    distributed.precision (`precision`: fp32 | bf16); batch sizes and gradient_clipping must not be set there
    (they come from train.* and each network's optim section); fp16 is not supported; the checks that skip
    non-finite updates (compute_grad_norm, check_grad_overflow) stay on. Everything else (bucket sizes,
    offload, ...) is passed to DeepSpeed as written."""
    path = cfg.distributed.deepspeed_config
    if not path:
        return {}
    if not os.path.isfile(path):
        raise ConfigError(f"config key 'distributed.deepspeed_config': file '{path}' does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            c = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config key 'distributed.deepspeed_config': '{path}' is not valid JSON: {e}") from None
    if c.get("fp16", {}).get("enabled"):
        raise ConfigError(f"DeepSpeed config '{path}' enables fp16; use distributed.precision=bf16 or fp32")
    stage = c.get("zero_optimization", {}).get("stage")
    if stage is not None and stage != cfg.distributed.zero_stage:
        raise ConfigError(f"DeepSpeed config '{path}' has zero_optimization.stage={stage} but config key "
                          f"'distributed.zero_stage' is {cfg.distributed.zero_stage}")
    bf16 = c.get("bf16", {}).get("enabled")
    if bf16 is not None and bf16 != (precision == "bf16"):
        raise ConfigError(f"DeepSpeed config '{path}' has bf16.enabled={bf16} but config key "
                          f"'distributed.precision' = {cfg.distributed.precision} means {precision} here "
                          "(configs/deepspeed/zero*-cpu.json are the fp32 variants)")
    for keys, ours in _OWNED.items():
        if keys in (("zero_optimization", "stage"), ("bf16", "enabled")):
            continue
        if keys[0] in c and c[keys[0]] != "auto":
            raise ConfigError(f"DeepSpeed config '{path}' sets '{keys[0]}'; it comes from config key {ours}")
    for section, key in (("zero_optimization", "compute_grad_norm"), ("bf16", "check_grad_overflow")):
        if c.get(section, {}).get(key) is False:  # DeepSpeed would then apply non-finite updates
            raise ConfigError(f"DeepSpeed config '{path}' sets {section}.{key}=false; every run skips updates "
                              "with a non-finite gradient norm, which needs it")
    return c


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun / deepspeed launcher environment; (0, 1, 0) if none."""
    try:
        return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as e:
        raise ConfigError(f"launcher environment (RANK / WORLD_SIZE / LOCAL_RANK) is malformed: {e}") from None


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("config key 'train.device' is 'cuda' but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def close_process_group() -> None:
    """Once per process, after its last train() (make_backend keeps the group for the next call in the same
    process): left to static destruction, gloo's threads can abort a run that succeeded (SIGABRT, "terminate
    called without an active exception"). The run's DDP modules hold the group in a reference cycle: collected
    first, or destroying the group does not free it."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def make_backend(cfg: Config) -> Backend:
    """Reads the launcher environment, picks the device, initialises the process group (gloo on CPU, nccl on
    GPU) and returns the backend of config key 'distributed.backend'."""
    kind = cfg.distributed.backend
    rank, world, local_rank = launch_env()
    if kind == "single" and world > 1:
        raise ConfigError(f"launched with {world} processes but config key 'distributed.backend' is 'single' "
                          "(use ddp or deepspeed)")
    device = pick_device(cfg.train.device, local_rank)
    split_batch(cfg, world)  # fail on a bad batch split before any process group exists
    if kind == "deepspeed":
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed picks its accelerator
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError("config key 'distributed.backend' is 'deepspeed' but deepspeed is not installed "
                              "(pip install 'fastonestep[deepspeed]')") from None
        if world == 1:  # one process without a launcher: DeepSpeed still wants a process group
            for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
                os.environ.setdefault(k, v)
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
    needs_group = world > 1 or kind == "deepspeed"
    if needs_group and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                device_id=device if device.type == "cuda" else None)
    if kind == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False)
    return BACKENDS[kind](cfg, device, rank, world)
