"""ssm_core.discretization against scipy.signal.cont2discrete (float64), limits, gradients, errors."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.signal import cont2discrete

from ssm_core.discretization import METHODS, bilinear, discretize, euler, zoh, zoh_euler

F64 = torch.float64
SCIPY_METHODS = ("zoh", "bilinear", "euler")
FNS = {"zoh": zoh, "bilinear": bilinear, "euler": euler, "zoh_euler": zoh_euler}
TOL = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny matrices: intra-op threads only add overhead (and stall badly on a busy CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def scipy_disc(A, B, dt, method):
    """(Abar, Bbar) from scipy for one dense system A: (N, N), B: (N, M)."""
    A, B = np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64)
    N, M = B.shape
    C, D = np.eye(N), np.zeros((N, M))
    ad, bd, _, _, _ = cont2discrete((A, B, C, D), float(dt), method=method)
    return ad, bd


def stable_dense(rng, n, m):
    """Random dense A with eigenvalues in the open left half plane, and B."""
    X = rng.standard_normal((n, n))
    A = X - (np.abs(np.linalg.eigvals(X).real).max() + 0.5) * np.eye(n)
    return A, rng.standard_normal((n, m))


def stable_diag(rng, *shape):
    return -np.exp(rng.uniform(-3, 2, size=shape)), rng.standard_normal(shape)


# ----------------------------------------------------------------------------- diagonal vs scipy


@pytest.mark.parametrize("method", SCIPY_METHODS)
@pytest.mark.parametrize("n", [1, 4, 16])
@pytest.mark.parametrize("dt", [1e-3, 0.1, 1.0])
def test_diagonal_matches_scipy(method, n, dt):
    rng = np.random.default_rng(n * 1000 + int(dt * 1000))
    a, b = stable_diag(rng, n)
    Abar, Bbar = discretize(torch.tensor(a), torch.tensor(b), dt, method)
    assert Abar.shape == (n,) and Bbar.shape == (n,) and Abar.dtype == F64
    ad, bd = scipy_disc(np.diag(a), b[:, None], dt, method)
    np.testing.assert_allclose(np.diag(ad), Abar.numpy(), **TOL)
    np.testing.assert_allclose(ad - np.diag(np.diag(ad)), 0, atol=1e-12)
    np.testing.assert_allclose(bd[:, 0], Bbar.numpy(), **TOL)


@pytest.mark.parametrize("method", SCIPY_METHODS)
def test_diagonal_batched_broadcast_matches_scipy(method):
    """Mamba-style shapes: A (dim, N) -> (dim, 1, N), dt (batch, dim, L, 1), B (batch, 1, L, N)."""
    rng = np.random.default_rng(7)
    batch, dim, L, N = 2, 3, 4, 5
    a, _ = stable_diag(rng, dim, N)
    b = rng.standard_normal((batch, 1, L, N))
    dts = np.exp(rng.uniform(-5, 0, size=(batch, dim, L, 1)))
    Abar, Bbar = discretize(torch.tensor(a)[:, None, :], torch.tensor(b), torch.tensor(dts), method)
    assert Abar.shape == (batch, dim, L, N) and Bbar.shape == (batch, dim, L, N)
    for i in range(batch):
        for d in range(dim):
            for t in range(L):
                ad, bd = scipy_disc(np.diag(a[d]), b[i, 0, t][:, None], dts[i, d, t, 0], method)
                np.testing.assert_allclose(np.diag(ad), Abar[i, d, t].numpy(), **TOL)
                np.testing.assert_allclose(bd[:, 0], Bbar[i, d, t].numpy(), **TOL)


def test_zoh_euler_is_mamba1():
    torch.manual_seed(0)
    batch, dim, L, N = 2, 3, 4, 5
    A = -torch.rand(dim, N, dtype=F64) - 0.1
    delta = torch.rand(batch, dim, L, dtype=F64)
    B = torch.randn(batch, N, L, dtype=F64)
    Abar, Bbar = discretize(A[:, None, :], B.transpose(1, 2)[:, None], delta[..., None], "zoh_euler")
    torch.testing.assert_close(Abar, torch.exp(torch.einsum("bdl,dn->bdln", delta, A)), **TOL)
    torch.testing.assert_close(Bbar, torch.einsum("bdl,bnl->bdln", delta, B), **TOL)
    # same Abar as zoh; Bbar agrees with zoh to first order in dt
    Az, Bz = zoh(A, torch.ones_like(A), 1e-4)
    Ae, Be = zoh_euler(A, torch.ones_like(A), 1e-4)
    torch.testing.assert_close(Ae, Az, rtol=0, atol=0)
    assert (Be - Bz).abs().max() < 1e-4 * 1e-4 * A.abs().max()


# ----------------------------------------------------------------------------- dense vs scipy


@pytest.mark.parametrize("method", SCIPY_METHODS)
@pytest.mark.parametrize("n,m", [(1, 1), (3, 2), (8, 1), (12, 4)])
@pytest.mark.parametrize("dt", [1e-3, 0.05, 0.7])
def test_dense_matches_scipy(method, n, m, dt):
    rng = np.random.default_rng(100 * n + m + int(dt * 1000))
    A, B = stable_dense(rng, n, m)
    Abar, Bbar = discretize(torch.tensor(A), torch.tensor(B), dt, method)
    assert Abar.shape == (n, n) and Bbar.shape == (n, m)
    ad, bd = scipy_disc(A, B, dt, method)
    np.testing.assert_allclose(Abar.numpy(), ad, **TOL)
    np.testing.assert_allclose(Bbar.numpy(), bd, **TOL)


@pytest.mark.parametrize("method", SCIPY_METHODS)
def test_dense_batched_matches_scipy(method):
    """Batched A (2, 3, N, N), shared B (N, M), per-item dt (2, 3); looped over scipy per item."""
    rng = np.random.default_rng(3)
    n, m = 4, 2
    A = np.stack([np.stack([stable_dense(rng, n, m)[0] for _ in range(3)]) for _ in range(2)])
    B = rng.standard_normal((n, m))
    dts = np.exp(rng.uniform(-4, 0, size=(2, 3)))
    Abar, Bbar = discretize(torch.tensor(A), torch.tensor(B), torch.tensor(dts), method)
    assert Abar.shape == (2, 3, n, n) and Bbar.shape == (2, 3, n, m)
    for i in range(2):
        for j in range(3):
            ad, bd = scipy_disc(A[i, j], B, dts[i, j], method)
            np.testing.assert_allclose(Abar[i, j].numpy(), ad, **TOL)
            np.testing.assert_allclose(Bbar[i, j].numpy(), bd, **TOL)


def test_dense_scalar_tensor_dt_and_singular_A():
    """0-d tensor dt; zoh stays valid for singular A (integrator chain) where A^{-1} does not exist."""
    A = np.array([[0.0, 1.0], [0.0, 0.0]])
    B = np.array([[0.0], [1.0]])
    Abar, Bbar = zoh(torch.tensor(A), torch.tensor(B), torch.tensor(0.3, dtype=F64))
    ad, bd = scipy_disc(A, B, 0.3, "zoh")
    np.testing.assert_allclose(Abar.numpy(), ad, **TOL)
    np.testing.assert_allclose(Bbar.numpy(), bd, **TOL)
    np.testing.assert_allclose(Bbar.numpy(), [[0.045], [0.3]], **TOL)


@pytest.mark.parametrize("dtype,theta,tol", [(F64, 0.04, 1e-15), (torch.float32, 0.5, 1e-6)])
def test_dense_zoh_single_matrix_accuracy(dtype, theta, tol):
    """A lone matrix must not hit torch.linalg.matrix_exp's inaccurate T8 path (pytorch#196592)."""
    A = torch.tensor([[0.0, -theta], [theta, 0.0]], dtype=dtype)  # exp(A) is a rotation by theta
    Abar, _ = zoh(A, torch.zeros(2, 1, dtype=dtype), 1.0)
    c, s = np.cos(theta), np.sin(theta)
    np.testing.assert_allclose(Abar.double().numpy(), [[c, -s], [s, c]], rtol=0, atol=tol)
    Abar, _ = zoh_euler(A, torch.zeros(2, 1, dtype=dtype), 1.0)
    np.testing.assert_allclose(Abar.double().numpy(), [[c, -s], [s, c]], rtol=0, atol=tol)


