"""Lesson 44: HiP attention, the tree search for the top-k key blocks (attnlib.sparse.hip).

The search against a loop oracle written from the algorithm's statement (Python lists and a Fraction for
the official round count, float64 dot products); the mask and the attention against loops; the invariants
(exactly m distinct blocks inside the region, sinks and window always kept, causality, dense attention
when the region fits in k, exact top-k when every child is a single block); the initial nodes (a partition
covers every block, the numba sizes leave blocks that no search can find); the cost (2m log2(T/k) key-block
scores per query block); the block-sparse kernel path against the torch path (forward and gradients); the
token mixer (causal with block_q = 1, the leak of a larger query block); the benchmark mask; bad inputs.
"""

import math
from fractions import Fraction

import pytest
import torch

from attnlib import TinyTransformer, attention, attention_naive, build_mechanism
from attnlib.masks import causal_mask
from attnlib.sparse.block_sparse import tile_classes
from attnlib.sparse.hip import (
    HiPAttention,
    benchmark_mask,
    blocks_to_mask,
    exact_block_selection,
    hip_attention,
    hip_mask,
    hip_search,
    initial_nodes,
    local_mask,
    num_rounds,
    representative_blocks,
    retrieval_qk,
    split_nodes,
    streaming_mask,
    topk_recall,
    true_topk_mask,
)

from ..helpers import make_qkv

# --- the loop oracle --------------------------------------------------------------------------------


