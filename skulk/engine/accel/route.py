"""Route MLX's CPU matmuls to an optimized BLAS on Linux.

Theory of operation
-------------------
The Linux ``mlx[cpu]`` wheel's ``libmlx.so`` imports ``cblas_sgemm``,
``cblas_dgemm`` and ``cblas_cgemm`` as undefined dynamic symbols and finds them
in a bundled reference (netlib) ``libblas``, which runs an f32 matmul at a few
GFLOP/s. The dynamic linker resolves such a symbol in the process's global
scope before the library's own dependencies, so a library that defines those
names and is loaded with ``RTLD_GLOBAL`` before ``import mlx.core`` wins.

``enable_fast_blas`` therefore:

1. checks, by reading libmlx.so's ELF tables (``elf``), that mlx really
   imports ``cblas_sgemm`` dynamically, and finds the reference library it
   would bind to;
2. loads an OpenBLAS shipped by a PyPI wheel (``scipy-openblas32``, else a
   ``scipy-openblas64`` or numpy's own bundled copy) with ``RTLD_LOCAL``: its
   symbols are prefixed (``scipy_cblas_sgemm``) and must not leak;
3. builds, once, a tiny dependency-free C shim (``shim.c``) with the
   system C compiler into a cache under ``skulk.paths.data_dir()``, loads it
   locally, binds the OpenBLAS and reference function addresses into it, and
   checks it against numpy through ctypes (``check``);
4. only then promotes the shim to the global scope, imports ``mlx.core``, and
   checks that mlx's matmuls go through the shim (a call counter) and agree
   with numpy. On failure the shim is switched to the reference functions,
   which is exactly what mlx would have called without it.

Invariants: ``enable_fast_blas`` never raises and never leaves mlx bound to an
unverified BLAS; it is idempotent (the first status is returned thereafter);
it writes nothing to stdout, stderr or the log (the caller reports the status).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from skulk.core.records import Record
from skulk.engine.accel.check import check_direct, check_mlx
from skulk.engine.accel.elf import ElfError, read_dynamic
from skulk.paths import data_dir

__all__ = ["OPT_OUT_ENV", "BlasStatus", "enable_fast_blas", "fast_blas_calls", "shim_cache_dir"]

OPT_OUT_ENV = "SKULK_FAST_BLAS"
"""``0``/``off``/``false``/``no`` disable; ``1``/``auto``/unset pick the first
usable backend; a backend name (``scipy-openblas32``, ``scipy-openblas64``,
``numpy-openblas64``) insists on that one."""

REFERENCE_BACKEND = "mlx-reference"
_GEMM_NAMES = ("cblas_sgemm", "cblas_dgemm", "cblas_cgemm")
_SHIM_SOURCE = Path(__file__).with_name("shim.c")
_SHIM_ABI = 1
_CFLAGS = ("-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-std=c11")
_COMPILE_TIMEOUT_S = 120.0
_OFF_VALUES = frozenset({"0", "off", "false", "no", "disable", "disabled"})
_AUTO_VALUES = frozenset({"", "1", "on", "true", "yes", "auto"})
_BACKENDS = ("scipy-openblas32", "scipy-openblas64", "numpy-openblas64")


class BlasStatus(Record, frozen=True, kw_only=True):
    """Which BLAS MLX's CPU matmuls use in this process, and why.

    ``active`` is True only when mlx's gemm calls were seen to go through the
    optimized library and agreed with numpy. ``backend`` names the library in
    use (``mlx-reference`` when inactive); ``reason`` says why, in one line;
    ``threads`` is the optimized library's thread count (0 when inactive);
    ``library`` its path ("" when inactive).
    """

    active: bool
    backend: str
    reason: str
    threads: int = 0
    library: str = ""


@dataclass(frozen=True, slots=True)
class _Candidate:
    """An optimized BLAS shipped in a wheel, with its symbol naming."""

    backend: str
    path: Path
    prefix: str
    suffix: str
    ilp64: bool

    def symbol(self, name: str) -> str:
        return f"{self.prefix}{name}{self.suffix}"


class _Unavailable(Exception):
    """A step found fast BLAS unusable; the message becomes the reason."""


_lock = threading.Lock()
_status: BlasStatus | None = None
_shim: ctypes.CDLL | None = None
_shim_file: Path | None = None
# ctypes handles stay referenced for the life of the process: the shim holds
# raw function addresses into them.
_keepalive: list[ctypes.CDLL] = []


def enable_fast_blas() -> BlasStatus:
    """Make MLX's CPU gemm use an optimized BLAS; call before ``import mlx.core``.

    Returns a ``BlasStatus``. Never raises: on any obstacle (not Linux, opted
    out with ``SKULK_FAST_BLAS=0``, mlx already imported, no optimized BLAS
    wheel, no C compiler and no cached shim, a failing symbol or numeric check)
    MLX keeps its own BLAS and ``reason`` says why. Idempotent and thread-safe:
    later calls return the first call's status. Respects
    ``OPENBLAS_NUM_THREADS`` (then ``OMP_NUM_THREADS``); otherwise uses one
    thread per CPU this process may run on.
    """
    global _status
    with _lock:
        if _status is None:
            try:
                _status = _enable()
            except Exception as exc:  # the contract is: never raise
                _revert_to_reference()
                _status = _inactive(f"unexpected error while enabling fast BLAS: {exc!r}")
            assert _status.active == (_status.backend != REFERENCE_BACKEND)
        return _status


def fast_blas_calls() -> int:
    """Number of gemm calls forwarded by the shim so far (0 when not loaded)."""
    return int(_shim.skulk_blas_calls()) if _shim is not None else 0


def shim_cache_dir() -> Path:
    """Directory holding compiled shims (one file per source/platform key)."""
    return data_dir() / "cache" / "blas"


def _inactive(reason: str) -> BlasStatus:
    return BlasStatus(active=False, backend=REFERENCE_BACKEND, reason=reason)


def _enable() -> BlasStatus:
    choice = os.environ.get(OPT_OUT_ENV, "").strip().lower()
    if choice in _OFF_VALUES:
        return _inactive(f"disabled by {OPT_OUT_ENV}={os.environ[OPT_OUT_ENV]}")
    if not sys.platform.startswith("linux"):
        return _inactive(f"not Linux ({sys.platform}): mlx uses the platform's own BLAS")
    if "mlx.core" in sys.modules:
        return _inactive("mlx.core was imported before enable_fast_blas(); call it first")
    try:
        reference = _reference_library()
        candidates = _candidates(choice)
        shim = _load_shim()
        failures: list[str] = []
        for candidate in candidates:
            try:
                threads, config = _bind(shim, candidate, reference)
            except _Unavailable as exc:
                failures.append(f"{candidate.backend}: {exc}")
                continue
            break
        else:
            raise _Unavailable("; ".join(failures) or "no optimized BLAS found")
        _promote(shim)
        error = check_mlx(shim)
        if error is not None:
            _revert_to_reference()
            return _inactive(f"{candidate.backend} failed the mlx self-check ({error}); using mlx's BLAS")
    except _Unavailable as exc:
        # A candidate that failed its direct check may still be bound in the
        # (local, unused) shim; leave nothing selected that failed a check.
        _revert_to_reference()
        return _inactive(str(exc))
    return BlasStatus(
        active=True,
        backend=candidate.backend,
        reason=f"mlx gemm routed to {config}; self-check against numpy passed",
        threads=threads,
        library=str(candidate.path),
    )


# --- what mlx binds to --------------------------------------------------------


def _package_dir(name: str) -> Path | None:
    """A package's directory, found without importing (executing) it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def _reference_library() -> ctypes.CDLL:
    """The library mlx takes ``cblas_sgemm`` from, loaded locally.

    Raises ``_Unavailable`` when mlx is missing, carries its own BLAS, or the
    providing library cannot be found among its DT_NEEDED entries.
    """
    mlx_dir = _package_dir("mlx")
    if mlx_dir is None:
        raise _Unavailable("mlx is not installed")
    # Current wheels keep the code in lib/libmlx.so; older or source builds may
    # link it into the extension module itself.
    objects = sorted((mlx_dir / "lib").glob("libmlx*.so*")) + sorted(mlx_dir.glob("core*.so"))
    for obj in objects:
        try:
            dyn = read_dynamic(obj)
        except (OSError, ElfError):
            continue
        if "cblas_sgemm" in dyn.exports:
            raise _Unavailable(f"{obj.name} contains its own cblas_sgemm (statically linked BLAS)")
        if "cblas_sgemm" not in dyn.imports:
            continue
        search = [Path(p.replace("$ORIGIN", str(obj.parent))) for p in (*dyn.rpath, *dyn.runpath)]
        for name in dyn.needed:
            for directory in search:
                path = directory / name
                try:
                    provides = "cblas_sgemm" in read_dynamic(path).exports
                except (OSError, ElfError):
                    continue
                if provides:
                    return _load_local(path, "mlx's reference BLAS")
        # Not beside mlx: let the system loader find a BLAS-looking dependency.
        for name in dyn.needed:
            if "blas" in name.lower():
                try:
                    lib = ctypes.CDLL(name, mode=os.RTLD_NOW | os.RTLD_LOCAL)
                except OSError:
                    continue
                if hasattr(lib, "cblas_sgemm"):
                    _keepalive.append(lib)
                    return lib
        raise _Unavailable(f"cannot find the library that provides cblas_sgemm to {obj.name}")
    raise _Unavailable("mlx does not import cblas_sgemm dynamically; a shim cannot redirect it")


