"""Safe reading of foreign checkpoints: golden files, torch round trips, hand-built files, malicious pickles."""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from l2s_jax.io.checkpoint_files import (
    LEGACY_MAGIC_NUMBER,
    LEGACY_PROTOCOL_VERSION,
    CheckpointFormatError,
    StateDictNotFoundError,
    UnsafeCheckpointError,
    extract_state_dict,
    read_checkpoint,
    read_state_dict,
)
from l2s_jax.io.safe_pickle import NamespaceRecord, SafeUnpickler

SLAK_CASES = ["slak/dev_slak_decom_w13", "slak/dev_slak_nodecom_w10", "convnext_bn/dev_convnext_bn"]
TIMM_TWINS = [
    "timm_convnext/convnext_mini",
    "timm_resnet/resnet_mini",
    "timm_vit/vit_mini",
    "timm_swin/swin_mini",
    "timm_mobilenetv3/mobilenetv3_mini",
]


@pytest.fixture
def no_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import torch`` fail, proving the reader never needs it."""
    monkeypatch.setitem(sys.modules, "torch", None)


# ----------------------------------------------------------------------------------------------
# Golden checkpoints
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", SLAK_CASES)
def test_slak_training_checkpoint(golden_dir: Path, case: str, no_torch: None) -> None:
    meta = json.loads((golden_dir / f"{case}.json").read_text())
    ckpt = read_checkpoint(golden_dir / f"{case}.pth")
    assert list(ckpt) == meta["checkpoint_top_level_keys"]
    assert ckpt["epoch"] == 299 and ckpt["scaler"] == {}

    args = ckpt["args"]
    assert isinstance(args, NamespaceRecord) and args.model.startswith("SLaK_golden_")
    assert len(vars(args)) > 50

    sd, key = extract_state_dict(ckpt)
    assert key == "model"
    assert len(sd) == meta["num_state_dict_entries"]
    assert list(sd) == list(ckpt["model"])  # order preserved
    nbt = [k for k in sd if k.endswith("num_batches_tracked")]
    assert nbt and all(sd[k].shape == () and sd[k].dtype == np.int64 and sd[k] == 187650 for k in nbt)
    floats = [k for k in sd if k not in nbt]
    assert all(sd[k].dtype == np.float32 and sd[k].flags.c_contiguous for k in floats)
    params = [k for k in floats if not k.endswith(("running_mean", "running_var"))]
    assert sum(sd[k].size for k in params) == meta["num_parameters"]
    for name, zeros in meta["zeroed_entries_per_tensor"].items():
        assert int(np.sum(sd[name] == 0)) == zeros, name  # 40 % sparse kernels: exact zero counts

    ema, ema_key = read_state_dict(golden_dir / f"{case}.pth", key="model_ema")
    assert ema_key == "model_ema" and list(ema) == list(sd)
    assert any(not np.array_equal(ema[k], sd[k]) for k in floats)

    opt = ckpt["optimizer"]
    decay, no_decay = opt["param_groups"]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert decay["lr_scale"] == 1.0 and decay["betas"] == (0.9, 0.999)
    indices = decay["params"] + no_decay["params"]
    assert sorted(opt["state"]) == sorted(indices) and all(isinstance(i, int) for i in indices)
    for entry in opt["state"].values():
        assert float(entry["step"]) == 1.0
        assert entry["exp_avg"].shape == entry["exp_avg_sq"].shape
        assert np.all(entry["exp_avg_sq"] >= 0)
    assert sorted(e["exp_avg"].shape for e in opt["state"].values()) == sorted(sd[k].shape for k in params)


def test_cswin_state_dict_keys(golden_dir: Path, no_torch: None) -> None:
    path = golden_dir / "cswin" / "cswin_mini.pth"
    meta = json.loads((golden_dir / "cswin" / "cswin_mini.json").read_text())
    ckpt = read_checkpoint(path)
    assert list(ckpt) == ["state_dict_ema", "state_dict"]
    default, key = extract_state_dict(ckpt)
    assert key == "state_dict"
    ema, key = extract_state_dict(ckpt, key="state_dict_ema")
    assert key == "state_dict_ema" and len(ema) == meta["num_state_dict_entries"]
    assert list(ema) == list(default)
    assert any(not np.array_equal(ema[k], default[k]) for k in ema)
    only_ema, key = extract_state_dict({"state_dict_ema": ckpt["state_dict_ema"], "epoch": 3})
    assert key == "state_dict_ema" and only_ema.keys() == ema.keys()
    assert sum(v.size for v in ema.values()) == meta["num_parameters"]


@pytest.mark.parametrize("name", TIMM_TWINS)
def test_timm_pth_matches_safetensors_twin(golden_dir: Path, name: str, no_torch: None) -> None:
    meta = json.loads((golden_dir / f"{name}.json").read_text())
    from_pth, key = read_state_dict(golden_dir / f"{name}.pth")
    from_st, st_key = read_state_dict(golden_dir / f"{name}.safetensors")
    assert key is None and st_key is None
    assert len(from_pth) == meta["num_state_dict_entries"]
    assert sorted(from_pth) == sorted(from_st)
    for k, v in from_pth.items():
        assert v.dtype == from_st[k].dtype and np.array_equal(v, from_st[k]), k


def test_full_size_mobilenet_reads(golden_dir: Path, no_torch: None) -> None:
    sd, key = read_state_dict(golden_dir / "timm_mobilenetv3" / "mobilenetv3_large_100.pth")
    manifest = json.loads((golden_dir / "manifests" / "timm_mobilenetv3_large_100.json").read_text())
    assert key is None
    assert {k: list(v.shape) for k, v in sd.items()} == {k: s for k, (s, _) in manifest["state_dict"].items()}
    assert {k: str(v.dtype) for k, v in sd.items()} == {k: d for k, (_, d) in manifest["state_dict"].items()}


# ----------------------------------------------------------------------------------------------
# Hand-built torch files (no torch needed): opcodes written by hand, like torch.save lays them out
# ----------------------------------------------------------------------------------------------


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _str(s: str) -> bytes:
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _tensor(pid: bytes, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    """``_rebuild_tensor_v2(persistent(pid), offset, size, stride, False, OrderedDict())``."""
    hooks = _global("collections", "OrderedDict") + b")R"
    args = _tuple(pid + b"Q", _int(offset), _tuple(*map(_int, size)), _tuple(*map(_int, stride)), b"\x89", hooks)
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _state_pickle(tensors: dict[str, tuple[bytes, int, tuple[int, ...], tuple[int, ...]]]) -> bytes:
    """A protocol-2 pickle of ``{name: tensor}``."""
    body = b"".join(_str(name) + _tensor(*spec) for name, spec in tensors.items())
    return b"\x80\x02}(" + body + b"u."


def _zip_pid(key: str, numel: int, storage: str = "FloatStorage") -> bytes:
    return _tuple(_str("storage"), _global("torch", storage), _str(key), _str("cpu"), _int(numel))


def _write_torch_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes], byteorder: bytes = b"little") -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", byteorder)
        for key, raw in storages.items():
            zf.writestr(f"archive/data/{key}", raw)
        zf.writestr("archive/version", b"3\n")


BASE = np.arange(12, dtype=np.float32)
VIEWS = {  # name -> (offset, size, stride) into BASE, and the numpy equivalent
    "w": (0, (3, 4), (4, 1)),
    "wt": (0, (4, 3), (1, 4)),
    "strided": (2, (5,), (2,)),
    "block": (5, (2, 2), (4, 1)),
    "scalar": (7, (), ()),
    "empty": (0, (0, 3), (3, 1)),
}
EXPECTED = {
    "w": BASE.reshape(3, 4),
    "wt": BASE.reshape(3, 4).T,
    "strided": BASE[2:11:2],
    "block": BASE.reshape(3, 4)[1:3, 1:3],
    "scalar": np.float32(7),
    "empty": np.zeros((0, 3), np.float32),
}


@pytest.mark.parametrize("byteorder", [b"little", b"big"])
def test_hand_built_zip_views_share_one_storage(tmp_path: Path, byteorder: bytes, no_torch: None) -> None:
    raw = BASE.astype("<f4" if byteorder == b"little" else ">f4").tobytes()
    pkl = _state_pickle({name: (_zip_pid("0", 12), *spec) for name, spec in VIEWS.items()})
    path = tmp_path / "views.pth"
    _write_torch_zip(path, pkl, {"0": raw}, byteorder)
    sd = read_checkpoint(path)
    assert list(sd) == list(VIEWS)
    for name, expected in EXPECTED.items():
        got = sd[name]
        assert got.dtype == np.float32 and got.shape == np.shape(expected) and got.flags.c_contiguous
        np.testing.assert_array_equal(got, expected)
    sd["w"][0, 0] = 100.0  # copies: no aliasing between tensors that shared a storage
    assert sd["wt"][0, 0] == 0.0


@pytest.mark.parametrize(
    "offset,size,stride",
    [
        (0, (13,), (1,)),
        (10, (3,), (1,)),
        (0, (3, 5), (5, 1)),
        (0, (2,), (100,)),
        (0, (2,), (-1,)),
        (0, (10**6, 10**6), (0, 0)),  # a 1e12-element expansion of one element
    ],
)
def test_out_of_bounds_tensor_is_rejected(tmp_path: Path, offset: int, size: tuple, stride: tuple) -> None:
    path = tmp_path / "oob.pth"
    _write_torch_zip(path, _state_pickle({"x": (_zip_pid("0", 12), offset, size, stride)}), {"0": BASE.tobytes()})
    with pytest.raises(CheckpointFormatError, match="storage|negative"):
        read_checkpoint(path)
    # The same views are fine inside the storage.
    _write_torch_zip(path, _state_pickle({"x": (_zip_pid("0", 12), 1, (11,), (1,))}), {"0": BASE.tobytes()})
    np.testing.assert_array_equal(read_checkpoint(path)["x"], BASE[1:])


def test_truncated_storage_record_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "short.pth"
    _write_torch_zip(path, _state_pickle({"x": (_zip_pid("0", 12), 0, (12,), (1,))}), {"0": BASE.tobytes()[:40]})
    with pytest.raises(CheckpointFormatError, match="holds 40 bytes"):
        read_checkpoint(path)


def _legacy_file(main: bytes, keys: list[str], records: list[bytes]) -> bytes:
    sys_info = {"protocol_version": LEGACY_PROTOCOL_VERSION, "little_endian": True, "type_sizes": {"long": 8}}
    head = b"".join(pickle.dumps(x, protocol=2) for x in (LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION, sys_info))
    return head + main + pickle.dumps(keys, protocol=2) + b"".join(records)


def test_hand_built_legacy_file_with_storage_views(tmp_path: Path, no_torch: None) -> None:
    def pid(key: str, numel: int, view: bytes = b"N", storage: str = "FloatStorage") -> bytes:
        return _tuple(_str("storage"), _global("torch", storage), _str(key), _str("cpu"), _int(numel), view)

    longs = np.array([5, -7, 2**40], dtype=np.int64)
    main = _state_pickle({
        "wt": (pid("11", 12), 0, (4, 3), (1, 4)),
        "view": (pid("11", 12, _tuple(_str("v"), _int(4), _int(6))), 1, (2, 2), (1, 2)),
        "longs": (pid("22", 3, storage="LongStorage"), 0, (3,), (1,)),
    })
    records = [struct.pack("<q", 12) + BASE.tobytes(), struct.pack("<q", 3) + longs.astype("<i8").tobytes()]
    path = tmp_path / "legacy.pt"
    path.write_bytes(_legacy_file(main, ["11", "22"], records))
    sd = read_checkpoint(path)
    np.testing.assert_array_equal(sd["wt"], BASE.reshape(3, 4).T)
    np.testing.assert_array_equal(sd["view"], BASE[4:10][1:5].reshape(2, 2).T)
    assert sd["longs"].dtype == np.int64
    np.testing.assert_array_equal(sd["longs"], longs)

    path.write_bytes(_legacy_file(main, ["11", "22"], records)[:-4])
    with pytest.raises(CheckpointFormatError, match="truncated|corrupt"):
        read_checkpoint(path)


def test_plain_pickle_of_numpy_and_plain_data(tmp_path: Path, no_torch: None) -> None:
    obj = {
        "a": np.arange(6, dtype=np.float64).reshape(2, 3).T,
        "big_endian": np.arange(-3, 3, dtype=">i2"),
        "text": np.array(["ab", "c"]),
        "objects": np.array([1, "x", None], dtype=object),
        "s": np.float32(1.5),
        "i": np.int64(3),
        "dt": np.dtype(">i2"),
        "set": {1, 2},
        "frozen": frozenset({"x"}),
        "b": b"\x00\xffraw",
        "ba": bytearray(b"ab"),
        "c": 1 + 2j,
        "sl": slice(1, 5, 2),
        "od": OrderedDict(z=1, a=2),
        "ns": argparse.Namespace(lr=0.1, name="x"),
        "nested": [(1, 2.0, None, True, "t")],
    }
    for protocol in (2, 4, 5):
        path = tmp_path / f"plain{protocol}.pkl"
        data = pickle.dumps(obj, protocol=protocol)
        path.write_bytes(data)
        got = read_checkpoint(path)
        reference = pickle.loads(data)  # numpy itself turns protocol-2 '>i2' arrays native-endian
        for name in ("a", "big_endian", "text", "objects"):
            assert type(got[name]) is np.ndarray and got[name].dtype == reference[name].dtype, name
            np.testing.assert_array_equal(got[name], obj[name])
        assert got["s"] == obj["s"] and got["s"].dtype == np.float32 and got["i"].dtype == np.int64
        assert type(got["dt"]) is type(np.dtype(">i2")) and got["dt"] == np.dtype(">i2")
        plain = ["set", "frozen", "b", "ba", "c", "sl", "od", "nested"]
        assert {k: got[k] for k in plain} == {k: obj[k] for k in plain}
        assert list(got["od"]) == ["z", "a"]
        assert isinstance(got["ns"], NamespaceRecord) and vars(got["ns"]) == {"lr": 0.1, "name": "x"}


# ----------------------------------------------------------------------------------------------
# torch round trips (only when torch is installed)
# ----------------------------------------------------------------------------------------------


def _torch_state() -> tuple[Any, OrderedDict]:
    """torch and a state dict covering views, shared storages and every common dtype (skip without torch)."""
    torch = pytest.importorskip("torch", reason="torch is not installed: round trips against torch.save are skipped")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    state = OrderedDict(
        contiguous=torch.randn(3, 5, generator=g),
        transposed=base.t(),
        offset_view=base.view(-1)[5:17].view(3, 4),
        column=base[:, 2],
        shared_a=base,
        shared_b=base[1:3],
        fp16=torch.randn(2, 3, generator=g).half(),
        bf16=torch.randn(3, 2, generator=g).to(torch.bfloat16).t(),
        f64=torch.randn(4, generator=g, dtype=torch.float64),
        int64=torch.randint(-(2**40), 2**40, (5,), generator=g),
        int8=torch.randint(-100, 100, (2, 2), generator=g).to(torch.int8),
        uint8=torch.randint(0, 255, (3,), generator=g).to(torch.uint8),
        uint16=torch.arange(7).to(torch.uint16),
        fp8=torch.randn(4, generator=g).to(torch.float8_e4m3fn),
        boolean=torch.randn(2, 4, generator=g) > 0,
        complex=torch.randn(3, generator=g, dtype=torch.complex64),
        num_batches_tracked=torch.tensor(187650),
        empty=torch.zeros(0, 3),
        parameter=torch.nn.Parameter(torch.randn(2, generator=g)),
    )
    return torch, state


def _as_numpy(t: Any) -> np.ndarray:
    """A torch tensor's values; low-precision floats upcast to float32 for comparison."""
    import torch

    t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn):
        return t.float().numpy()
    return t.numpy()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_save_round_trip(tmp_path: Path, zip_format: bool) -> None:
    torch, state = _torch_state()
    ckpt = {
        "model": state,
        "epoch": 7,
        "args": argparse.Namespace(model="x", lr=4e-3, kernel_size=[51, 49]),
        "shape": torch.Size([2, 3]),
        "device": torch.device("cpu"),
        "dtype": torch.float16,
        "np": np.arange(4.0),
        "opt": {"state": {0: {"step": torch.tensor(1.0)}}, "param_groups": [{"params": [0], "betas": (0.9, 0.99)}]},
    }
    path = tmp_path / "ckpt.pth"
    torch.save(ckpt, path, _use_new_zipfile_serialization=zip_format)
    assert zipfile.is_zipfile(path) == zip_format
    got = read_checkpoint(path)
    sd, key = extract_state_dict(got)
    assert key == "model" and list(sd) == list(state)
    for name, tensor in state.items():
        expected = _as_numpy(tensor)
        value = sd[name].astype(np.float32) if name in ("bf16", "fp8") else sd[name]
        assert value.dtype == expected.dtype and value.shape == expected.shape, name
        np.testing.assert_array_equal(value, expected, err_msg=name)
    assert sd["bf16"].dtype == ml_dtypes.bfloat16 and sd["fp8"].dtype == ml_dtypes.float8_e4m3fn
    assert got["epoch"] == 7 and got["shape"] == (2, 3) and got["device"] == "cpu"
    assert got["dtype"] == np.float16
    assert vars(got["args"]) == {"model": "x", "lr": 4e-3, "kernel_size": [51, 49]}
    np.testing.assert_array_equal(got["np"], np.arange(4.0))
    assert float(got["opt"]["state"][0]["step"]) == 1.0
    assert got["opt"]["param_groups"] == [{"params": [0], "betas": (0.9, 0.99)}]