def test_dense_zoh_euler():
    rng = np.random.default_rng(5)
    A, B = stable_dense(rng, 4, 3)
    Abar, Bbar = discretize(torch.tensor(A), torch.tensor(B), 0.2, "zoh_euler")
    np.testing.assert_allclose(Abar.numpy(), scipy_disc(A, B, 0.2, "zoh")[0], **TOL)
    np.testing.assert_allclose(Bbar.numpy(), 0.2 * B, **TOL)


# ----------------------------------------------------------------------------- A -> 0 limit


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_zoh_diagonal_zero_eigenvalues(dtype):
    A = torch.tensor([0.0, -1.0, 0.0, -1e-9, 1e-12, -3.0], dtype=dtype, requires_grad=True)
    B = torch.tensor([1.0, 2.0, -3.0, 0.5, 4.0, 1.0], dtype=dtype)
    dt = 0.25
    Abar, Bbar = zoh(A, B, dt)
    assert torch.isfinite(Abar).all() and torch.isfinite(Bbar).all()
    assert Bbar[0] == dt * B[0] and Bbar[2] == dt * B[2] and Abar[0] == 1
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    # |dt A| <= 2.5e-10: Bbar = dt B (1 + dt A / 2 + ...) -> dt B
    torch.testing.assert_close(Bbar[[3, 4]], dt * B[[3, 4]], rtol=max(tol, 1e-9), atol=0)
    # non-zero entries still use the exact formula
    Ad = A.detach().double()[[1, 5]]
    ref = torch.expm1(dt * Ad) / Ad * B.double()[[1, 5]]
    torch.testing.assert_close(Bbar[[1, 5]].double(), ref, rtol=tol, atol=tol)
    (Abar.sum() + Bbar.sum()).backward()
    assert torch.isfinite(A.grad).all()
    # d/dA [dt * expm1(dt A)/(dt A) * B] at A = 0 is dt^2 / 2 * B
    torch.testing.assert_close(A.grad[0], torch.tensor(dt + dt**2 / 2 * 1.0, dtype=dtype))


