"""The side-by-side decompositions of one block (linalg_pool): the same results as one at a time,
in the callers' order, on single-threaded workers, and errors reach the caller."""
import threading

import pytest
import torch

from swiftsvd_export.factorize import factorize_block, swift_basis, swift_factorize, whiten_factorize
from swiftsvd_export.linalg_pool import run_each
from swiftsvd_export.stats_cache import decompose_block


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _block(seed: int = 0):
    """Two groups like a Llama block's attn_in (q, k) and mlp_in (gate, taller than wide)."""
    g = torch.Generator().manual_seed(seed)
    X1, X2 = torch.randn(256, 48, generator=g, dtype=torch.float64), torch.randn(256, 32, generator=g, dtype=torch.float64)
    attn = {"q": torch.randn(48, 48, generator=g), "k": torch.randn(16, 48, generator=g)}
    mlp = {"gate": torch.randn(80, 32, generator=g)}
    return [(attn, X1.T @ X1), (mlp, X2.T @ X2)]


def test_tasks_run_on_workers_with_one_thread_each_and_keep_their_order(two_threads):
    def task(i):
        return i, threading.current_thread().name, torch.get_num_threads()

    out = run_each([lambda i=i: task(i) for i in range(5)], sizes=[1, 5, 2, 4, 3])
    assert [i for i, _, _ in out] == list(range(5))
    assert all(name.startswith("swiftsvd-linalg") and n == 1 for _, name, n in out)
    assert torch.get_num_threads() == 2  # the caller's setting is untouched


def test_workers_take_the_callers_grad_mode(two_threads):
    w = torch.ones(3, requires_grad=True)
    with torch.no_grad():
        out = run_each([lambda: w * 2, lambda: w * 3])
    assert not any(t.requires_grad for t in out)
    assert all(t.requires_grad for t in run_each([lambda: w * 2, lambda: w * 3]))


def test_one_task_or_one_thread_runs_in_the_calling_thread(two_threads):
    me = threading.current_thread().name
    assert run_each([lambda: threading.current_thread().name]) == [me]
    torch.set_num_threads(1)
    assert run_each([lambda: threading.current_thread().name] * 3) == [me] * 3


def test_an_error_in_a_task_reaches_the_caller(two_threads):
    def bad():
        raise ValueError("task 2 failed")

    with pytest.raises(ValueError, match="task 2 failed"):
        run_each([lambda: 1, bad, lambda: 3])


@pytest.mark.parametrize("method", ["swift", "whiten", "svd"])
def test_decompose_block_equals_each_linear_alone(two_threads, method):
    groups = _block()
    got = decompose_block(groups, method, "fp64")
    assert list(got) == ["q", "k", "gate"]
    for weights, G in groups:
        for name, W in weights.items():
            alone = decompose_block([({name: W}, G)], method, "fp64")[name]  # one task: the calling thread
            torch.testing.assert_close(got[name].values, alone.values, rtol=1e-10, atol=1e-9)
            torch.testing.assert_close(got[name].curve, alone.curve, rtol=1e-10, atol=1e-9)
    if method == "swift":  # the bases are bit for bit what a single-threaded caller computes
        torch.set_num_threads(1)
        for weights, G in groups:
            for name, W in weights.items():
                left = got[name].bases()[0]
                assert torch.equal(left, swift_basis(W.double(), G, left.shape[1])[1])


@pytest.mark.parametrize("method", ["swift", "whiten"])
def test_factorize_block_equals_the_factorizations_one_by_one(two_threads, method):
    groups = [(w, G, {n: 6 for n in w}) for w, G in _block(1)]
    block = factorize_block(groups, method)
    assert list(block) == ["q", "k", "gate"]
    for weights, G, ranks in groups:
        for name, k in ranks.items():
            W = weights[name].double()
            f = swift_factorize(W, G, k) if method == "swift" else whiten_factorize(W, G, k)
            torch.testing.assert_close(block[name].B @ block[name].A, f.B @ f.A)


def test_a_forked_child_starts_its_own_workers(two_threads):
    """A child forked after the pool started has none of its threads; it must not wait on them."""
    import multiprocessing as mp

    both = threading.Barrier(2, timeout=30)
    run_each([both.wait, both.wait])  # the parent's pool has both its threads
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as child:
        assert child.apply_async(_in_child).get(timeout=60) == [0, 1, 2]


def _in_child():
    torch.set_num_threads(2)
    return run_each([lambda i=i: i for i in range(3)])


def test_the_streaming_memory_estimate_counts_every_concurrent_decomposition(two_threads):
    """--max-memory plans for the work matrices of as many decompositions as run at once."""
    from types import SimpleNamespace

    from swiftsvd_export import linalg_pool, memory_budget

    cfg = SimpleNamespace(hidden_size=64, num_attention_heads=4)
    linears = {"q": (64, 64), "gate": (160, 64), "up": (160, 64), "down": (64, 160)}
    work = sorted((4 * (3 * min(o, i) ** 2 + 2 * o * i) for o, i in linears.values()), reverse=True)
    one = memory_budget.block_working_set(cfg, linears, {"a": 64, "m": 160}, 50_000, 1, 8, 4, workers=1)
    n = linalg_pool.workers(len(linears))
    assert n == 2 and linalg_pool.workers(len(linears), "cuda") == 1
    both = memory_budget.block_working_set(cfg, linears, {"a": 64, "m": 160}, 50_000, 1, 8, 4, workers=n)
    assert both - one == work[1]
