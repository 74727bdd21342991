"""`voc2012_instance`: PASCAL VOC 2012 instances, the paper's protocol (20 classes).

* `train`: the SBD training set (Hariharan et al. 2011, `train.txt`, 8498 images,
  instance masks in `inst/*.mat`), minus the images of VOC 2012 segmentation `val`,
  so that no validation image is trained on.
* `validation`: VOC 2012 segmentation `val` (1449 images), instances from
  `SegmentationObject/*.png`, each instance's class the majority of
  `SegmentationClass/*.png` over its pixels; VOC's 255 "void" border becomes -1.

Both come from one manual dir, laid out as `LAYOUT` below says. SBD's `cls/*.mat`
(semantic labels) are not needed: `GTinst.Categories` gives each instance's class.
"""

from __future__ import annotations

import pathlib

import numpy as np
import scipy.io
import tensorflow_datasets as tfds

from instance_embed.data import features as features_lib

CLASS_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor")
VOID = 255
_VOC_ENTRIES = ("JPEGImages", "SegmentationObject", "SegmentationClass",
                "ImageSets/Segmentation/val.txt")
_SBD_ENTRIES = ("img", "inst", "train.txt")
LAYOUT = """\
  <manual_dir>/
    VOCdevkit/VOC2012/             (or VOC2012/, or these four entries directly)
      JPEGImages/<id>.jpg
      SegmentationObject/<id>.png  palette PNG: 0 background, 1..N, 255 void
      SegmentationClass/<id>.png   palette PNG: 0 background, 1..20, 255 void
      ImageSets/Segmentation/val.txt
    benchmark_RELEASE/dataset/     (or dataset/)
      img/<id>.jpg
      inst/<id>.mat                GTinst.Segmentation (0 background, 1..N),
                                   GTinst.Categories (class of instance i at i-1)
      train.txt
"""


