"""Build lipkern with its C++ CPU kernels lipkern._cpu and, optionally, the CUDA extension lipkern._C.

lipkern._cpu (csrc/cpu/, any C++17 compiler) is optional: when it does not compile, the install goes on
and lipkern runs its PyTorch paths instead (LIPKERN_BUILD_CPU=0 skips it).
LIPKERN_BUILD_CUDA=auto (default) builds csrc/*.cu when nvcc is found, 1 requires it, 0 skips it.
Neither extension includes PyTorch headers (raw-pointer launchers), so a CPU-only torch is enough
to compile, link and import them; running the CUDA kernels needs a CUDA GPU.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
# Explicit targets: sm_80 (A100) and sm_90 (H100/H200) machine code, plus compute_90 PTX for newer GPUs.
DEFAULT_GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]


def _say(msg):
    print(f"lipkern setup: {msg}", file=sys.stderr)


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda/bin/nvcc"
    return None


def _cuda_library_dirs(nvcc):
    """The directories nvcc itself links from (its --dryrun LIBRARIES line), stubs excluded."""
    probe = Path(__file__).parent / "build" / "nvcc_probe.cu"
    probe.parent.mkdir(exist_ok=True)
    probe.write_text("")
    dryrun = subprocess.run([nvcc, "--dryrun", "-c", str(probe), "-o", str(probe.with_suffix(".o"))],
                            capture_output=True, text=True).stderr
    dirs = [tok.strip('"')[2:] for line in dryrun.splitlines() if line.startswith("#$ LIBRARIES=")
            for tok in line.split("=", 1)[1].split() if tok.strip('"').startswith("-L")]
    dirs = [d for d in dirs if not d.rstrip("/").endswith("stubs")]
    if not dirs:
        home = Path(nvcc).resolve().parent.parent
        dirs = [str(home / "lib64"), str(home / "lib")]
    return dirs


def _cuda_mode():
    mode = os.environ.get("LIPKERN_BUILD_CUDA", "auto").strip().lower()
    if mode not in {"auto", "0", "1"}:
        raise SystemExit(f"LIPKERN_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


class BuildExtWithNvcc(build_ext):
    """Compiles csrc/*.cu with nvcc (through ninja when present), then links them into the pybind11 module."""

    def build_extensions(self):
        nvcc = _find_nvcc()
        objects = self._compile_cuda(nvcc, (Path(self.build_temp) / "cuda").resolve())  # ninja runs in it
        for ext in self.extensions:
            if ext.name != "lipkern._C":
                continue
            ext.extra_objects = [str(o) for o in objects]
            ext.library_dirs.extend(_cuda_library_dirs(nvcc))
        super().build_extensions()

    def _compile_cuda(self, nvcc, out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        gencode = os.environ.get("LIPKERN_CUDA_GENCODE")
        gencode = gencode.split() if gencode else DEFAULT_GENCODE
        flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", f"-I{CSRC}", *gencode]
        sources = sorted(CSRC.glob("*.cu"))
        objects = [out_dir / (s.stem + ".o") for s in sources]
        ninja = shutil.which("ninja")
        if ninja:
            rules = [f"rule nvcc\n  command = {nvcc} {' '.join(flags)} -c $in -o $out\n"]
            rules += [f"build {o}: nvcc {s}\n" for s, o in zip(sources, objects)]
            (out_dir / "build.ninja").write_text("".join(rules))
            subprocess.check_call([ninja, "-C", str(out_dir)])
        else:
            for s, o in zip(sources, objects):
                subprocess.check_call([nvcc, *flags, "-c", str(s), "-o", str(o)])
        return objects


def _cpu_extensions():
    """lipkern._cpu: IEEE arithmetic (no -ffast-math, no FMA contraction: the AOL margin's proof counts the
    roundings of the operations as written); optional, a failed compile leaves the PyTorch paths."""
    if os.environ.get("LIPKERN_BUILD_CPU", "1").strip() == "0":
        _say("LIPKERN_BUILD_CPU=0: no lipkern._cpu (the PyTorch paths run on the CPU).")
        return []
    from pybind11.setup_helpers import Pybind11Extension

    sources = [str(p.relative_to(ROOT)) for p in sorted((CSRC / "cpu").glob("*.cpp"))]
    return [Pybind11Extension("lipkern._cpu", sources, include_dirs=[str(CSRC / "cpu")], cxx_std=17,
                              extra_compile_args=["-O3", "-fno-fast-math", "-ffp-contract=off"], optional=True)]


def _extensions():
    mode = _cuda_mode()
    nvcc = _find_nvcc()
    cpu = _cpu_extensions()
    if mode == "0":
        _say("LIPKERN_BUILD_CUDA=0: no lipkern._C (the Triton and PyTorch paths run on a GPU).")
        return cpu, {}
    if nvcc is None:
        if mode == "1":
            raise SystemExit("LIPKERN_BUILD_CUDA=1 but nvcc was not found: set CUDA_HOME or put nvcc on PATH.")
        _say("nvcc not found: no lipkern._C (the Triton and PyTorch paths run on a GPU). To build the CUDA "
             "kernels, install the CUDA toolkit, then reinstall with LIPKERN_BUILD_CUDA=1.")
        return cpu, {}
    from pybind11.setup_helpers import Pybind11Extension

    ext = Pybind11Extension(
        "lipkern._C",
        [str((CSRC / "bindings.cpp").relative_to(ROOT))],
        include_dirs=[str(CSRC)],
        libraries=["cudart_static", "dl", "rt", "pthread"],
        cxx_std=17,
    )
    return [ext, *cpu], {"build_ext": BuildExtWithNvcc}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
