"""``nflow_np.io``: the public names of the file layer, kept where code and tests import them.

The work is done in :mod:`nflow_np.files` (one job per module: :mod:`~nflow_np.files.safe` hardened
reading and atomic writes, :mod:`~nflow_np.files.folders` whole-folder saves, the lock and space
checks, :mod:`~nflow_np.files.model_files` model folders) and :mod:`nflow_np.specs` (layers that
describe themselves). The format is described in ``docs/files.md``.
"""

from nflow_np.files.folders import (
    LOCK_FILE,
    FolderLockedError,
    acquire_lock,
    bytes_needed,
    check_writable,
    publish_folder,
    remove_leftovers,
)
from nflow_np.files.model_files import (
    CONFIG_FILE,
    FORMAT_VERSION,
    MODEL_KEYS,
    NPZ_WEIGHTS_FILE,
    WEIGHTS_FILE,
    check_description,
    check_metadata,
    describe_model,
    load_model,
    model_file_bytes,
    model_from_description,
    publish_model_files,
    read_config,
    save_model,
    weights_sha256,
)
from nflow_np.files.safe import (
    ARCHIVE_ERRORS,
    MAX_CONFIG_BYTES,
    MAX_DEPTH,
    MAX_WEIGHTS_BYTES,
    ModelFileError,
    archive_members,
    atomic_write,
    parse_json,
    read_arrays,
    read_file,
    read_tensors,
)
from nflow_np.specs import FLOW_KINDS, MAX_DIM, flow_from_spec, register_flow
from nflow_np.specs import to_spec as flow_to_spec

__all__ = [
    "ARCHIVE_ERRORS",
    "CONFIG_FILE",
    "FLOW_KINDS",
    "FORMAT_VERSION",
    "LOCK_FILE",
    "MAX_CONFIG_BYTES",
    "MAX_DEPTH",
    "MAX_DIM",
    "MAX_WEIGHTS_BYTES",
    "MODEL_KEYS",
    "NPZ_WEIGHTS_FILE",
    "WEIGHTS_FILE",
    "FolderLockedError",
    "ModelFileError",
    "acquire_lock",
    "archive_members",
    "atomic_write",
    "bytes_needed",
    "check_description",
    "check_metadata",
    "check_writable",
    "describe_model",
    "flow_from_spec",
    "flow_to_spec",
    "load_model",
    "model_file_bytes",
    "model_from_description",
    "parse_json",
    "publish_folder",
    "publish_model_files",
    "read_arrays",
    "read_tensors",
    "read_config",
    "read_file",
    "register_flow",
    "remove_leftovers",
    "save_model",
    "weights_sha256",
]
