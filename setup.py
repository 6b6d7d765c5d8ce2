"""Build fastlayers' two torch-free pybind11 modules.

* ``fastlayers._C``    C++ CPU kernels (-O3 -fno-trapping-math, OpenMP), always built.
* ``fastlayers._cuda`` CUDA kernels, built when nvcc is found. Static cudart,
  archs from ``FASTLAYERS_CUDA_ARCHS`` (default ``80;90``); ``FASTLAYERS_NO_CUDA=1``
  skips it. Without nvcc the build prints one line and goes on.

Sources come from ``csrc/sources.txt``, the list CMakeLists.txt reads too.
Neither module includes torch headers or links libtorch.
"""
import concurrent.futures
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def read_sources():
    mods = {}
    for line in (CSRC / "sources.txt").read_text().splitlines():
        line = line.split("#", 1)[0].split()
        if line:
            mods.setdefault(line[0], []).append(os.path.join("csrc", line[1]))
    return mods


def find_nvcc():
    if os.environ.get("FASTLAYERS_NO_CUDA", "0") not in ("", "0"):
        return None, "FASTLAYERS_NO_CUDA is set"
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand, ""
    return None, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"


def cuda_archs():
    raw = os.environ.get("FASTLAYERS_CUDA_ARCHS", "80;90")
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    for a in archs:
        if not a.rstrip("a").isdigit():
            raise SystemExit(f"FASTLAYERS_CUDA_ARCHS: bad arch {a!r} in {raw!r} (expected e.g. '80;90')")
    return archs


class BuildExt(build_ext):
    def build_extensions(self):
        self._build_info = {}
        exts = list(self.extensions)
        # _cuda (nvcc) builds in a thread while the C++ module compiles.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            cuda = [pool.submit(self.build_cuda, e) for e in exts if e.name.endswith("._cuda")]
            for ext in exts:
                if not ext.name.endswith("._cuda"):
                    self.build_extension(ext)
            for f in cuda:
                f.result()
        d = os.path.join(self.build_lib, "fastlayers")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "_build_info.py"), "w") as f:
            f.write("# Written by setup.py at build time.\n")
            f.write(f"CUDA_BUILT = {self._build_info.get('cuda_built', False)!r}\n")
            f.write(f"CUDA_REASON = {self._build_info.get('cuda_reason', '')!r}\n")
            f.write(f"CUDA_ARCHS = {self._build_info.get('cuda_archs', [])!r}\n")

    def run(self):
        super().run()
        if self.inplace or getattr(self, "editable_mode", False):
            shutil.copy(os.path.join(self.build_lib, "fastlayers", "_build_info.py"), ROOT / "fastlayers")

    def build_cuda(self, ext):
        nvcc, why = find_nvcc()
        if nvcc is None:
            print(f"fastlayers: building without CUDA (_cuda skipped): {why}", flush=True)
            self._build_info["cuda_reason"] = f"_cuda was not built: {why} at install time"
            self.extensions.remove(ext)  # nothing to copy or package
            return
        archs = cuda_archs()
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name))
        tmp = Path(self.build_temp) / "cuda"
        tmp.mkdir(parents=True, exist_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        incs = [str(CSRC / "include"), pybind11.get_include(), sysconfig.get_paths()["include"]]
        inc_flags = [f"-I{i}" for i in incs]
        gencode = []
        for a in archs:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        # PTX of the newest arch too, so newer GPUs can JIT it.
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
        objs, cmds = [], []
        for src in ext.sources:
            obj = tmp / (Path(src).name + ".o")
            if src.endswith(".cu"):
                cmd = [nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
                       *gencode, *inc_flags, "-c", src, "-o", str(obj)]
            else:
                cxx = os.environ.get("CXX", "c++")
                cmd = [cxx, "-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", *inc_flags, "-c", src,
                       "-o", str(obj)]
            cmds.append(cmd)
            objs.append(str(obj))
        # nvcc is slow (two archs + PTX a file): compile the sources concurrently, one job per core.
        with concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
            for cmd in cmds:
                print(" ".join(cmd), flush=True)
            list(pool.map(lambda c: subprocess.check_call(c, cwd=ROOT), cmds))
        link = [nvcc, "-shared", "-cudart", "static", *gencode, "-o", str(out), *objs]
        print(" ".join(link), flush=True)
        subprocess.check_call(link, cwd=ROOT)
        self._build_info.update(cuda_built=True, cuda_archs=archs)


def extensions():
    from pybind11.setup_helpers import ParallelCompile, Pybind11Extension

    ParallelCompile("FASTLAYERS_BUILD_JOBS").install()  # the C++ sources in parallel (default: all cores)

    mods = read_sources()
    openmp = ["-fopenmp"] if sys.platform != "darwin" else []
    exts = [
        Pybind11Extension(
            "fastlayers._C",
            mods["_C"],
            include_dirs=[str(CSRC / "include")],
            extra_compile_args=["-O3", "-std=c++17", "-fno-trapping-math", *openmp],
            extra_link_args=openmp,
            cxx_std=17,
        ),
        Extension("fastlayers._cuda", mods["_cuda"]),
    ]
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
