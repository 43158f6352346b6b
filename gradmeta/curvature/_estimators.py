"""Matrix-free estimators on any ``LinearOperator`` or dense symmetric tensor.

Budgets are counted in matrix-vector products; randomness comes only from the explicit
``generator`` (a ``torch.Generator`` or an int seed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._linop import as_operator


def _gen(generator, device) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    g = torch.Generator(device="cpu")
    g.manual_seed(0 if generator is None else int(generator))
    return g


def _rademacher(n, k, gen, dtype, device) -> torch.Tensor:
    z = torch.randint(0, 2, (n, k), generator=gen, device=gen.device).to(dtype) * 2 - 1
    return z.to(device)


def _gaussian(n, k, gen, dtype, device) -> torch.Tensor:
    return torch.randn(n, k, generator=gen, device=gen.device, dtype=torch.float64).to(dtype=dtype, device=device)


def _probe_chunks(total: int, chunk: int):
    done = 0
    while done < total:
        k = min(chunk, total - done)
        yield k
        done += k


def hutchinson_trace(A, num_samples: int = 100, generator=None, chunk: int | None = None) -> torch.Tensor:
    """Hutchinson trace estimate ``mean_i zᵢᵀ A zᵢ`` with Rademacher ``zᵢ``; ``num_samples`` products.

    Args:
        A: ``LinearOperator`` or dense ``(n, n)`` tensor.
        num_samples: number of probes (= matrix-vector products).
        generator: ``torch.Generator`` or int seed.
        chunk: probes per ``matmat`` call (default: the operator's ``probe_block``).

    Returns:
        0-dim tensor. Its variance is ``2(‖A‖_F² − Σ A_ii²) / num_samples``.
    """
    A = as_operator(A)
    gen, n = _gen(generator, A.device), A.shape[0]
    acc = torch.zeros((), dtype=A.dtype, device=A.device)
    for k in _probe_chunks(num_samples, chunk or A.probe_block):
        Z = _rademacher(n, k, gen, A.dtype, A.device)
        acc += (Z * A.matmat(Z)).sum()
    return acc / num_samples


def hutchpp_trace(A, num_samples: int = 99, generator=None) -> torch.Tensor:
    """Hutch++ (Meyer et al. 2021): exact trace on a sketched top subspace + Hutchinson on the rest.

    Uses ``num_samples`` products in total: ``m = num_samples // 3`` for the sketch ``A S``,
    ``m`` for ``Qᵀ A Q`` and the rest for Hutchinson on ``(I − QQᵀ) A (I − QQᵀ)``.

    Returns:
        0-dim tensor.
    """
    A = as_operator(A)
    gen, n = _gen(generator, A.device), A.shape[0]
    m = max(num_samples // 3, 1)
    r = max(num_samples - 2 * m, 1)
    S = _rademacher(n, m, gen, A.dtype, A.device)
    Q, _ = torch.linalg.qr(A.matmat(S))
    t_top = torch.trace(Q.T @ A.matmat(Q))
    G = _rademacher(n, r, gen, A.dtype, A.device)
    G = G - Q @ (Q.T @ G)
    t_rest = (G * A.matmat(G)).sum() / r
    return t_top + t_rest


def hutchinson_diagonal(A, num_samples: int = 100, generator=None, chunk: int | None = None) -> torch.Tensor:
    """Hutchinson diagonal estimate ``mean_i zᵢ ∘ A zᵢ`` (Rademacher); returns ``(n,)``."""
    A = as_operator(A)
    gen, n = _gen(generator, A.device), A.shape[0]
    acc = torch.zeros(n, dtype=A.dtype, device=A.device)
    for k in _probe_chunks(num_samples, chunk or A.probe_block):
        Z = _rademacher(n, k, gen, A.dtype, A.device)
        acc += (Z * A.matmat(Z)).sum(1)
    return acc / num_samples


def _lanczos_steps(A, v0: torch.Tensor, max_steps: int):
    """Lanczos with full reorthogonalisation, one product per step.

    Yields after step ``j``: ``(alpha (list of j+1), beta (list of j), Q (n, j+1), b, exhausted)`` where
    ``b = ‖w‖`` is the next off-diagonal (the Ritz residual scale) and ``exhausted`` says the Krylov
    space is invariant (or of dimension ``n``), so the Ritz values are exact.
    """
    n = A.shape[0]
    m = min(max_steps, n)
    # Lanczos vectors as contiguous ROWS (a column slice of an (n, m) matrix is strided and slow to
    # reorthogonalise against); torch.empty: pages of unused rows are never touched.
    Qt = torch.empty(m, n, dtype=A.dtype, device=A.device)
    alpha, beta = [], []
    q = v0.to(A.dtype) / v0.norm()
    for j in range(m):
        Qt[j] = q
        w = A.matvec(q)
        a = torch.dot(q, w)
        alpha.append(a)
        w = w - a * q - (beta[-1] * Qt[j - 1] if j > 0 else 0)
        for _ in range(2):  # twice is enough (Parlett): Q stays orthonormal to working precision
            w = w - Qt[: j + 1].T @ (Qt[: j + 1] @ w)
        b = w.norm()
        exhausted = j == n - 1 or b <= 1e-12 * max(abs(a.item()), 1.0) * math.sqrt(n)
        yield alpha, beta, Qt[: j + 1].T, b, exhausted
        if exhausted:
            return
        beta.append(b)
        q = w / b


def lanczos(A, num_steps: int, v0: torch.Tensor):
    """Lanczos tridiagonalisation with full reorthogonalisation.

    Args:
        A: symmetric operator or dense tensor ``(n, n)``.
        num_steps: at most this many products (stops early on an invariant subspace).
        v0: start vector ``(n,)``.

    Returns:
        ``(alpha (m,), beta (m-1,), Q (n, m))`` with ``Qᵀ A Q = tridiag(beta, alpha, beta)``.
    """
    for alpha, beta, Q, _, _ in _lanczos_steps(as_operator(A), v0, num_steps):
        beta = list(beta)  # a snapshot: the generator appends once more after the last step
    alpha_t = torch.stack(alpha)
    beta_t = torch.stack(beta) if beta else alpha_t.new_zeros(0)
    return alpha_t, beta_t, Q


def _tridiag(alpha, beta):
    return torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)


@dataclass
class EigenResult:
    """Top eigenpairs from Lanczos. ``eigenvalues (k,)`` descending; ``eigenvectors (n, k)`` or
    None; ``residuals (k,)`` the bounds ``‖A x − θ x‖``; ``num_matvecs`` the products used."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    residuals: torch.Tensor
    num_matvecs: int


def top_eigenvalues(A, k: int = 1, *, tol: float = 1e-6, max_matvecs: int = 200, generator=None,
                    return_eigenvectors: bool = False, check_every: int = 5) -> EigenResult:
    """Largest-algebraic ``k`` eigenvalues of a symmetric operator by Lanczos with reorthogonalisation.

    Grows one Krylov space (no restarts), checking every ``check_every`` steps, until each of the top
    ``k`` Ritz pairs has residual ``‖A x − θ x‖ ≤ tol · |θ_1|`` (which bounds the eigenvalue error by
    the same amount), ``max_matvecs`` products were spent, or the Krylov space is exhausted (then the
    values are exact).

    Returns:
        ``EigenResult`` (eigenvalues in the operator's dtype, descending).
    """
    A = as_operator(A)
    n = A.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    v0 = _gaussian(n, 1, _gen(generator, A.device), A.dtype, A.device)[:, 0]
    start = A.num_matvecs
    budget = min(max_matvecs, n)
    for alpha, beta, Q, b, exhausted in _lanczos_steps(A, v0, budget):
        steps = len(alpha)
        if steps < k or not (exhausted or steps >= budget or steps % check_every == 0):
            continue
        theta, S = torch.linalg.eigh(_tridiag(torch.stack(alpha), torch.stack(beta) if beta else alpha[0].new_zeros(0)))
        order = torch.argsort(theta, descending=True)[:k]
        res = torch.zeros(len(order), dtype=A.dtype, device=A.device) if exhausted else (b * S[-1, order]).abs()
        scale = max(abs(theta[order[0]].item()), 1e-30)
        if exhausted or steps >= budget or bool((res <= tol * scale).all()):
            vecs = Q @ S[:, order] if return_eigenvectors else None
            return EigenResult(theta[order], vecs, res, A.num_matvecs - start)
    raise AssertionError("unreachable: the last Lanczos step always returns")


@dataclass
class SpectralDensity:
    """Stochastic Lanczos quadrature result.

    Attributes:
        grid: ``(G,)`` eigenvalue grid. density: ``(G,)`` Gaussian-smoothed density, integrating to ~1.
        nodes, weights: ``(num_probes, m)`` Ritz values and quadrature weights per probe (weights sum to 1).
        sigma: kernel width. num_matvecs: products used.
    """

    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    sigma: float
    num_matvecs: int

    def plot(self, ax=None, path=None, title: str = "Hessian spectral density (SLQ)"):
        """Plot the density (log scale); saves to ``path`` when given. Returns the matplotlib axes."""
        import matplotlib

        if ax is None and path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.semilogy(self.grid.cpu().numpy(), self.density.clamp_min(1e-12).cpu().numpy())
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.set_title(title)
        if path is not None:
            (fig or ax.figure).tight_layout()
            (fig or ax.figure).savefig(path, dpi=120)
            if fig is not None:
                plt.close(fig)
        return ax


def slq(A, num_probes: int = 4, num_steps: int = 60, *, grid_size: int = 500, sigma: float | None = None,
        generator=None) -> SpectralDensity:
    """Spectral density by stochastic Lanczos quadrature (Ghorbani et al. 2019).

    Each of ``num_probes`` Gaussian probes runs ``num_steps`` Lanczos steps; the Ritz values are the
    quadrature nodes and the squared first components of the Ritz vectors the weights. Uses at most
    ``num_probes · num_steps`` products. ``sigma`` defaults to ``(λmax − λmin) / 100``.
    """
    A = as_operator(A)
    n = A.shape[0]
    gen = _gen(generator, A.device)
    start = A.num_matvecs
    nodes, weights = [], []
    for _ in range(num_probes):
        v0 = _gaussian(n, 1, gen, A.dtype, A.device)[:, 0]
        alpha, beta, _ = lanczos(A, num_steps, v0)
        theta, S = torch.linalg.eigh(_tridiag(alpha, beta))
        m = num_steps if n >= num_steps else n
        pad = m - theta.shape[0]  # early stop: pad with zero-weight nodes so probes stack
        nodes.append(torch.cat([theta, theta[-1:].expand(pad)]))
        weights.append(torch.cat([S[0] ** 2, S.new_zeros(pad)]))
    nodes_t, weights_t = torch.stack(nodes), torch.stack(weights)
    lo, hi = nodes_t.min().item(), nodes_t.max().item()
    width = max(hi - lo, 1e-12 * max(abs(hi), 1.0))
    sigma = sigma if sigma is not None else width / 100
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_size, dtype=A.dtype, device=A.device)
    kern = torch.exp(-0.5 * ((grid[:, None, None] - nodes_t[None]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = (kern * weights_t[None]).sum((1, 2)) / num_probes
    return SpectralDensity(grid, density, nodes_t, weights_t, sigma, A.num_matvecs - start)
