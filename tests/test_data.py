"""Tests of fxadapt.data: data set layouts, decoding, the cache, limits and loaders."""

import io
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2

import fxadapt.data as data_module
from fxadapt.data import DATASETS, DataBundle, load_data, make_loaders
from fxadapt.errors import DataError

CLASS_COLORS = {
    "cat": (200, 30, 30),
    "dog": (30, 30, 200),
    "owl": (30, 200, 30),
}
MARKER_COLOR = (250, 250, 0)


def write_image(path: Path, color, size=(8, 8), mode="RGB") -> None:
    """Write a solid-colour image; the format follows the file extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def write_truncated_jpeg(path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 90, 90)).save(buffer, format="JPEG")
    encoded = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded[: len(encoded) // 2])


def make_image_tree(root: Path, train_per_class=3, test_per_class=2, test_name="test") -> Path:
    """Build train/ and test/ folders with one solid colour per class."""
    for name, color in CLASS_COLORS.items():
        for index in range(train_per_class):
            write_image(root / "train" / name / f"{index:03d}.png", color)
        for index in range(test_per_class):
            write_image(root / test_name / name / f"{index:03d}.png", color)
    return root


def nearest_class(image: torch.Tensor) -> str:
    mean_color = image.to(torch.float32).mean(dim=(1, 2))
    distances = {
        name: float((mean_color - torch.tensor(color, dtype=torch.float32)).abs().sum())
        for name, color in CLASS_COLORS.items()
    }
    return min(distances, key=distances.get)


def find_marker(images: torch.Tensor) -> int:
    """Return the index of the one image whose colour is MARKER_COLOR."""
    marker = torch.tensor(MARKER_COLOR, dtype=torch.float32)
    distances = (images.to(torch.float32).mean(dim=(2, 3)) - marker).abs().sum(dim=1)
    matches = torch.nonzero(distances < 12).flatten().tolist()
    assert len(matches) == 1
    return matches[0]


def loader_labels(loader) -> list[int]:
    return [label for _, labels in loader for label in labels.tolist()]


# digits


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return load_data("digits")


def test_digits_shapes_and_classes(digits):
    image, label = digits.train[0]
    assert digits.name == "digits"
    assert digits.input_shape == (3, 32, 32)
    assert digits.num_classes == 10
    assert digits.classes == [str(digit) for digit in range(10)]
    assert image.shape == (3, 32, 32)
    assert image.dtype == torch.float32
    assert isinstance(label, int)


def test_digits_split_is_stratified_80_20(digits):
    assert len(digits.train) == 1438
    assert len(digits.test) == 359
    assert len(digits.train_plain) == len(digits.train)
    for label in range(10):
        train_count = int((digits.train.labels == label).sum())
        test_count = int((digits.test.labels == label).sum())
        assert test_count == round((train_count + test_count) * 0.2)


def test_digits_split_is_fixed(digits):
    # The split comes from NumPy's frozen RandomState stream, so these labels never change.
    expected = [3, 7, 3, 9, 0, 8, 7, 0, 8, 0, 3, 3, 6, 6, 9, 1, 0, 1, 3, 6]
    assert digits.test.labels[:20].tolist() == expected
    again = load_data("digits", seed=5)
    assert torch.equal(again.train.images, digits.train.images)
    assert torch.equal(again.test.labels, digits.test.labels)


def test_digits_images_are_normalised(digits):
    plain = torch.stack([digits.train_plain[index][0] for index in range(len(digits.train))])
    assert abs(float(plain.mean())) < 1e-3
    assert float(plain.std()) == pytest.approx(1.0, abs=1e-3)
    channel_means = plain.mean(dim=(0, 2, 3))
    assert torch.allclose(channel_means, channel_means[0].expand(3))


def test_digits_augmentation_crops_without_flip(digits):
    steps = digits.train.transform.transforms
    crops = [step for step in steps if isinstance(step, v2.RandomCrop)]
    assert not any(isinstance(step, v2.RandomHorizontalFlip) for step in steps)
    assert len(crops) == 1
    assert crops[0].padding == [2, 2, 2, 2]
    torch.manual_seed(0)
    plain = digits.train_plain[0][0]
    assert any(not torch.equal(digits.train[0][0], plain) for _ in range(20))


def test_digits_without_augment_matches_plain():
    bundle = load_data("digits", augment=False)
    assert torch.equal(bundle.train[7][0], bundle.train_plain[7][0])


def test_digits_ignores_data_dir_with_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fxadapt.data")
    bundle = load_data("digits", tmp_path)
    assert len(bundle.train) == 1438
    assert "ignoring data_dir" in caplog.text


# limits


def test_limit_is_class_balanced(digits):
    bundle = load_data("digits", train_limit=25, test_limit=10, seed=3)
    train_counts = torch.bincount(bundle.train.labels, minlength=10).tolist()
    test_counts = torch.bincount(bundle.test.labels, minlength=10).tolist()
    assert train_counts == [3, 3, 3, 3, 3, 2, 2, 2, 2, 2]
    assert test_counts == [1] * 10
    assert len(bundle.train_plain) == 25


def test_limit_depends_on_seed():
    first = load_data("digits", train_limit=50, seed=1)
    again = load_data("digits", train_limit=50, seed=1)
    other = load_data("digits", train_limit=50, seed=2)
    assert torch.equal(first.train.images, again.train.images)
    assert not torch.equal(first.train.images, other.train.images)


def test_limit_above_split_keeps_whole_split():
    bundle = load_data("digits", train_limit=100_000, test_limit=360)
    assert len(bundle.train) == 1438
    assert len(bundle.test) == 359


def test_limit_moves_share_of_small_class(tmp_path):
    root = tmp_path / "tree"
    for index in range(2):
        write_image(root / "train" / "cat" / f"{index}.png", CLASS_COLORS["cat"])
    for name in ("dog", "owl"):
        for index in range(10):
            write_image(root / "train" / name / f"{index}.png", CLASS_COLORS[name])
    for name, color in CLASS_COLORS.items():
        write_image(root / "test" / name / "0.png", color)
    bundle = load_data("imagefolder", root, train_limit=13, cache_dir=tmp_path / "cache")
    assert torch.bincount(bundle.train.labels).tolist() == [2, 6, 5]


# image-folder trees


def test_imagefolder_labels_follow_folders(tmp_path):
    root = make_image_tree(tmp_path / "tree")
    write_image(root / "train" / "dog" / "marker.png", MARKER_COLOR)
    bundle = load_data("imagefolder", root, cache_dir=tmp_path / "cache")
    assert bundle.classes == ["cat", "dog", "owl"]
    assert len(bundle.train) == 10
    assert len(bundle.test) == 6
    marker = find_marker(bundle.train_plain.images)
    assert bundle.train_plain.labels[marker] == bundle.classes.index("dog")
    for index in range(len(bundle.test)):
        label = int(bundle.test.labels[index])
        assert nearest_class(bundle.test.images[index]) == bundle.classes[label]


def test_imagefolder_resizes_to_first_image(tmp_path):
    root = make_image_tree(tmp_path / "tree")
    # "000.png" of "cat" is the first train file in sorted order; PIL sizes are (width, height).
    write_image(root / "train" / "cat" / "000.png", CLASS_COLORS["cat"], size=(12, 6))
    write_image(root / "test" / "owl" / "big.png", CLASS_COLORS["owl"], size=(40, 40))
    write_image(root / "train" / "dog" / "grey.png", 120, mode="L")
    bundle = load_data("imagefolder", root, cache_dir=tmp_path / "cache")
    assert bundle.input_shape == (3, 6, 12)
    assert bundle.train.images.shape[1:] == (3, 6, 12)
    assert bundle.test.images.shape[1:] == (3, 6, 12)
    assert bundle.train[0][0].shape == (3, 6, 12)


def test_imagefolder_reads_val_folder(tmp_path):
    root = make_image_tree(tmp_path / "tree", test_name="val")
    bundle = load_data("imagefolder", root, cache_dir=tmp_path / "cache")
    assert len(bundle.test) == 6


def test_imagefolder_normalises_with_train_statistics(tmp_path):
    root = make_image_tree(tmp_path / "tree")
    bundle = load_data("imagefolder", root, cache_dir=tmp_path / "cache")
    expected_mean = [sum(color[c] for color in CLASS_COLORS.values()) / 3 / 255 for c in range(3)]
    assert bundle.mean == pytest.approx(expected_mean, abs=1e-6)
    plain = torch.stack([bundle.train_plain[index][0] for index in range(len(bundle.train))])
    assert float(plain.mean(dim=(0, 2, 3)).abs().max()) < 1e-4


def test_cifar10_tree_uses_cifar_augmentation(tmp_path):
    root = make_image_tree(tmp_path / "tree")
    bundle = load_data("cifar10", root, cache_dir=tmp_path / "cache")
    steps = bundle.train.transform.transforms
    crops = [step for step in steps if isinstance(step, v2.RandomCrop)]
    assert bundle.input_shape == (3, 32, 32)
    assert bundle.mean == data_module.CIFAR10_MEAN
    assert crops[0].padding == [4, 4, 4, 4]
    assert any(isinstance(step, v2.RandomHorizontalFlip) for step in steps)


# CIFAR-10 batch files


def write_cifar10_batches(folder: Path) -> None:
    """Write small CIFAR-10 batch files in torchvision's pickle format."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    for file_name in [f"data_batch_{number}" for number in range(1, 6)] + ["test_batch"]:
        rows = np.zeros((4, 3 * 32 * 32), dtype=np.uint8)
        for index in range(4):
            rows[index, :1024] = 10 * (index + 1)  # red plane
            rows[index, 1024:2048] = 1  # green plane
        batch = {"data": rows, "labels": [0, 3, 7, 9]}
        (folder / file_name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))


