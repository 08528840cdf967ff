"""Throw a catalogue of bad (and borderline-valid) inputs at the public boundaries; count unclear answers.

Each case calls the pipeline, the processor, ``DynReferConfig``, ``from_pretrained`` or the ``dynrefer``
command (in process) with one bad input and classifies the answer:

* clear: an expected error is a ``ValueError``/``TypeError``/``FileNotFoundError`` (library) or exit
  status 2 without a traceback (command line), within 40 seconds; a valid borderline input succeeds;
* unclear: any other exception type or a traceback, silent acceptance of an invalid input, a hang, or
  a valid input refused.

Usage: ``PYTHONPATH=src:tests HF_HUB_OFFLINE=1 python benchmarks/bad_inputs.py [--out FILE.json]``.
Prints one line per case and the totals (docs/reliability.md quotes them).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import PIL.Image

EXPECTED_ERRORS = (ValueError, TypeError, FileNotFoundError)
TIME_LIMIT = 40  # seconds before a case counts as hanging (the default download timeout is 30 s)


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


def silent_server() -> str:
    """A local HTTP 'server' that accepts connections and never answers; returns its URL."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    connections = []
    threading.Thread(
        target=lambda: [connections.append(server.accept()) for _ in range(8)], daemon=True
    ).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}/image.jpg"


def write_bomb_png(path: str, side: int = 20000) -> None:
    """A small PNG whose header claims ``side`` x ``side`` pixels (more than twice PIL's pixel limit)."""
    import struct
    import zlib

    buffer = io.BytesIO()
    PIL.Image.new("L", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    header = b"IHDR" + struct.pack(">II", side, side) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    Path(path).write_bytes(bytes(data))


def build_fixtures(folder: Path) -> dict[str, str]:
    """Image files and model folders broken in the usual ways."""
    import shutil

    from tiny import save_tiny_region_captioner

    paths = {}
    model = save_tiny_region_captioner(folder / "model")
    paths["model"] = str(model)
    rgb = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    paths["image"] = str(folder / "image.png")
    rgb.save(paths["image"])
    paths["text.jpg"] = str(folder / "text.jpg")
    Path(paths["text.jpg"]).write_text("not an image")
    paths["truncated.png"] = str(folder / "truncated.png")
    Path(paths["truncated.png"]).write_bytes(Path(paths["image"]).read_bytes()[:200])
    paths["16bit.png"] = str(folder / "16bit.png")
    PIL.Image.fromarray(np.full((60, 80), 40000, dtype=np.uint16)).save(paths["16bit.png"])
    paths["bomb.png"] = str(folder / "bomb.png")
    write_bomb_png(paths["bomb.png"])
    paths["folder"] = str(folder)
    empty = folder / "empty_model"
    empty.mkdir()
    paths["empty_model"] = str(empty)
    for name, damage in (
        ("corrupt_weights", lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 64)),
        ("no_weights", lambda f: (f / "model.safetensors").unlink()),
        ("config_not_json", lambda f: (f / "config.json").write_text("{ not json")),
        ("config_incomplete", lambda f: (f / "config.json").write_text('{"model_type": "dynrefer"}')),
        (
            "config_bert",
            lambda f: (f / "config.json").write_text('{"model_type": "bert", "hidden_size": 32}'),
        ),
        ("missing_tensors", _drop_tensors),
    ):
        target = folder / name
        shutil.copytree(model, target)
        damage(target)
        paths[name] = str(target)
    return paths


def _drop_tensors(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    kept = {key: value for key, value in weights.items() if not key.startswith("tag_fc")}
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})


