"""The synthetic tasks: their answers (checked by an independent loop), determinism, shapes, bad inputs."""

import pytest
import torch

from attnlib.tools.tasks import AssociativeRecall, Copying, InContextRegression, make_generator

TASKS = {
    "recall": lambda: AssociativeRecall(num_pairs=5, num_keys=7, num_values=6, num_queries=3),
    "copying": lambda: Copying(length=6, num_tokens=5),
    "regression": lambda: InContextRegression(dim=3, num_points=7, noise_std=0.1, score_all_points=True),
}


@pytest.mark.parametrize("name", list(TASKS))
def test_shapes_and_dtypes(name):
    task = TASKS[name]()
    batch = task.sample(4, make_generator(0))
    length = task.seq_len
    if task.kind == "classification":
        assert batch.inputs.shape == (4, length) and batch.inputs.dtype == torch.long
        assert batch.targets.dtype == torch.long
        assert int(batch.inputs.max()) < task.vocab_size and int(batch.targets.max()) < task.vocab_size
    else:
        assert batch.inputs.shape == (4, length, task.input_dim) and batch.inputs.dtype == torch.float32
    assert batch.targets.shape == (4, length)
    assert batch.loss_mask.shape == (4, length) and batch.loss_mask.dtype == torch.bool
    assert batch.loss_mask.any(dim=1).all()