def _load_local(path: Path, what: str) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(str(path), mode=os.RTLD_NOW | os.RTLD_LOCAL)
    except OSError as exc:
        raise _Unavailable(f"cannot load {what} {path}: {exc}") from exc
    _keepalive.append(lib)
    return lib


# --- optimized BLAS candidates ------------------------------------------------


def _candidates(choice: str) -> list[_Candidate]:
    """Optimized BLAS libraries present in this environment, best first."""
    found: list[_Candidate] = []
    wheel32 = _package_dir("scipy_openblas32")
    if wheel32 is not None:
        for path in sorted((wheel32 / "lib").glob("libscipy_openblas*.so*")):
            found.append(_Candidate("scipy-openblas32", path, "scipy_", "", ilp64=False))
    wheel64 = _package_dir("scipy_openblas64")
    if wheel64 is not None:
        for path in sorted((wheel64 / "lib").glob("libscipy_openblas64_*.so*")):
            found.append(_Candidate("scipy-openblas64", path, "scipy_", "64_", ilp64=True))
    numpy_dir = _package_dir("numpy")
    if numpy_dir is not None:
        for path in sorted((numpy_dir.parent / "numpy.libs").glob("libscipy_openblas64_*.so*")):
            found.append(_Candidate("numpy-openblas64", path, "scipy_", "64_", ilp64=True))
    if choice not in _AUTO_VALUES:
        if choice not in _BACKENDS:
            raise _Unavailable(
                f"{OPT_OUT_ENV}={choice} is not 0, 1, auto or a backend name ({', '.join(_BACKENDS)})"
            )
        wanted = [c for c in found if c.backend == choice]
        if not wanted:
            raise _Unavailable(f"{OPT_OUT_ENV}={choice}: that backend is not installed")
        return wanted
    if not found:
        raise _Unavailable("no optimized BLAS wheel found (install scipy-openblas32)")
    return found


