"""The paper's per-sample quantities from (A, p, q): pure functions of tensors, in float64.

Notation (paper Sec. 4, READING.md §1.3), per sample x with C classes:
    e = p − q,  E_f = ‖p − q‖² (fitting error),  ‖g‖² = ‖∇_θ d_Ω(q, f_θ(x))‖² = eᵀ A_x e,
    λmin, λmax the extreme eigenvalues of A_x,
    U = −log2 λmin,  L = −log2 λmax,  G = U − L = log2(λmax/λmin) ≥ 0,
    S(α, β, γ) = αG + βU + γL (structural error, Def. in Sec. 4.3; the paper gives no values,
    the default (1, 1, 1) makes S = 2U),
    Theorem 3: L ≤ log2(E_f/‖g‖²) ≤ U, i.e. lower = log2‖g‖² + L ≤ log2 E_f ≤ log2‖g‖² + U = upper,
    equivalently ‖g‖²/λmax ≤ E_f ≤ ‖g‖²/λmin when λmin > 0.

Logarithms are base 2 (paper Sec. 5; DESIGN §5). Eigenvalues are always computed in float64.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import torch

from .errors import NonFiniteStructureError, check_finite_structure

__all__ = [
    "COLUMNS",
    "Measurement",
    "fitting_error",
    "gradient_norm",
    "spectrum",
    "eigvalsh",
    "head_spectrum",
    "perp_spectrum",
    "symmetric_float64",
    "rank_tolerance",
    "theorem3_holds",
    "measure_from",
    "THEOREM3_RTOL",
    "local_pearson",
    "local_pearson_rows",
    "gic_diagnostics",
    "NonFiniteStructureError",
]



#: The extension columns a measurement may add: the bracket from A_x restricted to 1^⊥ ("perp": ``*_perp``) and
#: the descriptive GIC proxies ("gic": ``gic_*``). Each costs more than the paper's quantities at large C.
EXTRAS = ("perp", "gic")

#: Relative tolerance of the Theorem 3 check. Both sides come from the same A_x in float64, so the
#: only error is float64 rounding in eigvalsh and eᵀAe (about C·2.2e-16·λmax); 1e-9 leaves margin.
THEOREM3_RTOL = 1e-9

#: Column name -> (description, from the paper?). The probe's records carry these columns.
COLUMNS: dict[str, tuple[str, bool]] = {
    "loss": ("per-sample loss d_Ω(q, f)", True),
    "fitting_error": ("E_f = ‖p − q‖²", True),
    "log_fitting_error": ("log2 E_f (the plotted 'fitting error')", True),
    "gradient_norm": ("‖∇_θ d_Ω‖² = eᵀ A_x e", True),
    "log_gradient_norm": ("log2 ‖∇_θ d_Ω‖²", True),
    "lambda_min": ("smallest eigenvalue of A_x", True),
    "lambda_max": ("largest eigenvalue of A_x", True),
    "U": ("−log2 λmin (+inf when rank_deficient)", True),
    "L": ("−log2 λmax", True),
    "G": ("U − L = log2(λmax/λmin)", True),
    "structural_error": ("S = αG + βU + γL", True),
    "lower": ("log2‖g‖² + L (Theorem 3 lower bound on log2 E_f)", True),
    "upper": ("log2‖g‖² + U (Theorem 3 upper bound on log2 E_f)", True),
    "bound_holds": ("lower ≤ log2 E_f ≤ upper within THEOREM3_RTOL", True),
    "rank_deficient": ("λmin ≤ C·eps(dtype of A)·λmax: Theorem 3's hypothesis fails", False),
    "exact_fit": ("E_f = 0 exactly (p = q), so the log columns are −inf", False),
    "predicted_class": ("argmax of p", False),
    "target_class": ("argmax of q", False),
    "lambda_min_perp": ("smallest eigenvalue of A_x on 1^⊥ (simplex maps only; not from the paper)", False),
    "lambda_max_perp": ("largest eigenvalue of A_x on 1^⊥ (simplex maps only; not from the paper)", False),
    "lower_perp": ("log2‖g‖² − log2 λmax_perp: tighter lower bound (not from the paper)", False),
    "upper_perp": ("log2‖g‖² − log2 λmin_perp: tighter upper bound (not from the paper)", False),
    "bound_perp_holds": ("lower_perp ≤ log2 E_f ≤ upper_perp (not from the paper)", False),
    "gradient_norm_autograd": ("‖∇_θ d_Ω‖² by autograd, with check=True (NaN otherwise)", False),
    "gic_norm_ratio": ("GIC diagnostic: min/max of the row norms ‖∂f_c/∂θ‖ = √A_cc (1 under an exact GIC)", False),
    "gic_max_cos": ("GIC diagnostic: max_{c≠c'} |A_cc'|/√(A_cc A_c'c'), the largest |cos| between Jacobian rows", False),
}


def fitting_error(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """E_f(q, p) = ‖p − q‖² per sample. Shapes (batch, classes) -> (batch,)."""
    return ((p - q) ** 2).sum(-1)


def gradient_norm(A: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """‖g‖² = eᵀ A e per sample (exact: g = J_xᵀ e). A (batch, C, C), e (batch, C) -> (batch,)."""
    return torch.einsum("bi,bij,bj->b", e, A, e)


#: up to this many bytes of float64 result, :func:`symmetric_float64` symmetrises the batch in one operation
_BATCHED_SYMMETRIC_BYTES = 2**20


def symmetric_float64(A: torch.Tensor) -> torch.Tensor:
    """(A_x + A_xᵀ)/2 in float64, a new tensor. (batch, C, C) -> (batch, C, C).

    A_x is symmetric up to the rounding of the GEMMs that built it; the quadratic forms eᵀA_xe only see this
    symmetric part, and the spectrum is that of this part. One sample at a time: a (C, C) slice and its
    transpose stay in cache, where the batched transpose-add strides through all of A (2–3× slower at C = 100 to
    1000); a batch of at most 1 MiB in float64 (64 × 32², say) in one operation, where the per-sample loop's
    fixed cost dominates (0.07 against 0.92 ms for 64 × 32² on this project's CPU).
    """
    if A.numel() * 8 <= _BATCHED_SYMMETRIC_BYTES:
        a = A.to(torch.float64)
        return (a + a.transpose(-1, -2)).mul_(0.5)
    out = torch.empty(A.shape, dtype=torch.float64, device=A.device)
    for a, o in zip(A, out):
        a = a.to(torch.float64)
        torch.add(a, a.transpose(-1, -2), out=o).mul_(0.5)
    return out


#: below this many multiply-adds per batch (n·C³) the eigensolver runs on the calling thread alone
_THREADED_EIG_WORK = 2**22

_eig_pool: tuple[int, ThreadPoolExecutor] | None = None  # (its threads, the pool)


def eigvalsh(S: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of each symmetric matrix of a batch, ascending: ``torch.linalg.eigvalsh``, on the CPU with the
    batch split across the intra-op threads. (batch, C, C) -> (batch, C), S's dtype.

    LAPACK's ``syevd`` on one matrix of a few hundred rows makes little use of a second thread, so one thread per
    part of the batch, each one-threaded, is about twice as fast on 2 cores (docs/engine.md); the intra-op thread
    count is restored afterwards. On a GPU, and for small batches, one call.
    """
    global _eig_pool
    threads = torch.get_num_threads()
    n, C = S.shape[0], S.shape[-1]
    if S.device.type != "cpu" or threads < 2 or n < 2 or n * C**3 < _THREADED_EIG_WORK:
        return torch.linalg.eigvalsh(S)
    if _eig_pool is None or _eig_pool[0] < threads:
        _eig_pool = (threads, ThreadPoolExecutor(threads, thread_name_prefix="optmech-eigvalsh"))
    torch.set_num_threads(1)
    try:
        return torch.cat(list(_eig_pool[1].map(torch.linalg.eigvalsh, S.chunk(threads))))
    finally:
        torch.set_num_threads(threads)


def spectrum(A: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of each (A_x + A_xᵀ)/2 in float64, ascending. (batch, C, C) -> (batch, C).

    On A's own device (on a GPU, faster than a round trip through the CPU: docs/engine.md). A dense symmetric
    eigendecomposition (LAPACK ``syevd``, :func:`eigvalsh`): O(C³) per sample, the probe's largest cost at
    C ≳ 300 on a CPU unless the factors of a narrow logits layer give it (:func:`head_spectrum`).
    """
    return eigvalsh(symmetric_float64(A))


def head_spectrum(scale: torch.Tensor, core: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Eigenvalues of A_x = s_x·I + Q M_x Qᵀ (:class:`optmech.structure.head.LowRankHead`, Q with orthonormal
    columns), float64, ascending, (batch, C): s_x + eig(M_x) and s_x for the other C − d, from a d × d eigensolver.
    ``scale`` s (batch,), ``core`` (batch, d, d) the symmetric M_x in float64 (:func:`symmetric_float64`)."""
    s = scale.to(torch.float64)[:, None]
    core = eigvalsh(core)
    rest = torch.zeros(core.shape[0], n_classes - core.shape[1], dtype=torch.float64, device=core.device)
    return torch.sort(torch.cat([core, rest], 1) + s, dim=1).values


@functools.lru_cache(maxsize=16)
def _perp_basis(n: int, device: torch.device) -> torch.Tensor:
    """An orthonormal basis V (n, n−1) of the subspace orthogonal to the all-ones vector (cached; read only)."""
    M = torch.eye(n, dtype=torch.float64)
    M[:, 0] = 1.0
    Q, _ = torch.linalg.qr(M)
    return Q[:, 1:].contiguous().to(device)


def perp_spectrum(A: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of VᵀA_xV, A_x restricted to 1^⊥ (batch, C−1), float64, ascending.

    For predictions and targets on the simplex, e = p − q ⊥ 1, so eᵀAe/‖e‖² lies between these
    extreme eigenvalues: a bracket at least as tight as Theorem 3's (Cauchy interlacing).
    """
    V = _perp_basis(A.shape[-1], A.device)
    return spectrum(V.T @ symmetric_float64(A) @ V)


def rank_tolerance(lambda_max: torch.Tensor, n_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """Numerical-rank threshold C·eps(dtype)·λmax, with dtype that of A_x before the float64 cast."""
    return n_classes * torch.finfo(dtype).eps * lambda_max


def theorem3_holds(
    E_f: torch.Tensor,
    g2: torch.Tensor,
    lam_min: torch.Tensor,
    lam_max: torch.Tensor,
    rank_deficient: torch.Tensor,
    rtol: float = THEOREM3_RTOL,
) -> torch.Tensor:
    """Theorem 3 per sample in linear form: ‖g‖²/λmax ≤ E_f ≤ ‖g‖²/λmin (the upper side is vacuous
    when λmin ≤ tolerance). Tolerance: rtol relative to λmax·E_f on both sides."""
    slack = rtol * lam_max * E_f
    lower_ok = g2 <= E_f * lam_max + slack
    upper_ok = rank_deficient | (E_f * lam_min <= g2 + slack)
    return lower_ok & upper_ok


def gic_diagnostics(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Descriptive proxies for the Gradient Independence Condition (Def. 1; READING §1.9), from A alone.

    Under the GIC the C rows of J_x are near-orthogonal with near-equal norms; Lemma 2 bounds
    |cos| by about √(6 ln C/(|θ| − 1)) (see :func:`optmech.theory.lemma2_thresholds`).

    Returns:
        (min_c √A_cc / max_c √A_cc, max_{c≠c'} |A_cc'|/√(A_cc A_c'c')), each (batch,); NaN where a row is zero.
    """
    diag = A.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()  # (batch, C) row norms
    ratio = diag.min(-1).values / diag.max(-1).values
    outer = diag.unsqueeze(-1) * diag.unsqueeze(-2)
    cos = (A / outer).abs()
    eye = torch.eye(A.shape[-1], dtype=torch.bool, device=A.device)
    cos = cos.masked_fill(eye, 0.0)
    max_cos = cos.flatten(1).max(-1).values
    bad = (diag <= 0).any(-1)
    nan = torch.full_like(ratio, math.nan)
    return torch.where(bad, nan, ratio), torch.where(bad, nan, max_cos)


def _bracket(lam_min, lam_max, g2, log_g2, E_f, n_classes, dtype, rank_rtol):
    """(rank_deficient, U, L, lower, upper, holds) of Theorem 3 for one pair of extreme eigenvalues.

    U is +inf (and the upper bound vacuous) when λmin ≤ tolerance; L is +inf when λmax ≤ 0.
    """
    tol = rank_tolerance(lam_max, n_classes, dtype) if rank_rtol is None else rank_rtol * lam_max
    deficient = (lam_min <= tol) | (lam_max <= 0)
    inf = torch.full_like(lam_min, math.inf)
    U = torch.where(deficient, inf, -_log2(lam_min))
    L = torch.where(lam_max > 0, -_log2(lam_max), inf)
    upper = torch.where(deficient, inf, log_g2 + U)
    return deficient, U, L, log_g2 + L, upper, theorem3_holds(E_f, g2, lam_min, lam_max, deficient)


def _log2(x: torch.Tensor) -> torch.Tensor:
    return torch.log2(torch.clamp(x, min=0.0))  # log2(0) = −inf; tiny negative rounding -> 0


@dataclasses.dataclass(frozen=True)
class Measurement:
    """Per-sample quantities for one batch; every tensor field has shape (batch,).

    Float fields are float64, flags are bool. ``A`` (batch, C, C), as measured (its own dtype, the model's
    when the engine computed it; every quantity comes from its symmetric part in float64, or from the factors
    ``head`` of a narrow logits layer), and ``eigenvalues`` (batch, C), float64, are kept for inspection but not
    written by :meth:`to_frame`. See :data:`COLUMNS`.
    """

    loss: torch.Tensor
    fitting_error: torch.Tensor
    log_fitting_error: torch.Tensor
    gradient_norm: torch.Tensor
    log_gradient_norm: torch.Tensor
    lambda_min: torch.Tensor
    lambda_max: torch.Tensor
    U: torch.Tensor
    L: torch.Tensor
    G: torch.Tensor
    structural_error: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    bound_holds: torch.Tensor
    rank_deficient: torch.Tensor
    exact_fit: torch.Tensor
    predicted_class: torch.Tensor
    target_class: torch.Tensor
    lambda_min_perp: torch.Tensor
    lambda_max_perp: torch.Tensor
    lower_perp: torch.Tensor
    upper_perp: torch.Tensor
    bound_perp_holds: torch.Tensor
    gradient_norm_autograd: torch.Tensor
    gic_norm_ratio: torch.Tensor
    gic_max_cos: torch.Tensor
    given_A: torch.Tensor | None = dataclasses.field(repr=False)
    eigenvalues: torch.Tensor = dataclasses.field(repr=False)
    method: str = "auto"
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    per_layer: dict[str, torch.Tensor] | None = dataclasses.field(default=None, repr=False)
    head: object = dataclasses.field(default=None, repr=False)  # optmech.structure.head.LowRankHead

    @functools.cached_property
    def A(self) -> torch.Tensor:
        """(batch, C, C): the structural matrices as measured, in their own dtype (the model's): the engine's A, or
        formed from the factors ``head`` (A = s·I + Q M Qᵀ) on first read when the engine left it to them."""
        return self.given_A if self.given_A is not None else self.head.form()

    def __len__(self) -> int:
        return int(self.loss.shape[0])

    def to_frame(self) -> pd.DataFrame:
        """One row per sample, one column per entry of :data:`COLUMNS`; with per-layer shares also
        ``layer_trace:<module>`` = tr A_x^(l) = ‖∂f/∂θ_l‖²_F (not from the paper)."""
        columns = {name: getattr(self, name).detach().cpu().numpy() for name in COLUMNS}
        for layer, part in (self.per_layer or {}).items():
            columns[f"layer_trace:{layer}"] = part.diagonal(dim1=-2, dim2=-1).sum(-1).to(torch.float64).cpu().numpy()
        return pd.DataFrame(columns)

    @property
    def n_violations(self) -> int:
        """Samples where Theorem 3 fails beyond tolerance."""
        return int((~self.bound_holds).sum())


def measure_from(
    A: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    loss: torch.Tensor,
    *,
    simplex: bool,
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
    rank_rtol: float | None = None,
    gradient_norm_autograd: torch.Tensor | None = None,
    method: str = "auto",
    per_layer: dict[str, torch.Tensor] | None = None,
    extras: tuple[str, ...] = EXTRAS,
    head=None,
) -> Measurement:
    """Every per-sample quantity from the structural matrices and the prediction/target vectors.

    Args:
        A: (batch, C, C) structural matrices, any floating dtype (its dtype sets the rank tolerance); None when
            ``head`` is given (A is then formed only if an extra or a reader of ``Measurement.A`` needs it).
        p: (batch, C) predictions p = ∇Ω*(f).
        q: (batch, C) targets.
        loss: (batch,) per-sample loss values d_Ω(q, f).
        simplex: whether p and q lie on the simplex (enables the 1^⊥ columns; NaN otherwise).
        weights: (α, β, γ) of the structural error S = αG + βU + γL, each > 0.
        rank_rtol: λmin ≤ rank_rtol·λmax flags the sample; default C·eps(A.dtype).
        gradient_norm_autograd: (batch,) independent ‖g‖², stored as given.
        method: the engine method that produced A (recorded).
        per_layer: optional {module path: (batch, C, C)} shares of A, kept on the Measurement.
        extras: the extension columns to compute (:data:`EXTRAS`): ``"perp"`` (the 1^⊥ spectrum: a second
            eigendecomposition) and ``"gic"`` (the GIC diagnostics); the others are NaN.
        head: the engine's factors A = s·I + Q M Qᵀ of these A (:attr:`optmech.structure.StructuralMatrix.head`, a
            :class:`optmech.structure.head.LowRankHead`: ``scale`` s, ``basis`` Q in float64, ``core`` M, ``form()``):
            then ‖g‖² = s‖e‖² + (Qᵀe)ᵀ M (Qᵀe) and the spectrum come from them (:func:`head_spectrum`), all in
            float64, and A itself is read only by the extras.
    """
    unknown = set(extras) - set(EXTRAS)
    if unknown:
        raise ValueError(f"extras: expected a subset of {list(EXTRAS)}, got {sorted(unknown)} instead.")
    alpha, beta, gamma = (float(w) for w in weights)
    if min(alpha, beta, gamma) <= 0 or not all(math.isfinite(w) for w in (alpha, beta, gamma)):
        raise ValueError(f"weights: expected three finite positive numbers (α, β, γ), got {weights!r} instead.")
    n, C = p.shape
    dtype = A.dtype if A is not None else head.core.dtype
    p64, q64 = p.to(torch.float64), q.to(torch.float64)
    e = p64 - q64
    E_f = fitting_error(p64, q64)
    A64 = None
    if head is None:
        check_finite_structure(A)
        A64 = symmetric_float64(A)
        g2 = gradient_norm(A64, e)
        lam = eigvalsh(A64)
    else:
        head.check_finite()
        core = symmetric_float64(head.core)
        u = e @ head.basis  # Qᵀe, (n, d)
        g2 = head.scale.to(torch.float64) * (e * e).sum(1) + gradient_norm(core, u)
        lam = head_spectrum(head.scale, core, C)
    g2 = torch.clamp(g2, min=0.0)
    log_g2 = _log2(g2)
    lam_min, lam_max = lam[:, 0], lam[:, -1]
    deficient, U, L, lower, upper, holds = _bracket(lam_min, lam_max, g2, log_g2, E_f, C, dtype, rank_rtol)
    inf = torch.full_like(lam_min, math.inf)
    G = torch.where(deficient, inf, U - L)
    S = torch.where(deficient, inf, alpha * G + beta * U + gamma * L)

    nan = torch.full_like(lam_min, math.nan)
    if A64 is None and set(extras) & {"perp", "gic"}:
        A = head.form() if A is None else A
        A64 = symmetric_float64(A)
    if "perp" in extras and simplex and C > 1:  # the same bracket from A_x restricted to 1^⊥ (e ⊥ 1 on the simplex)
        lam_p = spectrum(_perp_basis(C, A64.device).T @ A64 @ _perp_basis(C, A64.device))
        lmin_p, lmax_p = lam_p[:, 0], lam_p[:, -1]
        _, _, _, lower_p, upper_p, holds_p = _bracket(lmin_p, lmax_p, g2, log_g2, E_f, C, dtype, rank_rtol)
    else:
        lmin_p = lmax_p = lower_p = upper_p = nan
        holds_p = torch.ones_like(holds)

    norm_ratio, max_cos = gic_diagnostics(A64) if "gic" in extras else (nan, nan)
    return Measurement(
        loss=loss.detach().to(torch.float64),
        fitting_error=E_f,
        log_fitting_error=_log2(E_f),
        gradient_norm=g2,
        log_gradient_norm=log_g2,
        lambda_min=lam_min,
        lambda_max=lam_max,
        U=U,
        L=L,
        G=G,
        structural_error=S,
        lower=lower,
        upper=upper,
        bound_holds=holds,
        rank_deficient=deficient,
        exact_fit=E_f == 0,
        predicted_class=p64.argmax(-1),
        target_class=q64.argmax(-1),
        lambda_min_perp=lmin_p,
        lambda_max_perp=lmax_p,
        lower_perp=lower_p,
        upper_perp=upper_p,
        bound_perp_holds=holds_p,
        gradient_norm_autograd=nan if gradient_norm_autograd is None else gradient_norm_autograd.to(torch.float64),
        gic_norm_ratio=norm_ratio,
        gic_max_cos=max_cos,
        given_A=A,
        eigenvalues=lam,
        method=method,
        weights=(alpha, beta, gamma),
        per_layer=per_layer,
        head=head,
    )


def local_pearson(a, b, window: int = 50, *, growing_from: int | None = None):
    """Windowed (local) Pearson correlation of two series (paper Figs 3, 8, 9; READING §1.6).

    r_t = Pearson(a[t−window+1 : t+1], b[t−window+1 : t+1]), reported at the window's last index t.
    Full windows only (r_t = NaN for t < window − 1), and NaN where either series has zero variance
    in the window (or a non-finite value). ``growing_from=k`` reproduces the authors' variant: for
    k ≤ t+1 < window the window is [0, t] (growing), so r_t is defined from t = k − 1 on.

    Args:
        a, b: 1-D sequences of equal length (numpy arrays, lists or tensors).
        window: the window length in records (the paper's 50).

    Returns:
        numpy array of r_t, same length as the inputs.
    """
    import numpy as np

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"local_pearson: expected two 1-D series of equal length, got shapes {x.shape} and {y.shape}.")
    if window < 2:
        raise ValueError(f"window: expected at least 2 records, got {window}.")
    out = np.full(x.shape, np.nan)
    start_t = window - 1 if growing_from is None else max(1, growing_from - 1)
    for t in range(start_t, len(x)):
        lo = max(0, t - window + 1)
        xs, ys = x[lo : t + 1], y[lo : t + 1]
        if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
            continue
        xc, yc = xs - xs.mean(), ys - ys.mean()
        denom = math.sqrt(float((xc * xc).sum()) * float((yc * yc).sum()))
        if denom > 0:
            out[t] = float((xc * yc).sum()) / denom
    return out


def local_pearson_rows(x, y, window: int = 50, *, growing_from: int | None = None):
    """:func:`local_pearson` of each row of ``x`` with the same row of ``y`` (for example one probe image
    per row): (n, T) arrays in, (n, T) array of r_t out, with the same windows and NaN rules.

    Full windows are computed for all rows at once; ``growing_from`` (the authors' growing windows)
    goes row by row through :func:`local_pearson`.
    """
    import numpy as np
    from numpy.lib.stride_tricks import sliding_window_view

    x, y = np.atleast_2d(np.asarray(x, dtype=np.float64)), np.atleast_2d(np.asarray(y, dtype=np.float64))
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"local_pearson_rows: expected two (n, T) arrays of equal shape, got {x.shape} and {y.shape}.")
    if growing_from is not None:
        return np.stack([local_pearson(a, b, window=window, growing_from=growing_from) for a, b in zip(x, y)])
    if window < 2:
        raise ValueError(f"window: expected at least 2 records, got {window}.")
    out = np.full(x.shape, np.nan)
    if x.shape[1] < window:
        return out
    xw, yw = sliding_window_view(x, window, axis=1), sliding_window_view(y, window, axis=1)
    xc, yc = xw - xw.mean(-1, keepdims=True), yw - yw.mean(-1, keepdims=True)
    den = np.sqrt((xc * xc).sum(-1) * (yc * yc).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        out[:, window - 1:] = np.where(den > 0, (xc * yc).sum(-1) / den, np.nan)
    return out