@pytest.fixture
def skip_cifar10_checksums(monkeypatch):
    # torchvision compares every batch file with the MD5 sum of the published file.
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)


@pytest.mark.parametrize("nested", [True, False], ids=["batch-folder", "flat"])
def test_cifar10_batch_files(tmp_path, skip_cifar10_checksums, nested):
    batch_folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path / "batches"
    write_cifar10_batches(batch_folder)
    bundle = load_data("cifar10", tmp_path if nested else batch_folder)
    assert len(bundle.train) == 20
    assert len(bundle.test) == 4
    assert bundle.classes[3] == "cat"
    assert bundle.train.labels[:4].tolist() == [0, 3, 7, 9]
    assert bundle.train_plain.images.shape[1:] == (3, 32, 32)
    assert int(bundle.train_plain.images[2, 0, 5, 5]) == 30
    assert int(bundle.train_plain.images[2, 1, 5, 5]) == 1
    assert int(bundle.train_plain.images[2, 2, 5, 5]) == 0


def test_cifar10_missing_batch_raises(tmp_path, skip_cifar10_checksums):
    write_cifar10_batches(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match="batch files in .*cifar-10-batches-py are missing"):
        load_data("cifar10", tmp_path)


# Tiny ImageNet


def make_tinyimagenet(root: Path) -> Path:
    wnid_colors = {"n02": CLASS_COLORS["dog"], "n01": CLASS_COLORS["cat"]}
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("n02\nn01\n")
    for wnid, color in wnid_colors.items():
        for index in range(3):
            write_image(root / "train" / wnid / "images" / f"{wnid}_{index}.JPEG", color, (16, 16))
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("unused\n")
    val_labels = [("val_0.JPEG", "n01"), ("val_1.JPEG", "n02"), ("val_2.JPEG", "n01")]
    lines = []
    for file_name, wnid in val_labels:
        write_image(root / "val" / "images" / file_name, wnid_colors[wnid], (16, 16))
        lines.append(f"{file_name}\t{wnid}\t0\t0\t15\t15")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    write_image(root / "test" / "images" / "test_0.JPEG", (0, 0, 0), (16, 16))
    return root


