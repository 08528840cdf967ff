"""The web demo (``dynrefer demo``, ``app.py``): draw boxes on a picture in the browser, or click on
objects, and read what DynRefer says about each region (docs/demo.md).

Gradio has no image component to draw boxes on, so the drawing board is a canvas laid over the picture in
a ``gr.HTML`` block. A small script (``_BOARD_JS``, run once when the page loads) turns mouse drags on it
into ``x1,y1,x2,y2`` lines of the "Regions" textbox, and clicks (in click mode, with a segmenter) into
``x,y`` lines. That textbox is the one place the regions live: the Python side reads them from it, typed
lines count the same as drawn ones, and the board redraws whatever it holds, numbered as the results are.
"""

from __future__ import annotations

import base64
import html
import json
import os
from io import BytesIO
from pathlib import Path

import PIL.Image

GRADIO_REQUIREMENT = "gradio>=6,<7"
_INSTALL_HINT = "pip install 'dynrefer_hf[demo]'"

try:
    import gradio as gr
except ImportError as error:
    raise ImportError(
        f"the web demo needs Gradio ({GRADIO_REQUIREMENT}), which is not installed: {_INSTALL_HINT}"
    ) from error
if gr.__version__.split(".")[0] != "6":
    raise ImportError(
        f"the web demo needs {GRADIO_REQUIREMENT}, found gradio {gr.__version__}: {_INSTALL_HINT}"
    )

from ..images import load_rgb_image
from ..pipelines.region_captioning import DEFAULT_MODEL, RegionCaptioningPipeline
from ..segmentation import PointSegmenter, region_points
from ..views import TASK_PRIOR_RATIOS, mask_to_box
from ..visualize import REGION_COLORS, draw_clicks, draw_regions, draw_views

__all__ = [
    "EXAMPLES",
    "GRADIO_REQUIREMENT",
    "LAUNCH_OPTIONS",
    "MAX_IMAGE_PIXELS",
    "MAX_REGIONS",
    "TABLE_HEADERS",
    "build_demo",
    "open_picture",
    "parse_regions",
    "remove_region",
]

# Larger pictures are refused before they are decoded (a 40-megapixel RGB picture is 120 MB in memory).
MAX_IMAGE_PIXELS = 40_000_000
# Regions per request: the model describes them in one call (in chunks of the pipeline's batch size).
MAX_REGIONS = 100
# The board sends the picture with at most this many pixels on its longer side, and shows it scaled (up
# or down) to fit this width and height in CSS pixels; boxes are always in the picture's own pixels.
_BOARD_SIDE = 1024
_BOARD_FIT = (720, 600)
# How many attributes the table shows per region.
_TOP_ATTRIBUTES = 3

TABLE_HEADERS = ["#", "box", "caption", "score", "class", "tags", "top attributes"]

_EXAMPLES_DIR = Path(__file__).parent / "examples"
# Synthetic shapes scenes (test split, seed 0) with their shapes' boxes, as (PNG path, boxes).
EXAMPLES: list[tuple[str, list[list[int]]]] = [
    (str(_EXAMPLES_DIR / entry["file"]), entry["boxes"])
    for entry in json.loads((_EXAMPLES_DIR / "examples.json").read_text())
]

_VIEW_MODES = [("image prior", "image_prior"), ("task prior", "task"), ("explicit t", "explicit")]
_VIEWS_EXPLAINED = """
DynRefer reads every region through several **nested views**: view 0 is the box itself, and each further
view is a larger crop around it, reaching a fraction **t** of the way from the box (t = 0) to the whole
picture (t = 1); the model combines what it sees in all of them. How the t of each view is chosen:

- **image prior** (default, upstream's rule at inference): for each region, the t among 0.1, 0.2, ... 1.0 whose
  view looks most different from the box itself (perceptual hash), weighted towards smaller views;
- **task prior**: the fixed t the paper gives for a task (captioning or attributes), the same for every region;
- **explicit t**: your own t for each view, with the sliders.

Tick *Show the views each region was read from* to see them.
"""
_TOOLS = [("drag a box", "box"), ("click an object", "click")]
_SEGMENTER_HINT = (
    "start the demo with a SAM / SAM 2 model, `dynrefer demo --segmenter facebook/sam-vit-base` "
    "(or build_demo(..., segmenter=...))"
)

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}

