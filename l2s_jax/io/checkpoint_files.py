"""Read foreign checkpoint files (PyTorch, safetensors, npz) into numpy, without running their code.

Supported files, recognised by their content (the extension only matters for error messages):

* PyTorch ``torch.save`` output (``.pth``, ``.pt``, ``.bin``, ``.ckpt``): the zip format (torch >= 1.6)
  and the legacy pickle-stream format (``_use_new_zipfile_serialization=False``). The pickles are
  read with :class:`~l2s_jax.io.safe_pickle.SafeUnpickler`; torch is never imported.
* A plain pickle of tensors/plain data (``.pkl``), read the same way.
* ``.safetensors`` (bfloat16 and float8 as ``ml_dtypes`` types), ``.npz`` and ``.npy`` (no pickles).

Tensors become numpy arrays; containers stay dicts / OrderedDicts / lists / tuples; a pickled
``argparse.Namespace`` becomes a :class:`~l2s_jax.io.safe_pickle.NamespaceRecord`.
"""
from __future__ import annotations

import io
import re
import struct
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import ml_dtypes
import numpy as np

from l2s_jax.io.safe_pickle import (
    CheckpointFormatError,
    NamespaceRecord,
    Storage,
    StorageType,
    UnsafeCheckpointError,
    safe_load,
)

__all__ = [
    "CheckpointFormatError",
    "DEFAULT_STATE_DICT_KEYS",
    "StateDictNotFoundError",
    "UnsafeCheckpointError",
    "extract_state_dict",
    "read_checkpoint",
    "read_state_dict",
]

SUPPORTED_FORMATS = (
    "PyTorch torch.save files (.pth/.pt/.bin/.ckpt, zip or legacy format), plain pickles of tensors (.pkl), "
    ".safetensors, .npz, .npy"
)
DEFAULT_STATE_DICT_KEYS: tuple[str, ...] = ("model", "state_dict", "model_ema", "state_dict_ema")
# Prefixes added by wrappers around the model: DataParallel/DDP, torch.compile.
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
# Bookkeeping entry of torch.optim.swa_utils.AveragedModel, next to its ``module.*`` weights.
_AVERAGED_MODEL_COUNTER = "n_averaged"

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "C64": np.dtype(np.complex64),
}


class StateDictNotFoundError(LookupError):
    """No state_dict where one was expected; the message lists what the checkpoint holds."""


# ----------------------------------------------------------------------------------------------
# Format detection
# ----------------------------------------------------------------------------------------------


def _sniff(path: Path) -> str:
    """The format of ``path`` from its first bytes: torch-zip, npz, pickle, safetensors, npy, tar."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "torch-zip"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        raise CheckpointFormatError(
            f"{path} is a zip archive but neither a PyTorch checkpoint (no data.pkl) nor an .npz "
            f"(entries: {names[:8]}); supported: {SUPPORTED_FORMATS}"
        )
    if head[:6] == b"\x93NUMPY":
        return "npy"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    if len(head) >= 262 and head[257:262] == b"ustar":
        raise CheckpointFormatError(
            f"{path} uses the tar-based torch.save format of PyTorch < 0.4, which is not supported; "
            "load it with an old PyTorch and torch.save its state_dict again"
        )
    raise CheckpointFormatError(f"{path}: unrecognised checkpoint format; supported: {SUPPORTED_FORMATS}")


def read_checkpoint(path: str | Path) -> Any:
    """Load a checkpoint file into plain Python data with numpy arrays for tensors.

    Never executes code from the file (:class:`UnsafeCheckpointError` if a pickle asks for
    anything beyond tensors and plain data) and does not need torch.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(
            f"{path} is a directory; give one checkpoint file ({SUPPORTED_FORMATS}); "
            "converted l2s_jax checkpoints (spec.json + state/) are loaded with l2s_jax.models.load_pretrained"
        )
    try:
        kind = _sniff(path)
        if kind == "torch-zip":
            return _read_torch_zip(path)
    except zipfile.BadZipFile as e:
        raise CheckpointFormatError(
            f"{path} is a damaged or truncated zip archive ({e}); copy or download it again") from e
    if kind == "pickle":
        return _read_pickle_stream(path)
    if kind == "safetensors":
        return _read_safetensors(path)
    return _read_numpy(path)


# ----------------------------------------------------------------------------------------------
# PyTorch zip format
# ----------------------------------------------------------------------------------------------