def test_tinyimagenet_labels_from_annotations(tmp_path):
    root = make_tinyimagenet(tmp_path / "tiny")
    bundle = load_data("tinyimagenet", root, cache_dir=tmp_path / "cache")
    assert bundle.classes == ["n02", "n01"]
    assert bundle.input_shape == (3, 64, 64)
    assert len(bundle.train) == 6
    assert bundle.test.labels.tolist() == [1, 0, 1]
    assert nearest_class(bundle.test.images[1]) == "dog"
    assert nearest_class(bundle.test.images[0]) == "cat"
    assert bundle.mean == data_module.IMAGENET_MEAN


def test_tinyimagenet_train_labels_follow_wnids(tmp_path):
    root = make_tinyimagenet(tmp_path / "tiny")
    bundle = load_data("tinyimagenet", root, cache_dir=tmp_path / "cache")
    for index in range(len(bundle.train)):
        label = int(bundle.train.labels[index])
        expected = "dog" if bundle.classes[label] == "n02" else "cat"
        assert nearest_class(bundle.train_plain.images[index]) == expected


def test_tinyimagenet_without_wnids_sorts_folders(tmp_path):
    root = make_tinyimagenet(tmp_path / "tiny")
    (root / "wnids.txt").unlink()
    bundle = load_data("tinyimagenet", root, cache_dir=tmp_path / "cache")
    assert bundle.classes == ["n01", "n02"]
    assert bundle.test.labels.tolist() == [0, 1, 0]


