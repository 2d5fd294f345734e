"""Compiling shoal's C kernels for the CPU at hand, once, cached by a hash of sources, flags and CPU.

Four builds of the same sources: AVX-512 (F, BW, VL, DQ, VNNI) with AMX's int8 tiles (Intel, from Sapphire
Rapids), AVX-512 alone, AVX2 + FMA + F16C, and portable C (any compiler, ARM included). A CPU flag is not proof
that an instruction runs (hypervisors hide some, and Linux grants AMX's tile state only on request), so before a
build is used, a probe compiled with the same flags is run in a child process; "auto" takes the widest that runs.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

logger = logging.getLogger("shoal")
HERE = Path(__file__).parent
SOURCES = [
    HERE / name
    for name in ("gemm.c", "gemm_int8.c", "paged_attention.c", "layer_ops.c", "layer.c", "experts.c")
]
HEADERS = [HERE / "simd_math.h", HERE / "kernels.h", HERE / "panel.h"]
BASE_FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
AVX512_FLAGS = [
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512dq",
    "-mavx512vnni",
    "-mavx2",
    "-mfma",
    "-mf16c",
]
ISA_FLAGS = {
    "amx": [*AVX512_FLAGS, "-mamx-tile", "-mamx-int8"],
    "avx512": AVX512_FLAGS,
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "portable": [],
}
X86_ONLY = ("amx", "avx512", "avx2")
# Executes an instruction of each extension the build may use; exits 0 only if all ran.
PROBE = r"""
#include <immintrin.h>
#include <string.h>
#ifdef __AMX_INT8__
#include <sys/syscall.h>
#include <unistd.h>
static int amx_runs(void) { /* the kernel grants the tile state, and a tile product of 2s and 3s gives 64 * 6 */
    struct { unsigned char palette, start, reserved[14]; unsigned short bytes[16]; unsigned char rows[16]; } c = {1};
    signed char a[16][64], b[16][64];
    int sums[16][16];
    if (syscall(SYS_arch_prctl, 0x1023, 18)) return 0;
    for (int t = 0; t < 3; t++) c.bytes[t] = 64, c.rows[t] = 16;
    memset(a, 2, sizeof a), memset(b, 3, sizeof b);
    _tile_loadconfig(&c);
    _tile_zero(0);
    _tile_loadd(1, a, 64);
    _tile_loadd(2, b, 64);
    _tile_dpbssd(0, 1, 2);
    _tile_stored(0, sums, 64);
    _tile_release();
    return sums[15][15] == 384;
}
#endif
int main(void) {
#ifdef __AMX_INT8__
    if (!amx_runs()) return 1;
#endif
    volatile float in[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
    float out[16];
#ifdef __AVX512F__
    __m512 v = _mm512_loadu_ps((const float *)in);
    __m512i w = _mm512_cvtepu8_epi32(_mm_set1_epi8(3));
    v = _mm512_fmadd_ps(v, _mm512_cvtepi32_ps(_mm512_srli_epi32(w, 1)), v);
    v = _mm512_add_ps(v, _mm512_cvtph_ps(_mm256_set1_epi16(0x3c00)));
    __m512i bytes = _mm512_add_epi8(w, _mm512_set1_epi8(0));                  /* AVX512BW */
    v = _mm512_and_ps(v, _mm512_castsi512_ps(_mm512_set1_epi32(-1)));          /* AVX512DQ */
    __m256 low = _mm256_max_ps(_mm512_castps512_ps256(v), _mm256_setzero_ps()); /* AVX512VL via -mavx512vl */
    v = _mm512_insertf32x8(v, low, 0);                                          /* AVX512DQ */
    v = _mm512_add_ps(v, _mm512_cvtepi32_ps(_mm512_sub_epi32(bytes, w)));
    v = _mm512_add_ps(v, _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, w))); /* VNNI: 3 * 3 */
    v = _mm512_sub_ps(v, _mm512_set1_ps(9.0f));
    _mm512_storeu_ps(out, v);
#else
    __m256 v = _mm256_loadu_ps((const float *)in);
    v = _mm256_fmadd_ps(v, _mm256_cvtph_ps(_mm_set1_epi16(0x3c00)), v);
    v = _mm256_add_ps(v, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set1_epi8(1))));
    _mm256_storeu_ps(out, v);