def oracle_search(q, k, *, top_k, block_q, query_stride, block_k, window, num_sinks, sample="center",
                  node_sizes="partition", causal=True, scale=None):
    """Per (batch, head, query block): the selected absolute key blocks and the children scored, from loops."""
    b_, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    m = -(-top_k // block_k)
    s0 = num_sinks // block_k * block_k
    first = s0 // block_k
    out = {}
    for b in range(b_):
        for h in range(hq):
            kv = h // (hq // hkv)
            for t in range(-(-lq // block_q)):
                lo, last = t * block_q, min((t + 1) * block_q, lq) - 1
                queries = list(range(last, lo - 1, -query_stride))
                pos = {i: i + lk - lq for i in queries}
                s1 = min(max(pos[last] + 1 - window, s0), lk) if causal else lk
                blocks = -(-(s1 - s0) // block_k)
                if s1 - s0 <= top_k:
                    out[b, h, t] = ([first + u for u in range(blocks)], 0)
                    continue
                if node_sizes == "partition":
                    nodes = [(blocks * j // m, blocks * (j + 1) // m - blocks * j // m) for j in range(m)]
                else:  # every node with the first node's size
                    nodes = [(blocks * j // m, blocks // m) for j in range(m)]
                group, rounds = Fraction(blocks, m), 0
                while group > 1:  # the official loop: halve B/m while it exceeds 1
                    group, rounds = group / 2, rounds + 1
                scored = 0
                for _ in range(rounds):
                    children = []
                    for a, n in nodes:
                        children += [(a, n // 2), (a + n // 2, n - n // 2)]
                    ranked = []
                    for index, (a, n) in enumerate(children):
                        best = -math.inf
                        if n >= 1:
                            scored += 1
                            rep = first + (a + n // 2 if sample == "center" else a)
                            for i in queries:
                                for j in range(rep * block_k, (rep + 1) * block_k):
                                    if j >= lk or (causal and j > pos[i] - window):
                                        continue
                                    best = max(best, scale * float(q[b, h, i].double() @ k[b, kv, j].double()))
                        ranked.append((-best, index))
                    nodes = [children[index] for _, index in sorted(ranked)[:m]]
                out[b, h, t] = (sorted(first + a for a, n in nodes), scored)
    return out


def oracle_mask(selected, lq, lk, *, block_q, block_k, window, num_sinks, causal=True, heads=(1, 1)):
    mask = torch.zeros(*heads, lq, lk, dtype=torch.bool)
    for b in range(heads[0]):
        for h in range(heads[1]):
            for i in range(lq):
                p = i + lk - lq
                blocks = set(selected[b, h, i // block_q][0])
                for j in range(lk):
                    near = p - j < window if causal else abs(p - j) < window
                    keep = j < num_sinks or near or j // block_k in blocks
                    mask[b, h, i, j] = keep and (not causal or j <= p)
    return mask


CONFIGS = {
    "causal-center": dict(lq=40, lk=40, top_k=6, block_q=4, query_stride=2, block_k=2, window=3, num_sinks=2),
    "causal-first": dict(lq=40, lk=40, top_k=6, block_q=4, query_stride=2, block_k=2, window=3, num_sinks=2,
                         sample="first"),
    "numba-sizes": dict(lq=37, lk=37, top_k=5, block_q=3, query_stride=1, block_k=1, window=2, num_sinks=0,
                        node_sizes="numba"),
    "offset-queries": dict(lq=13, lk=45, top_k=4, block_q=5, query_stride=2, block_k=3, window=4, num_sinks=4),
    "stride-3-odd": dict(lq=29, lk=29, top_k=3, block_q=7, query_stride=3, block_k=1, window=1, num_sinks=1),
    "one-query-blocks": dict(lq=26, lk=26, top_k=4, block_q=1, query_stride=1, block_k=2, window=2, num_sinks=1),
    "bidirectional": dict(lq=33, lk=33, top_k=6, block_q=8, query_stride=2, block_k=2, window=2, num_sinks=2,
                          causal=False),
    "window-0-first": dict(lq=30, lk=30, top_k=4, block_q=4, query_stride=1, block_k=2, window=0, num_sinks=0,
                           sample="first"),
}


def _case(name, seed=0, hkv=1):
    config = dict(CONFIGS[name])
    lq, lk = config.pop("lq"), config.pop("lk")
    q, k, v = make_qkv(b=2, hq=2, hkv=hkv, lq=lq, lk=lk, d=8, dtype=torch.float64, seed=seed)
    return q, k, v, config


# --- the search, the mask and the attention against loops -------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_search_matches_the_loop_oracle(name):
    q, k, _, config = _case(name, hkv=1)  # one key head for two query heads (grouped-query)
    selection = hip_search(q, k, **config)
    want = oracle_search(q, k, **config)
    for (b, h, t), (blocks, scored) in want.items():
        got = [u for u in selection.blocks[b, h, t].tolist() if u >= 0]
        assert got == blocks, (b, h, t)
        assert selection.scored[b, h, t] == scored, (b, h, t)


@pytest.mark.parametrize("name", ["causal-center", "offset-queries", "bidirectional", "numba-sizes"])
def test_mask_and_attention_match_the_loops(name):
    q, k, v, config = _case(name, seed=1, hkv=2)
    lq, lk = q.shape[2], k.shape[2]
    want_mask = oracle_mask(oracle_search(q, k, **config), lq, lk, block_q=config["block_q"],
                            block_k=config["block_k"], window=config["window"], num_sinks=config["num_sinks"],
                            causal=config.get("causal", True), heads=(2, 2))
    out, mask = hip_attention(q, k, v, return_mask=True, **config)
    assert torch.equal(mask, want_mask)
    assert torch.allclose(out, attention_naive(q, k, v, mask=want_mask), atol=1e-12)


def test_exact_block_selection_matches_brute_force():
    q, k, _, config = _case("causal-center", seed=2, hkv=2)
    got = exact_block_selection(q, k, **config)
    lq, bk, m = q.shape[2], config["block_k"], 3
    s0 = config["num_sinks"] // bk * bk
    for t in range(got.shape[2]):
        last = min((t + 1) * config["block_q"], lq) - 1
        queries = range(last, t * config["block_q"] - 1, -config["query_stride"])
        end = max(last + 1 - config["window"], s0)
        scores = {}
        for u in range(s0 // bk, -(-end // bk)):
            keys = [j for j in range(u * bk, (u + 1) * bk) if j < end]
            scores[u] = max(float(q[0, 0, i] @ k[0, 0, j]) for i in queries for j in keys if j <= i - config["window"])
        want = sorted(sorted(scores, key=lambda u: (-scores[u], u))[:m])
        assert [u for u in got[0, 0, t].tolist() if u >= 0] == want, t


# --- invariants ---------------------------------------------------------------------------------------


def test_every_searched_block_keeps_exactly_m_distinct_blocks_inside_its_region():
    q, k, _ = make_qkv(b=1, hq=3, lq=200, d=8, seed=3)
    selection = hip_search(q, k, top_k=10, block_q=8, query_stride=2, block_k=2, window=6, num_sinks=3)
    first = selection.region_start // 2
    for t in range(selection.blocks.shape[2]):
        end_block = -(-int(selection.region_end[t]) // 2)
        for h in range(3):
            blocks = selection.blocks[0, h, t].tolist()
            if selection.dense[t]:
                assert [u for u in blocks if u >= 0] == list(range(first, end_block))
            else:
                assert blocks == sorted(set(blocks)) and len(blocks) == 5  # m = 10 / 2, distinct, ascending
                assert first <= blocks[0] and blocks[-1] < end_block
    assert (~selection.dense).sum() > 10  # the search really ran


def test_mask_is_causal_and_keeps_sinks_and_window():
    q, k, _ = make_qkv(b=2, hq=2, lq=30, lk=70, d=8, seed=4)
    mask = hip_mask(q, k, top_k=6, block_q=4, query_stride=2, block_k=2, window=5, num_sinks=3)
    causal = causal_mask(30, 70)
    assert not (mask & ~causal).any()
    local = local_mask(30, 70, window=5, num_sinks=3)
    assert (mask | ~local).all()
    for i in range(30):  # the window is the query and the 4 keys before it
        assert local[i].nonzero().flatten().tolist() == [0, 1, 2] + list(range(i + 40 - 4, i + 41))
    assert (mask.sum(-1) < causal.sum(-1)).any()  # and it is sparse


@pytest.mark.parametrize("length", [1, 5, 12, 14])
def test_short_sequences_get_dense_causal_attention(length):
    # the region of every block holds at most top_k tokens when length <= top_k + window + num_sinks
    q, k, v = make_qkv(hq=2, lq=length, d=8, dtype=torch.float64, seed=5)
    out, mask = hip_attention(q, k, v, return_mask=True, top_k=8, block_q=1, query_stride=1, block_k=2, window=4,
                              num_sinks=2)
    assert torch.equal(mask[0, 0], causal_mask(length))
    assert torch.allclose(out, attention(q, k, v, causal=True), atol=1e-12)


def test_one_round_of_single_blocks_is_the_exact_top_k():
    # B = 2m: each child is one key block, its own representative, so the search ranks every key exactly
    q, k, _ = make_qkv(b=1, hq=2, lq=1, lk=16, d=8, seed=6)
    selection = hip_search(q, k, top_k=8, block_q=1, query_stride=1, block_k=1, window=0, num_sinks=0, causal=False)
    assert selection.rounds.tolist() == [1]
    want = (q @ k.transpose(-2, -1))[:, :, 0].topk(8, dim=-1).indices.sort(-1).values
    assert torch.equal(selection.blocks[:, :, 0], want)
    assert torch.equal(selection.blocks, exact_block_selection(q, k, top_k=8, block_q=1, query_stride=1, block_k=1,
                                                               window=0, num_sinks=0, causal=False))


# --- the tree: nodes, splits, representatives -------------------------------------------------------


@pytest.mark.parametrize("blocks, nodes", [(10, 4), (16, 4), (7, 7), (13, 5), (100, 8)])
def test_partition_nodes_cover_every_block_once(blocks, nodes):
    starts, sizes = initial_nodes(blocks, nodes)
    covered = [u for a, n in zip(starts.tolist(), sizes.tolist()) for u in range(a, a + n)]
    assert covered == list(range(blocks))
    assert starts.tolist() == [blocks * j // nodes for j in range(nodes)]


def test_numba_node_sizes_leave_blocks_that_no_search_can_reach():
    starts, sizes = initial_nodes(10, 4, node_sizes="numba")
    assert starts.tolist() == [0, 2, 5, 7] and sizes.tolist() == [2, 2, 2, 2]
    reachable = {u for a, n in zip(starts.tolist(), sizes.tolist()) for u in range(a, a + n)}
    assert sorted(set(range(10)) - reachable) == [4, 9]
    # when m divides B both rules agree
    assert all(torch.equal(x, y) for x, y in zip(initial_nodes(16, 4), initial_nodes(16, 4, node_sizes="numba")))
    # a key that stands out in block 4: the partition finds it, the numba sizes never look there
    q = torch.ones(1, 1, 1, 4)
    k = 0.01 * torch.randn(1, 1, 10, 4, generator=torch.Generator().manual_seed(0))
    k[0, 0, 4] = 5.0
    options = dict(top_k=4, block_q=1, query_stride=1, block_k=1, window=0, num_sinks=0, causal=False)
    assert 4 in hip_search(q, k, **options).blocks.flatten().tolist()
    assert 4 not in hip_search(q, k, node_sizes="numba", **options).blocks.flatten().tolist()


def test_numba_starts_are_computed_in_floating_point_as_the_reference_does():
    # int(30 / 22 * 11) = int(14.999999999999998) = 14 in float64, where floor(30 * 11 / 22) = 15
    starts, _ = initial_nodes(30, 22, node_sizes="numba")
    assert starts.tolist() == [int(30 / 22 * j) for j in range(22)]
    assert starts[11].item() == 14 and initial_nodes(30, 22)[0][11].item() == 15


def test_split_and_representatives():
    starts, sizes = split_nodes(torch.tensor([0, 5, 9]), torch.tensor([5, 1, 2]))
    assert starts.tolist() == [0, 2, 5, 5, 9, 10] and sizes.tolist() == [2, 3, 0, 1, 1, 1]
    assert representative_blocks(starts, sizes, "center").tolist() == [1, 3, 5, 5, 9, 10]
    assert representative_blocks(starts, sizes, "first").tolist() == [0, 2, 5, 5, 9, 10]


@pytest.mark.parametrize("blocks, nodes", [(1, 4), (4, 4), (5, 4), (8, 4), (9, 4), (1000, 3), (64, 64)])
def test_num_rounds_is_the_official_halving_loop(blocks, nodes):
    group, rounds = Fraction(blocks, nodes), 0
    while group > 1:
        group, rounds = group / 2, rounds + 1
    assert num_rounds(blocks, nodes) == rounds
    assert num_rounds(torch.tensor([blocks]), nodes).tolist() == [rounds]


# --- the cost: O(log(T/k)) key-block scores per query block ------------------------------------------


def test_search_cost_grows_as_log_t_over_k():
    top_k, block_k = 16, 2
    m = top_k // block_k
    counts = []
    for r in range(1, 6):
        length = top_k * 2 ** r
        q, k, _ = make_qkv(b=1, hq=1, lq=length, d=8, seed=r)
        selection = hip_search(q, k, top_k=top_k, block_q=length // 4, query_stride=4, block_k=block_k, window=0,
                               num_sinks=0, causal=False)
        # every query block searches T keys: log2(T/k) rounds of 2m children
        assert selection.rounds.tolist() == [r] * 4
        assert selection.scored.flatten().tolist() == [2 * m * r] * 4
        counts.append(int(selection.scored[0, 0, 0]))
    assert [b - a for a, b in zip(counts, counts[1:])] == [2 * m] * 4  # doubling T adds one round


def test_causal_cost_sums_to_t_log_t():
    length, top_k, block_q = 512, 16, 16
    q, k, _ = make_qkv(b=1, hq=1, lq=length, d=8, seed=7)
    selection = hip_search(q, k, top_k=top_k, block_q=block_q, query_stride=4, block_k=1, window=0, num_sinks=0)
    total = int(selection.scored.sum())
    bound = sum(2 * top_k * math.ceil(math.log2(max(1, (t + 1) * block_q / top_k))) for t in range(length // block_q))
    assert total <= bound  # at most 2m children per round
    assert total < length * length / 8  # far from the T^2 / 2 scores of dense causal attention


# --- comparisons: recall and the sliding window -------------------------------------------------------


def test_true_topk_and_recall():
    scores = torch.tensor([[3.0, 1.0, 2.0, -math.inf], [0.0, -math.inf, -math.inf, -math.inf]])
    top = true_topk_mask(scores, 2)
    assert top.tolist() == [[True, False, True, False], [True, False, False, False]]
    assert topk_recall(top, scores, 2).tolist() == [1.0, 1.0]
    half = torch.tensor([[True, True, False, True], [False, False, False, False]])
    assert topk_recall(half, scores, 2).tolist() == [0.5, 0.0]
    assert topk_recall(half, torch.full((2, 4), -math.inf), 2).tolist() == [1.0, 1.0]  # nothing to miss


def test_streaming_mask_has_the_budget():
    mask = streaming_mask(20, 20, budget=6, num_sinks=2)
    assert mask.sum(-1).tolist() == [min(i + 1, 6) for i in range(20)]
    assert mask[15].nonzero().flatten().tolist() == [0, 1, 12, 13, 14, 15]


def test_on_distant_relevant_keys_hip_recalls_what_a_window_misses():
    q, k = retrieval_qk(1024, 16, span=16, query_span=64, min_distance=192, seed=0)
    assert q.shape == k.shape == (1, 1, 1024, 16)
    assert torch.equal(retrieval_qk(1024, 16, seed=0)[0], retrieval_qk(1024, 16, seed=0)[0])
    options = dict(top_k=64, block_q=32, query_stride=2, block_k=2, window=32, num_sinks=4)
    mask = hip_mask(q, k, **options)[0, 0]
    scores = (q @ k.transpose(-2, -1))[0, 0].masked_fill(~causal_mask(1024), -math.inf)
    rows = slice(512, None)
    hip = topk_recall(mask, scores, 64)[rows].mean()
    window = topk_recall(streaming_mask(1024, 1024, budget=100, num_sinks=4), scores, 64)[rows].mean()
    assert hip > window + 0.3, (hip, window)


# --- the kernel path ----------------------------------------------------------------------------------


@pytest.mark.parametrize("lq, lk", [(40, 40), (21, 37)])
def test_block_sparse_kernel_equals_reference_forward_and_gradients(lq, lk):
    from kernels.block_sparse import block_sparse_attention

    q, k, v = make_qkv(b=1, hq=2, hkv=1, lq=lq, lk=lk, d=16, seed=8)
    options = dict(top_k=6, block_q=4, query_stride=2, block_k=2, window=3, num_sinks=2)
    mask = hip_mask(q, k, **options)
    xs_ref = [x.clone().requires_grad_() for x in (q, k, v)]
    xs_ker = [x.clone().requires_grad_() for x in (q, k, v)]
    want = attention(*xs_ref, mask=mask)
    got = block_sparse_attention(*xs_ker, mask, block_m=16, block_n=16)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    grad = torch.randn_like(want)
    want.backward(grad)
    got.backward(grad)
    for name, a, b in zip("qkv", xs_ker, xs_ref):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), (name, (a.grad - b.grad).abs().max())
    # the library's switch gives the same output
    fast = hip_attention(q, k, v, backend="kernel", block_m=16, block_n=16, **options)
    assert torch.allclose(fast, want, atol=1e-5)


def test_gradients_of_the_torch_path():
    q, k, v = make_qkv(b=1, hq=2, lq=12, d=4, dtype=torch.float64, seed=9, requires_grad=True)
    options = dict(top_k=2, block_q=1, query_stride=1, block_k=1, window=2, num_sinks=1)
    assert torch.autograd.gradcheck(lambda q, k, v: hip_attention(q, k, v, **options), (q, k, v), fast_mode=True)


# --- the token mixer ----------------------------------------------------------------------------------


def test_module_is_causal_with_an_active_search():
    options = dict(top_k=2, block_k=1, window=1, num_sinks=1)
    torch.manual_seed(0)
    model = TinyTransformer(vocab_size=11, max_len=14, dim=16, depth=2, num_heads=2, mechanism="hip",
                            mechanism_options=options).eval()
    x = torch.randint(0, 11, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x)
        mask = model.blocks[0].mixer.last_mask
        assert (mask.sum(-1) < causal_mask(14).sum(-1)).any()  # sparse: the search chooses keys
        for t in range(13):
            x2 = x.clone()
            x2[:, t + 1:] = (x2[:, t + 1:] + 1) % 11
            assert torch.allclose(model(x2)[:, :t + 1], y[:, :t + 1], atol=1e-6), t


def test_module_defaults_on_short_sequences_equal_mha():
    torch.manual_seed(0)
    mha = build_mechanism("mha", 16, 2, causal=True).double()
    hip = build_mechanism("hip", 16, 2, causal=True).double()
    hip.load_state_dict(mha.state_dict())  # the same parameters: HiP is training-free
    for length in (3, 9, 14):  # 14 = top_k 8 + window 4 + 2 sinks
        x = torch.randn(2, length, 16, dtype=torch.float64)
        assert torch.allclose(hip(x), mha(x), atol=1e-12)
    x = torch.randn(1, 40, 16, dtype=torch.float64)
    assert not torch.allclose(hip(x), mha(x))  # longer: sparse


def test_query_blocks_leak_the_future_and_are_refused_in_a_causal_module():
    with pytest.raises(ValueError, match="allow_leak"):
        HiPAttention(16, 2, block_q=4)
    q, k, _ = make_qkv(b=1, hq=4, lq=64, d=8, seed=10)
    options = dict(top_k=4, block_k=1, window=1, num_sinks=0, query_stride=1)
    for block_q, leaks in ((8, True), (1, False)):
        base = hip_mask(q, k, block_q=block_q, **options)
        moved = False
        for t in range(63):
            q2, k2 = q.clone(), k.clone()
            q2[:, :, t + 1:] = torch.randn_like(q2[:, :, t + 1:])
            k2[:, :, t + 1:] = torch.randn_like(k2[:, :, t + 1:])
            moved |= not torch.equal(hip_mask(q2, k2, block_q=block_q, **options)[:, :, :t + 1], base[:, :, :t + 1])
        assert moved == leaks, block_q


def test_kernel_backend_of_the_module():
    torch.manual_seed(0)
    reference = HiPAttention(32, 2, top_k=4, window=2)
    kernel = HiPAttention(32, 2, top_k=4, window=2, backend="kernel")
    kernel.load_state_dict(reference.state_dict())
    x = torch.randn(1, 24, 32)
    assert torch.allclose(kernel(x), reference(x), atol=1e-5)
    with pytest.raises(ValueError, match="return_weights"):
        kernel(x, return_weights=True)


# --- the benchmark mask -------------------------------------------------------------------------------


def test_benchmark_mask():
    length = 1024
    mask = benchmark_mask(length, seed=0)
    assert mask.shape == (length, length) and mask.dtype == torch.bool
    assert torch.equal(mask, benchmark_mask(length, seed=0))
    assert not (mask & ~causal_mask(length)).any()
    assert (mask | ~local_mask(length, length, window=256, num_sinks=16)).all()
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, length, 64, generator=g) for _ in range(2))
    assert torch.equal(mask, hip_mask(q, k, top_k=512, block_q=64, query_stride=2, block_k=64, window=256,
                                      num_sinks=16)[0, 0])
    # each query block visits at most 8 selected tiles, 5 window tiles and the sink tile
    visited, _ = tile_classes(mask[None, None], 64, 64)
    assert visited.sum(-1).max() <= 8 + 5 + 1


# --- bad inputs ---------------------------------------------------------------------------------------


BAD = [
    (lambda q, k: hip_search(q, k, top_k=0), ValueError, "top_k: expected a positive int"),
    (lambda q, k: hip_search(q, k, block_q=2.0), ValueError, "block_q: expected a positive int"),
    (lambda q, k: hip_search(q, k, window=-1), ValueError, "window: expected a non-negative int"),
    (lambda q, k: hip_search(q, k, sample="middle"), ValueError, "sample: expected one of"),
    (lambda q, k: hip_search(q, k, node_sizes="equal"), ValueError, "node_sizes: expected one of"),
    (lambda q, k: hip_search(q, k, causal=1), TypeError, "causal: expected a bool"),
    (lambda q, k: hip_search(q[0], k), ValueError, "q: expected a 4-d tensor"),
    (lambda q, k: hip_search(q, k[..., :3]), ValueError, "k: expected batch 1 and head_dim 4"),
    (lambda q, k: hip_search(q, k.double()), TypeError, "q, k: expected one dtype"),
    (lambda q, k: hip_search(torch.cat([q, q], 2), k), ValueError, "at most 8 queries"),
    (lambda q, k: hip_attention(q, k, k, backend="triton"), ValueError, "backend: expected one of"),
    (lambda q, k: HiPAttention(16, 2, backend="kernel"), ValueError, "head dim"),
    (lambda q, k: HiPAttention(16, 2, allow_leak=1), TypeError, "allow_leak: expected a bool"),
    (lambda q, k: streaming_mask(8, 8, budget=2, num_sinks=3), ValueError, "num_sinks: expected at most"),
    (lambda q, k: plot_without_trace(q, k), ValueError, "trace=True"),
]


def plot_without_trace(q, k):
    from attnlib.sparse.hip import plot_search_rounds

    plot_search_rounds(hip_search(q, k, top_k=2, block_q=1, window=0, num_sinks=0), query_block=0)


@pytest.mark.parametrize("call, error, words", BAD, ids=[words.split(":")[0] for _, _, words in BAD])
def test_bad_inputs_name_the_argument(call, error, words):
    q, k, _ = make_qkv(b=1, hq=2, hkv=1, lq=8, d=4)
    with pytest.raises(error, match=words):
        call(q, k)


def test_blocks_to_mask_with_empty_slots():
    blocks = torch.tensor([[[0, 2], [-1, 1]]])  # (1, T_q=2, m=2)
    mask = blocks_to_mask(blocks, 5, 7, 3, 2)
    want = torch.zeros(1, 5, 7, dtype=torch.bool)
    want[0, :3, [0, 1, 4, 5]] = True
    want[0, 3:, [2, 3]] = True
    assert torch.equal(mask, want)


def test_blocks_to_mask_refuses_float_block_ids():
    with pytest.raises(TypeError, match="blocks: expected an integer tensor, got torch.float32"):
        blocks_to_mask(torch.tensor([[0.7]]), 4, 4, 2, 2)