def library_cases(paths: dict[str, str], url: str):
    """(name, callable, expect_error) for the Python API."""
    from tiny import make_tiny_model
    from transformers import AutoConfig, pipeline

    from dynrefer_hf import DynReferConfig, DynReferForRegionCaptioning, DynReferImageProcessor

    describe = pipeline("region-captioning", model=paths["model"], device="cpu")
    processor = DynReferImageProcessor(size={"height": 56, "width": 56})
    image = PIL.Image.open(paths["image"]).convert("RGB")
    box = [10, 10, 60, 60]
    mask = np.zeros((120, 160), dtype=bool)
    mask[10:50, 20:70] = True

    def call(**kwargs):
        return lambda: describe(kwargs.pop("image", image), **{"boxes": [box], **kwargs})

    cases = [
        ("pipeline tag_threshold=1.5", call(tag_threshold=1.5), True),
        ("pipeline tag_threshold=-0.1", call(tag_threshold=-0.1), True),
        ("pipeline tag_threshold='0.5'", call(tag_threshold="0.5"), True),
        ("pipeline tag_threshold=nan", call(tag_threshold=float("nan")), True),
        ("pipeline attribute_top_k=-1", call(attribute_top_k=-1), True),
        ("pipeline attribute_top_k=2.5", call(attribute_top_k=2.5), True),
        ("pipeline attribute_top_k='3'", call(attribute_top_k="3"), True),
        ("pipeline batch_size=0", call(batch_size=0), True),
        ("pipeline batch_size=True", call(batch_size=True), True),
        ("pipeline batch_size=2.0", call(batch_size=2.0), True),
        ("pipeline max_new_tokens=0", call(max_new_tokens=0), True),
        ("pipeline max_new_tokens=-3", call(max_new_tokens=-3), True),
        ("pipeline num_beams=0", call(num_beams=0), True),
        ("pipeline num_return_sequences=2", call(num_return_sequences=2), True),
        ("pipeline unknown kwarg", call(no_such_option=3), True),
        ("pipeline return_views='yes'", call(return_views="yes"), True),
        ("pipeline progress_bar='on'", call(progress_bar="on"), True),
        ("pipeline timeout=-1", call(timeout=-1), True),
        ("pipeline view_selection='best'", call(view_selection="best"), True),
        ("pipeline view_selection='task' no task", call(view_selection="task"), True),
        ("pipeline view_selection=[2.0, 0.5]", call(view_selection=[2.0, 0.5]), True),
        ("pipeline task='unknown'", call(view_selection="task", task="unknown"), True),
        ("pipeline boxes=[]", lambda: describe(image, boxes=[]), True),
        ("pipeline boxes ragged", lambda: describe(image, boxes=[[1, 2, 3, 4], [1, 2, 3]]), True),
        ("pipeline boxes strings", lambda: describe(image, boxes=[["a", "b", "c", "d"]]), True),
        ("pipeline boxes 3 numbers", lambda: describe(image, boxes=[1, 2, 3]), True),
        ("pipeline box x2<x1", lambda: describe(image, boxes=[[50, 10, 10, 60]]), True),
        ("pipeline box NaN", lambda: describe(image, boxes=[[np.nan, 10, 10, 60]]), True),
        ("pipeline box outside", lambda: describe(image, boxes=[[500, 500, 600, 600]]), True),
        ("pipeline box partly outside (valid)", lambda: describe(image, boxes=[[-20, -5, 60, 300]]), False),
        ("pipeline box zero area (valid)", lambda: describe(image, boxes=[[30, 30, 30, 30]]), False),
        ("pipeline no boxes", lambda: describe(image), True),
        ("pipeline boxes and masks", lambda: describe(image, boxes=[box], masks=mask[None]), True),
        ("pipeline images=[]", lambda: describe([], boxes=[]), True),
        ("pipeline images list, boxes count", lambda: describe([image, image], boxes=[[box]]), True),
        ("pipeline image None", lambda: describe(None, boxes=[box]), True),
        ("pipeline image int", lambda: describe(5, boxes=[box]), True),
        ("pipeline image missing file", lambda: describe("no/such.jpg", boxes=[box]), True),
        ("pipeline image text file", lambda: describe(paths["text.jpg"], boxes=[box]), True),
        ("pipeline image truncated", lambda: describe(paths["truncated.png"], boxes=[box]), True),
        ("pipeline image decompression bomb", lambda: describe(paths["bomb.png"], boxes=[box]), True),
        ("pipeline image folder", lambda: describe(paths["folder"], boxes=[box]), True),
        ("pipeline URL never answers", lambda: describe(url, boxes=[box], timeout=2), True),
        ("pipeline URL never answers (default timeout)", lambda: describe(url, boxes=[box]), True),
        ("pipeline URL refused", lambda: describe("http://127.0.0.1:9/x.jpg", boxes=[box]), True),
        ("pipeline 16-bit PNG file", lambda: _not_clipped(describe, paths["16bit.png"]), False),
        (
            "pipeline 16-bit PIL image",
            lambda: _not_clipped(describe, PIL.Image.open(paths["16bit.png"])),
            False,
        ),
        ("pipeline float32 array", lambda: describe(np.zeros((60, 80, 3), np.float32), boxes=[box]), True),
        ("pipeline float PIL 'F'", lambda: describe(PIL.Image.new("F", (80, 60)), boxes=[box]), True),
        ("pipeline array 5 channels", lambda: describe(np.zeros((60, 80, 5), np.uint8), boxes=[box]), True),
        ("pipeline empty array", lambda: describe(np.zeros((0, 80, 3), np.uint8), boxes=[box]), True),
        ("pipeline soft mask", lambda: describe(image, masks=(mask * 0.3)[None]), True),
        ("pipeline NaN mask", lambda: describe(image, masks=np.where(mask, 1.0, np.nan)[None]), True),
        ("pipeline empty mask", lambda: describe(image, masks=np.zeros((1, 120, 160), bool)), True),
        ("pipeline mask wrong size", lambda: describe(image, masks=np.ones((1, 10, 10), bool)), True),
        ("pipeline mask 4-D", lambda: describe(image, masks=np.ones((1, 1, 120, 160), bool)), True),
        (
            "pipeline controls count",
            lambda: describe(image, boxes=[box, box], controls=[["a"], ["b"], ["c"]]),
            True,
        ),
        ("pipeline controls int", lambda: describe(image, boxes=[box], controls=5), True),
        ("pipeline controls [[1]]", lambda: describe(image, boxes=[box], controls=[[1]]), True),
        ("pipeline dict without image", lambda: describe({"boxes": [box]}), True),
        ("pipeline generate_kwargs twice", call(generate_kwargs={"num_beams": 1}, num_beams=2), True),
        (
            "pipeline missing trained tensors",
            lambda: pipeline("region-captioning", model=paths["missing_tensors"]),
            True,
        ),
        ("processor boxes ragged", lambda: processor(image, boxes=[[1, 2, 3, 4], [5, 6]]), True),
        ("processor soft mask", lambda: processor(image, masks=(mask * 0.3)[None]), True),
        ("processor NaN mask", lambda: processor(image, masks=np.where(mask, 1.0, np.nan)[None]), True),
        ("processor images=[]", lambda: processor([], boxes=[]), True),
        ("processor images None", lambda: processor(None, boxes=[box]), True),
        ("processor images str", lambda: processor("image.jpg", boxes=[box]), True),
        (
            "processor 16-bit PIL",
            lambda: _processor_not_clipped(processor, PIL.Image.open(paths["16bit.png"])),
            False,
        ),
        ("processor float array", lambda: processor(np.zeros((60, 80, 3)), boxes=[box]), True),
        (
            "processor seed='x'",
            lambda: processor(image, boxes=[box], view_selection="random", seed="x"),
            True,
        ),
        ("processor view_selection=5", lambda: processor(image, boxes=[box], view_selection=5), True),
        ("processor return_tensors='tf'", lambda: processor(image, boxes=[box], return_tensors="tf"), True),
        ("processor num_views=0", lambda: DynReferImageProcessor(num_views=0), True),
        ("processor num_views='3'", lambda: DynReferImageProcessor(num_views="three"), True),
        ("processor size={'h': 3}", lambda: DynReferImageProcessor(size={"h": 3}), True),
        ("processor image_mean 2 values", lambda: DynReferImageProcessor(image_mean=[0.5, 0.5]), True),
        ("config num_views=0", lambda: DynReferConfig(num_views=0), True),
        ("config tag_threshold=2", lambda: DynReferConfig(tag_threshold=2.0), True),
        ("config head_dropout=1.5", lambda: DynReferConfig(head_dropout=1.5), True),
        ("config max_text_length=0", lambda: DynReferConfig(max_text_length=0), True),
        (
            "model trainable_modules unknown",
            lambda: make_tiny_model(trainable_modules=["no_such_module"]),
            True,
        ),
        ("config from BERT folder", lambda: DynReferConfig.from_pretrained(paths["config_bert"]), True),
        (
            "AutoConfig BERT as dynrefer",
            lambda: _assert_dynrefer(AutoConfig.from_pretrained(paths["config_bert"])),
            True,
        ),
        (
            "model from BERT folder",
            lambda: DynReferForRegionCaptioning.from_pretrained(paths["config_bert"]),
            True,
        ),
        (
            "model from empty folder",
            lambda: DynReferForRegionCaptioning.from_pretrained(paths["empty_model"]),
            True,
        ),
        (
            "model from corrupt weights",
            lambda: DynReferForRegionCaptioning.from_pretrained(paths["corrupt_weights"]),
            True,
        ),
        (
            "model from config without weights",
            lambda: DynReferForRegionCaptioning.from_pretrained(paths["no_weights"]),
            True,
        ),
        (
            "model from config not JSON",
            lambda: DynReferForRegionCaptioning.from_pretrained(paths["config_not_json"]),
            True,
        ),
        (
            "model from incomplete config",
            lambda: DynReferForRegionCaptioning.from_pretrained(paths["config_incomplete"]),
            True,
        ),
        (
            "model missing tensors (loads, listed)",
            lambda: _lists_missing(DynReferForRegionCaptioning, paths["missing_tensors"]),
            False,
        ),
    ]
    return cases