_BOARD_PLACEHOLDER = '<div class="dr-empty">{message}</div>'
_NO_PICTURE = "No picture yet: upload one under <b>Picture</b> (on the right) or pick an example below."

_CSS = """
#dr-board .dr-stage { position: relative; display: inline-block; line-height: 0; user-select: none; }
#dr-board .dr-stage img { display: block; max-width: 100%; height: auto; pointer-events: none; }
#dr-board .dr-stage canvas { position: absolute; left: 0; top: 0; width: 100%; height: 100%;
                             cursor: crosshair; touch-action: none; }
#dr-board .dr-empty { padding: 3em 1em; text-align: center; background: var(--block-background-fill);
                      color: var(--body-text-color-subdued); }
#dr-regions img { display: block; }
#dr-board .dr-hint { margin: 0.3em 0 0; color: var(--body-text-color-subdued); font-size: 0.9em; }
"""

# Runs once when the page loads. Everything hangs off `document`, so it survives the board being
# re-rendered for every new picture. Region lines and their numbering follow `parse_regions`: every
# non-blank line of the Regions textbox is one region (a box or a click), numbered from 0 in order.
_BOARD_JS = r"""
() => {
  const COLORS = __COLORS__;
  const NUMBER = String.raw`\s*(-?[\d.]+)\s*`;
  const BOX = new RegExp(`^${NUMBER},${NUMBER},${NUMBER},${NUMBER}(:.*)?$`);
  const POINT = new RegExp(`^${NUMBER},${NUMBER}(:.*)?$`);
  const MIN_DRAG = 4;  // screen pixels: shorter drags are clicks, not boxes
  const REACH = 48;    // screen pixels around the picture where a drag may start (it starts at the edge)
  let drag = null, drawn = '';
  const stage = () => document.querySelector('#dr-board .dr-stage');
  const textarea = () => document.querySelector('#dr-boxes textarea');
  const tool = () => document.querySelector('#dr-tool input:checked')?.value ?? 'box';
  const color = (i) => COLORS[i % COLORS.length];
  const css = (c) => `rgb(${c[0]},${c[1]},${c[2]})`;
  const lines = () => (textarea()?.value ?? '').split('\n').filter((line) => line.trim());
  // Every line is one region: a box [x1, y1, x2, y2], a click [x, y], or null (not readable).
  const regions = () => lines().map((line) => {
    const m = line.match(BOX) ?? line.match(POINT);
    return m ? m.slice(1, line.match(BOX) ? 5 : 3).map(Number) : null;
  });
  // What the board shows depends on: the regions, the picture and its size on screen, the drag under way.
  const state = (s, img) => [textarea()?.value, img?.clientWidth, img?.clientHeight, s?.dataset.key, JSON.stringify(drag)].join('|');

  function label(ctx, text, x, y, c) {
    const top = y >= 16 ? y - 16 : y;
    ctx.fillStyle = css(c);
    ctx.fillRect(x, top, ctx.measureText(text).width + 8, 16);
    ctx.fillStyle = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] > 150 ? '#000' : '#fff';
    ctx.fillText(text, x + 4, top + 2);
  }

  function redraw() {
    const s = stage();
    if (!s) { drawn = state(s, undefined); return; }
    const img = s.querySelector('img'), canvas = s.querySelector('canvas');
    const w = img.clientWidth, h = img.clientHeight;
    drawn = state(s, img);
    if (!w || !h) return;
    if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
    const sx = w / Number(s.dataset.width), sy = h / Number(s.dataset.height);
    const ctx = canvas.getContext('2d');
    ctx.clearRect(0, 0, w, h);
    ctx.font = 'bold 13px sans-serif';
    ctx.textBaseline = 'top';
    ctx.lineWidth = 2;
    regions().forEach((region, i) => {
      if (!region) return;
      const c = color(i);
      if (region.length === 2) {  // a click: a dot in the region's colour, ringed in white
        const [x, y] = [region[0] * sx, region[1] * sy];
        ctx.beginPath();
        ctx.arc(x, y, 6, 0, 2 * Math.PI);
        ctx.fillStyle = css(c);
        ctx.fill();
        ctx.strokeStyle = '#fff';
        ctx.stroke();
        label(ctx, String(i), x + 8, y - 8 + 16, c);
        return;
      }
      const [x1, y1, x2, y2] = [region[0] * sx, region[1] * sy, region[2] * sx, region[3] * sy];
      ctx.strokeStyle = css(c);
      ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
      label(ctx, String(i), x1, y1, c);
    });
    if (drag && tool() === 'box') {
      ctx.setLineDash([6, 4]);
      ctx.strokeStyle = '#000';
      ctx.strokeRect(drag.x0, drag.y0, drag.x1 - drag.x0, drag.y1 - drag.y0);
      ctx.setLineDash([]);
    }
  }

  // The pointer's place on the canvas, in screen pixels, moved onto the picture if it is outside.
  function position(event, canvas) {
    const r = canvas.getBoundingClientRect();
    return [Math.min(Math.max(event.clientX - r.left, 0), r.width),
            Math.min(Math.max(event.clientY - r.top, 0), r.height)];
  }

  function nearPicture(event, canvas) {
    const r = canvas.getBoundingClientRect();
    return event.clientX >= r.left - REACH && event.clientX <= r.right + REACH &&
           event.clientY >= r.top - REACH && event.clientY <= r.bottom + REACH;
  }

  function setLines(lines) {
    const area = textarea();
    area.value = lines.join('\n');
    area.dispatchEvent(new Event('input', { bubbles: true }));  // tells Gradio the value changed
  }

  function addRegion(s, canvas) {
    const sx = Number(s.dataset.width) / canvas.clientWidth, sy = Number(s.dataset.height) / canvas.clientHeight;
    const moved = Math.abs(drag.x1 - drag.x0) >= MIN_DRAG && Math.abs(drag.y1 - drag.y0) >= MIN_DRAG;
    if (tool() === 'click') {
      if (moved) return;
      // a click is on a pixel: x in [0, width - 1], y in [0, height - 1]
      const x = Math.min(Math.floor(drag.x1 * sx), Number(s.dataset.width) - 1);
      const y = Math.min(Math.floor(drag.y1 * sy), Number(s.dataset.height) - 1);
      setLines([...lines(), `${x},${y}`]);
    } else if (moved) {
      const x1 = Math.round(Math.min(drag.x0, drag.x1) * sx), x2 = Math.round(Math.max(drag.x0, drag.x1) * sx);
      const y1 = Math.round(Math.min(drag.y0, drag.y1) * sy), y2 = Math.round(Math.max(drag.y0, drag.y1) * sy);
      setLines([...lines(), `${x1},${y1},${x2},${y2}`]);
    }
  }

  // Right-click on a region removes it (the highest-numbered box or click under the pointer).
  document.addEventListener('contextmenu', (event) => {
    const s = stage();
    if (!s || event.target !== s.querySelector('canvas')) return;
    event.preventDefault();
    const canvas = event.target, [x, y] = position(event, canvas);
    const sx = Number(s.dataset.width) / canvas.clientWidth, sy = Number(s.dataset.height) / canvas.clientHeight;
    const px = x * sx, py = y * sy, near = 8 * sx;  // a click counts within 8 screen pixels
    const hit = regions().findLastIndex((r) => r && (r.length === 2
      ? Math.hypot(r[0] - px, r[1] - py) <= near
      : r[0] <= px && px <= r[2] && r[1] <= py && py <= r[3]));
    if (hit >= 0) setLines(lines().filter((_, i) => i !== hit));
  });

  // A drag may start on the picture or just outside it (to reach its edge): it starts at the edge then.
  document.addEventListener('pointerdown', (event) => {
    const s = stage(), canvas = s?.querySelector('canvas');
    if (!s || event.button !== 0 || !nearPicture(event, canvas)) return;
    if (event.target.closest?.('input, textarea, select, button, label, a')) return;  // the page's own controls
    event.preventDefault();
    event.target.setPointerCapture?.(event.pointerId);
    const [x, y] = position(event, canvas);
    drag = { x0: x, y0: y, x1: x, y1: y };
    redraw();
  });
  document.addEventListener('pointermove', (event) => {
    const s = stage();
    if (!drag || !s) return;
    [drag.x1, drag.y1] = position(event, s.querySelector('canvas'));
    redraw();
  });
  document.addEventListener('pointerup', () => {
    const s = stage();
    if (!drag) return;
    if (s) addRegion(s, s.querySelector('canvas'));
    drag = null;
    redraw();
  });
  // Regions change by typing, by the buttons and by examples, the picture by uploads and resizes:
  // redraw whenever any of it differs from what was drawn last.
  setInterval(() => {
    const s = stage();
    if (state(s, s?.querySelector('img')) !== drawn) redraw();
  }, 150);
}
""".replace("__COLORS__", json.dumps([list(color) for color in REGION_COLORS]))

