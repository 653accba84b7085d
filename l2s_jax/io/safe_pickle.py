"""A pickle reader that builds only tensors (as numpy arrays) and plain data.

PyTorch checkpoints are pickles, and ``pickle.load`` runs whatever callable a pickle names, so
loading an untrusted ``.pth`` that way can execute arbitrary code. :class:`SafeUnpickler`
resolves every global a pickle names through an explicit allowlist (:data:`ALLOWED_GLOBALS`)
of our own numpy implementations and harmless plain-data types; any other global raises
:class:`UnsafeCheckpointError` before it is ever called. torch is never imported.

Tensors come back as C-contiguous numpy arrays (copies, so two tensors that shared a storage
no longer share memory). ``bfloat16`` and the float8 types are kept exactly as the
``ml_dtypes`` dtypes that JAX itself uses (``arr.astype(np.float32)`` upcasts losslessly).

The BUILD opcode calls ``__setstate__`` on whatever object is on the stack, so every object a
pickle can reach while loading is either a fresh local value, one of our immutable stand-ins,
or validates its state itself. In particular a pickle never holds a real ``np.dtype`` (numpy's
``dtype.__setstate__`` can corrupt shared descriptors); :func:`finalize` swaps the stand-ins
for plain numpy values once the pickle is fully read.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import pickle
import types
from typing import IO, Any, Callable

import ml_dtypes
import numpy as np


class UnsafeCheckpointError(Exception):
    """A checkpoint references something other than tensors and plain data (possible code execution)."""


class CheckpointFormatError(ValueError):
    """A checkpoint file is corrupt, truncated, or uses a layout this reader does not support."""


#: torch dtype names (as a pickled ``torch.<name>`` global) -> numpy dtype.
TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "float8_e8m0fnu": np.dtype(ml_dtypes.float8_e8m0fnu),
}

#: torch storage class name -> torch dtype name of its elements.
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",
}


class _Immutable:
    """Base for objects a pickle can reference: its BUILD opcode must not change them."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError(f"the pickle tries to modify {self!r} (BUILD on an allowlisted global)")


@dataclasses.dataclass(frozen=True)
class StorageType(_Immutable):
    """A torch storage class named in a pickle (``torch.FloatStorage``); only its element dtype matters."""

    name: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class TorchDtype(_Immutable):
    """A pickled torch dtype (``torch.float16``); :func:`finalize` turns it into the numpy dtype."""

    name: str
    dtype: np.dtype


@dataclasses.dataclass
class Storage(_Immutable):
    """One torch storage: ``numel`` elements of ``dtype``; ``data`` is None until its bytes are read."""

    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


class PendingTensor:
    """Stand-in for a tensor whose storage bytes are not read yet (first pass over a legacy file)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "PendingTensor()"


PENDING = PendingTensor()


class NamespaceRecord(types.SimpleNamespace):
    """Plain-data stand-in for a pickled ``argparse.Namespace`` (e.g. the training ``args``)."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise CheckpointFormatError(f"a pickled argparse.Namespace has a malformed state: {type(state).__name__}")
        self.__dict__.update(state)


class _Marker(_Immutable):
    """A named type reference (``numpy.ndarray``, ``torch.Tensor``) that may be passed around but never called."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsafeCheckpointError(
            f"the pickle calls '{self.name}' directly; it may only appear as the type argument of an "
            "array/tensor reconstruction"
        )


class _SafeCallable(_Immutable):
    """One of our own reconstruction functions as a pickle sees it: callable, but not modifiable."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __repr__(self) -> str:
        return f"<safe {self.fn.__name__}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


_NDARRAY = _Marker("numpy.ndarray")
_TENSOR_TYPES = (_Marker("torch.Tensor"), _Marker("torch.nn.parameter.Parameter"))


def _int(value: Any, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise CheckpointFormatError(f"{what} must be an integer, got {value!r:.80}")
    return int(value)


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)):
        raise CheckpointFormatError(f"{what} must be a tuple of integers, got {value!r:.80}")
    return tuple(_int(v, what) for v in value)


