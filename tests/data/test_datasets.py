"""Tests of the dataset registry, the shared readers and the file-based builders.

The VOC 2012 + SBD and instance-folder fixtures are written here, in the real
layouts (palette PNGs, MATLAB structs, 8/16-bit label images), under tmp_path.
"""

import io
import pathlib

import numpy as np
import pytest
import scipy.io
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

import instance_embed.data as data
from instance_embed.data import features as features_lib
from instance_embed.data import instance_folder
from instance_embed.data import penn_fudan_ped
from instance_embed.data import voc2012_instance

tfds.disable_progress_bar()


def load_all(name, split, data_dir, manual_dir=None, config=None):
    """A split as a list of NumPy examples."""
    return list(tfds.as_numpy(data.load(name, split, data_dir=data_dir,
                                        manual_dir=manual_dir, config=config)))


def assert_contract(example, num_classes, allow_ignore=False):
    """Checks one NumPy example against the data contract."""
    image, instances = example["image"], example["instances"]
    classes = example["instance_classes"]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    assert instances.dtype == np.int32 and instances.shape == image.shape[:2]
    assert classes.dtype == np.int32 and classes.ndim == 1
    ids = np.unique(instances)
    assert ids.min() >= (-1 if allow_ignore else 0)
    np.testing.assert_array_equal(ids[ids > 0], np.arange(1, classes.size + 1))
    assert np.all((classes >= 1) & (classes <= num_classes))
    assert isinstance(example["image_id"], bytes) and example["image_id"]


def write_png(path, array, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if palette:  # VOC-style indexed PNG: the values are palette indices.
        img.putpalette(np.random.default_rng(0).integers(0, 256, 768).tolist())
        assert img.mode == "P"
    img.save(path)


def write_jpeg(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=95)


def random_rgb(rng, height, width):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


# ---------------------------------------------------------------------- registry


def test_registry_names_and_class_names():
    assert set(data.DATASETS) == {"synthetic_shapes", "penn_fudan_ped",
                                  "voc2012_instance", "instance_folder"}
    for name, cls in data.DATASETS.items():
        assert cls.name == name  # The TFDS name matches the registry key.
    assert data.class_names("penn_fudan_ped") == ["person"]
    assert data.class_names("instance_folder") == ["object"]
    assert data.class_names("synthetic_shapes", "tiny") == ["disk", "ring", "bar"]
    voc = data.class_names("voc2012_instance")
    assert len(voc) == 20 and voc[0] == "aeroplane" and voc[14] == "person"
    assert voc[19] == "tvmonitor"


def test_unknown_dataset_or_config_is_a_value_error(tmp_path):
    with pytest.raises(ValueError) as info:
        data.load("coco", "train", data_dir=tmp_path)
    for name in data.DATASETS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="coco"):
        data.class_names("coco")
    with pytest.raises(ValueError, match="huge"):
        data.class_names("synthetic_shapes", "huge")


# ------------------------------------------------------------------ shared helpers


def test_relabel_consecutive_hand_worked():
    raw = np.array([[0, 5, 5], [255, 9, 0], [9, 9, 255]])
    instances, old_ids = features_lib.relabel_consecutive(raw, ignore_values=(255,))
    np.testing.assert_array_equal(instances,
                                  [[0, 1, 1], [-1, 2, 0], [2, 2, -1]])
    np.testing.assert_array_equal(old_ids, [5, 9])
    assert instances.dtype == np.int32


def test_deterministic_split_every_fifth_by_name():
    names = [f"img{i:02d}.png" for i in range(12)]
    shuffled = [pathlib.Path(n) for n in np.random.default_rng(0).permutation(names)]
    splits = features_lib.deterministic_split(shuffled)
    assert [p.name for p in splits["validation"]] == ["img04.png", "img09.png"]
    assert [p.name for p in splits["train"]] == [
        n for n in names if n not in ("img04.png", "img09.png")]


def test_make_example_rejects_broken_contract():
    image = np.zeros((4, 4, 3), np.uint8)
    gap = np.zeros((4, 4), np.int32)
    gap[0, 0], gap[1, 1] = 1, 3
    with pytest.raises(ValueError, match="img_a"):
        features_lib.make_example(image, gap, [1, 1], "img_a")
    with pytest.raises(ValueError, match="class ids"):
        features_lib.make_example(image, np.minimum(gap, 1), [0], "img_b")
    with pytest.raises(ValueError, match="shape"):
        features_lib.make_example(image, np.zeros((3, 4), np.int32), [], "img_c")