def _storage_array(raw: bytes, dtype: np.dtype, big_endian: bool) -> np.ndarray:
    """Raw storage bytes -> flat native-endian array (byte-swapping each element, or each half of a complex)."""
    if big_endian and dtype.itemsize > 1:
        unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
        raw = np.frombuffer(raw, np.uint8).reshape(-1, unit)[:, ::-1].tobytes()
    return np.frombuffer(raw, dtype=dtype)


def _parse_storage_pid(pid: Any, source: str, length: int) -> tuple[StorageType, str, int, tuple | None]:
    """Validate a persistent id ``('storage', type, key, location, numel[, view])``."""
    if not isinstance(pid, tuple) or len(pid) != length or pid[0] != "storage":
        if isinstance(pid, tuple) and pid and pid[0] == "module":
            raise CheckpointFormatError(
                f"{source} pickles a whole nn.Module (torch.save(model)), not a state_dict; "
                "torch.save(model.state_dict()) instead"
            )
        raise CheckpointFormatError(f"{source}: unsupported persistent id {pid!r:.120}")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if not isinstance(storage_type, StorageType):
        raise CheckpointFormatError(f"{source}: storage of unknown type {storage_type!r:.80}")
    if not isinstance(key, str) or isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise CheckpointFormatError(f"{source}: malformed storage reference {pid!r:.120}")
    view = pid[5] if length == 6 else None
    return storage_type, key, numel, view


def _read_torch_zip(path: Path) -> Any:
    source = str(path)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pickles = sorted(n for n in names if re.fullmatch(r"(?:[^/]+/)?data\.pkl", n))
        if len(pickles) != 1:
            raise CheckpointFormatError(f"{path}: expected one data.pkl in the zip archive, found {pickles or names[:8]}")
        root = pickles[0][: -len("data.pkl")]
        if f"{root}constants.pkl" in names or any(n.startswith(f"{root}code/") for n in names):
            raise CheckpointFormatError(
                f"{path} is a TorchScript archive (torch.jit.save), which holds code; "
                "torch.save(model.state_dict()) from the original model instead"
            )
        byteorder = zf.read(f"{root}byteorder").strip() if f"{root}byteorder" in names else b"little"
        if byteorder not in (b"little", b"big"):
            raise CheckpointFormatError(f"{path}: unknown byte order {byteorder[:20]!r} in {root}byteorder")
        storages: dict[str, Storage] = {}

        def persistent_load(pid: Any) -> Storage:
            storage_type, key, numel, _ = _parse_storage_pid(pid, source, 5)
            if key in storages:
                return storages[key]
            record = f"{root}data/{key}"
            nbytes = numel * storage_type.dtype.itemsize
            try:
                info = zf.getinfo(record)
            except KeyError:
                raise CheckpointFormatError(f"{path}: storage record {record!r} is missing from the archive") from None
            if info.file_size < nbytes:
                raise CheckpointFormatError(
                    f"{path}: storage {record!r} holds {info.file_size} bytes, {numel} x {storage_type.name} needs {nbytes}"
                )
            raw = zf.read(record)[:nbytes]
            data = _storage_array(raw, storage_type.dtype, byteorder == b"big")
            storages[key] = Storage(key, storage_type.dtype, numel, data)
            return storages[key]

        with zf.open(pickles[0]) as f:
            return safe_load(io.BytesIO(f.read()), source=source, persistent_load=persistent_load)


# ----------------------------------------------------------------------------------------------
# Legacy torch.save format and plain pickles
# ----------------------------------------------------------------------------------------------


