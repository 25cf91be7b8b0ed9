"""Numeric self-checks for the fast-BLAS shim (see skulk.engine.accel).

Theory of operation: a forwarding shim can go wrong in ways that still run,
such as a swapped transpose flag, a truncated integer, a stride in the wrong
layout. Each would give O(1) errors, while a correct f32 gemm over k <= 64
standard-normal terms errs by ~1e-6 of the result's scale. So both checks
compare against numpy in float64 on deliberately awkward shapes with a
tolerance far between the two, and report the first failures as one line.

``check_direct`` calls the shim's entry points through ctypes (before mlx
binds to it); ``check_mlx`` imports mlx.core (after the shim is global) and
also proves, with the shim's call counter, that mlx's matmuls go through it.
Both return None when sane, else a one-line description; neither raises for a
numeric failure.
"""

from __future__ import annotations

import ctypes
from typing import Any

__all__ = ["check_direct", "check_mlx"]

# CBLAS enums (cblas.h).
_ROW_MAJOR, _COL_MAJOR = 101, 102
_NO_TRANS, _TRANS = 111, 112
# Max |C - C_ref| / max(1, max |C_ref|), with C_ref computed in float64.
_TOLERANCE = {"float32": 1e-4, "float64": 1e-10, "complex64": 1e-4}


def _relative_error(got: Any, want: Any) -> float:
    import numpy as np

    if got.shape != want.shape or not np.all(np.isfinite(got)):
        return float("inf")
    scale = max(1.0, float(np.max(np.abs(want))))
    return float(np.max(np.abs(got.astype(want.dtype) - want))) / scale


def check_direct(shim: ctypes.CDLL) -> str | None:
    """Call the shim's gemm entries via ctypes on awkward shapes; None if sane."""
    import numpy as np

    rng = np.random.default_rng(20240601)
    fails: list[str] = []
    cases = [  # (order, trans_a, trans_b, m, n, k)
        (_ROW_MAJOR, _NO_TRANS, _NO_TRANS, 37, 29, 53),
        (_ROW_MAJOR, _TRANS, _NO_TRANS, 17, 64, 33),
        (_COL_MAJOR, _NO_TRANS, _TRANS, 40, 7, 61),
        (_ROW_MAJOR, _NO_TRANS, _NO_TRANS, 1, 96, 64),  # decode-shaped (gemv-like)
    ]
    specs = [
        ("cblas_sgemm", np.float32, ctypes.c_float),
        ("cblas_dgemm", np.float64, ctypes.c_double),
        ("cblas_cgemm", np.complex64, None),
    ]
    for name, dtype, scalar in specs:
        fn = getattr(shim, name)
        vp, ci = ctypes.c_void_p, ctypes.c_int
        if scalar is None:
            fn.argtypes = [ci, ci, ci, ci, ci, ci, vp, vp, ci, vp, ci, vp, vp, ci]
        else:
            fn.argtypes = [ci, ci, ci, ci, ci, ci, scalar, vp, ci, vp, ci, scalar, vp, ci]
        fn.restype = None
        for order, ta, tb, m, n, k in cases:
            def draw(rows: int, cols: int) -> Any:
                x = rng.standard_normal((rows, cols))
                if dtype is np.complex64:
                    x = x + 1j * rng.standard_normal((rows, cols))
                return x.astype(dtype)

            a = draw(k, m) if ta == _TRANS else draw(m, k)
            b = draw(n, k) if tb == _TRANS else draw(k, n)
            c = draw(m, n)
            op_a = a.T if ta == _TRANS else a
            op_b = b.T if tb == _TRANS else b
            alpha, beta = (0.5, 0.25) if scalar is not None else (0.5 - 0.25j, 0.25 + 0.5j)
            wide = np.complex128 if dtype is np.complex64 else np.float64
            want = alpha * (op_a.astype(wide) @ op_b.astype(wide)) + beta * c.astype(wide)
            layout = "C" if order == _ROW_MAJOR else "F"
            a, b, c = (np.asarray(x, order=layout) for x in (a, b, c))
            lead = (lambda x: x.shape[1]) if order == _ROW_MAJOR else (lambda x: x.shape[0])
            if scalar is None:
                al = np.array([alpha], dtype=np.complex64)
                be = np.array([beta], dtype=np.complex64)
                s_alpha, s_beta = al.ctypes.data, be.ctypes.data
            else:
                s_alpha, s_beta = alpha, beta
            fn(order, ta, tb, m, n, k, s_alpha, a.ctypes.data, lead(a), b.ctypes.data, lead(b),
               s_beta, c.ctypes.data, lead(c))
            err = _relative_error(c, want)
            if not err <= _TOLERANCE[np.dtype(dtype).name]:
                fails.append(f"{name} m={m} n={n} k={k} order={order} trans={ta},{tb}: error {err:.3g}")
    return "; ".join(fails) if fails else None


def check_mlx(shim: ctypes.CDLL) -> str | None:
    """Import mlx.core and check its matmuls go through the shim and are right."""
    import numpy as np

    try:
        import mlx.core as mx
    except Exception as exc:  # a broken mlx fails the caller's import too
        return f"import mlx.core failed: {exc!r}"
    rng = np.random.default_rng(7)
    cpu = mx.cpu
    f32_cases = [  # (a, b, how) -> mlx computes a @ b in float32
        (rng.standard_normal((37, 53)), rng.standard_normal((53, 29)), "plain"),
        (rng.standard_normal((53, 17)).T, rng.standard_normal((53, 64)), "transposed a"),
        (rng.standard_normal((3, 11, 24)), rng.standard_normal((3, 24, 9)), "batched"),
        (rng.standard_normal((1, 64)), rng.standard_normal((96, 64)).T, "decode row"),
    ]
    before = int(shim.skulk_blas_calls())
    fails: list[str] = []
    for a, b, how in f32_cases:
        want = a @ b
        got = np.array(mx.matmul(mx.array(a.astype(np.float32)), mx.array(b.astype(np.float32)), stream=cpu))
        err = _relative_error(got, want)
        if not err <= _TOLERANCE["float32"]:
            fails.append(f"float32 {how}: error {err:.3g}")
    if int(shim.skulk_blas_calls()) < before + len(f32_cases):
        return "mlx did not call cblas_sgemm through the shim"
    # float64 and complex64 matmul exist on mlx's CPU backend only in newer
    # releases; check them where they run.
    a, b = rng.standard_normal((19, 31)), rng.standard_normal((31, 23))
    for dtype, lhs in (("float64", a), ("complex64", a + 0.5j * rng.standard_normal(a.shape))):
        want = lhs @ b
        try:
            kind = getattr(mx, dtype)  # mx.array() would narrow float64 input to float32
            got = np.array(mx.matmul(mx.array(lhs, dtype=kind), mx.array(b, dtype=kind), stream=cpu))
        except Exception:
            continue
        err = _relative_error(got, want)
        if not err <= _TOLERANCE[dtype]:
            fails.append(f"{dtype}: error {err:.3g}")
    return "; ".join(fails) if fails else None
