"""Writes the two `.pth` fixtures of tests/test_torch_weights.py with real PyTorch.

Run once with torch installed (not a dependency of the package or of the tests):

    python tests/data/make_torch_fixtures.py

The tensors are `fixture_tensors()` of the test module, rebuilt here from the same
formulas: the tests compare what `torch_weights.read_state_dict` reads with NumPy arrays
computed independently of any torch file.
"""

import collections
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def fixture_state_dict():
    base = torch.arange(2 * 3 * 3 * 3, dtype=torch.float32).reshape(2, 3, 3, 3) / 7.0 - 2.0
    square = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    shared = torch.arange(10, dtype=torch.float32) * 0.5
    state = collections.OrderedDict()
    state["conv.weight"] = base                                 # OIHW, contiguous
    state["bn.num_batches_tracked"] = torch.tensor(1234567890123, dtype=torch.int64)
    state["transposed"] = square.t()                            # non-contiguous view
    state["half"] = torch.tensor([0.5, -1.25, 3.0], dtype=torch.float16)
    state["bf16"] = torch.tensor([1.0, -2.5, 0.15625], dtype=torch.bfloat16)
    state["shared_a"] = shared[2:6]                             # two views of one storage
    state["shared_b"] = shared[::3]
    state["empty"] = torch.zeros(0, 3)
    state["flag"] = torch.tensor([True, False, True])
    return {"state_dict": state, "epoch": 7}


def main():
    torch.save(fixture_state_dict(), os.path.join(HERE, "torch_fixture_zip.pth"))
    torch.save(fixture_state_dict(), os.path.join(HERE, "torch_fixture_legacy.pth"),
               _use_new_zipfile_serialization=False)


if __name__ == "__main__":
    main()
