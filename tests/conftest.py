"""Shared pytest fixtures: quiet TensorFlow, the dev copy of Penn-Fudan, small generated
datasets and run directories, a tiny experiment configuration, processes run at once,
and NumPy references of the paper's inference.

Helpers that several test files need are fixtures that return a function (pytest's
"factory as fixture"), so test files never import each other.
"""

import io
import math
import os
import pathlib
import re
import struct
import subprocess
import sys
import zlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The project's development copy of Penn-Fudan lives beside the repository, never in it.
PENN_FUDAN_DIR = pathlib.Path(
    os.environ.get("PENN_FUDAN_DIR", REPO_ROOT.parent / "shared" / "datasets" / "PennFudanPed")
)
# Thresholds of the tiny configuration: two keep the classification head small.
TINY_TAUS = (0.5, 0.75)


@pytest.fixture(scope="session")
def repo_root():
    """The repository's root directory (a `pathlib.Path`)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def penn_fudan_dir():
    """Path of a Penn-Fudan directory; the test is skipped when it is absent."""
    if not (PENN_FUDAN_DIR / "PNGImages").is_dir():
        pytest.skip(f"Penn-Fudan not found at {PENN_FUDAN_DIR}")
    return PENN_FUDAN_DIR


def _write_folder_dataset(root, count=5, size=64):
    """`count` images with two or three rectangles each, in the instance_folder layout."""
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "images"))
    os.makedirs(os.path.join(root, "masks"))
    for i in range(count):
        mask = np.zeros((size, size), np.uint8)
        for k in range(1, 2 + i % 2 + 1):
            y, x = rng.integers(0, size - 20, 2)
            mask[y:y + 18, x:x + 18] = k
        image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
        image[mask > 0] += np.uint8(120)
        Image.fromarray(image).save(os.path.join(root, "images", f"img{i}.png"))
        Image.fromarray(mask).save(os.path.join(root, "masks", f"img{i}.png"))
    return str(root)


@pytest.fixture(scope="session")
def write_folder_dataset():
    """`write_folder_dataset(root, count=5, size=64) -> root`: an instance_folder
    dataset of rectangles (every 5th image by name is `validation`)."""
    return _write_folder_dataset


def _tiny_config(data_dir, manual_dir, **train):
    """A light-backbone `ExperimentConfig` on an instance_folder dataset, 64 px, no
    augmentation, a few steps; `train` overrides `TrainConfig` fields."""
    from instance_embed import configs
    from instance_embed.data import augment
    from instance_embed.data import pipeline
    from instance_embed.inference import InferenceConfig
    from instance_embed.losses import LossConfig
    from instance_embed.model import ModelConfig

    train_kwargs = dict(batch_size=4, train_steps=6, learning_rate=3e-3, warmup_steps=0,
                        log_every=1, summary_every=3, checkpoint_every=3, eval_at_end=False,
                        seed=3)
    train_kwargs.update(train)
    no_augment = augment.AugmentConfig(rotate=False, resize=False, crop=False, flip=False)
    return configs.ExperimentConfig(
        dataset=configs.DatasetConfig(name="instance_folder", data_dir=str(data_dir),
                                      manual_dir=str(manual_dir)),
        input=pipeline.InputConfig(image_size=64, max_instances=4, augment=no_augment,
                                   shuffle_buffer=1),
        model=ModelConfig(backbone="light", embedding_dim=8, num_classes=1, taus=TINY_TAUS,
                          head_channels=16, head_depth=1),
        loss=LossConfig(points_per_instance=4, cls_warmup_steps=2, cls_ramp_steps=2),
        inference=InferenceConfig(num_seeds=5),
        train=configs.TrainConfig(**train_kwargs))


@pytest.fixture(scope="session")
def tiny_config():
    """`tiny_config(data_dir, manual_dir, **train) -> ExperimentConfig` (see
    `_tiny_config`)."""
    return _tiny_config


def _run_together(commands, timeout=600):
    """Runs each command (an argv list) in its own process, all at once; their
    `subprocess.CompletedProcess`es (stdout and stderr as text).

    Each process must exit with status 0 (its stderr's end is the failure message).
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env, cwd=REPO_ROOT) for command in commands]
    completed = []
    for command, process in zip(commands, processes):
        out, err = process.communicate(timeout=timeout)
        assert process.returncode == 0, err[-3000:]
        completed.append(subprocess.CompletedProcess(command, process.returncode, out, err))
    return completed


@pytest.fixture(scope="session")
def run_together():
    """`run_together([argv, ...], timeout=600) -> [CompletedProcess, ...]` (see
    `_run_together`)."""
    return _run_together


# TensorFlow's C++ log lines at ERROR level ("E1207 00:41:28.123 ..." or "E0000 00:00:...").
_ERROR_LOG_LINE = re.compile(r"^E\d{4} \d\d:\d\d:\d\d")
# The one ERROR line that is the machine's, not the program's: the CUDA build of the
# PyPI wheel probing for a GPU driver on a machine that has none.
_GPU_PROBE = "failed call to cuInit"


