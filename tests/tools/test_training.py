"""Training and evaluation: the masked loss, a short run that learns, determinism, bad inputs."""

import pytest
import torch

from attnlib.tools.tasks import AssociativeRecall, Batch, Copying, InContextRegression, make_generator
from attnlib.tools.training import auxiliary_loss, evaluate, masked_loss, train
from attnlib.tools.transformer import TinyTransformer


def small_model(task, depth=1, seed=0):
    torch.manual_seed(seed)
    return TinyTransformer.for_task(task, dim=32, depth=depth, num_heads=2, mlp_ratio=1)


def test_masked_cross_entropy_counts_only_scored_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    targets = torch.randint(0, 5, (2, 4))
    mask = torch.tensor([[False, True, False, True], [False, False, False, True]])
    got = masked_loss(logits, Batch(torch.zeros(2, 4, dtype=torch.long), targets, mask))
    # brute force: -log softmax at each scored position, averaged over the 3 of them
    terms = [-torch.log_softmax(logits[b, t], -1)[targets[b, t]] for b in range(2) for t in range(4) if mask[b, t]]
    assert torch.allclose(got, torch.stack(terms).mean())


def test_masked_squared_error():
    outputs = torch.tensor([[[1.0], [2.0], [3.0]]])
    batch = Batch(torch.zeros(1, 3, 2), torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[False, True, True]]))
    assert masked_loss(outputs, batch, "regression").item() == pytest.approx((4 + 4) / 2)


@pytest.mark.parametrize(
    "task, steps, factor",
    [
        (Copying(length=4, num_tokens=4), 40, 0.5),
        # in-context regression learns slowly; a short run only leaves the starting plateau
        (InContextRegression(dim=2, num_points=4, score_all_points=True), 60, 0.95),
    ],
    ids=["copying", "regression"],
)
def test_a_short_run_reduces_the_loss(task, steps, factor):
    model = small_model(task)
    history = train(model, task, steps=steps, batch_size=32, lr=1e-2, seed=0, log_every=None)
    assert set(history) == {"step", "loss", task.metric} and history["step"] == list(range(1, steps + 1))
    first, last = sum(history["loss"][:10]) / 10, sum(history["loss"][-10:]) / 10
    assert last < factor * first, f"loss went from {first:.3f} to only {last:.3f}"


def test_training_is_deterministic_given_the_seed():
    task = AssociativeRecall(num_pairs=3, num_keys=4, num_values=4)
    runs = [train(small_model(task), task, steps=5, batch_size=8, seed=1, log_every=None) for _ in range(2)]
    assert runs[0] == runs[1]
    other = train(small_model(task), task, steps=5, batch_size=8, seed=2, log_every=None)
    assert other["loss"] != runs[0]["loss"]


def test_progress_lines_are_printed_every_n_steps():
    task = Copying(length=3, num_tokens=3)
    lines = []
    train(small_model(task), task, steps=10, batch_size=4, log_every=4, print_fn=lines.append)
    assert [line.split()[1] for line in lines] == ["4/10", "8/10", "10/10"]
    assert "loss" in lines[0] and "accuracy" in lines[0]


class PenalisedMixer(torch.nn.Module):
    """A mixer that copies its input and sets an auxiliary loss: the mean square of a free parameter."""

    def __init__(self):
        super().__init__()
        self.free = torch.nn.Parameter(torch.full((3,), 2.0))
        self.aux_loss = None

    def forward(self, x):
        self.aux_loss = (self.free ** 2).mean()
        return x


def test_auxiliary_losses_are_summed_and_minimised():
    task = Copying(length=3, num_tokens=3)
    model = small_model(task, depth=2)
    assert auxiliary_loss(model) is None  # a plain model has none
    for block in model.blocks:
        block.mixer = PenalisedMixer()
    model(task.sample(2, make_generator(0)).inputs)
    assert auxiliary_loss(model).item() == pytest.approx(2 * 4.0)
    history = train(model, task, steps=30, batch_size=4, lr=5e-2, log_every=None)
    assert len(history["aux_loss"]) == 30 and history["aux_loss"][0] == pytest.approx(8.0)
    # only the auxiliary loss pulls the free parameters towards zero
    assert history["aux_loss"][-1] < 0.5 * history["aux_loss"][0]


def test_evaluate_reports_model_and_solver():
    task = Copying(length=3, num_tokens=3)
    model = small_model(task)
    result = evaluate(model, task, num_sequences=100, batch_size=32)
    assert set(result) == {"loss", "accuracy", "solver_accuracy"}
    assert result["solver_accuracy"] == 1.0 and 0.0 <= result["accuracy"] <= 1.0
    assert evaluate(model, task, num_sequences=100, batch_size=32) == result  # same seed, same numbers
    assert model.training


def test_evaluate_regression_reports_least_squares():
    task = InContextRegression(dim=2, num_points=6, noise_std=0.0)
    result = evaluate(small_model(task), task, num_sequences=64)
    assert set(result) == {"loss", "mse", "solver_mse"} and result["solver_mse"] < 1e-8


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(steps=0), ValueError, ["steps", "positive int", "0"]),
        (dict(steps=2, lr=-1.0), ValueError, ["lr", "positive", "-1.0"]),
        (dict(steps=2, warmup=-1), ValueError, ["warmup", ">= 0", "-1"]),
        (dict(steps=2, batch_size=2.0), ValueError, ["batch_size", "positive int", "2.0"]),
        (dict(steps=2, task="copying"), TypeError, ["task", "attnlib.tools.tasks", "str"]),
        (dict(steps=2, model=None), TypeError, ["model", "nn.Module", "NoneType"]),
    ],
    ids=["zero-steps", "negative-lr", "negative-warmup", "float-batch", "task-name", "no-model"],
)
def test_bad_input_names_the_argument(kwargs, error, words):
    task = Copying(length=3, num_tokens=3)
    kwargs = {"model": small_model(task), "task": task, **kwargs}
    with pytest.raises(error) as info:
        train(kwargs.pop("model"), kwargs.pop("task"), log_every=None, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_masked_loss_rejects_an_empty_mask_and_a_wrong_shape():
    batch = Batch(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="loss_mask"):
        masked_loss(torch.zeros(1, 3, 4), batch)
    with pytest.raises(ValueError, match="outputs"):
        masked_loss(torch.zeros(1, 4, 4), batch)