# Options for `gr.Blocks.launch` shared by `dynrefer demo` and app.py: the board's style and script
# (Gradio 6 takes them at launch), exception messages (never tracebacks) on the page, and uploads bounded
# before they reach `open_picture`.
LAUNCH_OPTIONS = {"show_error": True, "max_file_size": "50mb", "css": _CSS, "js": _BOARD_JS}


class _PictureError(ValueError):
    """A picture the demo cannot describe; the message is shown on the page."""


def open_picture(path: str | os.PathLike) -> tuple[PIL.Image.Image, list[str]]:
    """The picture at ``path`` as RGB, and notes on anything changed on the way (shown as warnings).

    The pixels are the pipeline's (``images.load_rgb_image``: EXIF orientation applied, alpha dropped,
    16-bit pixels rescaled to 8 bits, 32-bit and float pictures refused); only the first frame of an
    animation is kept.

    Raises:
        ValueError: not a readable image, or more than ``MAX_IMAGE_PIXELS`` pixels (checked before decoding).
    """
    name = Path(path).name
    try:
        with PIL.Image.open(path) as opened:  # reads the header only
            width, height = opened.size
            frames, mode = getattr(opened, "n_frames", 1), opened.mode
    except PIL.Image.DecompressionBombError as error:
        raise _PictureError(f"{name} is too large: {error}") from None
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise _PictureError(f"{name} is not a readable image ({error})") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise _PictureError(
            f"the picture is {width}x{height} ({width * height / 1e6:.1f} megapixels); the demo takes "
            f"at most {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels: downscale it first"
        )
    try:
        image = load_rgb_image(path)
    except ValueError as error:
        raise _PictureError(f"{name}: {error}") from None
    notes = []
    if frames > 1:
        notes.append(f"{name} has {frames} frames: only the first one is described")
    if mode in _SIXTEEN_BIT_MODES:
        notes.append(f"{name} has 16-bit pixels ({mode}): rescaled to 8 bits")
    return image, notes


