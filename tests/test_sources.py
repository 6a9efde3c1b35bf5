"""Sources beyond class folders (data/sources.py, data/layout.py): each yields the images (and labels) of the
equivalent class folder, the kind is found from what the path holds, and bad input gets one line or a counted skip."""
import io
import logging
import tarfile

import numpy as np
import pytest
from PIL import Image

from wecolora.cache.images import open_store
from wecolora.data.datasets import open_dataset
from wecolora.data.layout import check_dataset, parse_source
from wecolora.data.subset import SubsetChoice, drop_unreadable
from wecolora.errors import UserError

datasets = pytest.importorskip("datasets")
webdataset = pytest.importorskip("webdataset")

CLASSES = ("cat", "dog", "emu")
PER_CLASS = 4


def pixels(c: int, i: int) -> np.ndarray:
    """Image i of class c: 6x5 RGB noise of its own seed."""
    return np.random.default_rng(10 * c + i).integers(0, 256, (5, 6, 3), dtype=np.uint8)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def items():
    """(class index, class name, image index, pixels) in class-folder order."""
    return [(c, name, i, pixels(c, i)) for c, name in enumerate(CLASSES) for i in range(PER_CLASS)]


def table(split_items=None):
    rows = items() if split_items is None else split_items
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(a) for _, _, _, a in rows], "label": [c for c, _, _, _ in rows],
         "note": [f"{name}-{i}" for _, name, i, _ in rows]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES)),
                                    "note": datasets.Value("string")}))


