"""A small linear-operator base shared by every curvature object and estimator.

Operators act on flat vectors ``(n,)`` and matrices ``(n, k)``; the public functions translate
``{param_name: tensor}`` dictionaries to and from that flat layout (:class:`gradmeta.params.ParamLayout`).
"""
from __future__ import annotations

import torch


class LinearOperator:
    """A square linear map ``R^n -> R^n`` known only through products.

    Subclasses implement ``_matvec`` (and may override ``_matmat`` to batch probes). Every product
    is counted in ``num_matvecs`` so estimators can report their budget.

    Attributes:
        shape: ``(n, n)``.
        dtype, device: of the vectors the operator accepts and returns.
        num_matvecs: matrix-vector products performed so far (a ``matmat`` with ``k`` columns counts ``k``).
        probe_block: how many probes stochastic estimators pass per ``matmat`` by default. 1 for
            autograd operators (measured: a block only adds copies, the products run one by one);
            larger for dense matrices, where a block is one matmul.
    """

    probe_block = 1

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device):
        self.shape = (n, n)
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_matvecs = 0

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        Vt = V.T.contiguous()  # columns of V are strided; contiguous probes keep the kernels fast
        return torch.stack([self._matvec(v) for v in Vt], dim=1)

    def _check(self, x: torch.Tensor, ndim: int) -> torch.Tensor:
        if x.ndim != ndim or x.shape[0] != self.shape[1]:
            want = "(n,)" if ndim == 1 else "(n, k)"
            raise ValueError(f"{type(self).__name__} of shape {self.shape} expects a {want} "
                             f"tensor with n={self.shape[1]}, got shape {tuple(x.shape)}")
        return x.to(dtype=self.dtype, device=self.device)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` for ``v`` of shape ``(n,)``; returns ``(n,)``."""
        v = self._check(v, 1)
        self.num_matvecs += 1
        return self._matvec(v)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A V`` for ``V`` of shape ``(n, k)``; returns ``(n, k)``."""
        V = self._check(V, 2)
        self.num_matvecs += V.shape[1]
        if V.shape[1] == 0:
            return V.clone()
        return self._matmat(V)

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        return self.matvec(x) if x.ndim == 1 else self.matmat(x)

    def to_dense(self) -> torch.Tensor:
        """The ``(n, n)`` matrix, built from ``n`` products with the unit vectors."""
        return self.matmat(torch.eye(self.shape[1], dtype=self.dtype, device=self.device))

    def to_scipy(self):
        """Export as a ``scipy.sparse.linalg.LinearOperator`` (numpy in and out, for scipy solvers)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator as ScipyOperator

        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype

        def mv(x):
            x = torch.as_tensor(np.asarray(x).reshape(-1), dtype=self.dtype, device=self.device)
            return self.matvec(x).detach().cpu().numpy()

        def mm(X):
            X = torch.as_tensor(np.asarray(X), dtype=self.dtype, device=self.device)
            return self.matmat(X).detach().cpu().numpy()

        return ScipyOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mm, dtype=np_dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"


class DenseOperator(LinearOperator):
    """A dense ``(n, n)`` tensor seen as an operator (tests pass the exact matrix this way)."""

    probe_block = 64

    def __init__(self, matrix: torch.Tensor):
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"DenseOperator needs a square matrix, got shape {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matvec(self, v):
        return self.matrix @ v

    def _matmat(self, V):
        return self.matrix @ V

    def to_dense(self):
        return self.matrix


def as_operator(A) -> LinearOperator:
    """Accept a ``LinearOperator`` or a dense square tensor."""
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, torch.Tensor):
        return DenseOperator(A)
    raise TypeError(f"expected a gradmeta LinearOperator or a square torch.Tensor, got {type(A).__name__}")