def test_read_image_converts_grayscale_and_16_bit(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    write_png(tmp_path / "gray.png", gray)
    rgb = features_lib.read_image(tmp_path / "gray.png")
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], gray)
    deep = np.array([[100, 300], [500, 1100]], np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.tif")
    scaled = features_lib.read_image(tmp_path / "deep.tif")
    # Min-max to 0..255: (v - 100) / 1000 * 255.
    np.testing.assert_array_equal(scaled[..., 0], [[0, 51], [102, 255]])


def test_encode_image_round_trips_and_keeps_rgb_sources(tmp_path):
    image = random_rgb(np.random.default_rng(1), 5, 7)
    decoded = tf.io.decode_image(features_lib.encode_image(image), channels=3)
    np.testing.assert_array_equal(decoded.numpy(), image)
    write_png(tmp_path / "rgb.png", image)
    assert (features_lib.encode_image(image, tmp_path / "rgb.png")
            == (tmp_path / "rgb.png").read_bytes())
    # A grayscale source is not RGB: it is re-encoded from the converted array.
    gray = image[..., 0]
    write_png(tmp_path / "gray.png", gray)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    encoded = features_lib.encode_image(rgb, tmp_path / "gray.png")
    np.testing.assert_array_equal(tf.io.decode_image(encoded, channels=3).numpy(), rgb)
    assert Image.open(io.BytesIO(encoded)).mode == "RGB"


# -------------------------------------------------------------------- Penn-Fudan


def test_penn_fudan_dev_copy(penn_fudan_dir, tmp_path):
    train = load_all("penn_fudan_ped", "train", tmp_path, manual_dir=penn_fudan_dir)
    validation = load_all("penn_fudan_ped", "validation", tmp_path,
                          manual_dir=penn_fudan_dir)
    stems = sorted(p.stem for p in (penn_fudan_dir / "PNGImages").glob("*.png"))
    assert len(train) + len(validation) == len(stems) == 128
    assert (len(train), len(validation)) == (103, 25)
    # TFDS stores a split in an order of its own (a hash of the keys): compare sets.
    assert sorted(e["image_id"].decode() for e in validation) == stems[4::5]
    assert sorted(e["image_id"].decode() for e in train) == sorted(
        s for i, s in enumerate(stems) if i % 5 != 4)
    for example in train + validation:
        assert_contract(example, num_classes=1)
    assert sum(e["instance_classes"].size for e in train + validation) == 312
    # One example against the files read independently.
    example = validation[0]
    stem = example["image_id"].decode()
    image = np.asarray(Image.open(penn_fudan_dir / "PNGImages" / f"{stem}.png")
                       .convert("RGB"))
    mask = np.asarray(Image.open(penn_fudan_dir / "PedMasks" / f"{stem}_mask.png"))
    np.testing.assert_array_equal(example["image"], image)
    np.testing.assert_array_equal(example["instances"] > 0, mask > 0)
    for new_id, old_id in enumerate(np.unique(mask[mask > 0]), start=1):
        np.testing.assert_array_equal(example["instances"] == new_id, mask == old_id)


def make_penn_fudan(root, num_images=3, size=(12, 16)):
    """A Penn-Fudan-layout folder with non-consecutive mask ids."""
    rng = np.random.default_rng(2)
    for i in range(num_images):
        write_png(root / "PNGImages" / f"Ped{i:03d}.png", random_rgb(rng, *size))
        mask = np.zeros(size, np.uint8)
        mask[1:4, 1:5] = 2
        mask[6:9, 8:14] = 7
        write_png(root / "PedMasks" / f"Ped{i:03d}_mask.png", mask)
    return root


def test_penn_fudan_any_folder_of_any_size(tmp_path):
    manual = make_penn_fudan(tmp_path / "manual" / "PennFudanPed")
    # The parent of PennFudanPed/ works too (as an extracted archive gives it).
    train = load_all("penn_fudan_ped", "train", tmp_path / "tfds", tmp_path / "manual")
    assert sorted(e["image_id"] for e in train) == [b"Ped000", b"Ped001", b"Ped002"]
    for example in train:
        assert_contract(example, num_classes=1)
        np.testing.assert_array_equal(np.unique(example["instances"]), [0, 1, 2])
        assert example["instances"][2, 2] == 1 and example["instances"][7, 10] == 2
    # Three images give no validation image: the split does not exist.
    builder = data.builder("penn_fudan_ped", data_dir=data.prepared_dir_for_source(
        tmp_path / "tfds", tmp_path / "manual"))
    assert set(builder.info.splits) == {"train"}
    assert manual.is_dir()


def test_penn_fudan_errors_name_the_file(tmp_path):
    root = make_penn_fudan(tmp_path / "pf")
    (root / "PedMasks" / "Ped001_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match="Ped001_mask.png"):
        load_all("penn_fudan_ped", "train", tmp_path / "tfds", root)
    (root / "PNGImages" / "Ped001.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match="Ped001.png"):
        penn_fudan_ped.read_example(root / "PNGImages" / "Ped001.png")
    write_png(root / "PedMasks" / "Ped002_mask.png", np.zeros((12, 15), np.uint8))
    with pytest.raises(ValueError, match="Ped002_mask.png"):
        penn_fudan_ped.read_example(root / "PNGImages" / "Ped002.png")


def test_penn_fudan_missing_or_empty_manual_dir_never_downloads(tmp_path):
    (tmp_path / "empty").mkdir()
    for manual in (tmp_path / "absent", tmp_path / "empty"):
        with pytest.raises(FileNotFoundError) as info:
            data.load("penn_fudan_ped", "train", data_dir=tmp_path / "tfds",
                      manual_dir=manual)
        assert str(manual) in str(info.value) and "PNGImages" in str(info.value)
    (tmp_path / "other" / "stuff").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="PedMasks"):
        data.load("penn_fudan_ped", "train", data_dir=tmp_path / "tfds",
                  manual_dir=tmp_path / "other")


def test_penn_fudan_without_manual_dir_fetches_the_archive(tmp_path, monkeypatch):
    extracted = tmp_path / "extracted"
    make_penn_fudan(extracted / "PennFudanPed", num_images=6)
    requested = []

    def fake_download_and_extract(self, url):  # Stands in for the network.
        requested.append(url)
        return extracted

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract",
                        fake_download_and_extract)
    # TFDS's default manual dir may hold other datasets: still no Penn-Fudan there.
    (tmp_path / "tfds" / "downloads" / "manual" / "VOCdevkit").mkdir(parents=True)
    validation = load_all("penn_fudan_ped", "validation", tmp_path / "tfds")
    assert requested == [penn_fudan_ped.URL]
    assert [e["image_id"] for e in validation] == [b"Ped004"]


# ---------------------------------------------------------------- VOC 2012 + SBD

# (id, instance classes): per image, instance k covers rows 2k..2k+2 of columns 2..9.
VOC_VAL = {"2008_000001": [15, 12], "2008_000002": [1]}
SBD_TRAIN = {"2008_000001": [3], "2008_000010": [7, 20, 15], "2008_000011": [9]}


def instance_map(num_instances, shape=(12, 14)):
    labels = np.zeros(shape, np.uint8)
    for k in range(1, num_instances + 1):
        labels[2 * k:2 * k + 2, 2:10] = k
    return labels


def make_voc(root):
    """VOC 2012 (val: VOC_VAL) and SBD (train.txt: SBD_TRAIN) in their layouts."""
    rng = np.random.default_rng(3)
    voc = root / "VOCdevkit" / "VOC2012"
    for image_id, classes in VOC_VAL.items():
        write_jpeg(voc / "JPEGImages" / f"{image_id}.jpg", random_rgb(rng, 12, 14))
        objects = instance_map(len(classes))
        class_map = np.zeros_like(objects)
        for k, c in enumerate(classes, start=1):
            class_map[objects == k] = c
        # A few pixels of another class inside instance 1: the majority wins.
        class_map[2, 2:4] = 5
        # VOC's void border around the objects, in both maps.
        border = (objects == 0) & np.isin(np.arange(14), [1, 10])[None, :]
        objects[border], class_map[border] = 255, 255
        write_png(voc / "SegmentationObject" / f"{image_id}.png", objects, palette=True)
        write_png(voc / "SegmentationClass" / f"{image_id}.png", class_map, palette=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text(
        "\n".join(VOC_VAL) + "\n")
    sbd = root / "benchmark_RELEASE" / "dataset"
    (sbd / "inst").mkdir(parents=True)
    for image_id, classes in SBD_TRAIN.items():
        write_jpeg(sbd / "img" / f"{image_id}.jpg", random_rgb(rng, 12, 14))
        segmentation = instance_map(len(classes))
        if len(classes) == 3:  # SBD ids need not be dense in an image's map.
            segmentation[segmentation == 2] = 0
        boundaries = np.empty((len(classes), 1), object)  # A cell array, unused.
        boundaries[:, 0] = [np.zeros((0, 0)) for _ in classes]
        scipy.io.savemat(str(sbd / "inst" / f"{image_id}.mat"), {"GTinst": {
            "Segmentation": segmentation,
            "Categories": np.array(classes, np.uint8)[:, None],
            "Boundaries": boundaries,
        }})
    (sbd / "train.txt").write_text("\n".join(SBD_TRAIN) + "\n")
    return voc, sbd


def test_voc_round_trip_classes_and_void_border(tmp_path):
    voc, _ = make_voc(tmp_path / "manual")
    validation = load_all("voc2012_instance", "validation", tmp_path / "tfds",
                          tmp_path / "manual")
    train = load_all("voc2012_instance", "train", tmp_path / "tfds", tmp_path / "manual")
    assert sorted(e["image_id"].decode() for e in validation) == list(VOC_VAL)
    for example in validation:
        image_id = example["image_id"].decode()
        assert_contract(example, num_classes=20, allow_ignore=True)
        np.testing.assert_array_equal(example["instance_classes"], VOC_VAL[image_id])
        objects = np.asarray(Image.open(voc / "SegmentationObject" / f"{image_id}.png"))
        np.testing.assert_array_equal(example["instances"] == -1, objects == 255)
        np.testing.assert_array_equal(np.maximum(example["instances"], 0),
                                      np.where(objects == 255, 0, objects))
        # A JPEG source is stored as it is (TF's and PIL's JPEG decoders differ by a
        # few levels on noise like this, so compare with TF's decoding of the file).
        jpeg = (voc / "JPEGImages" / f"{image_id}.jpg").read_bytes()
        np.testing.assert_array_equal(example["image"], tf.io.decode_jpeg(jpeg).numpy())
    # 2008_000001 is in VOC val, so it is left out of SBD train.
    assert sorted(e["image_id"].decode() for e in train) == ["2008_000010",
                                                             "2008_000011"]
    for example in train:
        assert_contract(example, num_classes=20)
        classes = SBD_TRAIN[example["image_id"].decode()]
        if len(classes) == 3:  # Raw ids 1 and 3 (2 absent) become 1 and 2.
            np.testing.assert_array_equal(example["instance_classes"], [7, 15])
            np.testing.assert_array_equal(example["instances"][6:8, 2:10], 2)
        else:
            np.testing.assert_array_equal(example["instance_classes"], classes)


def test_voc_instance_without_class_names_the_file(tmp_path):
    voc, _ = make_voc(tmp_path)
    class_path = voc / "SegmentationClass" / "2008_000002.png"
    class_map = np.asarray(Image.open(class_path)).copy()
    class_map[class_map == 1] = 0  # Instance 1 of this image loses its class.
    class_map[2, 2:4] = 255
    write_png(class_path, class_map, palette=True)
    with pytest.raises(ValueError, match="2008_000002.png"):
        voc2012_instance.read_voc_example(voc, "2008_000002")


def test_voc_bad_files_name_the_file(tmp_path):
    voc, sbd = make_voc(tmp_path)
    # Through the builder: a missing image named in val.txt.
    (voc / "JPEGImages" / "2008_000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="2008_000002.jpg"):
        data.load("voc2012_instance", "validation", data_dir=tmp_path / "tfds",
                  manual_dir=tmp_path)
    write_png(voc / "SegmentationObject" / "2008_000001.png",
              instance_map(2, shape=(12, 13)), palette=True)
    with pytest.raises(ValueError, match="SegmentationObject/2008_000001.png"):
        voc2012_instance.read_voc_example(voc, "2008_000001")
    (sbd / "inst" / "2008_000011.mat").unlink()
    with pytest.raises(FileNotFoundError, match="2008_000011.mat"):
        voc2012_instance.read_sbd_example(sbd, "2008_000011")
    (sbd / "img" / "2008_000010.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(ValueError, match="2008_000010.jpg"):
        voc2012_instance.read_sbd_example(sbd, "2008_000010")


def test_voc_missing_parts_name_the_directory(tmp_path):
    manual = tmp_path / "manual"
    _, sbd = make_voc(manual)
    for path in sorted(sbd.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    with pytest.raises(FileNotFoundError) as info:
        data.load("voc2012_instance", "train", data_dir=tmp_path / "tfds",
                  manual_dir=manual)
    assert "SBD" in str(info.value) and str(manual) in str(info.value)
    assert "inst/<id>.mat" in str(info.value)


# ---------------------------------------------------------------- instance folder


def make_folder(root, num_images=6):
    """images/ + masks/: RGB PNG, grayscale JPEG, and TIFF images; 8 and 16-bit masks."""
    rng = np.random.default_rng(4)
    expected = {}
    for i in range(num_images):
        stem = f"cell_{i}"
        raw_ids = (3, 200) if i % 2 == 0 else (1000, 40000, 7)
        mask = np.zeros((10, 11), np.uint16 if i % 2 else np.uint8)
        for k, raw in enumerate(raw_ids):
            mask[3 * k:3 * k + 2, 1:9] = raw
        if i % 3 == 0:
            write_png(root / "images" / f"{stem}.png", random_rgb(rng, 10, 11))
        elif i % 3 == 1:
            write_jpeg(root / "images" / f"{stem}.jpg",
                       rng.integers(0, 256, (10, 11), dtype=np.uint8))
        else:
            (root / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(random_rgb(rng, 10, 11)).save(root / "images" / f"{stem}.tif")
        suffix = ".tif" if i == 5 else ".png"
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / "masks" / f"{stem}{suffix}")
        # Ids renumber in increasing order of the raw ids.
        order = np.argsort(np.argsort(raw_ids)) + 1
        expected[stem] = np.zeros((10, 11), np.int32)
        for k, new in enumerate(order):
            expected[stem][3 * k:3 * k + 2, 1:9] = new
    return expected


def test_instance_folder_8_and_16_bit_masks(tmp_path):
    expected = make_folder(tmp_path / "folder")
    train = load_all("instance_folder", "train", tmp_path / "tfds", tmp_path / "folder")
    validation = load_all("instance_folder", "validation", tmp_path / "tfds",
                          tmp_path / "folder")
    assert [e["image_id"].decode() for e in validation] == ["cell_4"]
    assert len(train) == 5
    for example in train + validation:
        assert_contract(example, num_classes=1)
        np.testing.assert_array_equal(example["instances"],
                                      expected[example["image_id"].decode()])
        assert np.all(example["instance_classes"] == 1)
    grayscale = next(e for e in train if e["image_id"] == b"cell_1")["image"]
    np.testing.assert_array_equal(grayscale[..., 0], grayscale[..., 2])


def test_instance_folder_split_subfolders_and_named_configs(tmp_path):
    make_folder(tmp_path / "own" / "train", num_images=3)
    make_folder(tmp_path / "own" / "validation", num_images=2)
    config = instance_folder.InstanceFolderConfig(name="own_splits")
    builder = data.builder("instance_folder", data_dir=tmp_path / "tfds", config=config)
    for split, size in (("train", 3), ("validation", 2)):
        examples = load_all("instance_folder", split, tmp_path / "tfds",
                            tmp_path / "own", config=config)
        assert len(examples) == size
    assert builder.data_path.parts[-3:] == ("instance_folder", "own_splits", "1.0.0")


def test_instance_folder_errors_name_the_file(tmp_path):
    root = tmp_path / "folder"
    make_folder(root)
    (root / "masks" / "cell_1.png").unlink()
    with pytest.raises(FileNotFoundError, match="cell_1.png"):
        load_all("instance_folder", "train", tmp_path / "tfds", root)
    write_png(root / "masks" / "cell_2.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(ValueError, match="cell_2.png"):
        instance_folder.read_example(root / "images" / "cell_2.tif")
    write_png(root / "masks" / "cell_3.png", random_rgb(np.random.default_rng(0), 10, 11))
    with pytest.raises(ValueError, match="cell_3.png.*single-channel"):
        instance_folder.read_example(root / "images" / "cell_3.png")
    (root / "images" / "cell_0.png").write_bytes(b"")
    with pytest.raises(ValueError, match="cell_0.png"):
        instance_folder.read_example(root / "images" / "cell_0.png")


def test_instance_folder_empty_manual_dir_names_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        data.load("instance_folder", "train", data_dir=tmp_path / "tfds",
                  manual_dir=tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value) and "masks/" in str(info.value)
    (tmp_path / "wrong" / "pictures").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="images/"):
        data.load("instance_folder", "train", data_dir=tmp_path / "tfds",
                  manual_dir=tmp_path / "wrong")


def test_each_source_directory_gets_its_own_prepared_copy(tmp_path):
    # Two Penn-Fudan-layout folders under one data_dir must not share a prepared copy.
    first = make_penn_fudan(tmp_path / "first", num_images=5)
    second = make_penn_fudan(tmp_path / "second", num_images=10)
    data_dir = tmp_path / "tfds"
    counts = [len(load_all("penn_fudan_ped", "train", data_dir, manual_dir=root)) +
              len(load_all("penn_fudan_ped", "validation", data_dir, manual_dir=root))
              for root in (first, second, first)]
    assert counts == [5, 10, 5]


# ------------------------------------------------------- broken VOC / SBD files are named


def _sbd_fixture(tmp_path):
    voc, sbd = make_voc(tmp_path)
    return voc, sbd, sbd / "inst" / "2008_000010.mat"


@pytest.mark.parametrize("breakage", [
    "garbage", "truncated", "empty", "matlab_v73", "no_gtinst", "no_categories",
])
def test_unreadable_sbd_mat_names_the_file(tmp_path, breakage):
    _, sbd, mat = _sbd_fixture(tmp_path)
    if breakage == "garbage":
        mat.write_bytes(b"this is not a MATLAB file\n" * 10)
    elif breakage == "truncated":
        mat.write_bytes(mat.read_bytes()[:150])
    elif breakage == "empty":
        mat.write_bytes(b"")
    elif breakage == "matlab_v73":
        # The header of a MATLAB 7.3 (HDF5) file, which scipy cannot read.
        header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64".ljust(116) + bytes(8)
        mat.write_bytes(header + b"\x00\x02IM" + bytes(512))
    elif breakage == "no_gtinst":
        scipy.io.savemat(str(mat), {"something_else": np.zeros((3, 3))})
    else:
        scipy.io.savemat(str(mat), {"GTinst": {"Segmentation": np.zeros((12, 14))}})
    with pytest.raises(ValueError, match="2008_000010.mat"):
        voc2012_instance.read_sbd_example(sbd, "2008_000010")


def test_sbd_mat_of_the_wrong_size_or_without_class_names_the_file(tmp_path):
    _, sbd, mat = _sbd_fixture(tmp_path)
    scipy.io.savemat(str(mat), {"GTinst": {
        "Segmentation": np.ones((12, 15), np.uint8),
        "Categories": np.array([[3]], np.uint8)}})
    with pytest.raises(ValueError, match="2008_000010.mat"):
        voc2012_instance.read_sbd_example(sbd, "2008_000010")
    # Instance id 2 has no entry in Categories: an instance with an id but no class.
    segmentation = np.zeros((12, 14), np.uint8)
    segmentation[1:4, 1:4], segmentation[6:9, 6:9] = 1, 2
    scipy.io.savemat(str(mat), {"GTinst": {"Segmentation": segmentation,
                                           "Categories": np.array([[3]], np.uint8)}})
    with pytest.raises(ValueError, match=r"2008_000010.mat.*instance id 2"):
        voc2012_instance.read_sbd_example(sbd, "2008_000010")


def test_voc_object_map_of_the_wrong_size_names_both_files(tmp_path):
    voc, _, _ = _sbd_fixture(tmp_path)
    write_png(voc / "SegmentationClass" / "2008_000002.png",
                            np.zeros((11, 14), np.uint8), palette=True)
    with pytest.raises(ValueError) as info:
        voc2012_instance.read_voc_example(voc, "2008_000002")
    assert "SegmentationClass/2008_000002.png" in str(info.value)