def _lists_missing(model_class, folder) -> None:
    """`from_pretrained` loads like transformers does but records the weights the checkpoint lacked."""
    if model_class.from_pretrained(folder).missing_weights != ["tag_fc.bias", "tag_fc.weight"]:
        raise AssertionError("missing weights not recorded")


def _assert_dynrefer(config) -> None:
    if config.model_type != "dynrefer":
        raise ValueError("not dynrefer")  # AutoConfig reading a BERT folder as BERT is the right answer


def _not_clipped(describe, image) -> None:
    """The 16-bit image (value 40000 of 65535) must not reach the model clipped to white."""
    from dynrefer_hf.images import load_rgb_image

    rgb = np.asarray(load_rgb_image(image))
    if rgb.max() == 255:
        raise AssertionError("clipped to white")
    describe(image, boxes=[[5, 5, 40, 40]])


def _processor_not_clipped(processor, image) -> None:
    out = processor(image, boxes=[[5, 5, 40, 40]])
    if out["pixel_values"].max() > 1.9:  # white after CLIP normalisation is ~1.93-2.15
        raise AssertionError("clipped to white")


def cli_cases(paths: dict[str, str], url: str):
    """(name, argv, expect_error) for the ``dynrefer`` command."""
    model = ["--model", paths["model"], "--device", "cpu"]
    image = paths["image"]
    return [
        ("cli caption no box", ["caption", image, *model], True),
        ("cli caption box 3 numbers", ["caption", image, "--box", "1,2,3", *model], True),
        ("cli caption box letters", ["caption", image, "--box", "a,b,c,d", *model], True),
        ("cli caption box x2<x1", ["caption", image, "--box", "50,2,3,40", *model], True),
        ("cli caption box NaN", ["caption", image, "--box", "nan,2,30,40", *model], True),
        ("cli caption box outside", ["caption", image, "--box", "500,500,600,600", *model], True),
        (
            "cli caption box partly outside (valid)",
            ["caption", image, "--box", "100,50,400,300", *model],
            False,
        ),
        ("cli caption box zero area (valid)", ["caption", image, "--box", "30,30,30,30", *model], False),
        (
            "cli caption box negative '--box=-5,...' (valid)",
            ["caption", image, "--box=-5,3,20,40", *model],
            False,
        ),
        (
            "cli caption box negative '--box -5,...' (valid)",
            ["caption", image, "--box", "-5,3,20,40", *model],
            False,
        ),
        ("cli caption missing image", ["caption", "no/such.jpg", "--box", "1,2,30,40", *model], True),
        ("cli caption text file", ["caption", paths["text.jpg"], "--box", "1,2,30,40", *model], True),
        (
            "cli caption truncated image",
            ["caption", paths["truncated.png"], "--box", "1,2,30,40", *model],
            True,
        ),
        (
            "cli caption decompression bomb",
            ["caption", paths["bomb.png"], "--box", "1,2,30,40", *model],
            True,
        ),
        ("cli caption image is a folder", ["caption", paths["folder"], "--box", "1,2,30,40", *model], True),
        (
            "cli caption URL never answers",
            ["caption", url, "--box", "1,2,30,40", "--timeout", "2", *model],
            True,
        ),
        (
            "cli caption 16-bit PNG (valid)",
            ["caption", paths["16bit.png"], "--box", "1,2,30,40", *model],
            False,
        ),
        (
            "cli caption batch-size 0",
            ["caption", image, "--box", "1,2,30,40", "--batch-size", "0", *model],
            True,
        ),
        (
            "cli caption batch-size x",
            ["caption", image, "--box", "1,2,30,40", "--batch-size", "x", *model],
            True,
        ),
        (
            "cli caption tag-threshold 2",
            ["caption", image, "--box", "1,2,30,40", "--tag-threshold", "2", *model],
            True,
        ),
        (
            "cli caption tag-threshold nan",
            ["caption", image, "--box", "1,2,30,40", "--tag-threshold", "nan", *model],
            True,
        ),
        (
            "cli caption max-new-tokens 0",
            ["caption", image, "--box", "1,2,30,40", "--max-new-tokens", "0", *model],
            True,
        ),
        (
            "cli caption top-attributes -1",
            ["caption", image, "--box", "1,2,30,40", "--top-attributes", "-1", *model],
            True,
        ),
        (
            "cli caption device cuda (none)",
            ["caption", image, "--box", "1,2,30,40", "--model", paths["model"], "--device", "cuda"],
            True,
        ),
        (
            "cli caption device tpu",
            ["caption", image, "--box", "1,2,30,40", "--model", paths["model"], "--device", "tpu"],
            True,
        ),
        (
            "cli caption draw bad folder",
            ["caption", image, "--box", "1,2,30,40", "--draw", "no/such/out.png", *model],
            True,
        ),
        (
            "cli caption draw bad extension",
            ["caption", image, "--box", "1,2,30,40", "--draw", "out.txt", *model],
            True,
        ),
        (
            "cli caption model empty folder",
            ["caption", image, "--box", "1,2,30,40", "--model", paths["empty_model"]],
            True,
        ),
        (
            "cli caption model corrupt weights",
            ["caption", image, "--box", "1,2,30,40", "--model", paths["corrupt_weights"]],
            True,
        ),
        (
            "cli caption model without weights",
            ["caption", image, "--box", "1,2,30,40", "--model", paths["no_weights"]],
            True,
        ),
        (
            "cli caption model config not JSON",
            ["caption", image, "--box", "1,2,30,40", "--model", paths["config_not_json"]],
            True,
        ),
        (
            "cli caption model incomplete config",
            ["caption", image, "--box", "1,2,30,40", "--model", paths["config_incomplete"]],
            True,
        ),
        (
            "cli caption model BERT",
            ["caption", image, "--box", "1,2,30,40", "--model", paths["config_bert"]],
            True,
        ),
        (
            "cli caption model missing tensors",
            ["caption", image, "--box", "1,2,30,40", "--model", paths["missing_tensors"]],
            True,
        ),
        (
            "cli caption model not found",
            ["caption", image, "--box", "1,2,30,40", "--model", "no/such/model"],
            True,
        ),
        ("cli info empty folder", ["info", paths["empty_model"]], True),
        ("cli info config not JSON", ["info", paths["config_not_json"]], True),
        ("cli info BERT", ["info", paths["config_bert"]], True),
        ("cli scene index -1", ["scene", str(Path(paths["folder"]) / "s.png"), "--index", "-1"], True),
        ("cli scene bad folder", ["scene", "no/such/dir/s.png"], True),
        ("cli scene bad extension", ["scene", str(Path(paths["folder"]) / "s.txt")], True),
        ("cli train-demo epochs 0", ["train-demo", "--epochs", "0"], True),
        ("cli train-demo learning-rate nan", ["train-demo", "--learning-rate", "nan"], True),
        (
            "cli convert missing files",
            [
                "convert",
                "--dynrefer",
                "a.pth",
                "--blip2",
                "b.pth",
                "--eva-vit",
                "c.pth",
                "--eva-clip",
                "d.pt",
                "--output",
                str(Path(paths["folder"]) / "out"),
            ],
            True,
        ),
        (
            "cli convert tag-threshold 2",
            [
                "convert",
                "--dynrefer",
                "a.pth",
                "--blip2",
                "b.pth",
                "--eva-vit",
                "c.pth",
                "--eva-clip",
                "d.pt",
                "--output",
                "o",
                "--tag-threshold",
                "2",
            ],
            True,
        ),
        ("cli push not a folder", ["push", "no/such/folder"], True),
        ("cli unknown command", ["frobnicate"], True),
        ("cli unknown option", ["caption", image, "--box", "1,2,30,40", "--no-such-option"], True),
    ]