# the cache


def count_decoder_calls(monkeypatch) -> list[Path]:
    calls: list[Path] = []
    real_decode_file = data_module._decode_file

    def counting_decode_file(path, image_size):
        calls.append(path)
        return real_decode_file(path, image_size)

    monkeypatch.setattr(data_module, "_decode_file", counting_decode_file)
    return calls


def test_cache_skips_decoding_on_second_load(tmp_path, monkeypatch):
    root = make_image_tree(tmp_path / "tree")
    cache_dir = tmp_path / "cache"
    first = load_data("imagefolder", root, cache_dir=cache_dir)
    assert len(list(cache_dir.glob("imagefolder-*.pt"))) == 2
    assert not list(cache_dir.glob("*.tmp"))

    def fail_decode_file(path, image_size):
        raise AssertionError(f"decoded {path} although the cache holds it")

    monkeypatch.setattr(data_module, "_decode_file", fail_decode_file)
    second = load_data("imagefolder", root, cache_dir=cache_dir)
    assert torch.equal(second.train.images, first.train.images)
    assert torch.equal(second.test.labels, first.test.labels)


def test_cache_file_loads_with_weights_only(tmp_path):
    root = make_image_tree(tmp_path / "tree")
    cache_dir = tmp_path / "cache"
    load_data("imagefolder", root, cache_dir=cache_dir)
    train_cache = next(cache_dir.glob("imagefolder-train-*.pt"))
    content = torch.load(train_cache, weights_only=True)
    assert content["images"].dtype == torch.uint8
    assert content["images"].shape == (9, 3, 8, 8)
    assert content["labels"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_cache_misses_after_new_file(tmp_path, monkeypatch):
    root = make_image_tree(tmp_path / "tree")
    cache_dir = tmp_path / "cache"
    load_data("imagefolder", root, cache_dir=cache_dir)
    write_image(root / "train" / "owl" / "new.png", CLASS_COLORS["owl"])
    calls = count_decoder_calls(monkeypatch)
    bundle = load_data("imagefolder", root, cache_dir=cache_dir)
    assert len(bundle.train) == 10
    assert len(calls) == 10
    assert all(path.parts[-3] == "train" for path in calls)


def test_cache_misses_when_train_classes_change(tmp_path):
    root = make_image_tree(tmp_path / "tree")
    cache_dir = tmp_path / "cache"
    before = load_data("imagefolder", root, cache_dir=cache_dir)
    # A new first class renumbers the labels of the unchanged test folder.
    write_image(root / "train" / "ant" / "0.png", (0, 0, 0))
    after = load_data("imagefolder", root, cache_dir=cache_dir)
    assert before.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert after.test.labels.tolist() == [1, 1, 2, 2, 3, 3]


def test_cache_ignores_damaged_file(tmp_path, monkeypatch, caplog):
    root = make_image_tree(tmp_path / "tree")
    cache_dir = tmp_path / "cache"
    load_data("imagefolder", root, cache_dir=cache_dir)
    train_cache = next(cache_dir.glob("imagefolder-train-*.pt"))
    train_cache.write_bytes(b"not a tensor file")
    calls = count_decoder_calls(monkeypatch)
    caplog.set_level(logging.WARNING, logger="fxadapt.data")
    bundle = load_data("imagefolder", root, cache_dir=cache_dir)
    assert len(bundle.train) == 9
    assert len(calls) == 9
    assert "ignoring unreadable cache file" in caplog.text


def test_cache_dir_defaults_to_environment(tmp_path, monkeypatch):
    root = make_image_tree(tmp_path / "tree")
    monkeypatch.setenv("FXADAPT_CACHE", str(tmp_path / "from-env"))
    load_data("imagefolder", root)
    assert len(list((tmp_path / "from-env").glob("imagefolder-*.pt"))) == 2


# unreadable files


def test_truncated_file_is_skipped_and_counted(tmp_path, caplog):
    root = make_image_tree(tmp_path / "tree", train_per_class=40)
    bad_file = root / "train" / "dog" / "broken.jpg"
    write_truncated_jpeg(bad_file)
    caplog.set_level(logging.WARNING, logger="fxadapt.data")
    bundle = load_data("imagefolder", root, cache_dir=tmp_path / "cache")
    assert len(bundle.train) == 120
    assert "skipped 1 of 121 image files" in caplog.text
    assert str(bad_file) in caplog.text


def test_skipped_file_is_reported_again_from_cache(tmp_path, caplog):
    root = make_image_tree(tmp_path / "tree", train_per_class=40)
    write_truncated_jpeg(root / "train" / "dog" / "broken.jpg")
    load_data("imagefolder", root, cache_dir=tmp_path / "cache")
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="fxadapt.data")
    bundle = load_data("imagefolder", root, cache_dir=tmp_path / "cache")
    assert len(bundle.train) == 120
    assert "skipped 1 of 121 image files" in caplog.text