def tensor_from_storage(
    storage: Any, offset: Any, size: Any, stride: Any, dtype: np.dtype | None = None
) -> np.ndarray | PendingTensor:
    """Copy the strided view ``(offset, size, stride)`` (in elements) of a storage into a new array.

    Every index the view touches is checked against the storage bounds first, so a malformed
    file cannot make ``as_strided`` read outside the storage; views with more elements than the
    storage (stride 0, overlaps) are refused rather than materialised.
    """
    if not isinstance(storage, Storage):
        raise CheckpointFormatError(f"a tensor is rebuilt from {type(storage).__name__}, not from a torch storage")
    offset = _int(offset, "tensor storage offset")
    size = _int_tuple(size, "tensor size")
    stride = _int_tuple(stride, "tensor stride")
    if len(size) != len(stride):
        raise CheckpointFormatError(f"tensor size {size} and stride {stride} have different lengths")
    if offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise CheckpointFormatError(f"negative tensor offset/size/stride: {offset}, {size}, {stride}")
    if storage.data is None:
        return PENDING
    flat = storage.data
    if dtype is not None and dtype != flat.dtype:
        if flat.dtype != np.uint8 or flat.size % dtype.itemsize:
            raise CheckpointFormatError(
                f"a {dtype} tensor cannot be read from storage {storage.key!r} of {flat.size} {flat.dtype} elements"
            )
        flat = flat.view(dtype)
    if 0 in size:
        return np.zeros(size, flat.dtype)
    last = offset + sum(st * (sz - 1) for sz, st in zip(size, stride))
    if last >= flat.size:
        raise CheckpointFormatError(
            f"tensor (offset {offset}, size {size}, stride {stride}) reaches element {last} of storage "
            f"{storage.key!r}, which has only {flat.size} elements; the file is corrupt"
        )
    if math.prod(size) > flat.size:
        raise CheckpointFormatError(
            f"tensor of size {size} (stride {stride}) has more elements than its storage {storage.key!r} "
            f"({flat.size}): an expanded/overlapping view, which is not read (it could be made arbitrarily "
            "large); save tensor.contiguous() instead"
        )
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(st * itemsize for st in stride), writeable=False
    )
    return np.array(view, copy=True, order="C")


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> np.ndarray | PendingTensor:
    """``torch._utils._rebuild_tensor``."""
    return tensor_from_storage(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> np.ndarray | PendingTensor:
    """``torch._utils._rebuild_tensor_v2``; autograd flags, hooks and metadata are dropped."""
    return tensor_from_storage(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> np.ndarray | PendingTensor:
    """``torch._utils._rebuild_tensor_v3``: the dtype is given explicitly over an untyped (byte) storage."""
    if not isinstance(dtype, TorchDtype):
        raise CheckpointFormatError(f"_rebuild_tensor_v3 needs a torch dtype, got {dtype!r:.80}")
    return tensor_from_storage(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Any:
    """``torch._utils._rebuild_parameter``: a Parameter is just its tensor here."""
    return data


def _rebuild_parameter_with_state(data: Any, requires_grad: Any, backward_hooks: Any, state: Any) -> Any:
    """``torch._utils._rebuild_parameter_with_state``: Python attributes of the Parameter are dropped."""
    return data


_TENSOR_REBUILDERS = (
    _rebuild_tensor,
    _rebuild_tensor_v2,
    _rebuild_tensor_v3,
    _rebuild_parameter,
    _rebuild_parameter_with_state,
)


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """``torch._tensor._rebuild_from_type_v2`` (tensors with Python attributes): the plain tensor."""
    known = isinstance(func, _SafeCallable) and func.fn in _TENSOR_REBUILDERS
    if not known or new_type not in _TENSOR_TYPES or not isinstance(args, tuple):
        raise UnsafeCheckpointError(
            f"_rebuild_from_type_v2 with {func!r:.80} / {new_type!r:.80}: only plain tensors and Parameters are read"
        )
    return func(*args)


def _torch_size(sizes: Any = ()) -> tuple[int, ...]:
    """``torch.Size`` -> a tuple of ints."""
    return _int_tuple(sizes, "torch.Size")


def _torch_device(kind: Any, index: Any = None) -> str:
    """``torch.device`` -> its string form, e.g. ``'cuda:0'``."""
    if not isinstance(kind, str):
        raise CheckpointFormatError(f"torch.device needs a string, got {kind!r:.80}")
    return kind if index is None else f"{kind}:{_int(index, 'device index')}"


_TEXT_ENCODINGS = {"latin1", "latin-1", "iso-8859-1", "iso8859-1", "utf-8", "utf8", "ascii"}


def _encode_text(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode``: how protocol-2 pickles store ``bytes`` (only text codecs are accepted)."""
    if not isinstance(text, str) or not isinstance(encoding, str) or encoding.lower() not in _TEXT_ENCODINGS:
        raise UnsafeCheckpointError(f"_codecs.encode({type(text).__name__}, {encoding!r:.40}) is not a text encoding")
    return text.encode(encoding)


def _make_bytearray(source: Any = b"", encoding: Any = None) -> bytearray:
    """``builtins.bytearray`` restricted to bytes or text plus a text encoding."""
    if encoding is None:
        if not isinstance(source, (bytes, bytearray)):
            raise CheckpointFormatError(f"bytearray from {type(source).__name__} is not supported")
        return bytearray(source)
    return bytearray(_encode_text(source, encoding))


class DtypeRecipe(_Immutable):
    """A pickled ``numpy.dtype`` while unpickling: a type code plus the byte order from its state.

    numpy's own ``dtype.__setstate__`` trusts its input and can even corrupt shared descriptors
    (e.g. the process-wide ``ml_dtypes.bfloat16``), so a pickle never gets a real ``np.dtype`` to
    BUILD on; this recipe validates the state and :func:`finalize` turns it into a fresh dtype.
    Structured, sub-array and datetime dtypes are not supported.
    """

    __slots__ = ("code", "align", "byteorder")

    def __init__(self, code: str, align: bool) -> None:
        self.code = code
        self.align = align
        self.byteorder: str | None = None

    def __repr__(self) -> str:
        return f"DtypeRecipe({self.code!r}, byteorder={self.byteorder!r})"

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
            raise CheckpointFormatError(f"unsupported numpy dtype state {state!r:.120}")
        byteorder, subarray, names, fields, elsize = state[1:6]
        if subarray is not None or names is not None or fields is not None:
            raise CheckpointFormatError(
                f"structured or sub-array numpy dtypes ({self.code!r} with fields {names!r:.60}) are not supported"
            )
        if byteorder not in ("<", ">", "=", "|"):
            raise CheckpointFormatError(f"numpy dtype {self.code!r} with byte order {byteorder!r:.20}")
        expected = _base_dtype(self.code).itemsize
        if _int(elsize, "numpy dtype element size") not in (-1, expected):
            raise CheckpointFormatError(f"numpy dtype {self.code!r} claims {elsize} bytes per element, not {expected}")
        object.__setattr__(self, "byteorder", byteorder)

    def __setattr__(self, name: str, value: Any) -> None:
        if hasattr(self, "byteorder"):
            raise UnsafeCheckpointError(f"{self!r} is read-only")
        object.__setattr__(self, name, value)

    def resolve(self) -> np.dtype:
        """A fresh numpy dtype for this recipe."""
        dtype = np.dtype(_base_dtype(self.code), align=self.align)
        if self.byteorder in ("<", ">") and dtype.byteorder != "|":
            dtype = dtype.newbyteorder(self.byteorder)
        return dtype


def _base_dtype(code: str) -> np.dtype:
    try:
        dtype = np.dtype(code)
    except TypeError as e:
        raise CheckpointFormatError(f"unknown numpy dtype {code!r:.40}") from e
    if dtype.fields is not None or dtype.subdtype is not None or dtype.kind in "mM":
        raise CheckpointFormatError(f"numpy dtype {code!r:.40} (structured, sub-array or datetime) is not supported")
    return dtype


def _resolve_dtype(spec: Any) -> np.dtype:
    """A dtype argument of a numpy reconstruction: a recipe, a torch dtype, or a type code."""
    if isinstance(spec, DtypeRecipe):
        return spec.resolve()
    if isinstance(spec, TorchDtype):
        return spec.dtype
    if isinstance(spec, bytes):
        spec = spec.decode("latin1")
    if not isinstance(spec, str):
        raise CheckpointFormatError(f"a numpy dtype must be a type code or a pickled dtype, got {type(spec).__name__}")
    return _base_dtype(spec)


def _np_dtype(spec: Any, align: Any = False, copy: Any = False) -> DtypeRecipe:
    """``numpy.dtype(spec, align, copy)`` -> a :class:`DtypeRecipe` (its state comes by BUILD)."""
    if isinstance(spec, bytes):
        spec = spec.decode("latin1")
    if not isinstance(spec, str):
        raise CheckpointFormatError(f"a pickled numpy dtype must name a type code, got {type(spec).__name__}")
    _base_dtype(spec)
    return DtypeRecipe(spec, bool(align))


class UnpickledArray(np.ndarray):
    """An ndarray under reconstruction; its ``__setstate__`` validates numpy's array state first.

    :func:`finalize` replaces it by a plain ``np.ndarray`` view.
    """

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise CheckpointFormatError(f"unsupported numpy array state {state!r:.120}")
        version, shape, dtype, fortran, raw = state
        dtype = _resolve_dtype(dtype)
        shape = _int_tuple(shape, "numpy array shape")
        if isinstance(raw, str):
            raw = raw.encode("latin1")
        if dtype.hasobject:
            if not isinstance(raw, list):
                raise CheckpointFormatError("a numpy object array must be pickled as a list of its elements")
        elif not isinstance(raw, (bytes, bytearray)):
            raise CheckpointFormatError(f"numpy array data must be bytes, got {type(raw).__name__}")
        np.ndarray.__setstate__(self, (_int(version, "numpy array version"), shape, dtype, bool(fortran), raw))


def _np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> UnpickledArray:
    """``numpy.core.multiarray._reconstruct``: an empty array that its BUILD state then fills."""
    if subtype is not _NDARRAY:
        raise UnsafeCheckpointError(f"numpy _reconstruct of {subtype!r:.80}: only plain numpy.ndarray is read")
    _int_tuple(shape, "numpy array shape")
    return UnpickledArray((0,), dtype=_resolve_dtype(dtype))


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    """``numpy.core.multiarray.scalar``: one numpy scalar from its raw bytes."""
    dtype = _resolve_dtype(dtype)
    if dtype.hasobject:
        return data
    if isinstance(data, str):
        data = data.encode("latin1")
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise CheckpointFormatError(f"numpy {dtype} scalar needs {dtype.itemsize} bytes, got {data!r:.80}")
    return np.frombuffer(bytes(data), dtype=dtype)[0]


def _np_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any, axis_order: Any = None) -> UnpickledArray:
    """``numpy.core.numeric._frombuffer`` (protocol-5 arrays): bytes -> array of the given shape."""
    if isinstance(buf, pickle.PickleBuffer):
        buf = buf.raw()
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise CheckpointFormatError(f"numpy _frombuffer needs a byte buffer, got {type(buf).__name__}")
    dtype = _resolve_dtype(dtype)
    if dtype.hasobject:
        raise UnsafeCheckpointError("numpy _frombuffer with an object dtype is refused")
    shape = _int_tuple(shape, "numpy array shape")
    flat = np.frombuffer(buf, dtype=dtype).copy().view(UnpickledArray)
    if order == "K" and axis_order is not None:
        return flat.reshape(shape, order="C").transpose(_int_tuple(axis_order, "numpy axis order"))
    if order not in ("C", "F", "A"):
        raise CheckpointFormatError(f"numpy _frombuffer with unknown order {order!r:.20}")
    return flat.reshape(shape, order=order)


def finalize(obj: Any, memo: dict[int, Any] | None = None) -> Any:
    """Swap the unpickling stand-ins for plain values: dtype recipes and torch dtypes -> ``np.dtype``,
    ``UnpickledArray`` -> ``np.ndarray``; containers are rebuilt around them (same types)."""
    memo = {} if memo is None else memo
    key = id(obj)
    if key in memo:
        return memo[key]
    out: Any
    if isinstance(obj, np.ndarray):
        out = obj.view(np.ndarray) if type(obj) is not np.ndarray else obj
        memo[key] = out
        if out.dtype.hasobject:
            out = out.copy()
            memo[key] = out
            for index in np.ndindex(out.shape):
                out[index] = finalize(out[index], memo)
        return out
    if isinstance(obj, (DtypeRecipe, TorchDtype)):
        out = _resolve_dtype(obj)
    elif type(obj) in (dict, collections.OrderedDict):
        out = memo[key] = type(obj)()
        for k, v in obj.items():
            out[finalize(k, memo)] = finalize(v, memo)
    elif type(obj) is list:
        out = memo[key] = []
        out.extend(finalize(v, memo) for v in obj)
    elif type(obj) is NamespaceRecord:
        out = memo[key] = NamespaceRecord()
        out.__dict__.update({k: finalize(v, memo) for k, v in vars(obj).items()})
    elif type(obj) in (tuple, set, frozenset):
        out = type(obj)(finalize(v, memo) for v in obj)
    else:
        out = obj
    memo[key] = out
    return out


def _allowed_globals() -> dict[tuple[str, str], Any]:
    functions: dict[tuple[str, str], Callable[..., Any]] = {
        ("_codecs", "encode"): _encode_text,
        ("torch", "Size"): _torch_size,
        ("torch", "device"): _torch_device,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("numpy", "dtype"): _np_dtype,
    }
    for fn in _TENSOR_REBUILDERS:
        functions[("torch._utils", fn.__name__)] = fn
    for core in ("numpy.core", "numpy._core"):
        functions[(f"{core}.multiarray", "_reconstruct")] = _np_reconstruct
        functions[(f"{core}.multiarray", "scalar")] = _np_scalar
        functions[(f"{core}.numeric", "_frombuffer")] = _np_frombuffer
    # Protocol-2 pickles written by Python 3 name builtins as ``__builtin__`` (py2 compatibility).
    for module in ("builtins", "__builtin__"):
        functions[(module, "bytearray")] = _make_bytearray

    table: dict[tuple[str, str], Any] = {key: _SafeCallable(fn) for key, fn in functions.items()}
    # Types (NEWOBJ needs a real class); builtin types cannot be modified by BUILD, and
    # NamespaceRecord validates its state.
    table[("collections", "OrderedDict")] = collections.OrderedDict
    table[("argparse", "Namespace")] = NamespaceRecord
    for module in ("builtins", "__builtin__"):
        for cls in (set, frozenset, slice, complex):
            table[(module, cls.__name__)] = cls
    table[("numpy", "ndarray")] = _NDARRAY
    table[("torch", "Tensor")] = _TENSOR_TYPES[0]
    table[("torch.nn.parameter", "Parameter")] = _TENSOR_TYPES[1]
    for name, dtype in TORCH_DTYPES.items():
        table[("torch", name)] = TorchDtype(name, dtype)
    for name, dtype_name in STORAGE_DTYPES.items():
        storage_type = StorageType(name, TORCH_DTYPES[dtype_name])
        table[("torch", name)] = storage_type
        # Pre-1.0 GPU checkpoints name the CUDA storage classes; the bytes are the same.
        table[("torch.cuda", name)] = storage_type
    table[("torch.storage", "UntypedStorage")] = table[("torch", "UntypedStorage")]
    return table


#: Every global a checkpoint pickle may reference, mapped to what it resolves to here.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = _allowed_globals()


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves globals only through :data:`ALLOWED_GLOBALS`.

    ``persistent_load`` handles PyTorch's out-of-pickle storage references; without it a
    pickle that refers to external data is rejected.
    """

    def __init__(
        self, file: IO[bytes], *, source: str, persistent_load: Callable[[Any], Any] | None = None
    ) -> None:
        super().__init__(file, encoding="latin1")
        self.source = source
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load {self.source}: it references '{module}.{name}', which could execute code; "
                "only tensors and plain data are read. If you trust the file, load it with "
                "torch.load(weights_only=False), torch.save its state_dict, and read that instead."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent_load is None:
            raise CheckpointFormatError(
                f"{self.source}: the pickle refers to external data ({pid!r:.80}) but is not inside a PyTorch checkpoint"
            )
        return self._persistent_load(pid)


def safe_load(file: IO[bytes], *, source: str, persistent_load: Callable[[Any], Any] | None = None) -> Any:
    """Read one pickle from ``file`` with :class:`SafeUnpickler` and :func:`finalize` it.

    Malformed data raises :class:`CheckpointFormatError`.
    """
    try:
        return finalize(SafeUnpickler(file, source=source, persistent_load=persistent_load).load())
    except (UnsafeCheckpointError, CheckpointFormatError):
        raise
    except Exception as e:  # UnpicklingError, EOFError, TypeError from a malformed opcode stream, ...
        raise CheckpointFormatError(
            f"{source}: not a readable pickle of tensors and plain data ({type(e).__name__}: {e})"
        ) from e