def _error_log_lines(stderr: str) -> list[str]:
    """The ERROR-level log lines of a program's stderr, but for TF's GPU probe."""
    return [line for line in stderr.splitlines()
            if _ERROR_LOG_LINE.match(line) and _GPU_PROBE not in line]


@pytest.fixture(scope="session")
def error_log_lines():
    """`error_log_lines(stderr) -> [line, ...]` (see `_error_log_lines`)."""
    return _error_log_lines


@pytest.fixture(scope="session")
def run_program():
    """`run_program(module, *flags, expect_ok=True)`: `python -m module flags...` from the
    repository root; the `CompletedProcess` (status 0 asserted unless `expect_ok=False`)."""

    def run(module, *args, expect_ok=True, timeout=600):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                             text=True, cwd=REPO_ROOT, env=env, timeout=timeout)
        if expect_ok:
            assert out.returncode == 0, out.stderr[-3000:]
        return out

    return run


def _make_run_dir(path, num_seeds=10, seed=0):
    """A run directory with config.json and one checkpoint of a random tiny model
    (light backbone, d = 8, 3 classes, the paper's taus)."""
    import tensorflow as tf

    from instance_embed import configs
    from instance_embed.inference import InferenceConfig
    from instance_embed.model import ModelConfig, build_model

    model_config = ModelConfig(backbone="light", embedding_dim=8, num_classes=3,
                               head_channels=16, head_depth=1)
    config = configs.ExperimentConfig(model=model_config,
                                      inference=InferenceConfig(num_seeds=num_seeds))
    model = build_model(model_config)
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        # Zero-initialised BatchNorm scales would make every residual block the identity.
        if variable.path.endswith("gamma"):
            variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype(np.float32))
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model),
                                         os.path.join(path, "ckpt"), max_to_keep=1)
    manager.save(checkpoint_number=1)
    config.save(str(path))
    return path


@pytest.fixture(scope="session")
def make_run_dir():
    """`make_run_dir(path, num_seeds=10, seed=0) -> path` (see `_make_run_dir`)."""
    return _make_run_dir


# ----------------------------------------------------------------------------------------
# Image files for the serving and robustness tests.


def _encode(image, fmt, **kwargs) -> bytes:
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(
        buffer, fmt, **kwargs)
    return buffer.getvalue()


def _random_image(height, width, seed=0):
    """Smooth colour blobs: structure for the network, noise-free for JPEG."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(height // 8, 2), max(width // 8, 2), 3), np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload)))


def _png_header_only(width, height) -> bytes:
    """A PNG claiming `width` x `height` in its IHDR, with no image data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"")
            + _png_chunk(b"IEND", b""))


def _jpeg_with_size(data: bytes, width, height) -> bytes:
    """A JPEG whose baseline frame header (FFC0) claims another size."""
    at = data.index(b"\xff\xc0")
    return data[:at + 5] + struct.pack(">HH", height, width) + data[at + 9:]


@pytest.fixture(scope="session")
def image_files():
    """Image-file makers: `encode(image, fmt, **save_kwargs) -> bytes`,
    `random_image(height, width, seed=0)`, `png_header_only(width, height)` (a PNG
    without image data) and `jpeg_with_size(data, width, height)` (a JPEG whose frame
    header claims another size)."""
    import types

    return types.SimpleNamespace(encode=_encode, random_image=_random_image,
                                 png_header_only=_png_header_only,
                                 jpeg_with_size=_jpeg_with_size)


class _PthTensor:
    """A NumPy array to be written as a torch tensor by `write_pth`."""

    def __init__(self, array):
        self.array = np.ascontiguousarray(array)


def _write_pth(path, state, extra_globals=()):
    """Writes `state` (name -> NumPy array) in torch.save's zip layout, without torch.

    For bad-input tests; the reader's correctness is checked against files written by
    real torch (tests/fixtures/make_torch_fixtures.py). Arrays become float32/int64
    tensors. `extra_globals` are objects pickled by reference into the state as well.
    """
    import collections
    import io
    import pickle
    import types
    import zipfile

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


# ----------------------------------------------------------------------------------------
# NumPy references of the paper's inference (sections 3.3-3.4), written plainly: loops
# and float64 arithmetic following the paper's definitions, sharing no code with the
# library.


def np_softmax(logits):
    logits = logits.astype(np.float64)
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)

def np_seediness(probs):
    """probs [h, w, T, C+1] -> [h, w]: best foreground probability, by loops."""
    h, w, num_taus, num_classes = probs.shape
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            out[i, j] = max(probs[i, j, t, c] for t in range(num_taus)
                            for c in range(1, num_classes))
    return out