def parse_regions(text: str | None) -> tuple[list[list[float]], list[list[str]]]:
    """The regions and control words of the Regions textbox.

    Every non-blank line is one region, numbered from 0: a box ``x1,y1,x2,y2`` or a click ``x,y`` (pixels),
    optionally followed by ``:`` and comma-separated control words (``40,30,120,90: red, circle``).

    Returns:
        ``(regions, controls)``: ``[[x1, y1, x2, y2] or [x, y], ...]`` and one list of words per region
        (maybe empty).

    Raises:
        ValueError: a line that is neither four nor two numbers, or a box whose x2 <= x1 or y2 <= y1.
    """
    regions, controls = [], []
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        number = len(regions)
        coordinates, _, words = line.partition(":")
        try:
            region = [float(part) for part in coordinates.split(",")]
        except ValueError:
            region = []
        if len(region) not in (2, 4):
            raise ValueError(
                f"region {number} {line.strip()!r} is neither a box nor a click: write x1,y1,x2,y2 or x,y (pixels)"
            )
        if len(region) == 4 and not (region[2] > region[0] and region[3] > region[1]):
            raise ValueError(
                f"box {number} ({coordinates.strip()}) has zero area: x2 must exceed x1 and y2 must exceed y1"
            )
        regions.append(region)
        controls.append([word.strip() for word in words.split(",") if word.strip()])
    return regions, controls


def _user_error(message: str) -> gr.Error:
    """An error shown on the page; the server's terminal gets no traceback for a user's mistake."""
    return gr.Error(message, print_exception=False)