class _LegacyStorages:
    """Storages of a legacy file: declared during the first pass, filled, then handed out in the second."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.roots: dict[str, Storage] = {}
        self.views: dict[str, Storage] = {}

    def persistent_load(self, pid: Any) -> Storage:
        storage_type, key, numel, view = _parse_storage_pid(pid, self.source, 6)
        root = self.roots.get(key)
        if root is None:
            root = self.roots[key] = Storage(key, storage_type.dtype, numel)
        elif root.dtype != storage_type.dtype:
            raise CheckpointFormatError(f"{self.source}: storage {key!r} is used as both {root.dtype} and {storage_type.dtype}")
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)):
            raise CheckpointFormatError(f"{self.source}: malformed storage view {view!r:.80}")
        view_key, offset, view_numel = view
        if root.data is None:
            return Storage(view_key, root.dtype, 0)
        if view_key not in self.views:
            if not all(isinstance(v, int) and v >= 0 for v in (offset, view_numel)) or offset + view_numel > root.numel:
                raise CheckpointFormatError(f"{self.source}: storage view {view!r:.80} lies outside storage {key!r}")
            self.views[view_key] = Storage(view_key, root.dtype, view_numel, root.data[offset : offset + view_numel])
        return self.views[view_key]

    def read_data(self, f: IO[bytes], keys: Any, file_size: int) -> None:
        """Read the storage records (int64 element count, then the little-endian elements) in ``keys`` order."""
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise CheckpointFormatError(f"{self.source}: the storage key list is malformed ({keys!r:.80})")
        for key in keys:
            storage = self.roots.get(key)
            if storage is None:
                raise CheckpointFormatError(f"{self.source}: storage {key!r} has data but no tensor refers to it")
            header = f.read(8)
            if len(header) != 8:
                raise CheckpointFormatError(f"{self.source}: truncated before the data of storage {key!r}")
            (count,) = struct.unpack("<q", header)
            nbytes = count * storage.dtype.itemsize
            if count != storage.numel or nbytes > file_size - f.tell():
                raise CheckpointFormatError(
                    f"{self.source}: storage {key!r} declares {storage.numel} elements, its record says {count} "
                    f"({file_size - f.tell()} bytes left in the file); the file is corrupt or truncated"
                )
            storage.data = _storage_array(f.read(nbytes), storage.dtype, big_endian=False)
        missing = [k for k, s in self.roots.items() if s.data is None]
        if missing:
            raise CheckpointFormatError(f"{self.source}: no data for storage(s) {missing[:8]}")


def _read_pickle_stream(path: Path) -> Any:
    """A legacy torch.save file (magic number first) or else a single plain pickle."""
    source = str(path)
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        first = safe_load(f, source=source)
        if first != LEGACY_MAGIC_NUMBER:
            if f.read(1):
                raise CheckpointFormatError(
                    f"{path}: a pickle followed by more data, but not a PyTorch legacy checkpoint (no magic number)"
                )
            return first
        version = safe_load(f, source=source)
        if version != LEGACY_PROTOCOL_VERSION:
            raise CheckpointFormatError(f"{path}: legacy torch.save protocol {version!r:.40}, expected {LEGACY_PROTOCOL_VERSION}")
        safe_load(f, source=source)  # sys_info: the writer's endianness and C type sizes; data is little-endian
        main_start = f.tell()
        storages = _LegacyStorages(source)
        # First pass: only learn which storages exist (tensors come back as PENDING placeholders).
        safe_load(f, source=source, persistent_load=storages.persistent_load)
        keys = safe_load(f, source=source)
        storages.read_data(f, keys, file_size)
        # Second pass over the same pickle, now with every storage filled in.
        f.seek(main_start)
        result = safe_load(f, source=source, persistent_load=storages.persistent_load)
    return result


# ----------------------------------------------------------------------------------------------
# safetensors, npz, npy
# ----------------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Via ``safetensors.numpy``; dtypes numpy lacks (bfloat16, float8) via ``safetensors.deserialize`` + ml_dtypes."""
    import safetensors
    import safetensors.numpy

    try:
        return dict(safetensors.numpy.load_file(path))
    except (TypeError, AttributeError, KeyError):
        pass  # a dtype safetensors.numpy cannot express; decode the raw views below
    except safetensors.SafetensorError as e:
        raise CheckpointFormatError(f"{path}: not a valid safetensors file ({e})") from e
    views = safetensors.deserialize(path.read_bytes())
    out: dict[str, np.ndarray] = {}
    for name, view in views:
        dtype = _SAFETENSORS_DTYPES.get(view["dtype"])
        if dtype is None:
            raise CheckpointFormatError(
                f"{path}: tensor {name!r} has safetensors dtype {view['dtype']}, which is not supported "
                f"(supported: {sorted(_SAFETENSORS_DTYPES)})"
            )
        out[name] = np.frombuffer(view["data"], dtype=dtype).reshape(view["shape"])
    return out


def _read_numpy(path: Path) -> dict[str, np.ndarray] | np.ndarray:
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it contains pickled object arrays, which could execute code; "
                "only numeric arrays are read"
            ) from e
        raise CheckpointFormatError(f"{path}: not a valid numpy file ({e})") from e
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        try:
            return {k: loaded[k] for k in loaded.files}
        except ValueError as e:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: entry holds pickled object arrays, which could execute code; "
                "only numeric arrays are read"
            ) from e


# ----------------------------------------------------------------------------------------------
# Finding the state_dict
# ----------------------------------------------------------------------------------------------


