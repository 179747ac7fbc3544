"""find_images: folders, globs, explicit files, hidden entries, and what gets reported as skipped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cxrcae.io import IMAGE_EXTENSIONS, find_images


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "data"
    for rel in [
        "COVID/b.png",
        "COVID/a.JPG",
        "COVID/deep/c.tif",
        "NORMAL/d.jpeg",
        "NORMAL/notes.txt",
        "NORMAL/.hidden.png",
        ".cache/e.png",
        "f.dcm",
    ]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    return root


def _rel(paths, root):
    return [str(Path(p).relative_to(root)) for p in paths]


def test_folder_recursive_sorted_with_skips(tree):
    files, skipped = find_images([tree])
    assert _rel(files, tree) == ["COVID/a.JPG", "COVID/b.png", "COVID/deep/c.tif", "NORMAL/d.jpeg", "f.dcm"]
    reasons = {str(p.relative_to(tree)): r for p, r in skipped}
    assert reasons == {
        ".cache": "hidden directory",
        "NORMAL/.hidden.png": "hidden file",
        "NORMAL/notes.txt": "not an image file (.txt)",
    }


def test_folder_not_recursive(tree):
    files, _ = find_images([tree / "COVID"], recursive=False)
    assert _rel(files, tree) == ["COVID/a.JPG", "COVID/b.png"]


def test_globs(tree):
    files, skipped = find_images([str(tree / "**" / "*.png")])
    assert _rel(files, tree) == ["COVID/b.png"]  # glob itself skips hidden files and dirs
    files, skipped = find_images([str(tree / "NORMAL" / "*")])
    assert _rel(files, tree) == ["NORMAL/d.jpeg"]
    assert [(p.name, r) for p, r in skipped] == [("notes.txt", "not an image file (.txt)")]
    files, skipped = find_images([str(tree / "*.bmp")])
    assert files == [] and skipped == [(tree / "*.bmp", "no match")]


def test_explicit_files_always_kept_and_missing_reported(tree):
    named = [tree / "NORMAL" / "notes.txt", tree / "NORMAL" / ".hidden.png", tree / "nope.png"]
    files, skipped = find_images(named)
    assert _rel(files, tree) == ["NORMAL/.hidden.png", "NORMAL/notes.txt"]
    assert skipped == [(tree / "nope.png", "no such file or directory")]


def test_duplicates_merged_and_order_independent(tree):
    a, _ = find_images([tree / "COVID", tree, str(tree / "COVID" / "*.png")])
    b, _ = find_images([tree])
    assert a == b


def test_symlinked_folder_and_loop(tree, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tree / "COVID", target_is_directory=True)
    os.symlink(tree, tree / "COVID" / "loop")  # a cycle must not hang the walk
    files, _ = find_images([link])
    names = [f.name for f in files]
    assert {"a.JPG", "b.png", "c.tif"} <= set(names)
    assert len(names) < 50


def test_extensions_are_lower_case():
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)
    assert {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm"} <= IMAGE_EXTENSIONS
