"""`fastonestep train PRESET --dry-run`: what a run would build and roughly how much GPU memory it needs,
before any data, teacher file or GPU exists.

Every network the method would train or hold is built on the meta device (shapes only, nothing
allocated) through the same factories the methods use, from the config alone: data.shape / data.num_classes
(or what the data kind implies) and the network section, which for a distillation preset describes the
teacher (when the teacher's model file exists, its own metadata is used instead).

Memory per GPU is a formula, printed with the numbers. Bytes per parameter of a trainable network:
  stage 0 (single / ddp; bf16 only inside autocast):  weights 4, gradients 4, Adam moments 8
  stages 1-3 (deepspeed):  bf16: weights 2, optimizer 12 (fp32 master + Adam m, v), gradients accumulated in
                                 fp32 (engine/distributed.py accumulate_in_fp32): at stage 1 the bf16 gradients
                                 and DeepSpeed's whole fp32 accumulation buffer, 2 + 4; at stages 2-3 fp32, 4
                           fp32: weights 4, gradients 4, optimizer 8
  ZeRO stage 1 shards the optimizer state over the N GPUs, stage 2 also the gradients, stage 3 also the
  weights:  per GPU = W + G + O (stage 0), W + G + O/N (1), W + (G + O)/N (2), (W + G + O)/N (3).
  EMA: fp32 (4 bytes/param), whole on every GPU at stage 0; under ZeRO (stages 1-3) sharded like the fp32
  master weights it is updated from, 4/N per GPU (whole where backward distillation simulates with it).
  Each post-hoc power EMA (train.ema_stds) adds another 4 bytes/param, sharded the same way (never whole).
  Frozen networks held during training (a DMD teacher): fp32 weights, replicated.
Activations (optional, rough): the tensors autograd saves for backward in one training forward of each
network, traced on the meta device at batch 1 and 2 (the difference is per sample, the rest -- mostly the
normalised weight copies of MP layers -- is per forward), times the per-GPU micro-batch, summed over the
networks whose graphs are alive together in the method's heaviest phase. Not included: temporaries freed
during the forward, allocator fragmentation, the CUDA context, no-grad forwards (teacher / fake score in
the DMD gradient), DMD2's discriminator passes. Attention is traced with the math kernel (flash
attention saves less). bf16 = the fp32 trace x 0.5. With train.activation_checkpointing the trace counts
each residual block's inputs instead of what it saves, plus the largest block's own saved tensors (alive while
that block is recomputed); phases with two graphs alive count that block twice, a slight overestimate.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import yaml

from fastonestep.config import Config, ConfigError, to_dict
from fastonestep.engine.export import model_path, network_spec, read_info
from fastonestep.networks.build import build_denoiser, count_parameters
from fastonestep.networks.checkpointing import checkpointable_blocks

GIB = 2**30


def _fmt(n: float) -> str:
    return f"{n / GIB:.2f}Gi" if n >= GIB / 10 else f"{n / 2**20:.1f}Mi"

# bytes per parameter: (weights, gradients, optimizer state) of a trainable network
STAGE0_BYTES = (4, 4, 8)
DEEPSPEED_BYTES = {"bf16": (2, 4, 12), "fp32": (4, 4, 8)}
BF16_ZERO1_GRAD_BYTES = 2 + 4  # BF16_Optimizer: bf16 gradients plus a whole fp32 accumulation buffer


def deepspeed_bytes(precision: str, stage: int) -> tuple[int, int, int]:
    """(weights, gradients, optimizer) bytes per parameter of a DeepSpeed engine at ZeRO `stage` (1-3)."""
    w, g, o = DEEPSPEED_BYTES[precision]
    if precision == "bf16" and stage == 1:
        g = BF16_ZERO1_GRAD_BYTES
    return w, g, o
EMA_BYTES = 4
FROZEN_BYTES = 4


@dataclass
class NetworkPlan:
    name: str
    module: torch.nn.Module  # on the meta device
    role: str  # "trainable" | "frozen" (held during training) | "init-only" (released after initialisation)
    ema: bool = False
    ema_whole: bool = False  # an EMA used in every step (backward.trajectory_net=ema) is not sharded
    posthoc: int = 0  # post-hoc power EMAs (train.ema_stds), sharded under ZeRO
    note: str = ""

    @property
    def parameters(self) -> int:
        return count_parameters(self.module)


# ----------------------------------------------------------------------------------------------------------
# what the run would build


def data_facts(cfg: Config) -> tuple[tuple[int, ...], int]:
    """(sample shape, number of classes) from the config alone."""
    d = cfg.data
    if d.shape:
        shape = tuple(d.shape)
    elif d.kind == "toy2d":
        shape = (2,)
    elif d.kind == "mnist":
        shape = (1, d.resolution, d.resolution)
    else:
        raise ConfigError(f"a dry run needs config key 'data.shape' for data.kind={d.kind!r} "
                          "(e.g. [4, 64, 64] for ImageNet-512 latents, [3, 64, 64] for 64 px RGB images)")
    classes = 0
    if d.class_conditional:
        classes = d.num_classes or (10 if d.kind == "mnist" else 0)
        if not classes:
            raise ConfigError(f"a dry run of a class-conditional run needs config key 'data.num_classes' "
                              f"for data.kind={d.kind!r}")
    return shape, classes


def _teacher_facts(cfg: Config, shape, classes):
    """(network spec, data shape, classes, sigma_data, source) of the teacher: its file when present."""
    path = model_path(cfg.teacher) if cfg.teacher else ""
    if path and os.path.isfile(path):
        info = read_info(path)
        return (info["network"], tuple(info["data_shape"]), info["num_classes"], info["sigma_data"],
                f"teacher file {path}")
    return network_spec(cfg.network), shape, classes, cfg.diffusion.sigma_data, "config network section"


def plan_networks(cfg: Config) -> tuple[list[NetworkPlan], dict]:
    """The networks of cfg.method, built on the meta device. Returns (plans, facts)."""
    shape, classes = data_facts(cfg)
    facts = {"data_shape": list(shape), "num_classes": classes}
    with torch.device("meta"):
        if cfg.method == "edm":
            spec = network_spec(cfg.network)
            net = build_denoiser(spec["kind"], shape, classes, cfg.diffusion.sigma_data, **spec["arch"])
            facts["architecture_from"] = "config network section"
            return [NetworkPlan("denoiser", net, "trainable", ema=True, posthoc=len(cfg.train.ema_stds))], facts

        spec, t_shape, t_classes, sigma_data, source = _teacher_facts(cfg, shape, classes)
        facts["architecture_from"] = source
        teacher = build_denoiser(spec["kind"], t_shape, t_classes, sigma_data, **spec["arch"])
        generator = NetworkPlan("generator", build_denoiser(spec["kind"], t_shape, t_classes, sigma_data,
                                                            **spec["arch"]), "trainable", ema=True,
                                posthoc=len(cfg.train.ema_stds), note="initialised from the teacher")
        if cfg.method == "diffratio":
            ratio = _diffratio_ratio(cfg, teacher, spec, t_shape, t_classes, sigma_data)
            return [generator, NetworkPlan("ratio", ratio, "trainable", note="replaces teacher + fake score"),
                    NetworkPlan("teacher", teacher, "init-only", note="used to initialise, then released")], facts
        if cfg.method in ("dmd", "dpdmd"):
            critic = torch.nn.ModuleDict({"score": build_denoiser(spec["kind"], t_shape, t_classes, sigma_data,
                                                                  **spec["arch"])})
            note = "fake score (teacher copy)"
            if cfg.method == "dmd" and cfg.dmd.gan_weight > 0:
                from fastonestep.networks.heads import GANHead

                critic["gan_head"] = GANHead(critic["score"].net.feature_dim)
                note += " + GAN head"
            return [generator, NetworkPlan("fake_score", critic, "trainable", note=note),
                    NetworkPlan("teacher", teacher, "frozen", note="evaluated every step")], facts
        if cfg.method == "backward":
            generator.ema_whole = cfg.backward.trajectory_net == "ema"
            return [generator, NetworkPlan("teacher", teacher, "frozen", note="evaluated every step")], facts
    raise ConfigError(f"the dry run does not know the networks of method {cfg.method!r}")


def _diffratio_ratio(cfg, teacher, spec, shape, classes, sigma_data):
    """The ratio network exactly as DiffRatio builds it (its own _build_ratio, on meta tensors)."""
    from fastonestep.methods.diffratio import DiffRatio

    fake = SimpleNamespace(cfg=cfg, teacher_info={"network": spec}, dataset=SimpleNamespace(shape=shape),
                           num_classes=classes, sigma_data=sigma_data)
    return DiffRatio._build_ratio(fake, teacher)


# ----------------------------------------------------------------------------------------------------------
# memory


def precision_of(cfg: Config) -> str:
    """distributed.precision, with auto read as bf16: a dry run plans for GPUs."""
    return "bf16" if cfg.distributed.precision == "auto" else cfg.distributed.precision


def state_bytes(plan: NetworkPlan, precision: str, gpus: int, stage: int) -> dict:
    """Per-GPU bytes of one network's weights, gradients, optimizer state and EMA (formula in the module doc)."""
    if gpus < 1 or stage not in (0, 1, 2, 3):
        raise ValueError(f"need gpus >= 1 and a ZeRO stage 0-3, got gpus={gpus}, stage={stage}")
    n = plan.parameters
    if plan.role == "init-only":
        return {"weights": 0, "grads": 0, "optimizer": 0, "ema": 0, "total": 0}
    if plan.role == "frozen":
        w = FROZEN_BYTES * n
        return {"weights": w, "grads": 0, "optimizer": 0, "ema": 0, "total": w}
    wb, gb, ob = STAGE0_BYTES if stage == 0 else deepspeed_bytes(precision, stage)
    w, g, o = wb * n, gb * n, ob * n
    if stage >= 1:
        o /= gpus
    if stage >= 2:
        g /= gpus
    if stage >= 3:
        w /= gpus
    e = EMA_BYTES * n if plan.ema else 0
    if stage >= 1 and not plan.ema_whole:
        e /= gpus
    e += EMA_BYTES * n * plan.posthoc / (gpus if stage >= 1 else 1)
    return {"weights": w, "grads": g, "optimizer": o, "ema": e, "total": w + g + o + e}


