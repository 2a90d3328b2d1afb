"""Refuse checkpoint files whose pickles name anything but tensors and a few known classes.

DeepSpeed reads its own checkpoint files with a full unpickler, and a full unpickler runs any
callable a file names (`os.system`, `builtins.exec`): a checkpoint copied from elsewhere could run
code at `--resume`. Before anything is loaded, every pickle in the checkpoint is walked with an
unpickler that builds nothing: allowed names become inert stubs, any other name stops the walk.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

# What mmcontrast's and DeepSpeed's checkpoints hold (ZeRO 0-3, fp32 and bf16): tensors, numpy
# RNG states and DeepSpeed's loss-scaler, ZeRO-stage and fragment records.
ALLOWED = {
    "collections.OrderedDict",
    "_codecs.encode",
    "torch.Size",
    "torch.Tensor",
    "torch.device",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type_v2",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
}
ALLOWED_PATTERNS = re.compile(
    r"torch\.\w+Storage|torch\.(b?float|u?int|bool|complex|half|double|long|short)\d*|numpy\.dtypes\.\w+DType"
)


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that names a callable outside the allow-list."""


class _Inert:
    """What every allowed name becomes while walking: accepts any arguments and state."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _Walker(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        full = f"{module}.{name}"
        if full not in ALLOWED and not ALLOWED_PATTERNS.fullmatch(full):
            raise UnsafeCheckpointError(full)
        return OrderedDict if full == "collections.OrderedDict" else _Inert

    def persistent_load(self, pid):
        return None  # tensor storages: nothing to build


def _walk(data: bytes) -> None:
    stream = io.BytesIO(data)
    while stream.tell() < len(data):  # a legacy torch file is several pickles in a row
        try:
            _Walker(stream).load()
        except UnsafeCheckpointError:
            raise
        except Exception:
            return  # past the pickles: raw storage bytes, never unpickled by torch either


def check_checkpoint_pickles(folder) -> None:
    """Raise UnsafeCheckpointError naming the file and the name when a pickle in `folder`
    (torch zip archives and plain pickle files, *.pt and *.pkl) names a callable not allowed."""
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file() or path.suffix not in (".pt", ".pth", ".pkl", ".bin"):
            continue
        try:
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as archive:
                    for member in archive.namelist():
                        if member.endswith(".pkl"):
                            _walk(archive.read(member))
            else:
                _walk(path.read_bytes())
        except UnsafeCheckpointError as exc:
            raise UnsafeCheckpointError(
                f"{path} names {exc}, which a checkpoint never holds: loading it could run code; "
                "refusing to resume from it"
            ) from None