def run_library_case(function, expect_error: bool) -> tuple[bool, str]:
    signal.alarm(TIME_LIMIT)
    try:
        function()
    except _Hang:
        return False, f"hangs (> {TIME_LIMIT} s)"
    except EXPECTED_ERRORS as error:
        message = str(error).splitlines()[0] if str(error) else ""
        return expect_error, f"{type(error).__name__}: {message[:150]}"
    except BaseException as error:  # noqa: BLE001 - classifying every outcome is the point
        return (
            False,
            f"UNEXPECTED {type(error).__name__}: {str(error).splitlines()[0][:150] if str(error) else ''}",
        )
    finally:
        signal.alarm(0)
    return not expect_error, "accepted"


def run_cli_case(argv: list[str], expect_error: bool) -> tuple[bool, str]:
    from dynrefer_hf.cli import main

    out, err = io.StringIO(), io.StringIO()
    signal.alarm(TIME_LIMIT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = exit_.code
    except _Hang:
        return False, f"hangs (> {TIME_LIMIT} s)"
    except BaseException as error:  # noqa: BLE001
        return (
            False,
            f"traceback: {type(error).__name__}: {str(error).splitlines()[0][:150] if str(error) else ''}",
        )
    finally:
        signal.alarm(0)
    text = err.getvalue().strip()
    last = text.splitlines()[-1] if text else ""
    if "Traceback" in text:
        return False, f"exit {code} with a traceback: {last[:150]}"
    if expect_error:
        return code == 2, f"exit {code}: {last[:150]}"
    return code == 0, f"exit {code}: {last[:150]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the outcomes as JSON here")
    parser.add_argument("--skip", action="append", default=[], help="skip the cases whose name contains this")
    parser.add_argument("--cli-only", action="store_true", help="only the command-line cases")
    args = parser.parse_args()
    signal.signal(signal.SIGALRM, _alarm)
    PIL.Image.MAX_IMAGE_PIXELS = PIL.Image.MAX_IMAGE_PIXELS  # PIL's default limit (about 89 Mpx)
    url = silent_server()
    outcomes = []
    with tempfile.TemporaryDirectory() as folder:
        paths = build_fixtures(Path(folder))
        for name, function, expect_error in [] if args.cli_only else library_cases(paths, url):
            if any(part in name for part in args.skip):
                continue
            clear, answer = run_library_case(function, expect_error)
            outcomes.append({"case": name, "clear": clear, "answer": answer})
            print(f"{'ok     ' if clear else 'UNCLEAR'}  {name}: {answer}", flush=True)
        for name, argv, expect_error in cli_cases(paths, url):
            if any(part in name for part in args.skip):
                continue
            clear, answer = run_cli_case(argv, expect_error)
            outcomes.append({"case": name, "clear": clear, "answer": answer})
            print(f"{'ok     ' if clear else 'UNCLEAR'}  {name}: {answer}", flush=True)
    unclear = sum(not outcome["clear"] for outcome in outcomes)
    print(f"\n{len(outcomes)} cases, {unclear} unclear")
    if args.out:
        Path(args.out).write_text(
            json.dumps({"cases": len(outcomes), "unclear": unclear, "outcomes": outcomes}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