def saved_activation_bytes(plan: NetworkPlan, data_shape, num_classes: int, batch: int,
                           checkpointing: bool = False) -> int:
    """Bytes autograd keeps for backward after one training forward of `plan.module` on `batch` samples,
    traced on the meta device (fp32). Views of one storage count once; parameters are not counted.

    With `checkpointing` (train.activation_checkpointing) each residual block keeps only its inputs, and its
    own saved tensors exist for one block at a time, during its recomputation in the backward: the result is
    what the rest of the network saves, plus the blocks' inputs, plus the largest single block's own."""
    return sum(saved_activation_parts(plan, data_shape, num_classes, batch, checkpointing))


def saved_activation_parts(plan: NetworkPlan, data_shape, num_classes: int, batch: int,
                           checkpointing: bool = False) -> tuple[int, int]:
    """(bytes kept from the forward until the backward, bytes of the largest checkpointed block's own saved
    tensors, alive only while it is recomputed); the second is 0 without checkpointing."""
    net = plan.module
    params = {p.untyped_storage()._cdata for p in net.parameters()}
    outside, inputs, inside = {}, {}, {}  # storage -> bytes: saved outside blocks, block inputs, per block
    active, keep = [], []

    def record(table, t):
        if t.device.type == "meta" and t.untyped_storage()._cdata not in params:
            table[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
            keep.append(t)  # keeps the storage alive so its address is not reused during the trace

    def pack(t):
        record(inside.setdefault(id(active[-1]), {}) if active else outside, t)
        return t

    def enter(block, args):
        for a in args:
            if isinstance(a, torch.Tensor):
                record(inputs, a)
        active.append(block)

    def leave(*_):
        active.pop()  # returns None: a forward hook's return value would replace the block's output

    blocks = checkpointable_blocks(net) if checkpointing else []
    hooks = [h for b in blocks for h in (b.register_forward_pre_hook(enter),
                                         b.register_forward_hook(leave))]
    forward = net["score"] if isinstance(net, torch.nn.ModuleDict) else net
    x = torch.zeros((batch, *data_shape), device="meta", requires_grad=True)
    sigma = torch.ones(batch, device="meta")
    labels = torch.zeros(batch, dtype=torch.long, device="meta") if num_classes else None
    was_training = forward.training
    forward.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward(x, sigma, labels)
    finally:
        forward.train(was_training)
        for h in hooks:
            h.remove()
    kept = {**outside, **inputs}
    largest_block = max((sum(n for k, n in own.items() if k not in kept) for own in inside.values()), default=0)
    return sum(kept.values()), largest_block


def activation_estimate(cfg: Config, plans: list[NetworkPlan], facts: dict, micro_batch: int,
                        precision: str, checkpointing: bool | None = None) -> dict:
    """Per network: per-sample and per-forward saved bytes; per GPU: the heaviest phase's sum (bytes).
    `checkpointing` None: as config key 'train.activation_checkpointing' says."""
    if checkpointing is None:
        checkpointing = cfg.train.activation_checkpointing
    scale = 0.5 if precision == "bf16" else 1.0
    shape, classes = tuple(facts["data_shape"]), facts["num_classes"]
    per_net = {}
    for plan in plans:
        if plan.role != "trainable":
            continue
        one = saved_activation_bytes(plan, shape, classes, 1, checkpointing)
        two = saved_activation_bytes(plan, shape, classes, 2, checkpointing)
        per_net[plan.name] = {"per_sample": (two - one) * scale, "per_forward": (2 * one - two) * scale}

    def cost(name, samples_per_batch_sample):
        a = per_net[name]
        return a["per_sample"] * samples_per_batch_sample * micro_batch + a["per_forward"]

    phases = {"edm": {"denoiser step": [("denoiser", 1)]},
              "diffratio": {"ratio step (generated + real)": [("ratio", 2)],
                            "generator step": [("generator", 1), ("ratio", 1)]},
              "dmd": {"fake-score step": [("fake_score", 1)], "generator step": [("generator", 1)]},
              "dpdmd": {"fake-score step": [("fake_score", 1)], "generator step": [("generator", 1)]},
              "backward": {"generator step": [("generator", 1)]}}[cfg.method]
    totals = {phase: sum(cost(n, k) for n, k in parts) for phase, parts in phases.items()}
    peak = max(totals, key=totals.get)
    return {"per_network": per_net, "phases": totals, "peak_phase": peak, "peak": totals[peak],
            "checkpointing": checkpointing}


# ----------------------------------------------------------------------------------------------------------
# report


def dry_run(cfg: Config, gpus: int = 1, stages=(0, 1, 2, 3), activations: bool = True, out=print) -> dict:
    """Prints the resolved config, the networks and the memory table; returns the numbers."""
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    plans, facts = plan_networks(cfg)
    trained = [p for p in plans if p.role == "trainable"]
    if cfg.train.activation_checkpointing and not any(checkpointable_blocks(p.module) for p in trained):
        from fastonestep.methods import nothing_to_checkpoint

        raise nothing_to_checkpoint([p.name for p in trained])
    precision = precision_of(cfg)
    micro = cfg.train.batch_per_gpu or cfg.train.batch_size // gpus
    if cfg.train.batch_size % gpus:
        raise ConfigError(f"config key 'train.batch_size' = {cfg.train.batch_size} is not divisible by --gpus {gpus}")

    out("# resolved config")
    out(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
    out("")
    out("# networks (built on the meta device: nothing allocated, no data read; of a teacher file, if it exists, "
        "only its metadata)")
    out(f"# data shape {facts['data_shape']}, {facts['num_classes']} classes; "
        f"architecture from the {facts['architecture_from']}")
    for p in plans:
        extra = (", EMA" if p.ema else "") + (f" + {p.posthoc} post-hoc EMAs" if p.posthoc else "")
        out(f"  {p.name:<12}{p.parameters:>15,} parameters  {p.role}{extra}" + (f"  ({p.note})" if p.note else ""))
    out("")

    memory = {}
    for stage in stages:
        memory[stage] = {p.name: state_bytes(p, precision, gpus, stage) for p in plans}
    wb, gb, ob = DEEPSPEED_BYTES[precision]
    gb1 = deepspeed_bytes(precision, 1)[1]
    auto = " (auto, planned as bf16 on GPUs)" if cfg.distributed.precision == "auto" else ""
    out(f"# memory per GPU: {gpus} GPU(s), distributed.precision={precision}{auto}")
    out("#   bytes/param of a trained network: stage 0 (single/ddp, autocast) W=4 G=4 O=8; "
        f"stages 1-3 (deepspeed, {precision}) W={wb} G={gb}{f' ({gb1} at stage 1)' if gb1 != gb else ''} O={ob}; "
        "EMA 4 (each, post-hoc EMAs too; sharded under "
        "ZeRO); frozen 4")
    out("#   per GPU: stage 0 W+G+O+EMA | stage 1 W+G+(O+EMA)/N | stage 2 W+(G+O+EMA)/N | stage 3 (W+G+O+EMA)/N")
    header = "  " + f"{'network':<12}" + "".join(f"{f'ZeRO {s}':>12}" for s in stages)
    out(header)
    for p in plans:
        out("  " + f"{p.name:<12}" + "".join(f"{_fmt(memory[s][p.name]['total']):>12}" for s in stages))
    totals = {s: sum(v["total"] for v in memory[s].values()) for s in stages}
    out("  " + f"{'states':<12}" + "".join(f"{_fmt(totals[s]):>12}" for s in stages))

    result = {"networks": {p.name: {"parameters": p.parameters, "role": p.role, "ema": p.ema,
                               "posthoc_emas": p.posthoc} for p in plans},
              "facts": facts, "precision": precision, "gpus": gpus, "memory": memory, "state_totals": totals,
              "micro_batch": micro}
    if activations:
        act = activation_estimate(cfg, plans, facts, micro, precision)
        result["activations"] = act
        out(f"  {'activations':<12}" + "".join(f"{_fmt(act['peak']):>12}" for _ in stages)
            + f"   (rough: {act['peak_phase']}, micro-batch {micro}; see below)")
        out("  " + f"{'total':<12}" + "".join(f"{_fmt(totals[s] + act['peak']):>12}" for s in stages))
        out(f"#   activations: tensors saved for backward, meta-device trace (per sample x micro-batch {micro}"
            f" + per forward), {'bf16 = fp32 trace x 0.5, ' if precision == 'bf16' else ''}heaviest phase; "
            "excludes freed temporaries, no-grad forwards, the DMD2 GAN pass through the fake encoder, allocator overhead, CUDA context")
        for name, a in act["per_network"].items():
            out(f"#   {name}: {a['per_sample'] / 2**20:.1f} MiB per sample + {a['per_forward'] / 2**20:.1f} MiB "
                "per forward")
        other = activation_estimate(cfg, plans, facts, micro, precision, not act["checkpointing"])
        result["activations_other"] = other
        if act["checkpointing"]:
            out(f"#   train.activation_checkpointing=true: each block keeps its inputs, the largest block's own tensors "
                f"live while it is recomputed; {_fmt(other['peak'])} without it")
        elif other["peak"] < act["peak"]:
            out(f"#   with train.activation_checkpointing=true: {_fmt(other['peak'])} (each residual block recomputed "
                "in the backward, about a third more compute)")
    else:
        out("#   activations not estimated (--no-activations)")
    return result