#endif
    return out[0] == 3.0f ? 0 : 1;
}
"""


def cache_dir() -> Path:
    base = os.environ.get("SHOAL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "shoal"
    )
    return Path(base).expanduser()


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next(line for line in text.splitlines() if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


def compiler() -> str | None:
    """The C compiler: $CC when it names one that exists, else cc or gcc on the PATH; None without one."""
    named = os.environ.get("CC")
    if named:
        return shutil.which(named)
    return shutil.which("cc") or shutil.which("gcc")


def candidate_isas() -> list[str]:
    """The builds worth trying on this machine, widest first."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
    return [isa for isa in ISA_FLAGS if x86 or isa not in X86_ONLY]


@cache
def isa_runs(isa: str) -> bool:
    """Whether code built with this ISA's flags runs here (tested by running a probe, not read from flags).
    The answer is kept in the cache directory, per CPU and flags."""
    if isa == "portable":
        return True
    if isa not in candidate_isas() or (cc := compiler()) is None:
        return False
    key = hashlib.sha256((PROBE + " ".join(ISA_FLAGS[isa]) + _cpu_signature()).encode()).hexdigest()[:16]
    marker = cache_dir() / f"probe-{isa}-{key}"
    for verdict in (True, False):
        if marker.with_suffix(".runs" if verdict else ".fails").exists():
            return verdict
    verdict = _run_probe(cc, isa)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.with_suffix(".runs" if verdict else ".fails").touch()
    except OSError:
        pass
    return verdict


def _run_probe(cc: str, isa: str) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = Path(tmp) / "probe.c", Path(tmp) / "probe"
        source.write_text(PROBE)
        built = subprocess.run(
            [cc, "-O1", *ISA_FLAGS[isa], str(source), "-o", str(binary)], capture_output=True
        )
        if built.returncode != 0:
            return False
        try:
            return subprocess.run([str(binary)], capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False


def best_isa() -> str:
    return next(isa for isa in candidate_isas() if isa_runs(isa))


def release_openmp_team() -> None:
    """omp_pause_resource_all(omp_pause_soft) in the process's OpenMP runtime (torch's libgomp, which the
    kernels share: same soname): the calling thread's idle team exits. A no-op where there is none."""
    try:
        runtime = ctypes.CDLL("libgomp.so.1")
        runtime.omp_pause_resource_all(1)
    except (OSError, AttributeError):
        pass


@cache
def load_library(isa: str) -> ctypes.CDLL | None:
    """The kernels built for `isa` ("avx512", "avx2", "portable"), or None when they cannot be built or run."""
    if isa not in ISA_FLAGS:
        raise ValueError(f"unknown kernel build {isa!r}; choose one of {sorted(ISA_FLAGS)}")
    if not isa_runs(isa):
        return None
    cc = compiler()
    if cc is None:
        logger.warning(
            "no C compiler found: using slower torch kernels (install gcc for shoal's CPU kernels)"
        )
        return None
    try:
        source = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    except OSError as exc:
        logger.warning("shoal's C kernel sources are missing (%s): using slower torch kernels", exc)
        return None
    flags = BASE_FLAGS + ISA_FLAGS[isa]
    key = hashlib.sha256(source + " ".join(flags).encode() + _cpu_signature().encode()).hexdigest()[:16]
    library = cache_dir() / f"shoal-kernels-{isa}-{key}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
            built = Path(tmp) / library.name
            error = _compile(cc, flags, Path(tmp), built)
            if error is not None:
                logger.warning("building shoal's C kernels (%s) failed:\n%s", isa, error)
                return None
            os.replace(built, library)  # atomic: concurrent builders never load half a file
    return ctypes.CDLL(str(library))


def _compile(cc: str, flags: list[str], tmp: Path, library: Path) -> str | None:
    """Every source compiled at once, each by a process of its own (the two GEMM files take most of the
    time), then linked. Returns the compiler's error text, or None."""
    objects = [tmp / (source.stem + ".o") for source in SOURCES]
    compiling = [
        subprocess.Popen([cc, *flags, "-c", str(src), "-o", str(obj)], stderr=subprocess.PIPE, text=True)
        for src, obj in zip(SOURCES, objects, strict=True)
    ]
    errors = [process.communicate()[1] for process in compiling]
    if any(process.returncode for process in compiling):
        return "\n".join(e for p, e in zip(compiling, errors, strict=True) if p.returncode)
    linked = subprocess.run(
        [cc, *flags, *map(str, objects), "-o", str(library), "-lm"], capture_output=True, text=True
    )
    return linked.stderr if linked.returncode else None