def write_shards(pattern_dir, rows, per_shard=5, labels=True, name="shards"):
    """WebDataset shards written with webdataset's TarWriter: key.png (+ key.cls)."""
    for shard in range(0, len(rows), per_shard):
        with webdataset.TarWriter(str(pattern_dir / f"{name}-{shard // per_shard:03d}.tar")) as sink:
            for k, (c, _, i, a) in enumerate(rows[shard:shard + per_shard]):
                sample = {"__key__": f"sample{shard + k:04d}", "png": png(a)}
                if labels:
                    sample["cls"] = c
                sink.write(sample)
    return str(pattern_dir / f"{name}-{{000..{(len(rows) - 1) // per_shard:03d}}}.tar")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One set of 12 images (3 classes x 4) in every layout."""
    root = tmp_path_factory.mktemp("sources")
    for _, name, i, a in items():
        for path in (root / "classes" / "train" / name / f"{i}.png", root / "flat" / f"{name}-{i}.png",
                     root / "nested" / "a" / name / f"{i}.png"):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(path)
    for _, name, i, a in items()[::PER_CLASS]:  # one test image per class
        (root / "classes" / "val" / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(root / "classes" / "val" / name / f"{i}.png")
    (root / "list.txt").write_text("# the training images\n" + "".join(
        f"classes/train/{name}/{i}.png\n" for _, name, i, _ in items()))
    (root / "list.csv").write_text("label,path\n" + "".join(
        f"{name},classes/train/{name}/{i}.png\n" for _, name, i, _ in items()))
    table().save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": table(), "test": table(items()[::PER_CLASS])}).save_to_disk(str(root / "dict"))
    (root / "parquet").mkdir()
    table().to_parquet(str(root / "parquet" / "train-00000.parquet"))
    (root / "shards").mkdir()
    pattern = write_shards(root / "shards", items())
    return root, pattern


SOURCES = [
    # (id, spec relative to the world ("{shards}": the brace pattern), labelled)
    ("class folders", "classes", True),
    ("unlabeled flat folder", "flat", False),
    ("txt list", "list.txt", False),
    ("csv list with labels", "list.csv", True),
    ("datasets save_to_disk", "saved", True),
    ("datasets DatasetDict", "dict", True),
    ("parquet written by datasets", "parquet", True),
    ("tar shards, brace pattern", "{shards}", True),
    ("tar shards, a folder of them", "shards", True),
]


def spec_of(world, spec):
    root, pattern = world
    return pattern if spec == "{shards}" else str(root / spec)


@pytest.mark.parametrize("spec,labelled", [c[1:] for c in SOURCES], ids=[c[0] for c in SOURCES])
def test_each_source_yields_the_images_and_labels_of_the_class_folders(world, spec, labelled):
    dataset = open_dataset(spec_of(world, spec))
    assert len(dataset) == len(items())
    got = [(np.asarray(image).tobytes(), dataset.classes[t] if labelled else None) for image, t in
           (dataset[i] for i in range(len(dataset)))]
    if not labelled:
        assert dataset.classes == [] and set(dataset.targets) == {-1}
    # Shard labels are the .cls integers: class c is named "c".
    names = {str(c): name for c, name in enumerate(CLASSES)}
    expected = [(a.tobytes(), name if labelled else None) for _, name, _, a in items()]
    assert sorted((p, names.get(n, n)) for p, n in got) == sorted(expected)
    assert len(set(dataset.sample_ids)) == len(dataset)


def test_the_keys_name_paths_rows_and_shard_members(world):
    root, pattern = world
    assert open_dataset(str(root / "flat")).sample_ids[0] == "cat-0.png"
    assert open_dataset(str(root / "list.csv")).sample_ids[0] == "classes/train/cat/0.png"
    assert open_dataset(str(root / "saved")).sample_ids[:2] == ["train/000000", "train/000001"]
    assert open_dataset(pattern).sample_ids[:2] == ["shards-000.tar/sample0000.png", "shards-000.tar/sample0001.png"]


def test_the_image_store_holds_the_same_pixels_from_every_source(world, tmp_path):
    root, pattern = world
    reference = open_store(open_dataset(str(root / "flat")), range(0, 12, 3), bound=33, cache_dir=tmp_path)
    for spec in (pattern, str(root / "saved"), str(root / "list.txt")):
        store = open_store(open_dataset(spec), range(0, 12, 3), bound=33, cache_dir=tmp_path)  # the same 4 images
        assert store.folder != reference.folder  # keyed by the source's own images
        for p in range(4):
            assert np.array_equal(store.image(p), reference.image(p)), (spec, p)


def test_a_datasets_test_split_and_labels_matched_by_name(world):
    root, _ = world
    test = open_dataset(str(root / "dict"), "test")
    assert test.classes == list(CLASSES) and test.targets == [0, 1, 2]
    with pytest.raises(UserError, match="single split, so it is the train split only"):
        open_dataset(str(root / "saved"), "test")


# ---------------------------------------------------------------------------------------------
# Which kind, and which folder layout


def test_the_kind_is_found_from_what_the_path_holds_and_a_prefix_forces_it(world):
    root, pattern = world
    kinds = {spec: parse_source(spec_of(world, spec)).kind for _, spec, _ in SOURCES}
    assert kinds == {"classes": "folder", "flat": "folder", "list.txt": "list", "list.csv": "list",
                     "saved": "hf-datasets", "dict": "hf-datasets", "parquet": "hf-datasets", "{shards}": "wds",
                     "shards": "wds"}
    assert parse_source("mnist-5k").kind == "builtin"
    assert parse_source(f"folder:{root / 'shards'}").kind == "folder"  # a prefix wins over detection
    assert parse_source(f"hf-datasets:{root / 'parquet' / 'train-00000.parquet'}").kind == "hf-datasets"
    assert parse_source(f"wds:{pattern}").path == pattern


def test_a_flat_folder_is_unlabeled_a_nested_one_classes_and_the_run_says_which(world, caplog):
    root, _ = world
    with caplog.at_level(logging.INFO, logger="wecolora"):
        flat, nested = open_dataset(str(root / "flat")), open_dataset(str(root / "nested" / "a"))
    assert flat.classes == [] and nested.classes == list(CLASSES)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "read as an unlabeled folder" in said and "read as class folders, 12 images in 3 classes" in said
    # The flag overrides: a nested folder read without labels takes every image at any depth.
    anywhere = open_dataset(str(root / "nested"), folder_layout="unlabeled")
    assert anywhere.classes == [] and len(anywhere) == 12 and anywhere.sample_ids[0] == "a/cat/0.png"
    with pytest.raises(UserError, match="no class folders in"):
        open_dataset(str(root / "flat"), folder_layout="classes")


def test_a_folder_with_images_at_the_top_and_in_sub_folders_is_not_guessed(tmp_path):
    for path in (tmp_path / "d" / "loose.png", tmp_path / "d" / "cat" / "1.png"):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels(0, 0)).save(path)
    for check in (lambda: open_dataset(str(tmp_path / "d")), lambda: check_dataset(str(tmp_path / "d"))):
        with pytest.raises(UserError, match="directly inside and in sub-folders: pass --folder-layout unlabeled"):
            check()
    assert len(open_dataset(str(tmp_path / "d"), folder_layout="unlabeled")) == 2
    assert open_dataset(str(tmp_path / "d"), folder_layout="classes").classes == ["cat"]


# ---------------------------------------------------------------------------------------------
# Multi-label lists


def test_a_multi_label_csv_column_and_several_0_1_columns(tmp_path):
    for i in range(3):
        Image.fromarray(pixels(0, i)).save(tmp_path / f"{i}.png")
    (tmp_path / "findings.csv").write_text(
        "Image Index,Finding Labels\n0.png,Effusion|Mass\n1.png,No Finding\n2.png,Mass\n")
    (tmp_path / "columns.csv").write_text("file,Effusion,Mass\n0.png,1,1\n1.png,0,0\n2.png,0,1\n")
    findings = open_dataset(str(tmp_path / "findings.csv"), label_column="Finding Labels")
    assert findings.multilabel and findings.classes == ["Effusion", "Mass", "No Finding"]
    assert findings.targets == [[1, 1, 0], [0, 0, 1], [0, 1, 0]]
    image, target = findings[0]
    assert target.tolist() == [1.0, 1.0, 0.0] and image.size == (6, 5)
    columns = open_dataset(str(tmp_path / "columns.csv"), label_column="Effusion,Mass")
    assert columns.multilabel and columns.classes == ["Effusion", "Mass"]
    assert columns.targets == [[1, 1], [0, 0], [0, 1]]
    with pytest.raises(UserError, match="--subset per-class needs one class per image"):
        SubsetChoice(findings, rule="per-class")


# ---------------------------------------------------------------------------------------------
# Bad input: one line, or a counted skip


def test_a_dataset_without_an_image_column_names_its_columns(tmp_path):
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}).save_to_disk(str(tmp_path / "t"))
    with pytest.raises(UserError, match=r"has no image column \(columns: text, label\); name it with --image-column"):
        open_dataset(str(tmp_path / "t"))
    with pytest.raises(UserError, match="has no column 'img' .--image-column.; columns: text, label"):
        open_dataset(str(tmp_path / "t"), image_column="img")


def test_a_csv_without_a_path_column_names_its_columns(world, tmp_path):
    (tmp_path / "l.csv").write_text("name,label\na,cat\n")
    for check in (lambda: open_dataset(str(tmp_path / "l.csv")), lambda: check_dataset(str(tmp_path / "l.csv"))):
        with pytest.raises(UserError, match=r"has no path column \(columns: name, label\); name the column"):
            check()


def test_a_list_naming_missing_files_is_refused_or_its_missing_images_counted(world, tmp_path):
    root, _ = world
    (tmp_path / "none.txt").write_text("nope/1.png\nnope/2.png\n")
    with pytest.raises(UserError, match="names images that do not exist .first: .*nope/1.png.; paths are read"):
        check_dataset(str(tmp_path / "none.txt"))
    (root / "some-missing.txt").write_text("".join(f"flat/cat-{i}.png\n" for i in range(4)) + "flat/gone.png\n")
    check_dataset(str(root / "some-missing.txt"))  # the first entries exist: missing ones are counted later
    dataset = open_dataset(str(root / "some-missing.txt"))
    kept, skipped = drop_unreadable(dataset, list(range(5)), max_fraction=0.25)
    assert kept == [0, 1, 2, 3] and skipped == ["flat/gone.png"]
    with pytest.raises(UserError, match="1 of the 5 chosen images cannot be read .flat/gone.png."):
        drop_unreadable(dataset, list(range(5)), max_fraction=0.1)


def test_a_corrupt_tar_member_is_skipped_and_counted_and_a_truncated_shard_refused(tmp_path):
    rows = items()[:4]
    with tarfile.open(tmp_path / "bad-000.tar", "w") as archive:
        for k, (_, _, _, a) in enumerate(rows):
            data = png(a) if k != 2 else b"\x89PNG\r\n\x1a\n not really"
            info = tarfile.TarInfo(f"s{k}.png")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    dataset = open_dataset(str(tmp_path / "bad-000.tar"))
    assert dataset.classes == [] and len(dataset) == 4  # no .cls: unlabeled
    kept, skipped = drop_unreadable(dataset, [0, 1, 2, 3], max_fraction=0.25)
    assert kept == [0, 1, 3] and skipped == ["bad-000.tar/s2.png"]
    with tarfile.open(tmp_path / "bad-000.tar") as archive:
        last = archive.getmembers()[-1].offset_data
    (tmp_path / "cut-000.tar").write_bytes((tmp_path / "bad-000.tar").read_bytes()[:last + 10])  # inside the last member
    with pytest.raises(UserError, match="tar shard .*cut-000.tar cannot be read"):
        open_dataset(str(tmp_path / "cut-000.tar"))
    (tmp_path / "z-000.tar.gz").write_bytes(b"")
    with pytest.raises(UserError, match="is compressed; wecolora reads shards by member offset"):
        check_dataset(f"wds:{tmp_path / 'z-000.tar.gz'}")


EMPTY = [
    # (id, how to make it, the fragment of the one line)
    ("empty folder", lambda p: p.mkdir(), "no class folders in"),
    ("empty csv", lambda p: p.with_suffix(".csv").write_text("path,label\n"), "is empty: it names no image"),
    ("empty txt", lambda p: p.with_suffix(".txt").write_text("# nothing\n"), "is empty: it names no image"),
    ("empty datasets table", lambda p: table([]).save_to_disk(str(p)), "is empty: it holds no rows"),
    ("shards without images", lambda p: _tar_of_json(p.with_suffix(".tar")), "hold no image members"),
]


def _tar_of_json(path):
    with webdataset.TarWriter(str(path)) as sink:
        sink.write({"__key__": "a", "json": {"x": 1}})


@pytest.mark.parametrize("make,fragment", [c[1:] for c in EMPTY], ids=[c[0] for c in EMPTY])
def test_an_empty_source_is_refused_in_one_line(tmp_path, make, fragment):
    target = tmp_path / "empty"
    make(target)
    spec = next(str(p) for p in sorted(tmp_path.iterdir()) if p.name.startswith("empty"))
    with pytest.raises(UserError, match=fragment):
        check_dataset(spec)
        open_dataset(spec)


def test_per_class_on_an_unlabeled_source_is_refused_in_one_line(world):
    root, _ = world
    flat = open_dataset(str(root / "flat"))
    with pytest.raises(UserError, match=r"--subset per-class needs labels, and .*flat is unlabeled; use --subset random"):
        SubsetChoice(flat, rule="per-class", ratio=0.5)
    assert SubsetChoice(flat, ratio=0.5).rule == "random"  # the default without labels
    assert SubsetChoice(open_dataset(str(root / "classes")), ratio=0.5).rule == "per-class"


def test_probe_sources_need_labels_and_a_test_split(world):
    root, pattern = world
    with pytest.raises(UserError, match="read as an unlabeled folder .*needs labels: use class folders"):
        check_dataset(str(root / "flat"), ("train", "test"), test_data=str(root / "flat"), need_labels=True)
    with pytest.raises(UserError, match="has no test split of its own; give the test images with --test-data"):
        check_dataset(pattern, ("train", "test"), need_labels=True)
    with pytest.raises(UserError, match="is a .txt list, which has no labels, and this command"):
        check_dataset(str(root / "list.csv"), ("train", "test"), test_data=str(root / "list.txt"), need_labels=True)
    check_dataset(str(root / "list.csv"), ("train", "test"), test_data=pattern, need_labels=True)


def test_tar_members_read_from_many_threads_come_back_whole(tmp_path):
    """The decode check and the store's header reads run in thread pools over one reader: each member's bytes must
    be its own (a shared file position would hand one thread another member's data)."""
    rows = [(0, "x", i, np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)) for i in range(300)]
    write_shards(tmp_path, rows, per_shard=100, labels=False)
    dataset = open_dataset(str(tmp_path))
    everything = list(range(len(dataset)))
    assert drop_unreadable(dataset, everything, max_fraction=0.0, workers=8) == (everything, [])
    store = open_store(dataset, everything, bound=33, cache_dir=tmp_path / "stores")
    for p in range(0, 300, 7):
        assert np.array_equal(store.image(p), rows[p][3].transpose(2, 0, 1)), p