def _tensor_entries(obj: Any) -> int:
    if not isinstance(obj, Mapping):
        return 0
    return sum(isinstance(k, str) and isinstance(v, (np.ndarray, np.generic)) for k, v in obj.items())


def _describe_value(value: Any) -> str:
    if isinstance(value, Mapping):
        n = _tensor_entries(value)
        return f"state_dict with {n} tensors" if n else f"dict of {len(value)}"
    if isinstance(value, np.ndarray):
        return f"array {value.shape} {value.dtype}"
    if isinstance(value, NamespaceRecord):
        return "argparse.Namespace"
    return type(value).__name__


def _describe_keys(obj: Any) -> str:
    if not isinstance(obj, Mapping):
        return f"(the checkpoint is a {type(obj).__name__}, not a dict)"
    return ", ".join(f"{k!r} ({_describe_value(v)})" for k, v in obj.items()) or "(empty)"


def _find_wrapped(obj: Any, default_keys: Sequence[str]) -> tuple[Mapping, str] | None:
    """The first default key holding a state_dict, directly or one wrapper level deeper."""
    if not isinstance(obj, Mapping):
        return None
    for outer in default_keys:
        value = obj.get(outer)
        if _tensor_entries(value):
            return value, outer
    for outer in default_keys:
        value = obj.get(outer)
        if isinstance(value, Mapping):
            for inner in default_keys:
                if _tensor_entries(value.get(inner)):
                    return value[inner], f"{outer}/{inner}"
    return None


def _lookup(obj: Any, key: str) -> Any:
    """``obj[key]``, where ``key`` may also be a path ``'outer/inner'``."""
    if isinstance(obj, Mapping) and key in obj:
        return obj[key]
    node = obj
    for part in key.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            raise StateDictNotFoundError(
                f"no entry {key!r} in the checkpoint; it holds: {_describe_keys(obj)}. "
                "Pass one of these as the key ('outer/inner' for a nested one)."
            )
        node = node[part]
    return node


def _strip_wrapper_prefixes(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Remove ``module.`` / ``_orig_mod.`` when every key (AveragedModel's counter aside) carries it."""
    changed = True
    while changed and state:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            keys = [k for k in state if k != _AVERAGED_MODEL_COUNTER]
            if keys and all(k.startswith(prefix) for k in keys):
                state = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}
                changed = True
    return state


def extract_state_dict(
    obj: Any, key: str | None = None, default_keys: Sequence[str] = DEFAULT_STATE_DICT_KEYS
) -> tuple[dict[str, np.ndarray], str | None]:
    """Find the weights inside a loaded checkpoint.

    With ``key`` (``'model'``, or ``'outer/inner'`` for a nested wrapper) that entry is used;
    otherwise the first of ``default_keys`` that holds tensors, also one wrapper level deeper;
    otherwise ``obj`` itself if it holds tensors. ``module.`` and ``_orig_mod.`` prefixes are
    stripped and non-tensor entries dropped (0-d arrays such as ``num_batches_tracked`` stay).
    Returns ``(state_dict, key used)``, the key being None when ``obj`` itself was the state_dict.
    """
    if key is not None:
        value = _lookup(obj, key)
        used: str | None = key
        if not _tensor_entries(value):
            found = _find_wrapped(value, default_keys)
            if found is None:
                raise StateDictNotFoundError(
                    f"checkpoint entry {key!r} holds no tensors ({_describe_value(value)}); "
                    f"it holds: {_describe_keys(value)}"
                )
            value, inner = found
            used = f"{key}/{inner}"
    else:
        found = _find_wrapped(obj, default_keys)
        if found is not None:
            value, used = found
        elif _tensor_entries(obj):
            value, used = obj, None
        else:
            raise StateDictNotFoundError(
                f"no state_dict found under the keys {list(default_keys)} nor at the top level; the checkpoint "
                f"holds: {_describe_keys(obj)}. Pass key= to choose an entry."
            )
    state = {
        k: np.asarray(v)
        for k, v in value.items()
        if isinstance(k, str) and isinstance(v, (np.ndarray, np.generic))
    }
    return _strip_wrapper_prefixes(state), used


def read_state_dict(
    path: str | Path, key: str | None = None, default_keys: Sequence[str] = DEFAULT_STATE_DICT_KEYS
) -> tuple[dict[str, np.ndarray], str | None]:
    """:func:`read_checkpoint` then :func:`extract_state_dict`."""
    return extract_state_dict(read_checkpoint(path), key=key, default_keys=default_keys)
