"""The web demo (dynrefer_hf.app, `dynrefer demo`): its input parsing, and the page in a real browser.

The browser test starts the app (with a tiny, randomly initialised SAM as its segmenter) on a free port of
127.0.0.1 in this process and drives the system's Chromium with Playwright (no browser download): it uploads
a picture, draws boxes with mouse drags, clicks on an object, presses Describe and compares the table with
what the pipeline returns for the same regions.
"""

import json
import runpy
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from dynrefer_hf.app import EXAMPLES, build_demo, open_picture, parse_regions, remove_region, web
from dynrefer_hf.cli import main
from dynrefer_hf.images import load_rgb_image
from dynrefer_hf.shapes import shapes_split

# ---------------------------------------------------------------------------------------- input parsing


def test_parse_regions_reads_one_box_or_click_per_line_with_optional_control_words():
    regions, controls = parse_regions("10,20,30,40\n\n  5.5, 6 ,7,8 : red, circle ,\n12,7: blue")
    assert regions == [[10, 20, 30, 40], [5.5, 6, 7, 8], [12, 7]]
    assert controls == [[], ["red", "circle"], ["blue"]]
    assert parse_regions("") == ([], [])
    assert parse_regions(None) == ([], [])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1,2,3", "region 0 '1,2,3' is neither a box nor a click: write x1,y1,x2,y2 or x,y"),
        ("1,2,3,4\nabc", "region 1 'abc' is neither a box nor a click"),
        ("10,10,10,50", r"box 0 \(10,10,10,50\) has zero area"),
        ("1,2,3,4\n9,9,5,20", r"box 1 \(9,9,5,20\) has zero area"),
    ],
)
def test_parse_regions_names_the_bad_line(text, message):
    with pytest.raises(ValueError, match=message):
        parse_regions(text)


def test_remove_region_drops_the_numbered_line():
    import gradio as gr

    assert remove_region("1,1,5,5\n\n2,2\n3,3,7,7", 1) == "1,1,5,5\n3,3,7,7"
    with pytest.raises(gr.Error, match="There is no region 3: the regions are numbered 0 to 2"):
        remove_region("1,1,5,5\n2,2,6,6\n3,3,7,7", 3)
    with pytest.raises(gr.Error, match="no region to remove"):
        remove_region("", 0)


def test_open_picture_refuses_huge_and_unreadable_files_and_notes_lossy_conversions(tmp_path, monkeypatch):
    deep = tmp_path / "deep.png"
    PIL.Image.fromarray(np.full((6, 8), 4000, dtype=np.uint16)).save(deep)
    image, notes = open_picture(deep)
    assert image.mode == "RGB" and image.size == (8, 6)
    assert notes == ["deep.png has 16-bit pixels (I;16): rescaled to 8 bits"]
    # the pipeline's pixels (16-bit rescaled, round(4000 * 255 / 65535) = 16), not convert("RGB")'s clipped 255
    assert np.array_equal(np.asarray(image), np.asarray(load_rgb_image(deep)))
    assert np.asarray(image).max() == 16

    animated = tmp_path / "animated.gif"
    frames = [PIL.Image.new("RGB", (8, 6), color) for color in ("red", "blue")]
    frames[0].save(animated, save_all=True, append_images=frames[1:])
    assert open_picture(animated)[1] == ["animated.gif has 2 frames: only the first one is described"]

    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(ValueError, match="notes.png is not a readable image"):
        open_picture(text)

    monkeypatch.setattr(web, "MAX_IMAGE_PIXELS", 40)
    with pytest.raises(ValueError, match=r"the picture is 8x6 \(0.0 megapixels\); the demo takes at most"):
        open_picture(deep)


