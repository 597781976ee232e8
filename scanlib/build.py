"""Build the compiled CUDA backend: ``csrc/`` (package ``scanlib_csrc``) into a shared library.

    python -m scanlib.build [--arch sm_90] [--force] [--nvcc PATH] [--jobs N]

The kernels are plain CUDA C++ behind a C ABI (``csrc/scanlib_cuda.h``), loaded with ctypes, so
one build serves every torch version. The library goes to a cache folder keyed by the source
hash, the nvcc version and the GPU architecture::

    $SCANLIB_CACHE_DIR (default ~/.cache/scanlib/cuda) / sm_90-<source hash>-cuda13.0.88 /
        libscanlib_cuda.so   build.json   build.log

The ``cuda`` backend calls :func:`ensure_library` on first use, which builds when nvcc is found
(set ``SCANLIB_CUDA_AUTOBUILD=0`` to forbid that). ``SCANLIB_NVCC`` or ``CUDA_HOME`` pick the
compiler; ``SCANLIB_CUDA_LIB`` points the backend at a library built elsewhere.

The same sources also compile with a host C++ compiler into a CPU emulation of the kernels
(:func:`build_emulation`), which the tests use to check the kernels' logic without a GPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from .errors import ScanlibError

logger = logging.getLogger(__name__)

LIB_NAME = "libscanlib_cuda.so"
EMU_LIB_NAME = "libscanlib_emu.so"
ENV_CACHE = "SCANLIB_CACHE_DIR"
ENV_NVCC = "SCANLIB_NVCC"
ENV_LIB = "SCANLIB_CUDA_LIB"
ENV_AUTOBUILD = "SCANLIB_CUDA_AUTOBUILD"

#: accuracy matters more than the last few percent here: no --use_fast_math (the kernels call
#: the fast exp2 themselves); -lineinfo costs nothing at run time and helps profilers
NVCC_FLAGS = ("-O3", "-std=c++17", "-lineinfo", "-DNDEBUG", "-Xcompiler", "-fPIC")
CXX_FLAGS = ("-O2", "-std=c++17", "-fPIC", "-fno-strict-aliasing", "-DSCANLIB_EMULATE")
SOURCE_SUFFIXES = (".cu", ".cuh", ".h")


class CudaBuildError(ScanlibError, RuntimeError):
    """Compiling or linking ``csrc/`` failed; the message names the command and how to retry."""


# ---------------------------------------------------------------------- sources and tools
def source_dir() -> Path:
    """The folder of the CUDA sources (the installed ``scanlib_csrc`` package)."""
    import scanlib_csrc

    return Path(scanlib_csrc.__file__).resolve().parent


def _is_emulation_only(path: Path) -> bool:
    return path.name.startswith("emulation")


def gpu_sources(src: Path | None = None) -> list[Path]:
    """The translation units of the GPU library (the emulation runtime is left out)."""
    src = src or source_dir()
    return sorted(p for p in src.glob("*.cu") if not _is_emulation_only(p))


def source_hash(src: Path | None = None) -> str:
    """sha256 over the names and contents of every source and header."""
    src = src or source_dir()
    files = sorted(q for q in src.iterdir() if q.suffix in SOURCE_SUFFIXES)
    # the backend asks on every selection until the library is loaded: hash only what changed
    stamp = tuple((q.name, q.stat().st_size, q.stat().st_mtime_ns) for q in files)
    return _hash_files(str(src), stamp)


@cache
def _hash_files(src: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    for name, _size, _mtime in stamp:
        h.update(name.encode() + b"\0" + (Path(src) / name).read_bytes() + b"\0")
    return h.hexdigest()


def find_nvcc() -> str | None:
    """nvcc from ``SCANLIB_NVCC``, ``CUDA_HOME``/``CUDA_PATH``, PATH or /usr/local/cuda."""
    env = os.environ.get(ENV_NVCC)
    if env:
        return env if Path(env).exists() else shutil.which(env)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").exists():
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


@cache
def nvcc_version(nvcc: str) -> str:
    """E.g. ``"13.0.88"`` (from ``nvcc --version``)."""
    try:
        text = subprocess.run(
            [nvcc, "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise CudaBuildError(f"cannot run {nvcc} --version: {e}") from e
    m = re.search(r"V(\d+\.\d+\.\d+)", text) or re.search(r"release (\d+\.\d+)", text)
    if not m:
        raise CudaBuildError(f"cannot read the CUDA version from `{nvcc} --version`:\n{text}")
    return m.group(1)


@cache
def cuda_include_dir(nvcc: str) -> str | None:
    """The toolkit's include folder (for cuda_fp16.h in the CPU emulation build)."""
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for m in re.finditer(r'-I"?([^"\s]+)', out.stdout + out.stderr):
        if (Path(m.group(1)) / "cuda_fp16.h").exists():
            return m.group(1)
    guess = Path(nvcc).resolve().parent.parent / "include"
    return str(guess) if (guess / "cuda_fp16.h").exists() else None


