"""``python -m nflow_np`` runs the ``nflow`` command line (:mod:`nflow_np.cli`)."""

import sys

from nflow_np.cli import main

if __name__ == "__main__":
    sys.exit(main())
