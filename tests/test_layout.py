"""Tests for wecolora.data.layout: which file names are images, and the checks of a dataset folder's layout
(class folders of images, a train split and a test split) made before any torch import."""
import pytest

from wecolora.data.layout import BUILTIN_DATASET_NAMES, IMAGE_EXTENSIONS, check_dataset, is_image_name
from wecolora.errors import UserError


@pytest.mark.parametrize("name, image", [
    ("a.png", True), ("a.PNG", True), ("b.jpg", True), ("b.JPEG", True), ("c.bmp", True), ("d.webp", True),
    ("e.tif", False), ("f.txt", False), ("png", False), ("a.png.txt", False),
    ("._a.png", False), (".hidden.jpg", False),  # macOS resource forks and hidden files
])
def test_is_image_name(name, image):
    assert is_image_name(name) is image


def _tree(root, files):
    """Make ``root`` holding the given relative files (folders end with '/')."""
    for name in files:
        path = root / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
    return root


ACCEPTED = [
    # files, splits
    (["cat/1.png", "dog/2.jpg"], ("train",)),  # a bare class-folder set is the train split
    (["train/cat/1.png", "train/dog/2.jpg"], ("train",)),
    (["train/cat/1.png", "test/cat/2.png"], ("train", "test")),
    (["train/cat/1.png", "val/cat/2.png"], ("train", "test")),  # val stands for the test split
    (["train/cat/deep/er/1.png"], ("train",)),  # images at any depth, as ImageFolder finds them
    (["train/cat/1.png", "train/.cache/", "train/.git/x"], ("train",)),  # hidden folders are not classes
]


@pytest.mark.parametrize("files, splits", ACCEPTED)
def test_check_dataset_accepts(tmp_path, files, splits):
    check_dataset(str(_tree(tmp_path / "set", files)), splits)


@pytest.mark.parametrize("name", BUILTIN_DATASET_NAMES)
def test_built_in_names_need_no_folder(name):
    check_dataset(name, ("train", "test"))


REFUSED = [
    # files, splits, words of the message
    (["cat/1.png"], ("train", "test"), "has no train/ folder, so it is the train split only"),
    (["train/cat/1.png"], ("train", "test"), "has no test split"),
    (["train/"], ("train",), "no class folders in"),
    (["train/readme.txt"], ("train",), "no class folders in"),
    (["train/cat/1.png", "train/dog/notes.txt"], ("train",), "class folder(s) dog in"),
    (["train/cat/._1.png"], ("train",), "class folder(s) cat in"),
    (["train/cat/1.png", "test/cat/1.png", "test/dog/"], ("train", "test"), "class folder(s) dog in"),
]


@pytest.mark.parametrize("files, splits, words", REFUSED)
def test_check_dataset_refuses(tmp_path, files, splits, words):
    with pytest.raises(UserError) as error:
        check_dataset(str(_tree(tmp_path / "set", files)), splits)
    assert words in str(error.value)


def test_many_empty_classes_are_counted(tmp_path):
    root = _tree(tmp_path / "set", ["train/a/1.png"] + [f"train/c{i}/" for i in range(7)])
    with pytest.raises(UserError, match=r"c0, c1, c2, c3, c4 and 2 more in"):
        check_dataset(str(root))


def test_a_missing_folder_names_the_built_ins(tmp_path):
    with pytest.raises(UserError, match="--probe-data .* built-ins: fashion-mnist, mnist-5k"):
        check_dataset(str(tmp_path / "none"), option="--probe-data")


def test_a_file_is_refused(tmp_path):
    (tmp_path / "data.zip").write_bytes(b"")
    with pytest.raises(UserError, match="is a file"):
        check_dataset(str(tmp_path / "data.zip"))


def test_the_extensions_are_lower_case_with_a_dot():
    assert all(ext.startswith(".") and ext == ext.lower() for ext in IMAGE_EXTENSIONS)


def test_the_built_in_names_are_the_datasets():
    from wecolora.data.datasets import BUILTIN_DATASETS

    assert set(BUILTIN_DATASET_NAMES) == set(BUILTIN_DATASETS)