def normalize_arch(arch: str) -> str:
    """``"sm_90"``, ``"90"``, ``"9.0"``, ``"sm90"``, ``"compute_90"`` -> ``"sm_90"`` (``"sm_90a"`` kept)."""
    a = arch.strip().lower()
    m = re.fullmatch(r"(?:sm_?|compute_?)?(\d+)\.?(\d*)([af]?)", a)
    if not m:
        raise ValueError(f"cannot read the GPU architecture {arch!r}; expected e.g. sm_90 or 9.0")
    major, minor, suffix = m.groups()
    digits = major + minor if minor or len(major) == 1 else major
    if len(digits) < 2:
        raise ValueError(f"cannot read the GPU architecture {arch!r}; expected e.g. sm_90 or 9.0")
    return f"sm_{digits}{suffix}"


def local_arch(device: int | None = None) -> str:
    """Architecture of a visible GPU (``torch.cuda.get_device_capability``)."""
    import torch

    if not torch.cuda.is_available():
        raise CudaBuildError(
            "no CUDA device is visible, so the architecture is unknown: pass it, e.g. "
            "`python -m scanlib.build --arch sm_90`"
        )
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def gencode(arch: str) -> list[str]:
    num = arch[len("sm_") :]
    return ["-gencode", f"arch=compute_{num},code=sm_{num}"]


def cache_root() -> Path:
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "scanlib" / "cuda"


def build_dir(arch: str, nvcc_ver: str, src: Path | None = None, root: Path | None = None) -> Path:
    key = hashlib.sha256((source_hash(src) + "\0" + " ".join(NVCC_FLAGS)).encode()).hexdigest()[:16]
    return (root or cache_root()) / f"{arch}-{key}-cuda{nvcc_ver}"


def find_library(arch: str, *, nvcc: str | None = None, src: Path | None = None) -> Path | None:
    """The cached library for ``arch`` and the current sources, or None. Without nvcc, any
    toolkit's build of these sources is accepted."""
    arch = normalize_arch(arch)
    nvcc = nvcc or find_nvcc()
    if nvcc is not None:
        lib = build_dir(arch, nvcc_version(nvcc), src) / LIB_NAME
        return lib if lib.exists() else None
    prefix = build_dir(arch, "", src).name  # "<arch>-<key>-cuda"
    root = cache_root()
    found = (
        sorted(root.glob(prefix + "*/" + LIB_NAME), key=lambda p: p.stat().st_mtime)
        if root.exists()
        else []
    )
    return found[-1] if found else None