def remove_region(text: str | None, number: float | None) -> str:
    """The Regions text without region ``number`` (the regions after it move up one number)."""
    lines = [line for line in (text or "").splitlines() if line.strip()]
    if not lines:
        raise _user_error("There is no region to remove.")
    if number is None or not 0 <= int(number) < len(lines):
        raise _user_error(f"There is no region {number}: the regions are numbered 0 to {len(lines) - 1}.")
    del lines[int(number)]
    return "\n".join(lines)


def _board_html(image: PIL.Image.Image, key: str) -> str:
    """The drawing board: the picture (scaled down to ``_BOARD_SIDE`` at most) with a canvas over it."""
    shown = image.copy()
    shown.thumbnail((_BOARD_SIDE, _BOARD_SIDE))
    kind = "png" if shown.width * shown.height <= 512 * 512 else "jpeg"  # small pictures stay exact
    buffer = BytesIO()
    shown.save(buffer, format=kind, quality=92)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    width = round(image.width * min(_BOARD_FIT[0] / image.width, _BOARD_FIT[1] / image.height))
    return (
        f'<div class="dr-stage" data-width="{image.width}" data-height="{image.height}" data-key="{key}">'
        f'<img src="data:image/{kind};base64,{data}" alt="the picture" draggable="false" style="width: {width}px">'
        "<canvas></canvas></div>"
        f'<p class="dr-hint">{image.width}x{image.height} pixels: drag on the picture to draw a box, or click '
        "an object in click mode; right-click a region to remove it.</p>"
    )


def _show_board(path: str | None) -> str:
    if path is None:
        return _BOARD_PLACEHOLDER.format(message=_NO_PICTURE)
    try:
        image, notes = open_picture(path)
    except ValueError as error:
        gr.Warning(str(error))
        return _BOARD_PLACEHOLDER.format(message=html.escape(f"This picture cannot be described: {error}"))
    for note in notes:
        gr.Warning(note)
    return _board_html(image, key=str(abs(hash(path))))


def _table_row(index: int, result: dict) -> list:
    label = result["label"]
    return [
        index,
        ", ".join(f"{value:g}" for value in result["box"]),  # wraps between numbers, never inside one
        result["caption"],
        round(result["score"], 4),
        f"{label['name']} ({label['score']:.2f})" if label else "",
        ", ".join(result["tags"]),
        ", ".join(f"{item['name']} {item['score']:.2f}" for item in result["attributes"]),
    ]


def _check_inside(regions: list[list[float]], image: PIL.Image.Image) -> None:
    """Raise a user error for the first box not inside the picture or click not on it."""
    for number, region in enumerate(regions):
        text = ",".join(f"{value:g}" for value in region)
        if len(region) == 2 and not (0 <= region[0] < image.width and 0 <= region[1] < image.height):
            raise _user_error(f"click {number} ({text}) is not on the {image.width}x{image.height} picture.")
        if len(region) == 4 and (
            region[0] < 0 or region[1] < 0 or region[2] > image.width or region[3] > image.height
        ):
            raise _user_error(f"box {number} ({text}) is not inside the {image.width}x{image.height} picture.")


def _segment_clicks(segmenter, image, regions) -> list:
    """The mask of every click region (``None`` for boxes), from the segmenter, in one batch."""
    clicks = [number for number, region in enumerate(regions) if len(region) == 2]
    masks = [None] * len(regions)
    if not clicks:
        return masks
    if segmenter is None:
        raise _user_error(f"click {clicks[0]} needs a segmenter: {_SEGMENTER_HINT}")
    found = segmenter(image, region_points([regions[number] for number in clicks]), allow_empty=True)
    for number, mask in zip(clicks, found):
        if not mask.any():
            raise _user_error(
                f"click {number} ({','.join(f'{value:g}' for value in regions[number])}): the segmenter found no "
                "object there (its mask is empty); click elsewhere or draw a box."
            )
        masks[number] = mask
    return masks


