r"""Synthetic tasks with known answers, the test bench of every later lesson.

Each task is a small generator of batches. A batch is a :class:`Batch` of three tensors:

* ``inputs``: what the model reads, token ids ``(B, L)`` (long) or vectors ``(B, L, input_dim)``;
* ``targets``: what it should predict at each position, ``(B, L)`` (token ids, or numbers);
* ``loss_mask``: ``(B, L)`` bool, ``True`` where a prediction is *scored*.

All three tasks are written as next-token prediction. A sequence $x_1, \dots, x_{T}$ gives
``inputs`` $= x_1 \dots x_{T-1}$ and ``targets`` $= x_2 \dots x_T$ (shifted by one), so that a causal
model's output at position $t$ is its guess for $x_{t+1}$; the ``loss_mask`` keeps only the positions
whose next token is determined by the context (the answer to a query, the second copy of a string).

The tasks:

* :class:`AssociativeRecall`: ``k1 v1 k2 v2 ... kn vn q`` -> the value that followed key ``q``. It
  needs a head that finds the earlier occurrence of ``q`` and reads what came after it (an *induction*
  or *retrieval* head); a one-layer model cannot do it, a two-layer model can.
* :class:`Copying`: ``s1 ... sm | s1 ... sm``: after the separator, repeat the string.
* :class:`InContextRegression`: ``x1 y1 ... xn yn xq`` with $y_i = w\cdot x_i + \varepsilon_i$ and a fresh
  $w$ for every sequence -> predict $y_q$. The least-squares (ridge) estimate from the context is the
  best possible answer, and the yardstick for the model.

Every task has a :meth:`~Task.solve` method, an algorithm that answers from the inputs alone (the
lookup the model should learn, or least squares), and a :meth:`~Task.score` that rates predictions
(accuracy, or mean squared error). Batches come from a ``torch.Generator`` that the caller seeds, so a
seed fixes every batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_positive_int


@dataclass
class Batch:
    """A batch of sequences.

    Attributes:
        inputs: ``(B, L)`` long token ids, or ``(B, L, input_dim)`` float vectors.
        targets: ``(B, L)``: the token id (long) or the number (float) to predict at each position.
        loss_mask: ``(B, L)`` bool, ``True`` where the prediction is scored.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]


def _check_generator(generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            "generator: expected a torch.Generator seeded by the caller, e.g. "
            f"torch.Generator().manual_seed(0); got {type(generator).__name__}"
        )


