"""Files: everything nflow_np reads from or writes to disk, one job per module.

- :mod:`nflow_np.files.safe`: hardened reading (regular files only, size caps, no pickle, bounded
  ``.npz`` members) and atomic single-file writes;
- :mod:`nflow_np.files.folders`: whole-folder saves published by one atomic rename, the folder
  lock, clean-up of what killed saves leave behind, and the space a save needs;
- :mod:`nflow_np.files.model_files`: ``model.safetensors`` + ``model.json`` (the layers describe themselves,
  :mod:`nflow_np.specs`);
- :mod:`nflow_np.files.gmm_files`: the Gaussian-mixture folder (``gmm.npz`` + ``summary.json``);
- checkpoints: :mod:`nflow_np.checkpoint`; user data: :mod:`nflow_np.data.files`.

The formats are described in ``docs/files.md``. This package imports nothing at import time, so
the layer modules can use :mod:`nflow_np.files.safe` without a cycle.
"""