def find_roots(manual_dir: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """The VOC 2012 and SBD folders inside `manual_dir`.

    Raises:
        FileNotFoundError: either is missing; names `manual_dir` and the layout.
    """
    voc = features_lib.find_root(
        manual_dir, ("VOCdevkit/VOC2012", "VOC2012", ""), _VOC_ENTRIES)
    sbd = features_lib.find_root(
        manual_dir, ("benchmark_RELEASE/dataset", "dataset", ""), _SBD_ENTRIES)
    missing = [name for name, root in (("VOC 2012", voc), ("SBD", sbd)) if root is None]
    if missing:
        raise FileNotFoundError(
            f"{' and '.join(missing)} not found in {manual_dir}: expected layout\n"
            f"{LAYOUT}")
    return voc, sbd


def read_ids(path: pathlib.Path) -> list[str]:
    """Image ids of an image-set file, one per line."""
    if not path.is_file():
        raise FileNotFoundError(f"Missing image-set file {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def majority_classes(instances: np.ndarray, class_map: np.ndarray,
                     class_path: pathlib.Path) -> np.ndarray:
    """Class of each instance: the most frequent class 1..20 over its pixels.

    Args:
        instances: int32 [H, W] with -1, 0, 1..N.
        class_map: int [H, W] VOC class labels (0, 1..20, 255).
        class_path: file `class_map` came from, for error messages.

    Returns:
        int32 [N] class ids.

    Raises:
        ValueError: naming `class_path`, for a label outside VOC's, or an instance
            with no class pixel.
    """
    num_classes = len(CLASS_NAMES)
    bad = (class_map > num_classes) & (class_map != VOID)
    if np.any(bad):
        raise ValueError(f"Class map {class_path} has labels outside 0..{num_classes} "
                         f"and {VOID}: {np.unique(class_map[bad]).tolist()}")
    num = int(instances.max(initial=0))
    valid = (instances > 0) & (class_map >= 1) & (class_map <= num_classes)
    votes = np.bincount(instances[valid] * (num_classes + 1) + class_map[valid],
                        minlength=(num + 1) * (num_classes + 1))
    votes = votes.reshape(num + 1, num_classes + 1)[1:, 1:]
    unclassed = np.flatnonzero(votes.sum(axis=1) == 0) + 1
    if unclassed.size:
        raise ValueError(f"Instances {unclassed.tolist()} (renumbered ids) have no "
                         f"class pixel (only 0 or {VOID}) in {class_path}")
    return (votes.argmax(axis=1) + 1).astype(np.int32)


def read_voc_example(voc_root: pathlib.Path, image_id: str) -> dict:
    """The contract example of one VOC 2012 segmentation image.

    Raises:
        FileNotFoundError / ValueError: naming the file at fault.
    """
    image_path = voc_root / "JPEGImages" / f"{image_id}.jpg"
    object_path = voc_root / "SegmentationObject" / f"{image_id}.png"
    class_path = voc_root / "SegmentationClass" / f"{image_id}.png"
    image = features_lib.read_image(image_path)
    object_map = features_lib.read_label_map(object_path)
    class_map = features_lib.read_label_map(class_path)
    features_lib.check_same_size(image, object_map, image_path, object_path)
    features_lib.check_same_size(image, class_map, image_path, class_path)
    instances, _ = features_lib.relabel_consecutive(object_map, ignore_values=(VOID,))
    classes = majority_classes(instances, class_map, class_path)
    return features_lib.make_example(image, instances, classes, image_id)


def _load_sbd_instances(mat_path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """(segmentation int64 [H, W], categories int64 [K]) of an SBD `inst/*.mat`."""
    if not mat_path.is_file():
        raise FileNotFoundError(f"Missing SBD instance file {mat_path}")
    try:
        gt = scipy.io.loadmat(str(mat_path), squeeze_me=True,
                              struct_as_record=False)["GTinst"]
        segmentation = np.asarray(gt.Segmentation, dtype=np.int64)
        categories = np.atleast_1d(np.asarray(gt.Categories, dtype=np.int64)).ravel()
    except (OSError, ValueError, KeyError, AttributeError, TypeError, IndexError,
            # Empty or truncated files; MATLAB v7.3 (HDF5) files, which scipy cannot read.
            scipy.io.matlab.MatReadError, NotImplementedError) as e:
        raise ValueError(f"Cannot read SBD instance file {mat_path} (expects a "
                         f"GTinst struct with Segmentation and Categories): {e}") from e
    if segmentation.ndim != 2:
        raise ValueError(f"{mat_path}: GTinst.Segmentation must be 2-D, got shape "
                         f"{segmentation.shape}")
    return segmentation, categories


def read_sbd_example(sbd_root: pathlib.Path, image_id: str) -> dict:
    """The contract example of one SBD image.

    Raises:
        FileNotFoundError / ValueError: naming the file at fault.
    """
    image_path = sbd_root / "img" / f"{image_id}.jpg"
    mat_path = sbd_root / "inst" / f"{image_id}.mat"
    image = features_lib.read_image(image_path)
    segmentation, categories = _load_sbd_instances(mat_path)
    features_lib.check_same_size(image, segmentation, image_path, mat_path)
    raw_ids = np.unique(segmentation[(segmentation > 0) & (segmentation != VOID)])
    if raw_ids.size and raw_ids.max() > categories.size:
        raise ValueError(f"{mat_path}: instance id {int(raw_ids.max())} has no entry "
                         f"in GTinst.Categories (length {categories.size})")
    instances, old_ids = features_lib.relabel_consecutive(
        segmentation, ignore_values=(VOID,))
    classes = categories[old_ids - 1] if old_ids.size else categories[:0]
    if np.any((classes < 1) | (classes > len(CLASS_NAMES))):
        raise ValueError(f"{mat_path}: GTinst.Categories must be in "
                         f"1..{len(CLASS_NAMES)}, got {classes.tolist()}")
    return features_lib.make_example(image, instances, classes, image_id)


class Voc2012Instance(tfds.core.GeneratorBasedBuilder):
    """PASCAL VOC 2012 instance segmentation: SBD train, VOC 2012 val."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    CLASS_NAMES = CLASS_NAMES
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Extract VOCtrainval_11-May-2012.tar (PASCAL VOC 2012) and "
        "benchmark.tgz (SBD) into the manual dir:\n" + LAYOUT)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=features_lib.features(),
            homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
            citation=(
                "@misc{pascal-voc-2012, author={Everingham, M. and Van Gool, L. and "
                "Williams, C. K. I. and Winn, J. and Zisserman, A.}, title={The "
                "{PASCAL} {V}isual {O}bject {C}lasses {C}hallenge 2012 {(VOC2012)} "
                "{R}esults}}\n"
                "@inproceedings{hariharan2011sbd, title={Semantic Contours from "
                "Inverse Detectors}, author={Hariharan, Bharath and Arbel{\\'a}ez, "
                "Pablo and Bourdev, Lubomir and Maji, Subhransu and Malik, Jitendra}, "
                "booktitle={ICCV}, year={2011}}"),
            metadata=tfds.core.MetadataDict(class_names=list(CLASS_NAMES)),
        )

    def _split_generators(self, dl_manager):
        manual_dir = features_lib.resolve_manual_dir(dl_manager)
        voc_root, sbd_root = find_roots(manual_dir)
        val_ids = read_ids(voc_root / "ImageSets" / "Segmentation" / "val.txt")
        held_out = set(val_ids)
        train_ids = [i for i in read_ids(sbd_root / "train.txt") if i not in held_out]
        return {
            "train": self._generate_examples(
                read_sbd_example, sbd_root, sbd_root / "img", train_ids),
            "validation": self._generate_examples(
                read_voc_example, voc_root, voc_root / "JPEGImages", val_ids),
        }

    def _generate_examples(self, read_fn, root, image_dir, image_ids):
        for image_id in image_ids:
            yield image_id, features_lib.for_storage(
                read_fn(root, image_id), image_dir / f"{image_id}.jpg")
