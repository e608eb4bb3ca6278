"""Build the patched llama.cpp (only ``libllama`` + the ggml libraries it links) and install the
llama-cpp-python bindings without a native build.

Cache layout under ``cache_root()/llamacpp``::

    sdist/llama_cpp_python-<ver>.tar.gz     the pinned sdist, downloaded once from PyPI
    work/llama.cpp, work/build              scratch tree (fixed paths, so ccache hits across builds)
    ccache/                                 ccache store (unless $CCACHE_DIR is set)
    <llama.cpp commit>-<patch hash>/        libllama.so, libggml*.so, build.json
    <llama.cpp commit>-unpatched-<hash>/    the same llama.cpp without the patches (``--unpatched``), for the
                                            check that stock llama.cpp refuses a low-rank GGUF
    <llama.cpp commit>-aarch64-<hash>/      a cross build for aarch64 (``arm_arch``), for tools/check_arm.py

The patch hash covers the patch series and the build options, so changing either makes a new key.
One implementation: ``tools/build_llamacpp.py`` and ``swiftsvd-export build-llamacpp`` both call
:func:`main`.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from ...errors import SwiftSVDError
from ...paths import cache_root

log = logging.getLogger(__name__)

# The pin: llama-cpp-python 0.3.36 vendors ggml-org/llama.cpp@0c1e57098.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e57098"
BINDING_DEPS = ("typing-extensions>=4.5", "numpy>=1.20", "diskcache>=5.6.1", "jinja2>=2.11.3")
LIB_NAMES = ("libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so")


def repo_patches_dir() -> Path:
    env = os.environ.get("SWIFTSVD_LLAMACPP_PATCHES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "targets" / "llamacpp" / "patches"


def patch_files(patches_dir: Path | None = None) -> list[Path]:
    d = Path(patches_dir) if patches_dir else repo_patches_dir()
    files = sorted(d.glob("*.patch"))
    if not files:
        raise SwiftSVDError(f"no *.patch files in {d}")
    return files


def cmake_options(native: bool = True, unity: bool = False, arm_arch: str | None = None) -> list[str]:
    """The CMake options of a build; ``arm_arch`` (e.g. ``armv8.2-a+dotprod+i8mm``) cross-compiles
    for aarch64 Linux with Debian's ``aarch64-linux-gnu`` toolchain (``tools/check_arm.py`` runs it
    under qemu-user), which implies a non-native build."""
    cross = [] if arm_arch is None else [
        "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
        "-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc", "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++",
        "-DCMAKE_FIND_ROOT_PATH=/usr/aarch64-linux-gnu", "-DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER",
        "-DCMAKE_FIND_ROOT_PATH_MODE_LIBRARY=ONLY", "-DCMAKE_FIND_ROOT_PATH_MODE_INCLUDE=ONLY",
        f"-DGGML_CPU_ARM_ARCH={arm_arch}"]
    native = native and arm_arch is None
    return cross + [
        "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_COMMON=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
        f"-DGGML_NATIVE={'ON' if native else 'OFF'}", "-DGGML_CCACHE=OFF",
        "-DLLAMA_BUILD_NUMBER=0",
        f"-DCMAKE_UNITY_BUILD={'ON' if unity else 'OFF'}",
        # the libraries are copied next to each other into the cache: find siblings via $ORIGIN
        "-DCMAKE_BUILD_RPATH=$ORIGIN", "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON",
    ]


def patch_hash(patches: list[Path], options: list[str]) -> str:
    h = hashlib.sha256()
    for p in patches:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update("\n".join(options).encode())
    return h.hexdigest()[:12]


def default_unity() -> bool:
    """``SWIFTSVD_LLAMACPP_UNITY=1`` selects the unity build (build and run time must agree)."""
    return os.environ.get("SWIFTSVD_LLAMACPP_UNITY", "0") == "1"


def lib_dir(native: bool = True, unity: bool | None = None, patches_dir: Path | None = None,
            unpatched: bool = False, arm_arch: str | None = None) -> Path:
    """Where the patched (or, with ``unpatched``, stock) libraries live (may not exist yet)."""
    unity = default_unity() if unity is None else unity
    opts = cmake_options(native, unity, arm_arch)
    arch = "" if arm_arch is None else "aarch64-"
    if unpatched:
        return cache_root() / "llamacpp" / f"{LLAMA_CPP_COMMIT}-{arch}unpatched-{patch_hash([], opts)}"
    return cache_root() / "llamacpp" / f"{LLAMA_CPP_COMMIT}-{arch}{patch_hash(patch_files(patches_dir), opts)}"


def is_built(d: Path) -> bool:
    return all((d / n).exists() for n in LIB_NAMES) and (d / "build.json").is_file()


def _run(cmd: list[str], cwd: Path | None = None, env: dict | None = None, what: str = "") -> str:
    log.info("$ %s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-30:])
        raise SwiftSVDError(f"{what or cmd[0]} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def sdist_path() -> Path:
    return cache_root() / "llamacpp" / "sdist" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"


def fetch_sdist() -> Path:
    path = sdist_path()
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              "--quiet",
              f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", tmp], what="pip download")
        got = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if not got:
            raise SwiftSVDError("pip download did not produce the llama-cpp-python sdist")
        os.replace(got[0], path)
    return path


def extract_vendor(sdist: Path, dest: Path) -> None:
    """Extract ``vendor/llama.cpp`` of the sdist into ``dest`` (fresh)."""
    if dest.exists():
        shutil.rmtree(dest)
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    dest.mkdir(parents=True)
    with tarfile.open(sdist) as tf:
        members = []
        for m in tf.getmembers():
            if not m.name.startswith(prefix):
                continue
            m.name = m.name[len(prefix):]
            if not m.name or m.name == ".git":
                continue
            members.append(m)
        tf.extractall(dest, members=members, filter="data")


def apply_patches(src: Path, patches: list[Path]) -> None:
    """Apply each patch with ``patch -p1``; a patch that does not apply stops with the file named."""
    for p in patches:
        proc = subprocess.run(["patch", "-p1", "--batch", "--forward", "--dry-run", "-i", str(p)],
                              cwd=src, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            failed, current = [], None
            for line in proc.stdout.splitlines():
                if line.startswith("checking file ") or line.startswith("patching file "):
                    current = line.split(" file ", 1)[1].strip()
                elif ("FAILED" in line or "can't find file" in line or "No file to patch" in line
                      or "Reversed" in line):
                    name = current or line
                    if name not in failed:
                        failed.append(name)
            names = ", ".join(failed) or "?"
            raise SwiftSVDError(
                f"patch {p.name} does not apply to llama.cpp {LLAMA_CPP_COMMIT} "
                f"(llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}): failed on {names}")
        _run(["patch", "-p1", "--batch", "--forward", "--quiet", "-i", str(p)], cwd=src, what=f"patch {p.name}")


def build_libs(force: bool = False, native: bool = True, unity: bool | None = None, jobs: int | None = None,
               patches_dir: Path | None = None, unpatched: bool = False, arm_arch: str | None = None) -> Path:
    unity = default_unity() if unity is None else unity
    patches = [] if unpatched else patch_files(patches_dir)
    opts = cmake_options(native, unity, arm_arch)
    out = lib_dir(native, unity, patches_dir, unpatched, arm_arch)
    if is_built(out) and not force:
        log.info("%s libllama cached in %s", "stock" if unpatched else "patched", out)
        return out
    t0 = time.time()
    sdist = fetch_sdist()
    work = cache_root() / "llamacpp" / "work"
    src, bld = work / "llama.cpp", work / "build"
    extract_vendor(sdist, src)
    apply_patches(src, patches)
    if bld.exists():
        shutil.rmtree(bld)
    env = dict(os.environ)
    launcher = []
    if shutil.which("ccache"):
        env.setdefault("CCACHE_DIR", str(cache_root() / "llamacpp" / "ccache"))
        env.setdefault("CCACHE_MAXSIZE", "2G")
        launcher = ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
    else:
        log.warning("ccache not found (apt-get install ccache makes rebuilds much faster)")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    t_conf = time.time()
    _run(["cmake", "-S", str(src), "-B", str(bld), *gen, *opts, *launcher], env=env, what="cmake configure")
    t_build = time.time()
    _run(["cmake", "--build", str(bld), "--target", "llama", "-j", str(jobs or os.cpu_count() or 2)],
         env=env, what="cmake build")
    t_done = time.time()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for so in sorted((bld / "bin").glob("lib*.so*")):
            dst = tmp / so.name
            if so.is_symlink():
                dst.symlink_to(os.readlink(so))
            else:
                shutil.copy2(so, dst)
        missing = [n for n in LIB_NAMES if not (tmp / n).exists()]
        if missing:
            raise SwiftSVDError(f"build finished but {', '.join(missing)} not found in {bld / 'bin'}")
        info = {"llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, "llama_cpp_commit": LLAMA_CPP_COMMIT,
                "patches": [p.name for p in patches], "cmake_options": opts, "ccache": bool(launcher),
                "seconds": {"prepare": round(t_conf - t0, 1), "configure": round(t_build - t_conf, 1),
                            "build": round(t_done - t_build, 1)}}
        (tmp / "build.json").write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("built libllama in %.0f s (build step %.0f s) -> %s", t_done - t0, t_done - t_build, out)
    return out


def bindings_installed() -> bool:
    try:
        return importlib.metadata.version("llama_cpp_python") == LLAMA_CPP_PYTHON_VERSION
    except importlib.metadata.PackageNotFoundError:
        return False


def install_bindings(force: bool = False) -> None:
    """pip-install the pinned bindings with the native build switched off (about 20 s)."""
    if bindings_installed() and not force:
        log.info("llama-cpp-python %s already installed", LLAMA_CPP_PYTHON_VERSION)
        return
    env = dict(os.environ, CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF")
    missing = []
    for req in BINDING_DEPS:
        name = req.split(">")[0].split("=")[0]
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(req)
    if missing:
        _run([sys.executable, "-m", "pip", "install", "--quiet", *missing], env=env, what="pip install deps")
    sdist = fetch_sdist()
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", str(sdist)],
         env=env, what="pip install llama-cpp-python")


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        args = build_argument_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    arm_arch = getattr(args, "arm_arch", None)
    if arm_arch:
        missing = [t for t in ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++") if not shutil.which(t)]
        if missing:
            raise SwiftSVDError(f"--arm-arch needs the aarch64 cross compilers ({', '.join(missing)} not found): "
                                "apt-get install g++-aarch64-linux-gnu")
    out = build_libs(force=args.force, native=not args.portable, unity=args.unity or default_unity(),
                     jobs=args.jobs, unpatched=args.unpatched, arm_arch=arm_arch)
    if not args.no_bindings and not arm_arch:
        install_bindings()
    what = "stock (unpatched)" if args.unpatched else "patched"
    if arm_arch:
        print(f"{what} llama.cpp for aarch64 ({arm_arch}) ready in {time.time() - t0:.1f} s: {out} "
              "(tools/check_arm.py runs it under qemu)")
    else:
        print(f"{what} llama.cpp ready in {time.time() - t0:.1f} s: LLAMA_CPP_LIB_PATH={out}")
    return 0


def add_build_arguments(p) -> None:
    p.add_argument("--force", action="store_true", help="rebuild even when the cache exists")
    p.add_argument("--portable", action="store_true", help="GGML_NATIVE=OFF (a binary for other CPUs)")
    p.add_argument("--unity", action="store_true", help="CMAKE_UNITY_BUILD=ON for ggml too (or SWIFTSVD_LLAMACPP_UNITY=1, "
                                                         "which run time reads as well)")
    p.add_argument("--jobs", "-j", type=int, default=None, help="parallel compile jobs (default: all cores)")
    p.add_argument("--no-bindings", action="store_true", help="do not pip-install llama-cpp-python")
    p.add_argument("--arm-arch", default=None, metavar="MARCH",
                   help="cross-build for aarch64 Linux with GGML_CPU_ARM_ARCH=MARCH (e.g. armv8.2-a+dotprod+i8mm; "
                        "needs g++-aarch64-linux-gnu) into its own cache folder, for tools/check_arm.py; "
                        "no bindings are installed")
    p.add_argument("--unpatched", action="store_true",
                   help="build the same llama.cpp without the patches into its own cache folder (for the test "
                        "that stock llama.cpp refuses a low-rank GGUF; ccache reuses most of the patched build)")


def build_argument_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="build the patched libllama and install llama-cpp-python")
    add_build_arguments(p)
    return p
