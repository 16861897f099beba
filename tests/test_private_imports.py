"""A helper one module of train, instruct, eval or corpus shares with another is public: no module
there imports another module's ``_private`` name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import interleaf

PACKAGES = ("train", "instruct", "eval", "corpus")


def test_no_module_imports_a_private_name_of_another():
    root = Path(interleaf.__file__).parent
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("interleaf"):
                    found += [
                        f"{path.relative_to(root)}:{node.lineno}: {node.module}.{alias.name}"
                        for alias in node.names
                        if alias.name.startswith("_") and not alias.name.startswith("__")
                    ]
    assert not found, found


def test_the_helpers_lcl_shares_with_train_data_are_public(tmp_path):
    from interleaf.train.data import SkipSample, image_file, parse_line, row_id

    assert parse_line('{"id": 3}') == {"id": 3}
    with pytest.raises(SkipSample) as exc:
        parse_line("{")
    assert exc.value.reason == "bad_json"
    assert row_id({"general_metadata": '{"id": "d1"}', "id": "x"}) == "d1"
    assert image_file("a.png", {"bytes_path": "images/ab"}, tmp_path / "f", tmp_path) == (
        str(tmp_path / "images/ab"),
        True,
    )
    assert image_file("a.png", None, tmp_path, tmp_path / "build") == (str(tmp_path / "a.png"), False)