def np_select_seeds(emb, seed_map, k, alpha, valid=None):
    """Greedy seeds of one image: emb [h, w, d], seed_map [h, w] -> list of k ints.

    `valid` [h, w] bool: the pixels that may be seeds (None: all).
    """
    points = emb.reshape(-1, emb.shape[-1]).astype(np.float64)
    s = seed_map.reshape(-1).astype(np.float64)
    n = len(s)
    valid = np.ones(n, bool) if valid is None else valid.reshape(-1)
    chosen = []
    nearest = [math.inf] * n
    for t in range(k):
        best, best_score = -1, None
        for p in range(n):
            if p in chosen or not valid[p]:
                continue
            score = math.log(s[p]) if s[p] > 0 else -math.inf
            if t > 0 and alpha > 0:
                score += alpha * math.log(nearest[p]) if nearest[p] > 0 else -math.inf
            if best < 0 or score > best_score:  # strict: ties keep the lower index
                best, best_score = p, score
        chosen.append(best)
        if best >= 0:
            for p in range(n):
                d2 = float(np.sum((points[p] - points[best]) ** 2))
                nearest[p] = min(nearest[p], d2)
    return chosen

def np_margins(emb, seeds, taus):
    """[K, h, w] margins log(2/tau - 1) - ||e_q - e_seed||^2 (float64); NaN for seed -1."""
    h, w, d = emb.shape
    points = emb.reshape(-1, d).astype(np.float64)
    out = np.full((len(seeds), h * w), np.nan)
    for k, (seed, tau) in enumerate(zip(seeds, taus)):
        if seed < 0:
            continue
        threshold = math.log(2.0 / tau - 1.0)
        for q in range(h * w):
            out[k, q] = threshold - np.sum((points[q] - points[seed]) ** 2)
    return out.reshape(len(seeds), h, w)

def np_classes_and_scores(probs, seeds):
    """probs [h, w, T, C+1], seeds [K] -> (tau_index, classes, scores) lists."""
    h, w, num_taus, num_classes = probs.shape
    flat = probs.reshape(h * w, num_taus, num_classes)
    taus, classes, scores = [], [], []
    for seed in seeds:
        if seed < 0:
            taus.append(0), classes.append(0), scores.append(0.0)
            continue
        best = (0, 1, flat[seed, 0, 1])
        for t in range(num_taus):
            for c in range(1, num_classes):
                if flat[seed, t, c] > best[2]:
                    best = (t, c, flat[seed, t, c])
        taus.append(best[0]), classes.append(best[1]), scores.append(best[2])
    return taus, classes, scores

def np_iou(a, b):
    union = np.logical_or(a, b).sum()
    return np.logical_and(a, b).sum() / union if union else 0.0

def np_select_detections(scores, seeds, low_masks, score_threshold, nms_iou_threshold):
    """Which seeds survive, in output order: list of positions into the seed list."""
    candidates = [k for k in range(len(seeds))
                  if seeds[k] >= 0 and scores[k] >= score_threshold]
    candidates.sort(key=lambda k: -scores[k])  # stable: ties keep seed order
    kept = []
    for k in candidates:
        if nms_iou_threshold is not None and any(
                np_iou(low_masks[k], low_masks[j]) > nms_iou_threshold for j in kept):
            continue
        kept.append(k)
    return kept

def random_inputs(rng, batch=2, h=10, w=12, d=6, num_taus=4, num_classes=3):
    embeddings = rng.normal(size=(batch, h, w, d)).astype(np.float32)
    logits = (2.0 * rng.normal(size=(batch, h, w, num_taus, num_classes + 1))).astype(np.float32)
    return embeddings, logits

def clustered_inputs(rng, batch=2, h=12, w=12, d=8, num_taus=4, num_classes=2, blobs=4):
    """Pixels in `blobs` rectangles-and-background regions with tight, distant embeddings.

    Masks grown from seeds of one region are (near) identical, which is what duplicate
    suppression is for, and no pixel lies near a threshold.
    """
    embeddings = np.zeros((batch, h, w, d), np.float32)
    for b in range(batch):
        labels = np.zeros((h, w), int)
        for blob in range(1, blobs):
            top, left = rng.integers(0, h - 4), rng.integers(0, w - 4)
            labels[top:top + rng.integers(3, 7), left:left + rng.integers(3, 7)] = blob
        centres = rng.normal(size=(blobs, d)) * 3.0
        embeddings[b] = centres[labels] + 0.02 * rng.normal(size=(h, w, d))
    logits = (2.0 * rng.normal(size=(batch, h, w, num_taus, num_classes + 1))).astype(np.float32)
    return embeddings, logits


@pytest.fixture(scope="session")
def numpy_inference():
    """The NumPy references above and the random heads outputs they are tested on:
    `softmax`, `seediness`, `select_seeds`, `margins`, `classes_and_scores`, `iou`,
    `select_detections`, `random_inputs`, `clustered_inputs`."""
    import types

    return types.SimpleNamespace(
        softmax=np_softmax, seediness=np_seediness, select_seeds=np_select_seeds,
        margins=np_margins, classes_and_scores=np_classes_and_scores, iou=np_iou,
        select_detections=np_select_detections, random_inputs=random_inputs,
        clustered_inputs=clustered_inputs)