def test_torch_ddp_prefix_is_stripped(tmp_path: Path) -> None:
    torch, state = _torch_state()
    path = tmp_path / "ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)
    sd, key = read_state_dict(path)
    assert key == "model" and list(sd) == list(state)
    np.testing.assert_array_equal(sd["transposed"], state["transposed"].numpy())


# ----------------------------------------------------------------------------------------------
# Malicious files
# ----------------------------------------------------------------------------------------------


class _Exploit:
    """Pickles as a call to os.system that would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def _evil_pickle(marker: Path, wrap: bool = True) -> bytes:
    payload = {"model": {"weight": _Exploit(marker)}} if wrap else _Exploit(marker)
    return pickle.dumps(payload, protocol=2)


def _assert_refused(path: Path, marker: Path, names: str = r"posix\.system|os\.system|nt\.system") -> None:
    with pytest.raises(UnsafeCheckpointError, match=rf"refusing to load .*'({names})'.*could execute code"):
        read_checkpoint(path)
    assert not marker.exists(), "the malicious pickle was executed"


@pytest.mark.parametrize("suffix", [".pkl", ".pth", ".weights"])
def test_malicious_plain_pickle(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(_evil_pickle(marker))
    _assert_refused(path, marker)


def test_malicious_pickle_in_torch_zip(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    _write_torch_zip(path, _evil_pickle(marker), {})
    _assert_refused(path, marker)


@pytest.mark.parametrize("position", ["magic", "sys_info", "main", "keys"])
def test_malicious_pickle_in_legacy_format(tmp_path: Path, position: str) -> None:
    marker = tmp_path / "pwned"
    parts = {
        "magic": pickle.dumps(LEGACY_MAGIC_NUMBER, protocol=2),
        "version": pickle.dumps(LEGACY_PROTOCOL_VERSION, protocol=2),
        "sys_info": pickle.dumps({"little_endian": True}, protocol=2),
        "main": pickle.dumps({"epoch": 1}, protocol=2),
        "keys": pickle.dumps([], protocol=2),
    }
    parts[position] = _evil_pickle(marker, wrap=position == "main")
    path = tmp_path / "evil_legacy.pt"
    path.write_bytes(b"".join(parts.values()))
    _assert_refused(path, marker)


DANGEROUS_GLOBALS = [
    ("os", "system"),
    ("posix", "system"),
    ("nt", "system"),
    ("subprocess", "Popen"),
    ("subprocess", "check_output"),
    ("builtins", "eval"),
    ("builtins", "exec"),
    ("builtins", "getattr"),
    ("builtins", "__import__"),
    ("__builtin__", "eval"),
    ("__builtin__", "getattr"),
    ("copyreg", "_reconstructor"),
    ("pickle", "loads"),
    ("numpy", "load"),
    ("torch", "load"),
    ("torch.storage", "_load_from_bytes"),
    ("torch._utils", "_rebuild_qtensor"),
    ("torch.nn.modules.conv", "Conv2d"),
    ("argparse", "ArgumentParser"),
    ("collections", "defaultdict"),
]


@pytest.mark.parametrize("module,name", DANGEROUS_GLOBALS, ids=[".".join(g) for g in DANGEROUS_GLOBALS])
def test_dangerous_globals_are_refused(tmp_path: Path, module: str, name: str) -> None:
    marker = tmp_path / "pwned"
    payload = b"\x80\x02" + _global(module, name) + _tuple(_str(f"echo pwned > {marker}")) + b"R."
    path = tmp_path / "evil.pkl"
    path.write_bytes(payload)
    _assert_refused(path, marker, names=f"{module}\\.{name}")


# A numpy dtype state that, applied by numpy itself to the shared ml_dtypes.bfloat16 descriptor,
# corrupts it for the whole process (element size -1).
_BAD_DTYPE_STATE = _tuple(_int(3), _str("|"), b"N", _tuple(_str("a")), b"}" + _str("a") + _tuple(
    _global("torch", "float64"), _int(0)) + b"s", _int(-1), _int(-1), _int(63))


@pytest.mark.parametrize(
    "payload,match",
    [
        # BUILD on an allowlisted global must not modify it.
        (_global("torch", "FloatStorage") + b"}" + _str("dtype") + _str("O") + b"sb.", "modify"),
        (_global("torch._utils", "_rebuild_tensor_v2") + b"}" + _str("x") + _int(1) + b"sb.", "modify"),
        (_global("torch", "bfloat16") + _BAD_DTYPE_STATE + b"b.", "modify"),
        # _rebuild_from_type_v2 may only wrap tensor rebuilds.
        (_global("torch._tensor", "_rebuild_from_type_v2") + _tuple(
            _global("builtins", "set"), _global("torch", "Tensor"), _tuple(), b"N") + b"R.", "only plain tensors"),
        (_global("numpy.core.multiarray", "_reconstruct") + _tuple(
            _global("builtins", "set"), _tuple(_int(0)), _str("b")) + b"R.", "only plain numpy.ndarray"),
        (_global("_codecs", "encode") + _tuple(_str("x"), _str("zlib_codec")) + b"R.", "not a text encoding"),
        (_global("numpy", "ndarray") + _tuple(_tuple(_int(4))) + b"R.", "calls 'numpy.ndarray' directly"),
    ],
    ids=[
        "build-storage-type", "build-function", "build-torch-dtype", "from-type-v2", "np-reconstruct-subtype",
        "codecs", "ndarray-call",
    ],
)
def test_misuse_of_allowed_globals(payload: bytes, match: str) -> None:
    with pytest.raises(UnsafeCheckpointError, match=match):
        SafeUnpickler(io.BytesIO(b"\x80\x02" + payload), source="test").load()
    assert np.dtype(ml_dtypes.bfloat16).itemsize == 2


@pytest.mark.parametrize(
    "payload,match",
    [
        (_global("numpy", "dtype") + _tuple(_str("bfloat16"), b"\x89\x88") + b"R" + _BAD_DTYPE_STATE + b"b.",
         "structured"),
        (_global("numpy", "dtype") + _tuple(_str("f4"), b"\x89\x88") + b"R" + _tuple(
            _int(3), _str("<"), b"NNN", _int(64), _int(-1), _int(0)) + b"b.", "claims 64 bytes"),
        (_global("numpy.core.multiarray", "_reconstruct") + _tuple(
            _global("numpy", "ndarray"), _tuple(_int(0)), _str("b")) + b"R" + _tuple(
            _int(1), _tuple(_int(3)), _global("torch", "float32"), b"\x89", b"C" + bytes([8]) + bytes(8)) + b"b.",
         "buffer size"),
    ],
    ids=["dtype-fields", "dtype-elsize", "array-size"],
)
def test_malformed_numpy_states(tmp_path: Path, payload: bytes, match: str) -> None:
    path = tmp_path / "np.pkl"
    path.write_bytes(b"\x80\x02" + payload)
    with pytest.raises(CheckpointFormatError, match=match):
        read_checkpoint(path)
    assert np.dtype(ml_dtypes.bfloat16).itemsize == 2


def test_build_on_a_storage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "rebind.pth"
    payload = b"\x80\x02" + _zip_pid("0", 12) + b"Q}" + _str("data") + b"Nsb."
    _write_torch_zip(path, payload, {"0": BASE.tobytes()})
    with pytest.raises(UnsafeCheckpointError, match="modify"):
        read_checkpoint(path)


def test_npz_with_object_array_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, ok=np.arange(3), bad=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UnsafeCheckpointError, match="object arrays"):
        read_checkpoint(path)


# ----------------------------------------------------------------------------------------------
# Other formats and errors
# ----------------------------------------------------------------------------------------------


def test_npz_and_npy(tmp_path: Path) -> None:
    arrays = {"a.weight": np.arange(6.0).reshape(2, 3), "n": np.array(5, np.int64)}
    np.savez(tmp_path / "w.npz", **arrays)
    sd, key = read_state_dict(tmp_path / "w.npz")
    assert key is None and sd.keys() == arrays.keys()
    np.testing.assert_array_equal(sd["a.weight"], arrays["a.weight"])
    np.save(tmp_path / "one.npy", arrays["a.weight"])
    np.testing.assert_array_equal(read_checkpoint(tmp_path / "one.npy"), arrays["a.weight"])


def test_safetensors_bfloat16_and_float8(tmp_path: Path) -> None:
    values = {
        "bf": np.array([[1.5, -2.0], [0.1, 3e5]], np.float32).astype(ml_dtypes.bfloat16),
        "f8": np.array([0.5, -1.25, 448.0], np.float32).astype(ml_dtypes.float8_e4m3fn),
        "f32": np.arange(3, dtype=np.float32),
    }
    codes = {"bf": "BF16", "f8": "F8_E4M3", "f32": "F32"}
    header, blob = {}, b""
    for name, arr in values.items():
        raw = arr.tobytes()
        header[name] = {"dtype": codes[name], "shape": list(arr.shape), "data_offsets": [len(blob), len(blob) + len(raw)]}
        blob += raw
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path = tmp_path / "low_precision.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head + blob)
    got = read_checkpoint(path)
    for name, arr in values.items():
        assert got[name].dtype == arr.dtype
        np.testing.assert_array_equal(got[name].astype(np.float32), arr.astype(np.float32))


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        read_checkpoint(tmp_path / "nowhere.pth")
    with pytest.raises(IsADirectoryError):
        read_checkpoint(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointFormatError, match=r"unrecognised.*\.safetensors.*\.npz"):
        read_checkpoint(tmp_path / "notes.txt")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("readme.md", "x")
    with pytest.raises(CheckpointFormatError, match="no data.pkl"):
        read_checkpoint(tmp_path / "other.zip")
    path = tmp_path / "script.pt"
    _write_torch_zip(path, pickle.dumps({}, protocol=2), {})
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("archive/code/__torch__.py", "def forward(self): ...")
    with pytest.raises(CheckpointFormatError, match="TorchScript"):
        read_checkpoint(path)
    path = tmp_path / "refs.pkl"
    path.write_bytes(b"\x80\x02" + _str("x") + b"Q.")
    with pytest.raises(CheckpointFormatError, match="external data"):
        read_checkpoint(path)


# ----------------------------------------------------------------------------------------------
# extract_state_dict on in-memory objects
# ----------------------------------------------------------------------------------------------


def test_extract_state_dict_selection_and_cleanup() -> None:
    w = np.ones((2, 2), np.float32)
    nbt = np.array(3, np.int64)
    sd, key = extract_state_dict({"a": w, "b.num_batches_tracked": nbt, "note": "text", "count": 4})
    assert key is None and list(sd) == ["a", "b.num_batches_tracked"] and sd["b.num_batches_tracked"].dtype == np.int64

    nested = {"model": {"state_dict": {"x": w}, "epoch": 1}, "optimizer": {"state": {0: {"step": w}}}}
    sd, key = extract_state_dict(nested)
    assert key == "model/state_dict" and list(sd) == ["x"]
    assert extract_state_dict(nested, key="model")[1] == "model/state_dict"
    assert extract_state_dict(nested, key="model/state_dict")[1] == "model/state_dict"

    both = {"model": {"a": w}, "model_ema": {"a": 2 * w}}
    assert extract_state_dict(both)[1] == "model"
    assert extract_state_dict(both, default_keys=("model_ema", "model"))[1] == "model_ema"
    assert float(extract_state_dict(both, key="model_ema")[0]["a"][0, 0]) == 2.0

    with pytest.raises(StateDictNotFoundError, match=r"'teacher'.*'model' \(state_dict with 1 tensors\)"):
        extract_state_dict(both, key="teacher")
    with pytest.raises(StateDictNotFoundError, match=r"no state_dict found.*'epoch' \(int\)"):
        extract_state_dict({"epoch": 3, "args": NamespaceRecord(lr=1)})
    with pytest.raises(StateDictNotFoundError, match="holds no tensors"):
        extract_state_dict({"model": {"a": w}, "epoch": 3}, key="epoch")


def test_wrapper_prefixes_are_stripped() -> None:
    w = np.zeros(2, np.float32)
    assert list(extract_state_dict({"module.a": w, "module.b.c": w})[0]) == ["a", "b.c"]
    assert list(extract_state_dict({"_orig_mod.module.a": w})[0]) == ["a"]
    averaged = extract_state_dict({"n_averaged": np.array(4), "module.a": w})[0]
    assert list(averaged) == ["n_averaged", "a"]
    partial = extract_state_dict({"module.a": w, "b": w})[0]
    assert list(partial) == ["module.a", "b"]  # only a prefix shared by every key is a wrapper's