def test_zoh_diagonal_series_is_continuous_across_threshold():
    """Value and gradient agree with the exact double-precision formula on both sides of the switch."""
    z = torch.logspace(-8, 0, 200, dtype=F64) * torch.tensor([-1.0, 1.0], dtype=F64)[:, None]
    A = z.flatten().clone().requires_grad_(True)
    _, Bbar = zoh(A, torch.ones_like(A), 1.0)
    exact = torch.expm1(A.detach()) / A.detach()
    torch.testing.assert_close(Bbar.detach(), exact, rtol=1e-13, atol=0)
    (g,) = torch.autograd.grad(Bbar.sum(), A)
    zd = A.detach()
    g_exact = (zd * torch.exp(zd) - torch.expm1(zd)) / zd**2  # only trustworthy for |z| >~ 1e-3
    big = zd.abs() > 1e-2
    torch.testing.assert_close(g[big], g_exact[big], rtol=1e-11, atol=0)
    zs = zd[~big]
    g_series = 1 / 2 + zs / 3 + zs**2 / 8 + zs**3 / 30 + zs**4 / 144 + zs**5 / 840
    torch.testing.assert_close(g[~big], g_series, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_diagonal(method):
    torch.manual_seed(1)
    A = torch.tensor([-0.7, 0.0, -2.0], dtype=F64, requires_grad=True)
    B = torch.randn(2, 3, dtype=F64, requires_grad=True)
    dt = torch.tensor([[0.3], [0.05]], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, d: discretize(a, b, d, method), (A, B, dt))


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_dense(method):
    rng = np.random.default_rng(2)
    A_np, B_np = stable_dense(rng, 2, 2)
    A = torch.tensor(A_np, requires_grad=True)
    B = torch.tensor(B_np, requires_grad=True)
    dt = torch.tensor([0.2, 0.6], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, d: discretize(a, b, d, method), (A, B, dt))


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dense", [False, True])
def test_fp32_in_fp32_out(method, dense):
    rng = np.random.default_rng(4)
    if dense:
        A, B = (torch.tensor(x, dtype=torch.float32) for x in stable_dense(rng, 4, 2))
    else:
        A, B = (torch.tensor(x, dtype=torch.float32) for x in stable_diag(rng, 3, 4))
    Abar, Bbar = discretize(A, B, 0.1, method)
    assert Abar.dtype == torch.float32 and Bbar.dtype == torch.float32
    A64, B64 = discretize(A.double(), B.double(), 0.1, method)
    torch.testing.assert_close(Abar.double(), A64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(Bbar.double(), B64, rtol=1e-5, atol=1e-6)


def test_half_inputs_compute_in_fp32():
    A = torch.tensor([-1e-3, -0.5, -2.0], dtype=torch.bfloat16)
    B = torch.ones(3, dtype=torch.float16)
    dt = torch.tensor(0.01, dtype=torch.bfloat16)
    Abar, Bbar = discretize(A, B, dt)
    assert Abar.dtype == torch.float32 and Bbar.dtype == torch.float32
    assert Abar[0] < 1  # exp(-1e-5) would round to 1 in bf16
    ref_A, ref_B = discretize(A.double(), B.double(), dt.double())
    torch.testing.assert_close(Abar.double(), ref_A, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(Bbar.double(), ref_B, rtol=1e-6, atol=1e-7)


def test_fp64_wins_and_python_dt_is_exact():
    A = torch.tensor([-1.0], dtype=torch.float32)
    B = torch.tensor([1.0], dtype=F64)
    Abar, _ = discretize(A, B, 0.1)
    assert Abar.dtype == F64 and Abar.item() == np.exp(-0.1)


def test_complex_diagonal_zoh_matches_scipy():
    """S4D-style complex eigenvalues."""
    a = np.array([-0.5 + 1.0j, -0.1 - 3.0j, 0.0 + 0.0j])
    b = np.array([1.0 + 0.5j, -2.0 + 0.0j, 0.3 - 1.0j])
    Abar, Bbar = zoh(torch.tensor(a), torch.tensor(b), 0.4)
    assert Abar.dtype == torch.complex128
    A_full = np.diag(a)
    E = __import__("scipy.linalg", fromlist=["expm"]).expm(
        0.4 * np.block([[A_full, b[:, None]], [np.zeros((1, 4))]])
    )
    np.testing.assert_allclose(Abar.numpy(), np.diag(E[:3, :3]), **TOL)
    np.testing.assert_allclose(Bbar.numpy(), E[:3, 3], **TOL)


# ----------------------------------------------------------------------------- layout inference / property


@settings(max_examples=25, deadline=None)
@given(
    batch=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    n=st.integers(1, 5),
    log_dt=st.floats(-6, 1),
    method=st.sampled_from(METHODS),
    seed=st.integers(0, 2**16),
)
def test_dense_of_diagonal_equals_diagonal(batch, n, log_dt, method, seed):
    """For any batch shape, the dense path on diag_embed(a) equals the elementwise diagonal path."""
    g = torch.Generator().manual_seed(seed)
    a = -torch.rand(*batch, n, generator=g, dtype=F64) * 5
    b = torch.randn(*batch, n, generator=g, dtype=F64)
    dt = float(np.exp(log_dt))
    Ad, Bd = discretize(a, b, dt, method, diagonal=True)
    Af, Bf = discretize(torch.diag_embed(a), b[..., None], dt, method, diagonal=False)
    assert Ad.shape == Bd.shape == (*batch, n)
    assert Af.shape == (*batch, n, n) and Bf.shape == (*batch, n, 1)
    torch.testing.assert_close(Af, torch.diag_embed(Ad), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(Bf[..., 0], Bd, rtol=1e-9, atol=1e-12)


def test_layout_inference():
    A_sq, B_nm = torch.randn(3, 3, dtype=F64), torch.randn(3, 2, dtype=F64)
    assert discretize(A_sq, B_nm, 0.1)[1].shape == (3, 2)  # dense
    A_diag, B_diag = torch.randn(2, 3, dtype=F64), torch.randn(2, 3, dtype=F64)
    assert discretize(A_diag, B_diag, 0.1)[0].shape == (2, 3)  # diagonal (A not square)
    # square A with B (..., N) whose second-to-last dim != N: diagonal
    assert discretize(A_sq, torch.randn(5, 1, 3, dtype=F64), 0.1)[1].shape == (5, 3, 3)
    # ambiguous (N, N) pair is dense unless told otherwise
    A_amb = -torch.rand(3, 3, dtype=F64)
    B_amb = torch.randn(3, 3, dtype=F64)
    assert torch.count_nonzero(discretize(A_amb, B_amb, 0.1, "euler")[0] - torch.eye(3, dtype=F64)) == 9
    Ad, _ = discretize(A_amb, B_amb, 0.1, "euler", diagonal=True)
    torch.testing.assert_close(Ad, 1 + 0.1 * A_amb)


def test_method_aliases_and_case():
    A, B = -torch.rand(4, dtype=F64), torch.randn(4, dtype=F64)
    for alias, name in [("tustin", "bilinear"), ("forward_euler", "euler"), ("ZOH", "zoh")]:
        for x, y in zip(discretize(A, B, 0.1, alias), discretize(A, B, 0.1, name)):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


# ----------------------------------------------------------------------------- errors


def test_unknown_method():
    with pytest.raises(ValueError, match=r"unknown discretization method 'foh'.*'zoh'"):
        discretize(torch.randn(3), torch.randn(3), 0.1, "foh")


def test_dense_non_square_A():
    with pytest.raises(ValueError, match=r"expected A of shape \(\.\.\., N, N\), got \(3, 4\)"):
        zoh(torch.randn(3, 4), torch.randn(3, 2), 0.1, diagonal=False)


def test_dense_B_rows_mismatch():
    with pytest.raises(ValueError, match=r"expected B of shape \(\.\.\., 3, M\).*got \(4, 2\)"):
        bilinear(torch.randn(3, 3), torch.randn(4, 2), 0.1, diagonal=False)


def test_dense_batch_mismatch():
    with pytest.raises(ValueError, match=r"not broadcastable"):
        euler(torch.randn(2, 3, 3), torch.randn(3, 1), torch.rand(5), diagonal=False)
    with pytest.raises(ValueError, match=r"A \(3,\) .*B \(4,\) .*dt \(2,\)"):
        zoh(torch.randn(3, 2, 2), torch.randn(4, 2, 1), torch.rand(2))


def test_diagonal_shape_mismatch():
    with pytest.raises(ValueError, match=r"got A \(2, 4\), B \(2, 3\), dt \(\)"):
        discretize(torch.randn(2, 4), torch.randn(2, 3), 0.1)
    with pytest.raises(ValueError, match=r"dt \(5, 1\)"):
        discretize(torch.randn(3, 4), torch.randn(3, 4), torch.rand(5, 1), "zoh_euler")
    with pytest.raises(ValueError, match=r"0-d"):
        discretize(torch.tensor(1.0), torch.tensor(1.0), 0.1)
