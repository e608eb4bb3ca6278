"""The Swift-SVD factorization is the closed-form optimum; the baselines behave as documented."""
import pytest
import torch

from swiftsvd_export.factorize import (factorize_block, output_covariance, reconstruction_error, shrink_gram,
                                       swift_factorize, whiten_factorize)
from swiftsvd_export.stats_cache import decompose_block


def _problem(out_f, in_f, n_tokens, seed=0, rank_x=None):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    X = torch.randn(n_tokens, in_f, generator=g, dtype=torch.float64)
    X = X * torch.logspace(0, -2, in_f, dtype=torch.float64)  # anisotropic, like real activations
    if rank_x is not None:  # rank-deficient activations: X lives in a rank_x subspace
        X = X[:, :rank_x] @ torch.randn(rank_x, in_f, generator=g, dtype=torch.float64)
    return W, X, X.T @ X


def _err(W, f, G):
    return reconstruction_error(W, f.B @ f.A, G)[0]


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (40, 40)])
@pytest.mark.parametrize("k", [1, 7, 20])
def test_swift_error_is_sum_of_discarded_eigenvalues(shape, k):
    W, X, G = _problem(*shape, n_tokens=400)
    f = swift_factorize(W, G, k)
    eig = torch.linalg.eigvalsh(output_covariance(W, G))
    discarded = eig[: eig.numel() - k].clamp_min(0).sum().item()
    direct = ((X @ W.T - X @ (f.B @ f.A).T) ** 2).sum().item()
    assert _err(W, f, G) == pytest.approx(discarded, rel=1e-8, abs=1e-9)
    assert direct == pytest.approx(discarded, rel=1e-8, abs=1e-9)
    assert f.A.shape == (k, shape[1]) and f.B.shape == (shape[0], k)


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
def test_swift_matches_whiten_when_well_conditioned_and_beats_svd(shape):
    W, _, G = _problem(*shape, n_tokens=500)
    for k in (3, 10, 25):
        swift = _err(W, swift_factorize(W, G, k), G)
        wf = whiten_factorize(W, G, k)
        assert wf.jitter == 0.0
        assert swift == pytest.approx(_err(W, wf, G), rel=1e-7)
        svd = _err(W, factorize_block([({"w": W}, G, {"w": k})], "svd")["w"], G)
        assert svd > swift * 1.01


def test_singular_covariance_swift_stays_finite_and_optimal_whiten_needs_jitter():
    W, X, G = _problem(40, 32, n_tokens=300, rank_x=12)  # G has rank 12 of 32
    assert torch.linalg.matrix_rank(G).item() == 12
    k = 8
    f = swift_factorize(W, G, k)
    assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()
    eig = torch.linalg.eigvalsh(output_covariance(W, G))
    assert _err(W, f, G) == pytest.approx(eig[: eig.numel() - k].clamp_min(0).sum().item(), rel=1e-7)
    wf = whiten_factorize(W, G, k)
    assert wf.jitter > 0.0, "Cholesky of a singular XᵀX must need the jitter fallback"
    assert _err(W, wf, G) >= _err(W, f, G) * (1 - 1e-9)
    # Beyond the rank of X, swift is exact: nothing is lost.
    assert _err(W, swift_factorize(W, G, 12), G) == pytest.approx(0.0, abs=1e-6 * torch.trace(W @ G @ W.T).item())


def test_group_factorization_shares_input_and_keeps_only_requested():
    W1, _, G = _problem(24, 32, 200, seed=1)
    W2 = torch.randn(8, 32, dtype=torch.float64)
    out = factorize_block([({"q": W1, "k": W2}, G, {"q": 5})], "whiten")
    assert set(out) == {"q"} and out["q"].rank == 5
    with pytest.raises(ValueError):
        factorize_block([({"q": W1}, G, {"q": 5})], "nope")


def test_shrink_gram_pulls_off_diagonals_toward_zero_and_stays_psd():
    _, _, G = _problem(8, 24, 100, rank_x=6)  # a singular G: shrinkage makes it definite
    assert shrink_gram(G, 0.0) is G
    S = shrink_gram(G, 0.25)
    off = ~torch.eye(24, dtype=torch.bool)
    assert torch.equal(S.diagonal(), G.diagonal())
    assert torch.allclose(S[off], 0.75 * G[off], rtol=1e-14, atol=0)
    assert torch.linalg.eigvalsh(S)[0] > 0 and torch.linalg.eigvalsh(G)[0] < 1e-8 * G.diagonal().max()