def make_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` (the batches of every task come from one)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    return torch.Generator().manual_seed(seed)


class Task:
    """What every task provides (subclasses fill it in).

    Attributes:
        kind: ``"classification"`` (tokens in, token ids out) or ``"regression"`` (vectors in, numbers out).
        vocab_size: number of token ids (classification), else ``None``.
        input_dim: size of an input vector (regression), else ``None``.
        output_dim: logits per position (``vocab_size``) or ``1`` for a number.
        seq_len: length ``L`` of ``inputs``.
        metric: ``"accuracy"`` or ``"mse"``, what :meth:`score` returns.
    """

    kind: str = "classification"
    metric: str = "accuracy"
    vocab_size: int | None = None
    input_dim: int | None = None
    output_dim: int = 1
    seq_len: int = 0

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """Draw ``batch_size`` sequences from ``generator``."""
        raise NotImplementedError

    def solve(self, inputs: torch.Tensor) -> torch.Tensor:
        """The answer at every position ``(B, L)``, computed from ``inputs`` alone (meaningful where scored)."""
        raise NotImplementedError

    def score(self, predictions: torch.Tensor, batch: Batch) -> float:
        """Accuracy (classification) or mean squared error (regression) over the scored positions.

        ``predictions`` are ``(B, L)`` token ids or numbers, e.g. from :meth:`solve` or
        :meth:`predictions_from_outputs`.
        """
        if predictions.shape != batch.targets.shape:
            raise ValueError(f"predictions: expected shape {tuple(batch.targets.shape)} (as targets), "
                             f"got {tuple(predictions.shape)}")
        scored = batch.loss_mask
        if self.kind == "classification":
            return (predictions[scored] == batch.targets[scored]).float().mean().item()
        return ((predictions[scored].float() - batch.targets[scored]) ** 2).mean().item()

    def predictions_from_outputs(self, outputs: torch.Tensor) -> torch.Tensor:
        """A model's ``(B, L, output_dim)`` outputs -> ``(B, L)`` predictions (argmax, or the number)."""
        if self.kind == "classification":
            return outputs.argmax(dim=-1)
        return outputs[..., 0]

    def token_labels(self, inputs: torch.Tensor) -> list[str]:
        """Short readable names for the positions of one sequence ``(L,)`` (for plot axes)."""
        raise NotImplementedError

    def describe(self, batch: Batch, index: int = 0) -> str:
        """One sequence of ``batch`` as readable text: the inputs, and the scored targets."""
        labels = self.token_labels(batch.inputs[index])
        lines = ["inputs : " + " ".join(labels)]
        scored = batch.loss_mask[index].nonzero().flatten().tolist()
        answers = [f"after {labels[t]!s} (position {t}) -> {self._target_label(batch.targets[index, t])}"
                   for t in scored]
        lines.append("scored : " + "; ".join(answers))
        return "\n".join(lines)

    def _target_label(self, target: torch.Tensor) -> str:
        return str(target.item())

    def _check_batch_size(self, batch_size) -> None:
        check_positive_int("batch_size", batch_size)


class AssociativeRecall(Task):
    r"""Associative recall: key-value pairs, then keys to look up.

    A sequence lists ``num_pairs`` pairs ``k1 v1 ... kn vn`` (distinct keys, values drawn with
    replacement), then ``num_queries`` of the keys again, each followed by its value:

    ``k1 v1 k2 v2 ... kn vn | q1 a1 q2 a2 ... qm am``  with  $a_j = v_i$ where $q_j = k_i$.

    ``inputs`` drop the last token, ``targets`` are shifted by one, and ``loss_mask`` scores the
    positions of the queries ``q_j``, where the next token is the answer $a_j$. With one query (the
    default) the single scored position is the last one.

    Token ids: keys are ``0 .. num_keys-1``, values ``num_keys .. num_keys+num_values-1`` (one shared
    vocabulary of size ``num_keys + num_values``). Keys and values are named ``k3``, ``v7`` in labels.

    Args:
        num_pairs: key-value pairs per sequence ($n$); at most ``num_keys`` (keys are distinct).
        num_keys: size of the key vocabulary.
        num_values: size of the value vocabulary.
        num_queries: keys looked up per sequence ($m \le n$, distinct).
    """

    def __init__(self, num_pairs: int = 8, num_keys: int = 16, num_values: int = 16, num_queries: int = 1):
        for name, value in (("num_pairs", num_pairs), ("num_keys", num_keys), ("num_values", num_values),
                            ("num_queries", num_queries)):
            check_positive_int(name, value)
        if num_pairs > num_keys:
            raise ValueError(f"num_pairs: expected at most num_keys={num_keys} (the keys of a sequence are "
                             f"distinct), got {num_pairs}")
        if num_queries > num_pairs:
            raise ValueError(f"num_queries: expected at most num_pairs={num_pairs} (each query is one of "
                             f"the sequence's keys, distinct), got {num_queries}")
        self.num_pairs, self.num_keys, self.num_values, self.num_queries = num_pairs, num_keys, num_values, num_queries
        self.vocab_size = num_keys + num_values
        self.output_dim = self.vocab_size
        self.seq_len = 2 * num_pairs + 2 * num_queries - 1

    def __repr__(self) -> str:
        return (f"AssociativeRecall(num_pairs={self.num_pairs}, num_keys={self.num_keys}, "
                f"num_values={self.num_values}, num_queries={self.num_queries})")

    @property
    def chance_accuracy(self) -> float:
        """Accuracy of guessing a value uniformly at random."""
        return 1.0 / self.num_values

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        self._check_batch_size(batch_size)
        _check_generator(generator)
        n, m = self.num_pairs, self.num_queries
        # distinct keys per sequence: the first n of a random permutation of the key vocabulary
        keys = torch.rand(batch_size, self.num_keys, generator=generator).argsort(dim=-1)[:, :n]
        values = self.num_keys + torch.randint(0, self.num_values, (batch_size, n), generator=generator)
        # which pairs are queried: the first m of a random permutation of 0..n-1
        picked = torch.rand(batch_size, n, generator=generator).argsort(dim=-1)[:, :m]
        queries, answers = keys.gather(1, picked), values.gather(1, picked)

        pairs = torch.stack([keys, values], dim=-1).reshape(batch_size, 2 * n)
        lookups = torch.stack([queries, answers], dim=-1).reshape(batch_size, 2 * m)
        sequence = torch.cat([pairs, lookups], dim=1)  # (B, 2n + 2m)
        inputs, targets = sequence[:, :-1], sequence[:, 1:]
        loss_mask = torch.zeros_like(inputs, dtype=torch.bool)
        loss_mask[:, 2 * n::2] = True  # the query positions, whose next token is the answer
        return Batch(inputs.contiguous(), targets.contiguous(), loss_mask)

    def solve(self, inputs: torch.Tensor) -> torch.Tensor:
        """Look every token up among the pairs: the value after the matching key (else ``-1``)."""
        n = self.num_pairs
        keys, values = inputs[:, 0:2 * n:2], inputs[:, 1:2 * n:2]  # (B, n)
        hit = inputs[:, :, None] == keys[:, None, :]  # (B, L, n): which pair's key each token is
        found = hit.any(dim=-1)
        answer = values.gather(1, hit.float().argmax(dim=-1))
        return torch.where(found, answer, torch.full_like(answer, -1))

    def token_labels(self, inputs: torch.Tensor) -> list[str]:
        return [self._token_name(int(t)) for t in inputs]

    def _token_name(self, token: int) -> str:
        return f"k{token}" if token < self.num_keys else f"v{token - self.num_keys}"

    def _target_label(self, target: torch.Tensor) -> str:
        return self._token_name(int(target))


class Copying(Task):
    r"""Copying: a random string, a separator, and the same string again.

    ``s1 s2 ... sm | s1 s2 ... sm`` with $s_i$ uniform over ``num_tokens`` symbols; ``|`` is token id
    ``num_tokens``. ``inputs`` drop the last token and ``targets`` are shifted by one, so the scored
    positions are the separator and the first ``m - 1`` tokens of the copy: at position $m + i$ the
    answer is $s_{i+1}$, found $m + 1$ positions back.

    Args:
        length: string length $m$.
        num_tokens: symbols the string is made of (the vocabulary has one more, the separator).
    """

    def __init__(self, length: int = 8, num_tokens: int = 16):
        check_positive_int("length", length)
        check_positive_int("num_tokens", num_tokens)
        self.length, self.num_tokens = length, num_tokens
        self.separator = num_tokens
        self.vocab_size = num_tokens + 1
        self.output_dim = self.vocab_size
        self.seq_len = 2 * length

    def __repr__(self) -> str:
        return f"Copying(length={self.length}, num_tokens={self.num_tokens})"

    @property
    def chance_accuracy(self) -> float:
        return 1.0 / self.num_tokens

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        self._check_batch_size(batch_size)
        _check_generator(generator)
        m = self.length
        string = torch.randint(0, self.num_tokens, (batch_size, m), generator=generator)
        separator = torch.full((batch_size, 1), self.separator, dtype=torch.long)
        sequence = torch.cat([string, separator, string], dim=1)  # (B, 2m + 1)
        inputs, targets = sequence[:, :-1], sequence[:, 1:]
        loss_mask = torch.zeros_like(inputs, dtype=torch.bool)
        loss_mask[:, m:] = True  # from the separator on, the next token is a copy
        return Batch(inputs.contiguous(), targets.contiguous(), loss_mask)

    def solve(self, inputs: torch.Tensor) -> torch.Tensor:
        """At position ``t >= m`` the answer is ``inputs[t - m]``; before the separator, ``-1``."""
        m = self.length
        answer = torch.full_like(inputs, -1)
        answer[:, m:] = inputs[:, :inputs.shape[1] - m]
        return answer

    def token_labels(self, inputs: torch.Tensor) -> list[str]:
        return ["|" if int(t) == self.separator else str(int(t)) for t in inputs]


class InContextRegression(Task):
    r"""In-context linear regression: learn $w$ from the examples in the sequence, then predict.

    Every sequence draws its own $w \sim \mathcal{N}(0, I_d / d)$, then ``num_points`` examples and one
    query, $x_i \sim \mathcal{N}(0, I_d)$, $y_i = w\cdot x_i + \sigma\,\varepsilon_i$ with
    $\varepsilon_i \sim \mathcal{N}(0, 1)$ (so $y$ has variance about $1 + \sigma^2$). The sequence
    interleaves them as vectors of size $d + 1$:

    ``[x1, 0] [0, y1] [x2, 0] [0, y2] ... [xn, 0] [0, yn] [xq, 0]``    (length $2n + 1$)

    The target at an $x$ position is the $y$ that follows it. ``loss_mask`` scores the query only,
    or, with ``score_all_points=True``, every $x$ position (each predicted from the examples before it,
    which shows how the error falls with the number of examples).

    :meth:`solve` gives the best possible prediction, the posterior mean of $w$ given the examples
    before the position (ridge regression):

    $$\hat w = (X^\top X + \lambda I)^{-1} X^\top y, \qquad \lambda = \sigma^2 d,$$

    which for $\sigma = 0$ is the minimum-norm least-squares solution $X^{+} y$.

    Args:
        dim: dimension $d$ of $x$.
        num_points: examples per sequence $n$ (before the query).
        noise_std: $\sigma$.
        score_all_points: score every $x$ position, not only the query.
    """

    kind = "regression"
    metric = "mse"

    def __init__(self, dim: int = 4, num_points: int = 12, noise_std: float = 0.0, score_all_points: bool = False):
        check_positive_int("dim", dim)
        check_positive_int("num_points", num_points)
        if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)):
            raise TypeError(f"noise_std: expected a float, got {type(noise_std).__name__}")
        if noise_std < 0:
            raise ValueError(f"noise_std: expected a number >= 0, got {noise_std}")
        self.dim, self.num_points, self.noise_std = dim, num_points, float(noise_std)
        self.score_all_points = bool(score_all_points)
        self.input_dim = dim + 1
        self.output_dim = 1
        self.seq_len = 2 * num_points + 1

    def __repr__(self) -> str:
        return (f"InContextRegression(dim={self.dim}, num_points={self.num_points}, "
                f"noise_std={self.noise_std}, score_all_points={self.score_all_points})")

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        self._check_batch_size(batch_size)
        _check_generator(generator)
        d, n = self.dim, self.num_points
        w = torch.randn(batch_size, d, generator=generator) / d ** 0.5
        x = torch.randn(batch_size, n + 1, d, generator=generator)  # n examples, then the query
        y = (x @ w[:, :, None])[..., 0] + self.noise_std * torch.randn(batch_size, n + 1, generator=generator)

        inputs = torch.zeros(batch_size, 2 * n + 1, d + 1)
        inputs[:, 0::2, :d] = x          # x tokens at even positions: [x_i, 0]
        inputs[:, 1::2, d] = y[:, :n]    # y tokens at odd positions:  [0, y_i]
        targets = torch.zeros(batch_size, 2 * n + 1)
        targets[:, 0::2] = y             # at x_i, predict y_i
        loss_mask = torch.zeros(batch_size, 2 * n + 1, dtype=torch.bool)
        if self.score_all_points:
            loss_mask[:, 0::2] = True
        else:
            loss_mask[:, -1] = True
        return Batch(inputs, targets, loss_mask)

    def solve(self, inputs: torch.Tensor) -> torch.Tensor:
        """Ridge (posterior-mean) prediction at every $x$ position from the examples before it; 0 elsewhere."""
        d = self.dim
        lam = self.noise_std ** 2 * d
        xs, ys = inputs[:, 0::2, :d].double(), inputs[:, 1::2, d].double()  # (B, n+1, d), (B, n)
        predictions = torch.zeros(inputs.shape[:2], dtype=torch.float64)
        for i in range(xs.shape[1]):  # position 2i: the examples 0..i-1 are known
            if i == 0:
                continue  # no example yet: the prior mean, 0
            x_ctx, y_ctx = xs[:, :i], ys[:, :i]
            if lam > 0:
                gram = x_ctx.transpose(1, 2) @ x_ctx + lam * torch.eye(d, dtype=torch.float64)
                w_hat = torch.linalg.solve(gram, (x_ctx.transpose(1, 2) @ y_ctx[..., None]))[..., 0]
            else:
                w_hat = (torch.linalg.pinv(x_ctx) @ y_ctx[..., None])[..., 0]
            predictions[:, 2 * i] = (xs[:, i] * w_hat).sum(-1)
        return predictions.to(inputs.dtype)

    def token_labels(self, inputs: torch.Tensor) -> list[str]:
        return [f"x{t // 2 + 1}" if t % 2 == 0 else f"y{t // 2 + 1}" for t in range(inputs.shape[0])][:-1] + ["xq"]

    def describe(self, batch: Batch, index: int = 0) -> str:
        d = self.dim
        inputs = batch.inputs[index]
        lines = []
        for t, label in enumerate(self.token_labels(inputs)):
            if t % 2 == 0:
                vector = ", ".join(f"{v:+.2f}" for v in inputs[t, :d].tolist())
                note = f"   target y = {batch.targets[index, t].item():+.3f}" if batch.loss_mask[index, t] else ""
                lines.append(f"{label:>3} = [{vector}]{note}")
            else:
                lines.append(f"{label:>3} = {inputs[t, d].item():+.3f}")
        return "\n".join(lines)


TASKS = {"associative_recall": AssociativeRecall, "copying": Copying, "in_context_regression": InContextRegression}
