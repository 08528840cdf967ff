"""`dynrefer scene` and `dynrefer train-demo` argument handling (the training itself: docs/demo_model.md)."""

import json

import numpy as np
import pytest
from PIL import Image

from dynrefer_hf.cli import main
from dynrefer_hf.shapes import shapes_split


def test_scene_writes_a_test_scene_and_prints_its_boxes(tmp_path, capsys):
    out = tmp_path / "scene.png"
    assert main(["scene", str(out), "--index", "2", "--seed", "1"]) == 0
    record = shapes_split("test", 3, seed=1)[2]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(record["image"]))
    first_line, *caption_lines = capsys.readouterr().out.strip().splitlines()
    expected = " ".join("--box " + ",".join(str(int(v)) for v in box) for box in record["boxes"])
    assert first_line == expected
    assert [line.split(": ", 1)[1] for line in caption_lines] == record["captions"]

    assert main(["scene", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["captions"] == shapes_split("test", 1, seed=0)[0]["captions"]


def test_scene_and_train_demo_reject_bad_arguments(tmp_path, capsys):
    assert main(["scene", str(tmp_path / "missing" / "x.png")]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert main(["scene", str(tmp_path / "x.txt")]) == 2
    assert "image extension" in capsys.readouterr().err
    for args, message in (
        (["scene", str(tmp_path / "x.png"), "--index", "-1"], "argument --index: '-1' is not an integer >= 0"),
        (["train-demo", "--output-dir", str(tmp_path), "--epochs", "0"], "'0' is not a number in (0, inf]"),
        (["train-demo", "--learning-rate", "nan"], "'nan' is not a number in (0, inf]"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
