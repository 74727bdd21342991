"""Shared pytest fixtures: quiet TensorFlow, the dev copy of Penn-Fudan, temp data dirs."""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The project's development copy of Penn-Fudan lives beside the repository, never in it.
PENN_FUDAN_DIR = pathlib.Path(
    os.environ.get("PENN_FUDAN_DIR", REPO_ROOT.parent / "shared" / "datasets" / "PennFudanPed")
)


@pytest.fixture(scope="session")
def penn_fudan_dir():
    """Path of a Penn-Fudan directory; the test is skipped when it is absent."""
    if not (PENN_FUDAN_DIR / "PNGImages").is_dir():
        pytest.skip(f"Penn-Fudan not found at {PENN_FUDAN_DIR}")
    return PENN_FUDAN_DIR


class _PthTensor:
    """A NumPy array to be written as a torch tensor by `write_pth`."""

    def __init__(self, array):
        import numpy as np

        self.array = np.ascontiguousarray(array)


def _write_pth(path, state, extra_globals=()):
    """Writes `state` (name -> NumPy array) in torch.save's zip layout, without torch.

    For bad-input tests; the reader's correctness is checked against files written by
    real torch (tests/data/make_torch_fixtures.py). Arrays become float32/int64
    tensors. `extra_globals` are objects pickled by reference into the state as well.
    """
    import collections
    import io
    import pickle
    import sys
    import types
    import zipfile

    import numpy as np

    storage_types = {}
    fake_torch = types.ModuleType("torch")
    fake_utils = types.ModuleType("torch._utils")
    for name in ("FloatStorage", "LongStorage"):
        cls = type(name, (), {"__module__": "torch"})
        setattr(fake_torch, name, cls)
        storage_types[name] = cls

    def _rebuild_tensor_v2(*args):  # only its name is pickled
        raise AssertionError

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    fake_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    fake_torch._utils = fake_utils
    blobs = {}

    class Storage:
        def __init__(self, key, array):
            self.key, self.array = key, array

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                kind = "LongStorage" if obj.array.dtype.kind in "iu" else "FloatStorage"
                return ("storage", storage_types[kind], obj.key, "cpu", obj.array.size)
            return None

        def reducer_override(self, obj):
            if isinstance(obj, _PthTensor):
                array = obj.array
                array = array.astype(np.int64 if array.dtype.kind in "iu" else np.float32)
                key = str(len(blobs))
                blobs[key] = array.tobytes()
                strides = tuple(s // array.itemsize for s in array.strides)
                return (_rebuild_tensor_v2, (Storage(key, array), 0, array.shape, strides,
                                             False, collections.OrderedDict()))
            return NotImplemented

    payload = collections.OrderedDict((k, _PthTensor(v)) for k, v in state.items())
    for i, value in enumerate(extra_globals):
        payload[f"extra{i}"] = value
    saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
    sys.modules["torch"], sys.modules["torch._utils"] = fake_torch, fake_utils
    try:
        buffer = io.BytesIO()
        Pickler(buffer, protocol=2).dump(payload)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        for key, blob in blobs.items():
            archive.writestr(f"archive/data/{key}", blob)
        archive.writestr("archive/version", "3\n")
    return str(path)


@pytest.fixture
def write_pth():
    """`write_pth(path, {name: array}, extra_globals=())`: a torch.save zip file."""
    return _write_pth
