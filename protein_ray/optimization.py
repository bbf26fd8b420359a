"""One optimisation step and its schedule: losses, AdamW with one-cycle or cosine,
the epoch loop over batches with its NaN/inf guard, and restoring optimizer state.

Pure PyTorch: the training workers (``protein_ray.train``) and the GPU check use it.
"""

from __future__ import annotations

import time
import warnings

import torch

from protein_ray.config import OptimConfig

MIN_ONECYCLE_STEPS = 10


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-element focal loss: down-weights easy negatives, which dominate in
    multi-label data where most classes are absent from most images."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_true = torch.exp(-bce)
    return (1 - p_true) ** gamma * bce


def per_sample_loss(logits: torch.Tensor, targets: torch.Tensor, optim: OptimConfig) -> torch.Tensor:
    if optim.loss == "focal":
        return focal_loss(logits, targets, optim.focal_gamma).mean(dim=1)
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, steps_per_epoch: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    total = max(1, optim.epochs * steps_per_epoch)
    # One-cycle's warm-up needs whole steps: with 5 steps its phase is 0 steps long and
    # torch divides by zero. Runs that short are smoke tests; they anneal instead.
    if optim.schedule == "onecycle" and total >= MIN_ONECYCLE_STEPS:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=optim.lr, total_steps=total, pct_start=0.2)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return optimizer, scheduler


def train_one_epoch(model, batches, optimizer, scheduler, optim, device, autocast, scaler) -> dict:
    model.train()
    loss_sum, seen, bad, skipped, steps, started = 0.0, 0, 0, 0, 0, time.perf_counter()
    for batch in batches:
        images = batch["image"].to(device, non_blocking=True)
        if optim.channels_last and device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        targets, ok = batch["target"].to(device), batch["ok"].to(device)
        buffers = [b.detach().clone() for b in model.buffers()]  # batch-norm statistics: a few KB
        with autocast:
            logits = model(images)
        # Weighted, not filtered: every worker runs the same steps, which DDP needs.
        loss = (per_sample_loss(logits.float(), targets, optim) * ok).sum() / ok.sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        if scaler is not None:  # the fp16 scaler skips steps with inf/NaN gradients itself
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            # Gradients are all-reduced by now, so every DDP worker takes the same decision.
            if gradients_are_finite(model):
                optimizer.step()
            else:  # a NaN/inf step would poison the weights and every later checkpoint
                for buffer, saved in zip(model.buffers(), buffers):
                    buffer.copy_(saved)  # the forward pass already folded the batch into the statistics
                skipped += 1
                continue
        scheduler.step()
        good = int(ok.sum().item())
        loss_sum += loss.item() * good
        seen, bad = seen + good, bad + len(ok) - good
    if steps and (skipped == steps or skipped > optim.max_nonfinite_steps):
        raise FloatingPointError(f"{skipped} of {steps} steps of the epoch had non-finite gradients (NaN/inf loss; "
                                 f"optim.max_nonfinite_steps {optim.max_nonfinite_steps}): lower optim.lr or check "
                                 "the input images")
    seconds = time.perf_counter() - started
    return {"loss_sum": loss_sum, "seen": seen, "bad": bad, "seconds": seconds, "skipped_steps": skipped}


def gradients_are_finite(model: torch.nn.Module) -> bool:
    norms = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    return bool(torch.isfinite(torch.stack(norms)).all()) if norms else True


def restore_optimizer(optimizer, scheduler, saved: dict, steps: int) -> None:
    """The saved per-parameter state (Adam moments, step counts), this run's
    hyperparameters, and this run's schedule advanced by ``steps``.

    The schedule is a function of the step. A rerun may ask for more epochs than the
    saved schedule spans, so it is rebuilt for this run and advanced, not loaded. The
    learning rates in ``saved`` are left out: recursive schedules (cosine) compute
    each step from the group's current rate, and must start from this run's."""
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, hyperparameters in zip(optimizer.param_groups, fresh):
        group.update(hyperparameters)
    advance_schedule(scheduler, steps)


def advance_schedule(scheduler, steps: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "step() before optimizer.step()": intended here
        for _ in range(steps):
            scheduler.step()