@pytest.mark.parametrize("name", list(TASKS))
def test_same_seed_same_batch_other_seed_other_batch(name):
    task = TASKS[name]()
    a, b = task.sample(8, make_generator(3)), task.sample(8, make_generator(3))
    c = task.sample(8, make_generator(4))
    for field in ("inputs", "targets", "loss_mask"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize("name", ["recall", "copying"])
def test_targets_are_the_inputs_shifted_by_one(name):
    task = TASKS[name]()
    batch = task.sample(6, make_generator(1))
    assert torch.equal(batch.targets[:, :-1], batch.inputs[:, 1:])


def test_associative_recall_answers_by_an_independent_lookup():
    task = AssociativeRecall(num_pairs=5, num_keys=7, num_values=6, num_queries=3)
    batch = task.sample(16, make_generator(2))
    for seq, targets, scored in zip(batch.inputs.tolist(), batch.targets.tolist(), batch.loss_mask.tolist()):
        table = {}
        for i in range(task.num_pairs):
            key, value = seq[2 * i], seq[2 * i + 1]
            assert 0 <= key < task.num_keys and task.num_keys <= value < task.vocab_size
            assert key not in table, "keys of one sequence must be distinct"
            table[key] = value
        positions = [t for t, s in enumerate(scored) if s]
        assert positions == [2 * task.num_pairs + 2 * j for j in range(task.num_queries)]
        queried = [seq[t] for t in positions]
        assert len(set(queried)) == task.num_queries
        for t in positions:
            assert targets[t] == table[seq[t]]
    solved = task.solve(batch.inputs)
    assert torch.equal(solved[batch.loss_mask], batch.targets[batch.loss_mask])


def test_copying_answers_by_an_independent_loop():
    task = Copying(length=6, num_tokens=5)
    batch = task.sample(8, make_generator(2))
    for seq, targets, scored in zip(batch.inputs.tolist(), batch.targets.tolist(), batch.loss_mask.tolist()):
        string = seq[:task.length]
        assert seq[task.length] == task.separator
        assert [targets[t] for t in range(len(seq)) if scored[t]] == string
    solved = task.solve(batch.inputs)
    assert torch.equal(solved[batch.loss_mask], batch.targets[batch.loss_mask])


def test_regression_targets_follow_one_linear_map_per_sequence():
    task = InContextRegression(dim=3, num_points=7, noise_std=0.0)
    batch = task.sample(5, make_generator(0))
    d = task.dim
    x = batch.inputs[:, 0::2, :d].double()                     # (B, n+1, d), the query last
    y = batch.targets[:, 0::2].double()                        # (B, n+1)
    assert torch.allclose(batch.inputs[:, 1::2, d].double(), y[:, :-1])  # the y tokens carry the targets
    assert torch.all(batch.inputs[:, 0::2, d] == 0) and torch.all(batch.inputs[:, 1::2, :d] == 0)
    for b in range(5):
        # 7 noiseless examples in 3 dims determine w: recover it and predict every target
        w = torch.linalg.lstsq(x[b, :-1], y[b, :-1, None]).solution
        assert torch.allclose(x[b] @ w, y[b, :, None], atol=1e-5)
    assert batch.loss_mask.sum(dim=1).tolist() == [1] * 5 and batch.loss_mask[:, -1].all()


def test_regression_solver_is_ridge_on_the_examples_before_each_position():
    task = InContextRegression(dim=3, num_points=6, noise_std=0.5, score_all_points=True)
    batch = task.sample(4, make_generator(7))
    pred = task.solve(batch.inputs).double()
    lam = 0.5 ** 2 * 3
    for b in range(4):
        for i in range(1, task.num_points + 1):  # x token i (0-based) sits at position 2i
            xs = batch.inputs[b, 0:2 * i:2, :3].double()
            ys = batch.inputs[b, 1:2 * i:2, 3].double()
            # posterior mean: w = (X^T X + lam I)^{-1} X^T y, as a brute-force normal-equation solve
            w = torch.linalg.inv(xs.T @ xs + lam * torch.eye(3, dtype=torch.float64)) @ xs.T @ ys
            assert torch.allclose(pred[b, 2 * i], batch.inputs[b, 2 * i, :3].double() @ w, atol=1e-5)
    assert torch.all(pred[:, 0] == 0)


def test_regression_solver_without_noise_is_exact_once_there_are_enough_points():
    task = InContextRegression(dim=3, num_points=6, noise_std=0.0, score_all_points=True)
    batch = task.sample(8, make_generator(1))
    pred = task.solve(batch.inputs)
    enough = torch.zeros_like(batch.loss_mask)
    enough[:, 2 * 3::2] = True  # from the 4th x on, 3 examples determine w in 3 dims
    assert torch.allclose(pred[enough], batch.targets[enough], atol=1e-4)
    assert task.score(pred, batch) < task.score(torch.zeros_like(pred), batch)


def test_score_and_chance():
    task = Copying(length=4, num_tokens=5)
    batch = task.sample(4, make_generator(0))
    assert task.score(batch.targets, batch) == 1.0
    assert task.score(torch.full_like(batch.targets, -1), batch) == 0.0
    assert AssociativeRecall(num_values=8).chance_accuracy == 1 / 8


def test_describe_is_readable():
    task = AssociativeRecall(num_pairs=2, num_keys=4, num_values=4)
    text = task.describe(task.sample(1, make_generator(0)))
    assert text.startswith("inputs : k") and "-> v" in text
    assert "xq" in InContextRegression(dim=2, num_points=2).describe(InContextRegression(dim=2, num_points=2).sample(1, make_generator(0)))


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda: AssociativeRecall(num_pairs=9, num_keys=8), ValueError, ["num_pairs", "at most num_keys=8", "9"]),
        (lambda: AssociativeRecall(num_pairs=3, num_queries=4), ValueError, ["num_queries", "num_pairs=3", "4"]),
        (lambda: AssociativeRecall(num_values=0), ValueError, ["num_values", "positive int", "0"]),
        (lambda: Copying(length=2.5), ValueError, ["length", "positive int", "2.5"]),
        (lambda: InContextRegression(noise_std=-1.0), ValueError, ["noise_std", ">= 0", "-1.0"]),
        (lambda: InContextRegression(noise_std="0.1"), TypeError, ["noise_std", "float", "str"]),
        (lambda: Copying().sample(4, generator=0), TypeError, ["generator", "torch.Generator", "int"]),
        (lambda: Copying().sample(0, make_generator(0)), ValueError, ["batch_size", "positive int", "0"]),
        (lambda: make_generator(1.5), TypeError, ["seed", "int", "float"]),
    ],
    ids=["pairs-exceed-keys", "queries-exceed-pairs", "zero-values", "float-length", "negative-noise",
         "string-noise", "int-generator", "zero-batch", "float-seed"],
)
def test_bad_input_names_the_argument(make, error, words):
    with pytest.raises(error) as info:
        make()
    for word in words:
        assert word in str(info.value)