# ---------------------------------------------------------------------- running the compiler
def _quote(cmd: Sequence[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def _retry_hint(arch: str | None) -> str:
    arch_opt = f" --arch {arch}" if arch else ""
    return (
        f"Retry with: python -m scanlib.build --force{arch_opt}   "
        f"(set {ENV_NVCC} or CUDA_HOME to use another nvcc)"
    )


def _run(cmd: list[str], log: list[str], arch: str | None, log_path: Path | None) -> None:
    log.append("$ " + _quote(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise CudaBuildError(
            f"building the scanlib CUDA library failed: cannot run the command\n  $ {_quote(cmd)}\n"
            f"{e}\n{_retry_hint(arch)}"
        ) from e
    output = (proc.stdout + proc.stderr).strip()
    if output:
        log.append(output)
    if proc.returncode != 0:
        tail = "\n".join(output.splitlines()[-40:])
        where = f"Full log: {log_path}\n" if log_path else ""
        raise CudaBuildError(
            f"building the scanlib CUDA library failed (exit status {proc.returncode}) in the command\n"
            f"  $ {_quote(cmd)}\n{tail}\n{where}{_retry_hint(arch)}"
        )


def _run_all(
    cmds: list[list[str]], jobs: int, log: list[str], arch: str | None, log_path: Path | None
) -> None:
    """Run independent commands, ``jobs`` at a time; the first failure raises."""
    if jobs <= 1 or len(cmds) <= 1:
        for c in cmds:
            _run(c, log, arch, log_path)
        return
    logs: list[list[str]] = [[] for _ in cmds]
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_run, c, lg, arch, log_path) for c, lg in zip(cmds, logs)]
        error = None
        for f in futures:
            try:
                f.result()
            except CudaBuildError as e:
                error = error or e
    for lg in logs:
        log.extend(lg)
    if error is not None:
        raise error


def compile_commands(
    archs: Sequence[str],
    out_dir: Path,
    *,
    nvcc: str,
    src: Path | None = None,
    threads: int | None = None,
) -> list[list[str]]:
    """One ``nvcc -c`` per translation unit, for every arch in ``archs``."""
    src = src or source_dir()
    codes: list[str] = []
    for a in archs:
        codes += gencode(normalize_arch(a))
    extra = ["--threads", str(threads)] if threads and len(archs) > 1 else []
    return [
        [
            nvcc,
            *NVCC_FLAGS,
            *codes,
            *extra,
            "-I",
            str(src),
            "-c",
            str(cu),
            "-o",
            str(out_dir / (cu.stem + ".o")),
        ]
        for cu in gpu_sources(src)
    ]


def compile_objects(
    archs: Sequence[str],
    out_dir: str | Path,
    *,
    nvcc: str | None = None,
    src: Path | None = None,
    jobs: int = 2,
    threads: int | None = None,
) -> list[Path]:
    """Compile (no link) every GPU translation unit for ``archs`` into ``out_dir``; the CI check
    that the kernels build for several architectures without a GPU."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise CudaBuildError("nvcc was not found: install the CUDA toolkit or set SCANLIB_NVCC")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cmds = compile_commands(archs, out, nvcc=nvcc, src=src, threads=threads)
    log: list[str] = []
    _run_all(cmds, jobs, log, archs[0] if len(archs) == 1 else None, None)
    return [Path(c[-1]) for c in cmds]


def build(
    arch: str | None = None,
    *,
    force: bool = False,
    nvcc: str | None = None,
    src: Path | None = None,
    jobs: int | None = None,
) -> Path:
    """Compile and link ``csrc/`` for ``arch`` (default: the local GPU's) into the cache; returns
    the library's path. Reuses a cached build unless ``force``."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise CudaBuildError(
            "nvcc was not found, so the scanlib CUDA library cannot be built: install the CUDA "
            f"toolkit (or set {ENV_NVCC} / CUDA_HOME), then run `python -m scanlib.build`"
        )
    arch = normalize_arch(arch) if arch else local_arch()
    src = src or source_dir()
    ver = nvcc_version(nvcc)
    final_dir = build_dir(arch, ver, src)
    lib = final_dir / LIB_NAME
    if lib.exists() and not force:
        return lib
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=final_dir.parent))
    log: list[str] = [f"# scanlib CUDA build for {arch} with nvcc {ver} ({nvcc}), sources {src}"]
    log_path = final_dir / "build.log"
    start = time.time()
    try:
        cmds = compile_commands([arch], work, nvcc=nvcc, src=src)
        try:
            _run_all(cmds, jobs or os.cpu_count() or 1, log, arch, log_path)
            objs = [c[-1] for c in cmds]
            _run(
                [nvcc, "-shared", *gencode(arch), *objs, "-o", str(work / LIB_NAME)],
                log,
                arch,
                log_path,
            )
        except CudaBuildError as e:
            final_dir.mkdir(parents=True, exist_ok=True)
            log.append(str(e))
            log_path.write_text("\n".join(log) + "\n")
            raise
        final_dir.mkdir(parents=True, exist_ok=True)
        log.append(f"# built in {time.time() - start:.1f} s")
        log_path.write_text("\n".join(log) + "\n")
        meta = {
            "arch": arch,
            "nvcc": nvcc,
            "nvcc_version": ver,
            "source_hash": source_hash(src),
            "flags": list(NVCC_FLAGS),
            "seconds": round(time.time() - start, 1),
        }
        (final_dir / "build.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(work / LIB_NAME, lib)  # atomic: a concurrent loader never sees half a file
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return lib


def ensure_library(arch: str, *, autobuild: bool | None = None) -> Path:
    """The library for ``arch``: ``SCANLIB_CUDA_LIB``, else the cached build, else build it now
    (when nvcc is found and ``SCANLIB_CUDA_AUTOBUILD`` is not 0)."""
    env = os.environ.get(ENV_LIB)
    if env:
        if not Path(env).exists():
            raise CudaBuildError(f"{ENV_LIB}={env} does not exist")
        return Path(env)
    arch = normalize_arch(arch)
    nvcc = find_nvcc()
    lib = find_library(arch, nvcc=nvcc)
    if lib is not None:
        return lib
    if autobuild is None:
        autobuild = os.environ.get(ENV_AUTOBUILD, "1") != "0"
    if nvcc is None or not autobuild:
        why = "nvcc was not found" if nvcc is None else f"{ENV_AUTOBUILD}=0"
        raise CudaBuildError(
            f"the scanlib CUDA library is not built for {arch} and {why}: "
            f"run `python -m scanlib.build --arch {arch}` where the CUDA toolkit is installed"
        )
    logger.warning(
        "building the scanlib CUDA library for %s with %s (first use; once per toolkit, "
        "architecture and source version)",
        arch,
        nvcc,
    )
    return build(arch, nvcc=nvcc)


def library_status(arch: str) -> str | None:
    """None if the library for ``arch`` is there or can be built here; otherwise why not (with
    the remedy). Cheap: runs at most ``nvcc --version``."""
    if os.environ.get(ENV_LIB):
        return (
            None
            if Path(os.environ[ENV_LIB]).exists()
            else f"{ENV_LIB}={os.environ[ENV_LIB]} does not exist"
        )
    nvcc = find_nvcc()
    try:
        if find_library(arch, nvcc=nvcc) is not None:
            return None
    except CudaBuildError as e:
        return str(e)
    if nvcc is None:
        return (
            f"the compiled library is not built for {arch} and nvcc was not found: install the CUDA "
            "toolkit and run `python -m scanlib.build`"
        )
    if os.environ.get(ENV_AUTOBUILD, "1") == "0":
        return f"the compiled library is not built for {arch} ({ENV_AUTOBUILD}=0): run `python -m scanlib.build`"
    return None


# ---------------------------------------------------------------------- CPU emulation (tests)
def find_cxx() -> str | None:
    return (
        os.environ.get("CXX")
        or shutil.which("g++")
        or shutil.which("c++")
        or shutil.which("clang++")
    )


def build_emulation(
    out_dir: str | Path | None = None,
    *,
    cxx: str | None = None,
    nvcc: str | None = None,
    src: Path | None = None,
) -> Path:
    """Compile the kernels with the host C++ compiler into ``libscanlib_emu.so``, a CPU emulation
    with the same C ABI (host pointers instead of device pointers). For tests; cached like the GPU
    build (key: sources and compiler) unless ``out_dir`` is given."""
    cxx = cxx or find_cxx()
    nvcc = nvcc or find_nvcc()
    if cxx is None:
        raise CudaBuildError("no host C++ compiler (g++/clang++) for the CPU emulation build")
    include = cuda_include_dir(nvcc) if nvcc else None
    if include is None:
        raise CudaBuildError(
            "the CUDA headers (cuda_fp16.h) were not found; the emulation build needs them"
        )
    src = src or source_dir()
    if out_dir is None:
        try:
            cxx_ver = subprocess.run(
                [cxx, "--version"], capture_output=True, text=True
            ).stdout.splitlines()[0]
        except (OSError, IndexError):
            cxx_ver = cxx
        key = hashlib.sha256(
            (source_hash(src) + cxx_ver + " ".join(CXX_FLAGS)).encode()
        ).hexdigest()[:16]
        out = cache_root() / f"emulation-{key}"
    else:
        out = Path(out_dir)
    lib = out / EMU_LIB_NAME
    if lib.exists():
        return lib
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=out))
    try:
        sources = sorted(src.glob("*.cu"))
        cmds = [
            [
                cxx,
                *CXX_FLAGS,
                "-x",
                "c++",
                "-I",
                str(src),
                "-I",
                include,
                "-c",
                str(s),
                "-o",
                str(work / (s.stem + ".o")),
            ]
            for s in sources
        ]
        log: list[str] = []
        _run_all(cmds, os.cpu_count() or 1, log, None, None)
        _run(
            [cxx, "-shared", *[c[-1] for c in cmds], "-o", str(work / EMU_LIB_NAME), "-pthread"],
            log,
            None,
            None,
        )
        os.replace(work / EMU_LIB_NAME, lib)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return lib