def test_too_many_unreadable_files_raise(tmp_path):
    root = make_image_tree(tmp_path / "tree", train_per_class=33)
    write_truncated_jpeg(root / "train" / "cat" / "broken.jpg")
    (root / "train" / "owl" / "empty.png").write_bytes(b"")
    with pytest.raises(DataError) as raised:
        load_data("imagefolder", root, cache_dir=tmp_path / "cache")
    message = str(raised.value)
    assert "2 of 101 image files" in message
    assert str(root / "train" / "cat" / "broken.jpg") in message
    assert "\n" not in message


# errors


def case_unknown_name(tmp_path):
    return "mnist", None, {}


def case_no_data_dir(tmp_path):
    return "cifar10", None, {}


def case_absent_data_dir(tmp_path):
    return "imagefolder", tmp_path / "absent", {}


def case_data_dir_is_file(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    return "imagefolder", a_file, {}


def case_imagefolder_without_train(tmp_path):
    (tmp_path / "no-train" / "test").mkdir(parents=True)
    return "imagefolder", tmp_path / "no-train", {}


def case_tinyimagenet_without_train(tmp_path):
    (tmp_path / "no-train" / "val").mkdir(parents=True)
    return "tinyimagenet", tmp_path / "no-train", {}


def case_cifar10_unknown_layout(tmp_path):
    (tmp_path / "no-train" / "images").mkdir(parents=True)
    return "cifar10", tmp_path / "no-train", {}


def case_no_test_folder(tmp_path):
    return "imagefolder", make_image_tree(tmp_path / "no-test", test_per_class=0), {}


def case_class_folder_without_images(tmp_path):
    root = make_image_tree(tmp_path / "empty-class")
    (root / "train" / "emu").mkdir()
    (root / "train" / "emu" / "notes.txt").write_text("no images here")
    return "imagefolder", root, {}


def case_split_without_class_folders(tmp_path):
    (tmp_path / "empty-split" / "train").mkdir(parents=True)
    (tmp_path / "empty-split" / "test").mkdir()
    return "imagefolder", tmp_path / "empty-split", {}


def case_test_class_not_in_train(tmp_path):
    root = make_image_tree(tmp_path / "extra-class")
    write_image(root / "test" / "emu" / "0.png", (0, 0, 0))
    return "imagefolder", root, {}


def case_no_val_annotations(tmp_path):
    root = make_tinyimagenet(tmp_path / "tiny")
    (root / "val" / "val_annotations.txt").unlink()
    return "tinyimagenet", root, {}


def case_val_annotation_unknown_wnid(tmp_path):
    root = make_tinyimagenet(tmp_path / "tiny")
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    return "tinyimagenet", root, {}


def case_val_annotation_without_tab(tmp_path):
    root = make_tinyimagenet(tmp_path / "tiny")
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG n01\n")
    return "tinyimagenet", root, {}


def case_val_annotations_empty(tmp_path):
    root = make_tinyimagenet(tmp_path / "tiny")
    (root / "val" / "val_annotations.txt").write_text("\n")
    return "tinyimagenet", root, {}


def case_wnid_without_folder(tmp_path):
    root = make_tinyimagenet(tmp_path / "tiny")
    (root / "wnids.txt").write_text("n02\nn01\nn03\n")
    return "tinyimagenet", root, {}


def case_train_folder_not_in_wnids(tmp_path):
    root = make_tinyimagenet(tmp_path / "tiny")
    (root / "wnids.txt").write_text("n02\n")
    return "tinyimagenet", root, {}


def case_limit_below_classes(tmp_path):
    return "digits", None, {"train_limit": 5}


def case_limit_zero(tmp_path):
    return "digits", None, {"test_limit": 0}


ERROR_CASES = [
    (case_unknown_name, r"unknown data set 'mnist': choose one of cifar10, digits, "),
    (case_no_data_dir, r"cifar10 needs a data directory: pass --data-dir"),
    (case_absent_data_dir, r"data directory .*absent not found: pass --data-dir"),
    (case_data_dir_is_file, r"data directory .*a-file is not a folder"),
    (case_imagefolder_without_train, r"no train/ folder in .*no-train: "),
    (case_tinyimagenet_without_train, r"no train/ folder in .*no-train: .*tiny-imagenet-200"),
    (case_cifar10_unknown_layout, r"no train/ folder, cifar-10-batches-py/ folder or data_b"),
    (case_no_test_folder, r"no test/ or val/ folder in .*no-test"),
    (case_class_folder_without_images, r"class folder .*train/emu contains no images"),
    (case_split_without_class_folders, r"no class folders in .*empty-split/train"),
    (case_test_class_not_in_train, r"class folder .*test/emu matches no class in .*/train"),
    (case_no_val_annotations, r"no val/val_annotations.txt in "),
    (case_val_annotation_unknown_wnid, r"line 1 of .*val_annotations.txt names wnid n99"),
    (case_val_annotation_without_tab, r"line 1 of .*val_annotations.txt has no tab"),
    (case_val_annotations_empty, r"val_annotations.txt lists no images"),
    (case_wnid_without_folder, r"class folder .*train/n03 not found"),
    (case_train_folder_not_in_wnids, r"class folder .*train/n01 matches no class in .*wnids.txt"),
    (case_limit_below_classes, r"--train-limit 5 is smaller than the 10 classes"),
    (case_limit_zero, r"invalid --test-limit 0"),
]


@pytest.mark.parametrize(
    ("make_case", "pattern"), ERROR_CASES, ids=[case.__name__[5:] for case, _ in ERROR_CASES]
)
def test_data_error_message(tmp_path, make_case, pattern):
    name, data_dir, options = make_case(tmp_path)
    with pytest.raises(DataError, match=pattern) as raised:
        load_data(name, data_dir, cache_dir=tmp_path / "cache", **options)
    assert "\n" not in str(raised.value)


def test_seed_out_of_range_raises():
    with pytest.raises(ValueError, match="seed must be between 0 and 2"):
        load_data("digits", seed=-1)


# loaders


def test_train_loader_order_follows_seed():
    bundle = load_data("digits", augment=False)
    first = loader_labels(make_loaders(bundle, 100, seed=0)[0])
    again = loader_labels(make_loaders(bundle, 100, seed=0)[0])
    other = loader_labels(make_loaders(bundle, 100, seed=1)[0])
    assert len(first) == 1438
    assert first == again
    assert first != other
    assert first != bundle.train.labels.tolist()


def test_test_loader_keeps_order(digits):
    train_loader, test_loader = make_loaders(digits, 64, drop_last=True)
    assert loader_labels(test_loader) == digits.test.labels.tolist()
    assert len(train_loader) == 1438 // 64
    images, labels = next(iter(train_loader))
    assert images.shape == (64, 3, 32, 32)
    assert labels.dtype == torch.int64


def test_make_loaders_rejects_bad_arguments(digits):
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        make_loaders(digits, 0)
    with pytest.raises(DataError, match="1438 samples, fewer than one batch of 2000"):
        make_loaders(digits, 2000, drop_last=True)


def test_datasets_constant():
    assert DATASETS == ("cifar10", "digits", "imagefolder", "tinyimagenet")


# real CIFAR-10


def test_real_cifar10_tree(cifar10_root, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    bundle = load_data("cifar10", cifar10_root, cache_dir=cache_dir)
    assert bundle.classes == [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    assert len(bundle.train) == 50_000
    assert len(bundle.test) == 10_000
    assert torch.bincount(bundle.train.labels).tolist() == [5000] * 10
    assert torch.bincount(bundle.test.labels).tolist() == [1000] * 10

    # Files are listed class by class in sorted order, so train/cat/0000.jpg comes 15,000th.
    cat_file = cifar10_root / "train" / "cat" / "0000.jpg"
    with Image.open(cat_file) as opened:
        decoded = torch.from_numpy(np.array(opened.convert("RGB"))).permute(2, 0, 1)
    assert int(bundle.train.labels[15_000]) == 3
    assert torch.equal(bundle.train_plain.images[15_000], decoded)

    sample = torch.stack([bundle.train_plain[index][0] for index in range(0, 50_000, 100)])
    assert float(sample.mean(dim=(0, 2, 3)).abs().max()) < 0.1
    assert float(sample.std()) == pytest.approx(1.0, abs=0.1)

    monkeypatch.setattr(data_module, "_decode_file", lambda *args: pytest.fail("cache missed"))
    cached = load_data("cifar10", cifar10_root, cache_dir=cache_dir, train_limit=1000)
    assert torch.bincount(cached.train.labels).tolist() == [100] * 10
    assert len(cached.test) == 10_000


def test_cutout_blanks_one_square():
    torch.manual_seed(0)
    image = torch.ones(3, 32, 32)
    blanked = data_module.Cutout(16)(image)
    zero_rows = (blanked[0] == 0).any(dim=1).sum().item()
    zero_columns = (blanked[0] == 0).any(dim=0).sum().item()

    assert 0 < zero_rows <= 16
    assert 0 < zero_columns <= 16
    assert (blanked == 0).sum().item() == 3 * zero_rows * zero_columns
    assert torch.equal(image, torch.ones(3, 32, 32))


def test_cutout_applies_to_training_images_only():
    bundle = load_data("digits", cutout=16)
    plain = load_data("digits")
    torch.manual_seed(1)
    train_zero = sum(float((bundle.train[index][0] == 0).float().mean()) for index in range(20))
    test_zero = sum(float((bundle.test[index][0] == 0).float().mean()) for index in range(20))
    plain_zero = sum(float((plain.train[index][0] == 0).float().mean()) for index in range(20))

    assert train_zero > plain_zero + 1.0
    assert test_zero == pytest.approx(
        sum(float((plain.test[index][0] == 0).float().mean()) for index in range(20))
    )
