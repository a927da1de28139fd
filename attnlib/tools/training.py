r"""Training and evaluation on the synthetic tasks of :mod:`attnlib.tools.tasks`.

The loss is computed on the *scored* positions only. For classification it is the masked
cross-entropy, with $M$ the set of scored positions (``loss_mask``) and $z_t$ the logits at position $t$:

$$\mathcal{L} = \frac{1}{|M|} \sum_{t \in M} -\log \operatorname{softmax}(z_t)_{y_t},$$

and for regression the masked mean squared error $\frac{1}{|M|}\sum_{t\in M} (\hat y_t - y_t)^2$.

:func:`train` runs AdamW with a linear warm-up then a constant learning rate, and clips the gradient
norm. A fresh batch is drawn at every step from a generator seeded with ``seed``, so a run is
reproducible: the same model initialisation and seed give the same history.

A mechanism that needs an auxiliary training loss (a router's load-balancing loss, say) stores it,
already weighted, as a tensor attribute ``aux_loss`` on its module during the forward pass;
:func:`auxiliary_loss` sums them over the model and :func:`train` adds the sum to the task's loss.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from .._checks import check_positive_int
from .progress import Progress
from .tasks import Batch, Task, make_generator


def masked_loss(outputs: torch.Tensor, batch: Batch, kind: str = "classification") -> torch.Tensor:
    """The loss averaged over the scored positions.

    Args:
        outputs: ``(B, L, output_dim)`` logits (classification) or ``(B, L, 1)`` numbers (regression).
        batch: a :class:`~attnlib.tools.tasks.Batch` (``targets`` and ``loss_mask`` are ``(B, L)``).
        kind: ``"classification"`` (cross-entropy) or ``"regression"`` (squared error).

    Returns a scalar tensor.
    """
    mask = batch.loss_mask
    if outputs.shape[:2] != mask.shape:
        raise ValueError(f"outputs: expected (batch, seq) = {tuple(mask.shape)} leading dims (as loss_mask), "
                         f"got shape {tuple(outputs.shape)}")
    if not mask.any():
        raise ValueError("batch.loss_mask: expected at least one scored position, got none")
    if kind == "classification":
        # -log softmax(z_t)[y_t] at the scored positions t, averaged over them
        return nn.functional.cross_entropy(outputs[mask], batch.targets[mask])
    if kind == "regression":
        return ((outputs[..., 0][mask] - batch.targets[mask]) ** 2).mean()
    raise ValueError(f"kind: expected 'classification' or 'regression', got {kind!r}")


def auxiliary_loss(model: nn.Module) -> torch.Tensor | None:
    """The sum of the ``aux_loss`` tensors that the model's modules set in their last forward pass.

    Returns ``None`` when no module has one (a plain model), so that the caller adds nothing.
    """
    losses = [m.aux_loss for m in model.modules() if isinstance(getattr(m, "aux_loss", None), torch.Tensor)]
    return torch.stack([loss.reshape(()) for loss in losses]).sum() if losses else None


def _check_model_and_task(model, task) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(task, Task):
        raise TypeError(f"task: expected a task from attnlib.tools.tasks, got {type(task).__name__}")


def _check_positive_float(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")


def train(model: nn.Module, task: Task, *, steps: int, batch_size: int = 64, lr: float = 3e-3,
          weight_decay: float = 0.0, warmup: int = 20, grad_clip: float = 1.0, seed: int = 0,
          log_every: int | None = 100, print_fn: Callable[[str], None] = print,
          progress: bool | None = None) -> dict[str, list]:
    """Train ``model`` on fresh batches of ``task`` with AdamW; returns the history.

    Args:
        model: maps ``task``'s inputs to ``(B, L, task.output_dim)``.
        task: a task of :mod:`attnlib.tools.tasks`.
        steps: optimisation steps (one fresh batch each).
        batch_size: sequences per batch.
        lr: peak learning rate, reached linearly over ``warmup`` steps, then constant.
        weight_decay: AdamW's decoupled weight decay.
        warmup: warm-up steps (0 for none).
        grad_clip: largest gradient norm (``None`` for no clipping).
        seed: seeds the batch generator.
        log_every: print a progress line every this many steps (``None`` for silence).
        print_fn: where progress lines go.
        progress: show a progress bar that updates in place (:class:`attnlib.tools.progress.Progress`):
            ``None`` in a Jupyter kernel only, ``False`` never.

    Returns:
        ``{"step": [...], "loss": [...], task.metric: [...]}``, one entry per step, measured on that
        step's training batch (before the update), ready for :func:`attnlib.tools.plotting.plot_learning_curve`.
        ``"loss"`` is the task's loss alone; when the model has auxiliary losses, their sum per step is
        in ``"aux_loss"`` and the optimiser minimises ``loss + aux_loss``.
    """
    _check_model_and_task(model, task)
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    _check_positive_float("lr", lr)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup: expected an int >= 0, got {warmup!r}")
    if grad_clip is not None:
        _check_positive_float("grad_clip", grad_clip)
    if log_every is not None:
        check_positive_int("log_every", log_every)

    generator = make_generator(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    # linear warm-up from lr/warmup to lr, then constant
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    history: dict[str, list] = {"step": [], "loss": [], task.metric: []}
    model.train()
    bar = Progress(steps, "training", enabled=progress)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        batch = task.sample(batch_size, generator)
        outputs = model(batch.inputs)
        loss = masked_loss(outputs, batch, task.kind)
        aux = auxiliary_loss(model)
        optimizer.zero_grad(set_to_none=True)
        (loss if aux is None else loss + aux).backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        schedule.step()

        with torch.no_grad():
            metric = task.score(task.predictions_from_outputs(outputs), batch)
        history["step"].append(step)
        history["loss"].append(loss.item())
        if aux is not None:
            history.setdefault("aux_loss", []).append(aux.item())
        history[task.metric].append(metric)
        if bar.shown:
            recent = history["loss"][-20:], history[task.metric][-20:]
            bar.update(step, loss=sum(recent[0]) / len(recent[0]), **{task.metric: sum(recent[1]) / len(recent[1])})
        if log_every is not None and (step % log_every == 0 or step == steps):
            recent = slice(-min(log_every, len(history["loss"])), None)
            mean_loss = sum(history["loss"][recent]) / len(history["loss"][recent])
            mean_metric = sum(history[task.metric][recent]) / len(history[task.metric][recent])
            print_fn(f"step {step:5d}/{steps}  loss {mean_loss:.4f}  {task.metric} {mean_metric:.3f}  "
                     f"({time.perf_counter() - start:.1f} s)")
    bar.close()
    return history


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, *, num_sequences: int = 1024, batch_size: int = 256,
             seed: int = 12345) -> dict[str, float]:
    """Loss and metric of ``model`` on ``num_sequences`` fresh sequences, and those of ``task.solve``.

    The evaluation batches come from their own generator (``seed``), so pick a seed that training does
    not use. Returns ``{"loss": ..., task.metric: ..., "solver_" + task.metric: ...}``, where the solver
    is the task's own algorithm (a lookup, or least squares), the best achievable answer.
    """
    _check_model_and_task(model, task)
    check_positive_int("num_sequences", num_sequences)
    check_positive_int("batch_size", batch_size)
    generator = make_generator(seed)
    was_training = model.training
    model.eval()
    totals = {"loss": 0.0, task.metric: 0.0, "solver_" + task.metric: 0.0}
    scored_total = 0
    try:
        remaining = num_sequences
        while remaining > 0:
            batch = task.sample(min(batch_size, remaining), generator)
            remaining -= len(batch)
            scored = int(batch.loss_mask.sum())
            outputs = model(batch.inputs)
            # weight each batch by its number of scored positions: the totals are per scored position
            totals["loss"] += masked_loss(outputs, batch, task.kind).item() * scored
            totals[task.metric] += task.score(task.predictions_from_outputs(outputs), batch) * scored
            totals["solver_" + task.metric] += task.score(task.solve(batch.inputs), batch) * scored
            scored_total += scored
    finally:
        model.train(was_training)
    return {name: value / scored_total for name, value in totals.items()}