# ---------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scanlib.build",
        description="Compile scanlib's CUDA kernels (csrc/) into the cached shared library.",
    )
    parser.add_argument("--arch", help="GPU architecture, e.g. sm_90 (default: the local GPU's)")
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if a cached build exists"
    )
    parser.add_argument("--nvcc", help=f"the nvcc to use (default: ${ENV_NVCC}, CUDA_HOME, PATH)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiler processes")
    parser.add_argument(
        "--compile-only",
        metavar="ARCHS",
        help="only compile the objects for a comma-separated list of archs (no GPU needed), "
        "e.g. sm_80,sm_90; a check, nothing is cached",
    )
    parser.add_argument(
        "--emulation", action="store_true", help="build the CPU emulation library (tests)"
    )
    args = parser.parse_args(argv)
    try:
        start = time.time()
        if args.compile_only:
            archs = [normalize_arch(a) for a in args.compile_only.split(",") if a.strip()]
            with tempfile.TemporaryDirectory() as tmp:
                objs = compile_objects(
                    archs, tmp, nvcc=args.nvcc, jobs=args.jobs or 2, threads=len(archs)
                )
            print(
                f"compiled {len(objs)} objects for {', '.join(archs)} in {time.time() - start:.1f} s"
            )
            return 0
        if args.emulation:
            lib = build_emulation(nvcc=args.nvcc)
        else:
            lib = build(args.arch, force=args.force, nvcc=args.nvcc, jobs=args.jobs)
    except (CudaBuildError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(lib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