def build_demo(
    model: str | os.PathLike | RegionCaptioningPipeline | None = None,
    device: str | None = None,
    segmenter: str | os.PathLike | PointSegmenter | None = None,
) -> gr.Blocks:
    """The demo page, queued so that one model call runs at a time.

    Args:
        model: a ``region-captioning`` pipeline, or a model folder or Hub id to load one from;
            ``None`` loads ``DEFAULT_MODEL`` (the demonstration model shipped in the package, offline).
        device: where to load the model when it is not a pipeline (default: the pipeline's default, CPU).
        segmenter: a SAM / SAM 2 folder or Hub id, or a ``PointSegmenter``: turns on the click mode
            (a click on an object makes a region of its mask); default: the pipeline's own, if any.

    Returns:
        The ``gr.Blocks`` app; start it with ``.launch(**LAUNCH_OPTIONS)``.
    """
    if isinstance(model, RegionCaptioningPipeline):
        describe = model
    else:
        from transformers import pipeline

        name, revision = (os.fspath(model), None) if model is not None else DEFAULT_MODEL
        describe = pipeline("region-captioning", model=name, revision=revision, device=device)
    if segmenter is not None and not isinstance(segmenter, PointSegmenter):
        segmenter = PointSegmenter.from_pretrained(segmenter, device=describe.device, dtype=describe.dtype)
    segmenter = segmenter or describe.segmenter
    num_views = describe.image_processor.num_views
    view_size = (describe.image_processor.size["height"], describe.image_processor.size["width"])
    model_name = describe.model.name_or_path
    if model_name == DEFAULT_MODEL[0]:
        model_name = "the demonstration model shipped in the package (trained on synthetic shapes scenes)"

    with gr.Blocks(title="DynRefer: describe image regions", analytics_enabled=False) as demo:
        gr.Markdown(
            "## DynRefer: describe image regions\n"
            "Upload a picture under **Picture** (or pick an example), drag boxes on it or click on objects, "
            "press **Describe**: every region gets a caption, tags, attributes and a class. "
            f"Model: `{model_name}`."
        )
        with gr.Row():
            with gr.Column(scale=3) as left:
                tool = gr.Radio(
                    _TOOLS,
                    value="box",
                    label="On the picture",
                    info=(
                        "a click makes a region of the object's mask, found by the segmenter "
                        f"({getattr(segmenter.model, 'name_or_path', '') or 'SAM'})"
                        if segmenter is not None
                        else f"clicking needs a segmenter: {_SEGMENTER_HINT}"
                    ),
                    elem_id="dr-tool",
                )
                board = gr.HTML(_show_board(None), padding=False, elem_id="dr-board")
            with gr.Column(scale=2):
                picture = gr.Image(
                    type="filepath",
                    label="Picture",
                    sources=["upload", "clipboard"],
                    height=220,
                    elem_id="dr-image",
                )
                boxes = gr.Textbox(
                    label="Regions",
                    info="One region per line, numbered from 0: a box x1,y1,x2,y2 or a click x,y in pixels, "
                    "optionally followed by ': control words' (e.g. 40,30,120,90: red, circle). Drawing and "
                    "clicking on the picture add lines.",
                    lines=4,
                    max_lines=12,
                    elem_id="dr-boxes",
                )
                with gr.Row():
                    box_number = gr.Number(label="Region #", value=0, precision=0, minimum=0, min_width=80)
                    remove = gr.Button("Remove region", elem_id="dr-remove")
                    clear = gr.Button("Clear regions", elem_id="dr-clear")
                view_mode = gr.Radio(
                    _VIEW_MODES,
                    value="image_prior",
                    label="Views",
                    info="how the t of each region's nested views is chosen (explained below)",
                    elem_id="dr-view-mode",
                )
                task = gr.Dropdown(
                    sorted(TASK_PRIOR_RATIOS), value="captioning", label="Task prior", visible=False
                )
                with gr.Row(visible=False) as ratio_row:
                    ratios = [
                        gr.Slider(
                            0.0, 1.0, value=round(view / num_views, 1), step=0.05, label=f"t of view {view}"
                        )
                        for view in range(1, num_views)
                    ]
                with gr.Accordion("What are the views? (image prior, task prior, explicit t)", open=False):
                    gr.Markdown(_VIEWS_EXPLAINED, elem_id="dr-views-explained")
                show_views = gr.Checkbox(label="Show the views each region was read from", value=False)
                run = gr.Button("Describe", variant="primary", elem_id="dr-describe")
            with left:  # under the board
                gr.Examples(
                    [
                        [path, "\n".join(",".join(map(str, box)) for box in example_boxes)]
                        for path, example_boxes in EXAMPLES
                    ],
                    inputs=[picture, boxes],
                    label="Examples: synthetic shapes scenes with their shapes' boxes",
                )
        with gr.Row():
            with gr.Column(scale=2, min_width=160):
                # The picture's own label and buttons would sit on its top edge, over the first caption.
                gr.Markdown("**Described regions**")
                drawn = gr.Image(
                    show_label=False,
                    buttons=[],
                    type="pil",
                    format="png",
                    interactive=False,
                    elem_id="dr-regions",
                )
            table = gr.Dataframe(
                headers=TABLE_HEADERS,
                datatype=["number", "str", "str", "number", "str", "str", "str"],
                label="Descriptions",
                interactive=False,
                scale=4,
                wrap=True,
                max_height=900,
                column_widths=["4%", "14%", "25%", "9%", "12%", "14%", "22%"],
                elem_id="dr-table",
            )
        views = gr.Image(
            label="Views (t = 0 is the box itself)",
            type="pil",
            format="png",
            visible=False,
            elem_id="dr-views",
        )

        # Gradio finds the progress tracker by its default value (a fresh tracker per call).
        def describe_regions(values, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
            path = values[picture]
            if path is None:
                raise _user_error("No picture: upload one or pick an example first.")
            try:
                image, notes = open_picture(path)
                regions, controls = parse_regions(values[boxes])
            except ValueError as error:
                raise _user_error(str(error)) from None
            for note in notes:
                gr.Warning(note)
            if not regions:
                raise _user_error(
                    "No region: drag on the picture to draw a box, click an object in click mode, or type "
                    "x1,y1,x2,y2 in Regions."
                )
            if len(regions) > MAX_REGIONS:
                raise _user_error(f"{len(regions)} regions: the demo describes at most {MAX_REGIONS} at a time.")
            _check_inside(regions, image)
            progress(0, desc=f"describing {len(regions)} regions")
            masks = _segment_clicks(segmenter, image, regions)
            # A click's region is its mask, described through the mask's box as the pipeline's masks= is.
            region_boxes = [region if mask is None else mask_to_box(mask) for region, mask in zip(regions, masks)]
            selection = {"image_prior": {}, "task": {"view_selection": "task", "task": values[task]}}.get(
                values[view_mode], {"view_selection": [values[slider] for slider in ratios]}
            )
            try:
                results = describe(
                    image,
                    boxes=region_boxes,
                    controls=controls if any(controls) else None,
                    attribute_top_k=_TOP_ATTRIBUTES,
                    return_views=values[show_views],
                    progress_bar=True,
                    **selection,
                )
            except ValueError as error:
                raise _user_error(str(error)) from None
            views_picture = gr.update(value=None, visible=False)
            if values[show_views]:
                views_picture = gr.update(
                    value=draw_views(
                        image,
                        [result["views"]["crop_boxes"] for result in results],
                        [result["views"]["view_boxes"] for result in results],
                        [result["views"]["ratios"] for result in results],
                        view_size=view_size,
                        captions=[result["caption"] for result in results],
                    ),
                    visible=True,
                )
            rows = [_table_row(index, result) for index, result in enumerate(results)]
            clicked = image
            if any(mask is not None for mask in masks):
                clicks = [[region] if len(region) == 2 else [] for region in regions]
                clicked = draw_clicks(image, masks, clicks)
            return draw_regions(clicked, results, legend=len(results) > 3), rows, views_picture

        def tool_changed(chosen):
            if chosen == "click" and segmenter is None:
                gr.Warning(f"Clicking needs a segmenter: {_SEGMENTER_HINT}")

        picture.change(_show_board, picture, board)
        # A new picture starts empty: no regions, and no results of the last one.
        def start_over():
            return "", None, [], gr.update(value=None, visible=False)

        picture.upload(start_over, None, [boxes, drawn, table, views])
        picture.clear(start_over, None, [boxes, drawn, table, views])
        tool.change(tool_changed, tool, None)
        remove.click(remove_region, [boxes, box_number], boxes)
        clear.click(lambda: "", None, boxes)
        view_mode.change(
            lambda mode: (gr.update(visible=mode == "task"), gr.update(visible=mode == "explicit")),
            view_mode,
            [task, ratio_row],
        )
        run.click(
            describe_regions,
            {picture, boxes, view_mode, task, show_views, *ratios},
            [drawn, table, views],
        )
    demo.queue(default_concurrency_limit=1)
    return demo
