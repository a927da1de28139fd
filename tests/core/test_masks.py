"""Mask functions and the tensors they make."""

import pytest
import torch

from attnlib import masks


def test_causal_square_is_lower_triangular():
    assert torch.equal(masks.causal_mask(5), torch.ones(5, 5, dtype=torch.bool).tril())


def test_causal_is_bottom_right_aligned_when_lengths_differ():
    m = masks.causal_mask(2, 5)  # the two queries are positions 3 and 4
    assert torch.equal(m, torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))
    empty_rows = masks.causal_mask(5, 2)  # positions -3..1: the first three see nothing
    assert empty_rows.sum(-1).tolist() == [0, 0, 0, 1, 2]


def test_sliding_window_counts():
    m = masks.sliding_window_mask(8, left=2)
    assert m.sum(-1).tolist() == [1, 2, 3, 3, 3, 3, 3, 3]
    both = masks.sliding_window_mask(8, left=1, right=1)
    assert both.sum(-1).tolist() == [2, 3, 3, 3, 3, 3, 3, 2]
    assert torch.equal(both, both.T)


def test_padding_mask():
    m = masks.padding_mask(torch.tensor([3, 1]), 4)
    assert m.shape == (2, 1, 1, 4)
    assert m[:, 0, 0].tolist() == [[True, True, True, False], [True, False, False, False]]


def test_combinators():
    win = masks.sliding_window(2, 2)
    causal = masks.causal()
    both = masks.make_mask(masks.and_masks(win, causal), 6)[0, 0]
    assert torch.equal(both, masks.sliding_window_mask(6, left=2))
    either = masks.make_mask(masks.or_masks(win, causal), 6)[0, 0]
    assert torch.equal(either, masks.causal_mask(6) | masks.sliding_window_mask(6, left=2, right=2))
    inverse = masks.make_mask(masks.not_mask(causal), 6)[0, 0]
    assert torch.equal(inverse, ~masks.causal_mask(6))


def test_make_mask_broadcasts_over_batch_and_heads():
    per_batch = masks.make_mask(masks.key_padding(torch.tensor([2, 4])), 3, 4, batch=2, heads=3)
    assert per_batch.shape == (2, 1, 3, 4)
    assert masks.make_mask(masks.causal(), 3, 4, batch=2, heads=3).shape == (1, 1, 3, 4)


@pytest.mark.parametrize("call, words", [
    pytest.param(lambda: masks.sliding_window(-1), "left", id="negative-window"),
    pytest.param(lambda: masks.make_mask(masks.causal(), 0), "q_len", id="zero-length"),
    pytest.param(lambda: masks.and_masks(), "at least one", id="empty-and"),
    pytest.param(lambda: masks.key_padding([1, 2]), "lengths", id="lengths-not-tensor"),
    pytest.param(lambda: masks.make_mask(lambda b, h, i, j: i - j, 3), "boolean", id="non-bool-mask-fn"),
])
def test_bad_input(call, words):
    with pytest.raises((ValueError, TypeError), match=words):
        call()
