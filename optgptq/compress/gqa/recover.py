"""Recovery after an Opt-GQA conversion: distil the original model into the converted one.

Merging K/V heads changes what every layer attends to, and the closed-form merges
(:mod:`optgptq.compress.gqa.merge`) fit each layer on its own. Recovery then trains the merged
attention projections end to end so that the converted model (the student) predicts what the
original (the teacher) predicts on the calibration tokens — the GQA paper recovers quality by
uptraining; here the budget is minutes, so only the attention projections move:

- trainable: every layer's K/V projections (``train="kv"``), or also its query and output
  projections (``"qkvo"``); embeddings, norms and MLPs stay frozen. Query and output
  projections are per query head, so training them keeps the grouping intact;
- loss: ``KL(teacher || student)`` of the next-token distributions at every position, the
  mean over tokens (distillation at temperature 1); the teacher's logits are computed batch by
  batch without gradients, so nothing is stored beyond one batch;
- AdamW without weight decay; the learning rate warms up linearly over the first
  ``WARMUP`` of the run, then decays by a cosine to zero. The run's progress is the larger of
  ``steps done / max_steps`` and ``seconds spent / seconds``, so a time budget ends with a
  fully decayed rate whatever the machine's speed;
- minibatches of ``batch_size`` calibration windows, reshuffled every epoch;
- on the GPU when one is present (``device="auto"``), in float32 everywhere, with torch's
  ``medium`` float32 matmul precision (bfloat16 or TF32 operands where the hardware has them,
  float32 accumulation).

Llama-family models only (BLOOM keeps one K/V copy per query head; training would have to
keep a group's copies tied). The result stays a standard model of the converted shape.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from optgptq.compress.gqa import arch

TRAINABLE = {"kv": ("k_proj", "v_proj"), "qkvo": ("q_proj", "k_proj", "v_proj", "o_proj")}
LR, WARMUP, BATCH = 1e-4, 0.05, 4
RECOVER_SECONDS, RECOVER_TRAIN = 600.0, "qkvo"   # the command line's defaults


@dataclass
class Recovery:
    """What a recovery run did: steps, seconds, and the mean training loss per 10% of the run."""

    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0
    loss_curve: list[float] = field(default_factory=list)


def resolve_device(device: str) -> torch.device:
    """``"auto"``: the GPU when torch sees one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def distill_loss(student: nn.Module, teacher: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean ``KL(teacher || student)`` over every position of ``ids [batch, seq]``."""
    with torch.no_grad():
        target = F.log_softmax(teacher(ids, use_cache=False).logits.float(), dim=-1)
    logp = F.log_softmax(student(ids, use_cache=False).logits.float(), dim=-1)
    return F.kl_div(logp.flatten(0, 1), target.flatten(0, 1), log_target=True,
                    reduction="batchmean")


@torch.no_grad()
def mean_distill_loss(student: nn.Module, teacher: nn.Module, ids: torch.Tensor,
                      batch_size: int = BATCH) -> float:
    """:func:`distill_loss` over all of ``ids``, in batches (on the models' device)."""
    device = next(student.parameters()).device
    parts = [float(distill_loss(student, teacher, b.to(device))) * len(b)
             for b in ids.split(batch_size)]
    return sum(parts) / len(ids)


def trainable_parameters(model: nn.Module, train: str) -> list[nn.Parameter]:
    """The projections ``train`` names (see the module docstring), set to require gradients;
    every other parameter is frozen."""
    if train not in TRAINABLE:
        raise ValueError(f"train={train!r}: expected one of {', '.join(TRAINABLE)}")
    if not arch.is_llama(model.config):
        raise ValueError("recovery supports Llama-family models only (BLOOM keeps one K/V copy "
                         "per query head)")
    model.requires_grad_(False)
    params = []
    for att in arch.attention_layers(model):
        for name in TRAINABLE[train]:
            for p in getattr(att.module, name).parameters():
                p.requires_grad_(True)
                params.append(p)
    return params


def _lr_scale(progress: float) -> float:
    if progress < WARMUP:
        return progress / WARMUP
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - WARMUP) / (1 - WARMUP))))


def recover(student: nn.Module, teacher: nn.Module, calib: torch.Tensor, seconds: float,
            max_steps: int | None = None, train: str = "kv", lr: float = LR,
            batch_size: int = BATCH, device: str = "auto", seed: int = 0,
            progress: bool = True) -> Recovery:
    """Train ``student`` in place towards ``teacher`` on ``calib [n, seq]`` for at most
    ``seconds`` (and ``max_steps``); both models end on the CPU in float32, in eval mode."""
    if seconds <= 0 and not max_steps:
        raise ValueError("recovery needs a time budget (seconds > 0) or max_steps")
    params = trainable_parameters(student, train)
    dev = resolve_device(device)
    student.to(dev).train()
    teacher.to(dev).eval()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    result, window = Recovery(), []
    budget = seconds if seconds > 0 else math.inf
    bar = tqdm(total=100, desc=f"GQA recovery ({train}, {dev.type})", unit="%",
               disable=not progress, file=sys.stderr)
    start, order = time.perf_counter(), torch.empty(0, dtype=torch.long)
    old_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        done = 0.0
        while done < 1.0:
            if order.numel() < batch_size:
                order = torch.cat([order, torch.randperm(len(calib), generator=gen)])
            batch, order = calib[order[:batch_size]].to(dev), order[batch_size:]
            for group in opt.param_groups:
                group["lr"] = lr * _lr_scale(done)
            loss = distill_loss(student, teacher, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            result.steps += 1
            result.tokens += batch.numel()
            window.append(float(loss))
            elapsed = time.perf_counter() - start
            done = max(elapsed / budget, result.steps / max_steps if max_steps else 0.0)
            if len(result.loss_curve) < int(10 * min(done, 1.0)):
                result.loss_curve.append(round(sum(window) / len(window), 5))
                window = []
            bar.n = round(100 * min(done, 1.0))
            bar.set_postfix(loss=f"{float(loss):.4f}", steps=result.steps)
    finally:
        torch.set_float32_matmul_precision(old_precision)
        bar.close()
        student.requires_grad_(False)
        student.cpu().eval()
        teacher.cpu()
    result.seconds = time.perf_counter() - start
    return result