def test_shipped_examples_are_the_shapes_test_scenes_they_name():
    entries = json.loads((web._EXAMPLES_DIR / "examples.json").read_text())
    assert [path for path, _ in EXAMPLES] == [str(web._EXAMPLES_DIR / entry["file"]) for entry in entries]
    for entry, (path, boxes) in zip(entries, EXAMPLES):
        record = shapes_split(entry["split"], 1, seed=entry["seed"], start=entry["index"])[0]
        with PIL.Image.open(path) as shipped:
            np.testing.assert_array_equal(np.asarray(shipped.convert("RGB")), np.asarray(record["image"]))
        assert boxes == [[int(value) for value in box] for box in record["boxes"]]


# ---------------------------------------------------------------------------------------- the command


def test_demo_command_without_gradio_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` fail
    for name in ("dynrefer_hf.app", "dynrefer_hf.app.web"):
        monkeypatch.delitem(sys.modules, name)
    assert main(["demo"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        "dynrefer demo: the web demo needs Gradio (gradio>=6,<7), which is not installed: "
        "pip install 'dynrefer_hf[demo]'"
    )


def test_app_py_builds_the_same_page_for_spaces(monkeypatch, tiny_sam):
    import gradio as gr

    monkeypatch.setenv("DYNREFER_SEGMENTER", str(tiny_sam))
    namespace = runpy.run_path(str(Path(__file__).resolve().parents[1] / "app.py"), run_name="app")
    assert isinstance(namespace["demo"], gr.Blocks)
    assert namespace["demo"].title == "DynRefer: describe image regions"
    (tool,) = [block for block in namespace["demo"].blocks.values() if getattr(block, "elem_id", None) == "dr-tool"]
    assert tool.info.startswith("a click makes a region of the object's mask") and str(tiny_sam) in tool.info


def test_demo_command_serves_the_page_where_asked_and_names_its_own_options(monkeypatch, capsys):
    import gradio as gr

    launched = {}

    def launch(demo, **options):
        launched.update(options, demo=demo)
        demo.local_url = f"http://{options['server_name']}:{options['server_port']}/"

    monkeypatch.setattr(gr.Blocks, "launch", launch)
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda demo: launched.update(blocked=True))
    assert main(["demo", "--host", "0.0.0.0", "--port", "8123", "--share", "no", "--device", "cpu"]) == 0
    demo = launched.pop("demo")
    assert isinstance(demo, gr.Blocks)
    assert launched == {
        "server_name": "0.0.0.0",
        "server_port": 8123,
        "share": False,
        "quiet": True,  # Gradio's own lines would say "set share=True in launch()"
        "prevent_thread_lock": True,
        "blocked": True,
        **web.LAUNCH_OPTIONS,
    }
    printed = capsys.readouterr().err
    assert "dynrefer demo: serving on http://0.0.0.0:8123/" in printed
    assert "--share yes would add a public gradio.live link" in printed and "share=True" not in printed


def test_demo_command_refuses_a_segmenter_that_is_not_sam_in_one_line(tiny_region_captioner, capsys):
    assert main(["demo", "--segmenter", str(tiny_region_captioner), "--device", "cpu", "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("dynrefer demo: segmenter ") and "is a 'dynrefer' model" in error
    assert len(error.splitlines()) == 1


def test_click_mode_without_a_segmenter_says_what_to_pass(describe):
    demo = build_demo(describe)
    (tool,) = [block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "dr-tool"]
    assert "clicking needs a segmenter" in tool.info and "--segmenter facebook/sam-vit-base" in tool.info


def test_demo_command_checks_the_port_first(capsys):
    assert main(["demo", "--port", "0"]) == 2
    assert capsys.readouterr().err.strip() == "dynrefer demo: --port must be between 1 and 65535, got 0"


# ---------------------------------------------------------------------------------------- in the browser

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# The rows of the results table (Gradio's Dataframe also renders a hidden copy for measuring columns).
TABLE_ROWS = "#dr-table [role=row].virtual-row"
CELLS = "[role=gridcell]"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def describe():
    from transformers import pipeline

    return pipeline("region-captioning")


@pytest.fixture(scope="module")
def demo_url(describe, tiny_sam):
    demo = build_demo(describe, segmenter=tiny_sam)
    port = _free_port()
    demo.launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **web.LAUNCH_OPTIONS
    )
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def page(demo_url):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("the browser test needs the system's Chromium: apt-get install chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(30_000)
        page.goto(demo_url)
        page.wait_for_selector("#dr-board")
        yield page
        browser.close()


def _upload(page, path):
    page.locator("#dr-image input[type=file]").set_input_files(str(path))
    page.wait_for_function(f"document.querySelectorAll('{TABLE_ROWS}').length === 0")  # the last results go


def _drag(page, box, size):
    """Draw ``box`` (picture pixels) on the board with a mouse drag; the picture is ``size`` (w, h)."""
    canvas = _board_canvas(page)
    scale_x, scale_y = canvas["width"] / size[0], canvas["height"] / size[1]
    page.mouse.move(canvas["x"] + box[0] * scale_x, canvas["y"] + box[1] * scale_y)
    page.mouse.down()
    page.mouse.move(canvas["x"] + box[2] * scale_x, canvas["y"] + box[3] * scale_y, steps=6)
    page.mouse.up()


def _board_canvas(page) -> dict:
    """The board's canvas, scrolled into view (the mouse reaches only the viewport): its box on the screen."""
    canvas = page.locator("#dr-board .dr-stage canvas")
    canvas.scroll_into_view_if_needed()
    return canvas.bounding_box()


def _boxes_text(page) -> str:
    return page.input_value("#dr-boxes textarea")


def _expect_message(page, text):
    page.locator(".toast-body", has_text=text).first.wait_for()


def _rows(page) -> list[list[str]]:
    """The table's cells, row by row, as the page shows them."""
    return page.eval_on_selector_all(
        TABLE_ROWS, f"rows => rows.map(r => [...r.querySelectorAll('{CELLS}')].map(td => td.innerText.trim()))"
    )


@pytest.mark.slow
def test_the_empty_board_is_no_second_upload_area_and_the_views_are_explained(page):
    board = page.locator("#dr-board .dr-empty")
    assert "upload one under Picture (on the right)" in board.inner_text()
    assert "Upload a picture" not in board.inner_text()
    # a dashed border is what upload areas look like (Gradio's Picture box has one)
    assert page.eval_on_selector("#dr-board .dr-empty", "e => getComputedStyle(e).borderStyle") != "dashed"
    page.get_by_text("What are the views?").click()
    explained = page.locator("#dr-views-explained").inner_text()
    for mode in ("image prior", "task prior", "explicit t"):
        assert mode in explained
    assert "from the box (t = 0) to the whole" in explained


@pytest.mark.slow
def test_page_reports_bad_input_and_keeps_serving_without_tracebacks(page, tmp_path, capfd):
    # a huge picture (48 megapixels, 1-bit) is refused before it is decoded
    huge = tmp_path / "huge.png"
    PIL.Image.new("1", (8000, 6000)).save(huge)
    _upload(page, huge)
    _expect_message(page, "the picture is 8000x6000 (48.0 megapixels); the demo takes at most 40 megapixels")
    page.locator("#dr-board", has_text="This picture cannot be described").wait_for()

    path, _ = EXAMPLES[2]
    _upload(page, path)
    page.locator("#dr-board .dr-stage canvas").wait_for()
    page.click("#dr-describe")
    _expect_message(page, "No region: drag on the picture to draw a box, click an object in click mode")
    page.fill("#dr-boxes textarea", "10,10,10,50")
    page.click("#dr-describe")
    _expect_message(page, "box 0 (10,10,10,50) has zero area: x2 must exceed x1 and y2 must exceed y1")
    page.fill("#dr-boxes textarea", "10,10,30,50\n300,300,400,380")
    page.click("#dr-describe")
    _expect_message(page, "box 1 (300,300,400,380) is not inside the 377x376 picture.")
    page.fill("#dr-boxes textarea", "10,10,30,50\n377,20")
    page.click("#dr-describe")
    _expect_message(page, "click 1 (377,20) is not on the 377x376 picture.")
    assert page.locator(TABLE_ROWS).count() == 0
    # the user's mistakes are on the page, not as tracebacks in the server's terminal
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out


@pytest.mark.slow
def test_drawn_boxes_are_described_as_the_pipeline_describes_them(page, describe):
    path, shape_boxes = EXAMPLES[2]
    image = PIL.Image.open(path).convert("RGB")
    _upload(page, path)  # an upload clears the boxes
    page.wait_for_function("document.querySelector('#dr-boxes textarea').value === ''")
    page.locator("#dr-board .dr-stage canvas").wait_for()
    targets = [shape_boxes[0], shape_boxes[3]]
    for box in targets:
        _drag(page, box, image.size)
    # a third box, then a right-click on it removes it again
    _drag(page, [250, 150, 350, 250], image.size)
    page.wait_for_function("document.querySelector('#dr-boxes textarea').value.split('\\n').length === 3")
    canvas = _board_canvas(page)
    page.mouse.click(
        canvas["x"] + canvas["width"] * 300 / 377, canvas["y"] + canvas["height"] * 200 / 376, button="right"
    )
    page.wait_for_function("document.querySelector('#dr-boxes textarea').value.split('\\n').length === 2")

    boxes, _ = parse_regions(_boxes_text(page))
    assert len(boxes) == 2
    np.testing.assert_allclose(boxes, targets, atol=2)  # screen pixels map back to picture pixels

    page.click("#dr-describe")
    page.wait_for_function(f"document.querySelectorAll('{TABLE_ROWS}').length === 2", timeout=180_000)
    rows = _rows(page)
    expected = describe(image, boxes=boxes)
    assert [row[0] for row in rows] == ["0", "1"]
    assert [row[1] for row in rows] == [", ".join(f"{value:g}" for value in box) for box in boxes]
    assert [row[2] for row in rows] == [result["caption"] for result in expected]
    assert [row[4].split(" (")[0] for row in rows] == [result["label"]["name"] for result in expected]

    # the box column breaks lines between numbers, never inside one
    lines_of_boxes = page.eval_on_selector_all(
        f"{TABLE_ROWS} {CELLS}[data-col='1'] span",
        """spans => spans.map(span => {
            const text = span.firstChild, lines = [];
            for (let i = 0; i < text.length; i++) {
                const range = document.createRange();
                range.setStart(text, i); range.setEnd(text, i + 1);
                const top = Math.round(range.getBoundingClientRect().top);
                if (!lines.length || lines[lines.length - 1].top !== top) lines.push({top, text: ''});
                lines[lines.length - 1].text += text.data[i];
            }
            return lines.map(line => line.text);
        })""",
    )
    for box, lines in zip(boxes, lines_of_boxes):
        assert [value for line in lines for value in line.replace(",", " ").split()] == [f"{v:g}" for v in box]

    # nothing of Gradio's covers the top corners of the result picture, where the first caption is
    picture = page.locator("#dr-regions img")
    picture.wait_for()
    picture.scroll_into_view_if_needed()  # elementFromPoint sees only the viewport
    corners = page.evaluate(
        """() => { const img = document.querySelector('#dr-regions img'), r = img.getBoundingClientRect();
                   return [[r.left + 4, r.top + 4], [r.right - 4, r.top + 4]].map(
                       ([x, y]) => document.elementFromPoint(x, y) === img); }"""
    )
    assert corners == [True, True]


@pytest.mark.slow
def test_a_drag_may_start_outside_the_picture(page):
    path, _ = EXAMPLES[2]
    _upload(page, path)
    page.wait_for_function("document.querySelector('#dr-boxes textarea').value === ''")
    canvas = _board_canvas(page)
    page.mouse.move(canvas["x"] - 20, canvas["y"] - 15)  # left of and above the picture
    page.mouse.down()
    page.mouse.move(canvas["x"] + canvas["width"] / 2, canvas["y"] + canvas["height"] / 2, steps=6)
    page.mouse.up()
    page.wait_for_function("document.querySelector('#dr-boxes textarea').value !== ''")
    (box,), _ = parse_regions(_boxes_text(page))
    np.testing.assert_allclose(box, [0, 0, 377 / 2, 376 / 2], atol=2)


@pytest.mark.slow
def test_a_click_on_an_object_is_described_through_the_segmenters_mask(page, describe, tiny_sam):
    from dynrefer_hf.segmentation import PointSegmenter, region_points
    from dynrefer_hf.views import mask_to_box

    path, shape_boxes = EXAMPLES[2]
    image = PIL.Image.open(path).convert("RGB")
    _upload(page, path)
    page.wait_for_function("document.querySelector('#dr-boxes textarea').value === ''")
    page.fill("#dr-boxes textarea", ",".join(map(str, shape_boxes[0])))  # a box, then a click beside it
    page.get_by_label("click an object").check()
    canvas = _board_canvas(page)
    page.mouse.click(canvas["x"] + canvas["width"] * 100.5 / 377, canvas["y"] + canvas["height"] * 340.5 / 376)
    page.wait_for_function("document.querySelector('#dr-boxes textarea').value.split('\\n').length === 2")
    (box, click), _ = parse_regions(_boxes_text(page))
    np.testing.assert_allclose(click, [100, 340], atol=2)

    page.click("#dr-describe")
    page.wait_for_function(f"document.querySelectorAll('{TABLE_ROWS}').length === 2", timeout=180_000)
    rows = _rows(page)
    # the page runs the segmenter at the pipeline's dtype (bfloat16 on a CPU with native bfloat16)
    (mask,) = PointSegmenter.from_pretrained(tiny_sam, dtype=describe.dtype)(image, region_points([click]))
    expected = describe(image, boxes=[box, mask_to_box(mask)])
    # a click's region is its mask's (one region per call on both sides: in bfloat16, the machine's precision
    # here, a region's scores depend on which regions share its forward pass)
    assert describe(image, boxes=[mask_to_box(mask)])[0] == describe(image, masks=mask[None])[0]
    assert rows[1][1] == ", ".join(f"{value:g}" for value in expected[1]["box"])
    assert [row[2] for row in rows] == [result["caption"] for result in expected]
    page.locator("#dr-regions img").wait_for()  # the picture with the click's mask came back too
    page.get_by_label("drag a box").check()


@pytest.mark.slow
def test_control_words_explicit_views_and_the_views_picture(page, describe):
    path, shape_boxes = EXAMPLES[2]
    image = PIL.Image.open(path).convert("RGB")
    _upload(page, path)
    page.wait_for_function("document.querySelector('#dr-boxes textarea').value === ''")
    page.fill(
        "#dr-boxes textarea",
        f"{','.join(map(str, shape_boxes[0]))}\n{','.join(map(str, shape_boxes[3]))}: blue",
    )
    page.get_by_label("explicit t").check()
    page.get_by_label("Show the views").check()
    # the t sliders appear after the server answers the mode change
    expected_sliders = describe.image_processor.num_views - 1
    page.wait_for_function(f"document.querySelectorAll('input[type=range]').length === {expected_sliders}")
    ratios = [
        float(value) for value in page.eval_on_selector_all("input[type=range]", "s => s.map(i => i.value)")
    ]
    assert len(ratios) == describe.image_processor.num_views - 1
    page.click("#dr-describe")
    page.locator("#dr-views img").wait_for(timeout=180_000)
    rows = [row[2] for row in _rows(page)]
    expected = describe(
        image, boxes=[shape_boxes[0], shape_boxes[3]], controls=[[], ["blue"]], view_selection=ratios
    )
    assert rows == [result["caption"] for result in expected]