def _thread_count() -> int:
    """OPENBLAS_NUM_THREADS, then OMP_NUM_THREADS, else the usable CPU count."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _address(lib: ctypes.CDLL, name: str) -> int | None:
    try:
        return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
    except AttributeError:
        return None


def _bind(shim: ctypes.CDLL, candidate: _Candidate, reference: ctypes.CDLL) -> tuple[int, str]:
    """Bind ``candidate`` into the (still local) shim and check it via ctypes.

    Returns (threads, description). Raises ``_Unavailable`` if a symbol is
    missing or the direct numeric check fails.
    """
    lib = _load_local(candidate.path, candidate.backend)
    fast = [_address(lib, candidate.symbol(name)) for name in _GEMM_NAMES]
    ref = [_address(reference, name) for name in _GEMM_NAMES]
    if fast[0] is None:
        raise _Unavailable(f"{candidate.path.name} lacks {candidate.symbol('cblas_sgemm')}")
    if ref[0] is None:
        raise _Unavailable("mlx's reference BLAS lacks cblas_sgemm")
    # Every entry mlx could call must be forwardable on the fast side too.
    for name, f, r in zip(_GEMM_NAMES, fast, ref):
        if r is not None and f is None:
            raise _Unavailable(f"{candidate.path.name} lacks {candidate.symbol(name)}")
    voidp = ctypes.c_void_p
    shim.skulk_blas_bind.argtypes = [ctypes.c_int, voidp, voidp, voidp, voidp, voidp, voidp]
    shim.skulk_blas_bind.restype = ctypes.c_int
    if shim.skulk_blas_bind(int(candidate.ilp64), *fast, *ref) != 0:
        raise _Unavailable("shim refused the function table")

    threads = _thread_count()
    setter = getattr(lib, candidate.symbol("openblas_set_num_threads"), None)
    if setter is not None:
        setter.argtypes, setter.restype = [ctypes.c_int], None
        setter(threads)
    getter = getattr(lib, candidate.symbol("openblas_get_num_threads"), None)
    if getter is not None:
        getter.argtypes, getter.restype = [], ctypes.c_int
        threads = int(getter())
    config_fn = getattr(lib, candidate.symbol("openblas_get_config"), None)
    config = candidate.backend
    if config_fn is not None:
        config_fn.argtypes, config_fn.restype = [], ctypes.c_char_p
        raw = config_fn()
        if raw:
            described = " ".join(raw.decode("utf-8", "replace").split())
            config = f"{candidate.backend} ({described}; {threads} thread{'' if threads == 1 else 's'})"

    error = check_direct(shim)
    if error is not None:
        raise _Unavailable(f"direct gemm check failed: {error}")
    return threads, config


# --- the shim -----------------------------------------------------------------


def _compiler() -> list[str]:
    """The C compiler command: $CC when set, else cc, gcc or clang on PATH."""
    value = os.environ.get("CC", "").strip()
    if value:
        argv = shlex.split(value)
        resolved = shutil.which(argv[0])
        if resolved is None:
            raise _Unavailable(f"no cached shim and the compiler CC={value} was not found")
        return [resolved, *argv[1:]]
    for name in ("cc", "gcc", "clang"):
        resolved = shutil.which(name)
        if resolved is not None:
            return [resolved]
    raise _Unavailable("no cached shim and no C compiler (cc, gcc, clang) on PATH; set CC")


def _shim_path() -> Path:
    source = _SHIM_SOURCE.read_bytes()
    # The shim links against nothing and learns every address at run time, so
    # only its source, the target and the flags decide the binary; an OpenBLAS
    # or mlx upgrade needs no rebuild.
    key = hashlib.sha256(
        b"\0".join([source, platform.machine().encode(), sys.platform.encode(), " ".join(_CFLAGS).encode()])
    ).hexdigest()[:20]
    return shim_cache_dir() / f"skulk_blas_shim-{key}.so"


def _build(target: Path) -> None:
    """Compile the shim to ``target`` atomically (temp file, then rename)."""
    compiler = _compiler()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise _Unavailable(f"cannot write the shim cache {target.parent}: {exc}") from exc
    tmp = Path(tmp_name)
    try:
        argv = [*compiler, *_CFLAGS, "-o", str(tmp), str(_SHIM_SOURCE)]
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_COMPILE_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise _Unavailable(f"compiling the shim with {compiler[0]} failed: {exc}") from exc
        if done.returncode != 0:
            tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise _Unavailable(f"compiling the shim with {compiler[0]} failed (exit {done.returncode}): {tail}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _load_shim() -> ctypes.CDLL:
    """Load the cached shim locally, building it first if absent or stale."""
    global _shim, _shim_file
    if _shim is not None:
        return _shim
    if not _SHIM_SOURCE.is_file():
        raise _Unavailable(f"shim source {_SHIM_SOURCE} is missing from the installation")
    target = _shim_path()
    for attempt in range(2):
        if attempt == 1 or not target.is_file():
            _build(target)
        try:
            lib = ctypes.CDLL(str(target), mode=os.RTLD_NOW | os.RTLD_LOCAL)
            lib.skulk_blas_abi.restype = ctypes.c_int
            if lib.skulk_blas_abi() == _SHIM_ABI:
                break
            load_error = f"ABI {lib.skulk_blas_abi()} != {_SHIM_ABI}"
        except (OSError, AttributeError) as exc:
            load_error = str(exc)
        if attempt == 1:
            raise _Unavailable(f"freshly built shim {target} is unusable: {load_error}")
        # A corrupt or foreign file under our name: rebuild it once.
        target.unlink(missing_ok=True)
    lib.skulk_blas_calls.restype = ctypes.c_uint64
    lib.skulk_blas_select.argtypes, lib.skulk_blas_select.restype = [ctypes.c_int], ctypes.c_int
    lib.skulk_blas_selected.restype = ctypes.c_int
    _shim, _shim_file = lib, target
    return lib


def _promote(shim: ctypes.CDLL) -> None:
    """Put the already loaded, bound and checked shim into the global scope."""
    assert shim.skulk_blas_selected() == 1, "promote only a bound shim on the fast table"
    assert _shim_file is not None and shim is _shim
    try:
        # RTLD_NOLOAD: re-open the very object already loaded (and bound),
        # changing only its scope; never a second copy.
        ctypes.CDLL(str(_shim_file), mode=os.RTLD_NOW | os.RTLD_GLOBAL | os.RTLD_NOLOAD)
    except OSError as exc:
        raise _Unavailable(f"cannot make the shim global: {exc}") from exc


def _revert_to_reference() -> None:
    if _shim is not None and _shim.skulk_blas_selected() == 1:
        _shim.skulk_blas_select(0)
