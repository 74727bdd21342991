"""Tests of `instance_embed.model.torch_weights`: reading torch.save files without torch."""

import os
import pathlib
import zipfile

import numpy as np
import pytest

from instance_embed.model import torch_weights

DATA = pathlib.Path(__file__).resolve().parents[1] / "fixtures"


def _expected():
    """The tensors of tests/data/make_torch_fixtures.py, from the same formulas."""
    base = np.arange(2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3) / np.float32(7.0)
    base = base - np.float32(2.0)
    square = np.arange(12, dtype=np.float32).reshape(3, 4)
    shared = np.arange(10, dtype=np.float32) * np.float32(0.5)
    return {
        "state_dict.conv.weight": base,
        "state_dict.bn.num_batches_tracked": np.array(1234567890123, np.int64),
        "state_dict.transposed": square.T,
        "state_dict.half": np.array([0.5, -1.25, 3.0], np.float16),
        # 1.0, -2.5 and 0.15625 are exact in bfloat16.
        "state_dict.bf16": np.array([1.0, -2.5, 0.15625], np.float32),
        "state_dict.shared_a": shared[2:6],
        "state_dict.shared_b": shared[::3],
        "state_dict.empty": np.zeros((0, 3), np.float32),
        "state_dict.flag": np.array([True, False, True]),
    }


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_reads_files_written_by_torch(layout):
    arrays = torch_weights.read_state_dict(str(DATA / f"torch_fixture_{layout}.pth"))
    expected = _expected()
    assert list(arrays) == list(expected)  # the file's order; "epoch" is not a tensor
    for name, value in expected.items():
        assert arrays[name].dtype == value.dtype, name
        assert arrays[name].shape == value.shape, name
        np.testing.assert_array_equal(arrays[name], value, err_msg=name)


def test_round_trips_the_test_writer(tmp_path, write_pth):
    rng = np.random.default_rng(0)
    state = {"a.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
             "a.count": np.array(5, np.int64)}
    arrays = torch_weights.read_state_dict(write_pth(tmp_path / "w.pth", state))
    np.testing.assert_array_equal(arrays["a.weight"], state["a.weight"])
    assert arrays["a.count"] == 5


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_truncated_file_is_refused_naming_it(tmp_path, layout):
    source = (DATA / f"torch_fixture_{layout}.pth").read_bytes()
    for keep in (len(source) // 2, len(source) - 7, 40):
        path = tmp_path / f"cut{keep}.pth"
        path.write_bytes(source[:keep])
        with pytest.raises(torch_weights.TorchFileError, match=str(path)):
            torch_weights.read_state_dict(str(path))


def test_short_storage_inside_a_zip_is_refused(tmp_path):
    path = tmp_path / "short.pth"
    with zipfile.ZipFile(DATA / "torch_fixture_zip.pth") as source, \
            zipfile.ZipFile(path, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if "/data/" in item.filename and len(data) > 8:
                data = data[:-8]
            target.writestr(item, data)
    with pytest.raises(torch_weights.TorchFileError, match="truncated|corrupt"):
        torch_weights.read_state_dict(str(path))


def test_pickle_naming_other_globals_is_refused(tmp_path, write_pth):
    marker = tmp_path / "ran"
    path = write_pth(tmp_path / "evil.pth", {"w": np.ones(2)}, extra_globals=[os.system])
    with pytest.raises(torch_weights.TorchFileError) as error:
        torch_weights.read_state_dict(path)
    message = str(error.value)
    assert path in message and "system" in message and "refused" in message
    assert not marker.exists()


def test_not_a_torch_file_is_refused(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    with pytest.raises(torch_weights.TorchFileError, match=str(path)):
        torch_weights.read_state_dict(str(path))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        torch_weights.read_state_dict(str(tmp_path / "missing.pth"))