@pytest.mark.parametrize("method", ["swift", "whiten"])
def test_decompose_block_with_shrink_solves_the_shrunk_problem_and_reports_the_true_error(method):
    """With --shrink β the bases are the optimum for (1-β)·G + β·diag(G) (swift and whiten alike),
    while the stored error curve stays the error on the calibration activations (G itself), which
    β = 0 minimizes: shrinkage gives up calibration error for robustness, never the reverse."""
    W, _, G = _problem(20, 32, 300, seed=3)
    beta = 0.3
    Gs = shrink_gram(G, beta)
    shrunk = decompose_block([({"w": W}, G)], method, "fp64", shrink=beta)["w"]
    exact = decompose_block([({"w": W}, G)], method, "fp64")["w"]
    eig = torch.linalg.eigvalsh(output_covariance(W, Gs)).flip(0)
    for k in (2, 7, 12):
        A, B = shrunk.factors(W, k)
        err_true = reconstruction_error(W, B @ A, G)[0]
        assert shrunk.error(k)[0] == pytest.approx(err_true, rel=1e-9)
        assert reconstruction_error(W, B @ A, Gs)[0] == pytest.approx(eig[k:].sum().item(), rel=1e-8)
        assert err_true > exact.error(k)[0] * (1 + 1e-6)  # the shrunk factors are not G's optimum
    assert shrunk.error(0)[0] == pytest.approx(exact.error(0)[0], rel=1e-12)  # ‖XWᵀ‖² of the true G
    if method == "swift":
        assert torch.allclose(shrunk.values, eig, rtol=1e-10, atol=1e-10 * eig[0].item())


def _tall_with_condition(cond: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A 48 x 32 W with singular values s spread over [1/cond, 1] (returns W, s)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(48, 32, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), 32, dtype=torch.float64)
    return U @ torch.diag(s) @ V.T, s


@pytest.mark.parametrize("case", ["well-conditioned", "ill-conditioned", "rank-deficient"])
def test_tall_swift_is_optimal_and_householder_takes_over_only_when_cholesky_qr_is_unsafe(case, monkeypatch):
    """A taller-than-wide W goes through the Cholesky factor of WᵀW (cheaper than a Householder QR);
    when W is too ill-conditioned for that at the requested rank (the basis would not be
    orthonormal) or rank-deficient (WᵀW not definite), the Householder QR takes over. Either way
    the error is the optimum."""
    calls = []
    real_geqrf = torch.geqrf
    monkeypatch.setattr(torch, "geqrf", lambda A: calls.append(A.shape) or real_geqrf(A))
    if case == "ill-conditioned":  # G = I: the optimum is Σ_{i>k} s_i², known from the construction
        W, s = _tall_with_condition(1e7)
        G, k = torch.eye(32, dtype=torch.float64), 30
        optimum = (s[k:] ** 2).sum().item()
    else:
        W, _ = _tall_with_condition(10.0)
        if case == "rank-deficient":
            W[:, 20:] = W[:, :12]  # 12 repeated columns: rank 20 of 32
        G, k = _problem(48, 32, n_tokens=400, seed=3)[2], 7
        eig = torch.linalg.eigvalsh(output_covariance(W, G))
        optimum = eig[: eig.numel() - k].clamp_min(0).sum().item()
    f = swift_factorize(W, G, k)
    assert bool(calls) == (case != "well-conditioned")
    assert _err(W, f, G) == pytest.approx(optimum, rel=1e-6 if case == "ill-conditioned" else 1e-9)
    assert torch.allclose(f.B.T @ f.B, torch.eye(k, dtype=torch.float64), atol=1e-12, rtol=0)
    if case == "well-conditioned":
        f32 = swift_factorize(W.float(), G.float(), k)
        assert len(calls) == 0
        assert _err(W, f32, G) == pytest.approx(optimum, rel=1e-4)
