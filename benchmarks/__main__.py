"""``python -m benchmarks`` runs the benchmark suite (:mod:`benchmarks.suite`)."""

import importlib
import sys

# ``__package__`` may be an alias of the installed package (see ``__init__.py``): import the suite under the
# package's own name, so that its Numba-cached kernels compile and load under one name.
main = importlib.import_module(f"{sys.modules[__package__].__name__}.suite").main

if __name__ == "__main__":
    sys.exit(main())
