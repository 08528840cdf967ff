"""How long the web demo takes from pressing Describe to the results on the page, for 1 and for 10 boxes.

Starts the demo (embedded demonstration model, CPU) on a free port of 127.0.0.1 in this process, drives the
system's Chromium with Playwright (as tests/test_web_demo.py does), types the boxes, presses Describe and
waits for the table to show one row per box. The direct pipeline call for the same boxes is timed too,
interleaved with the page runs, so that the page's own overhead shows. Also saves a screenshot of the page
with results (``--screenshot``, used for docs/images/web_demo.png).

Usage: ``python benchmarks/bench_web_demo.py [--repeats 5] [--screenshot docs/images/web_demo.png]``.
Prints a table and writes ``benchmarks/results/bench_web_demo_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import time
from pathlib import Path

import PIL.Image
import torch
from playwright.sync_api import sync_playwright
from transformers import pipeline

from dynrefer_hf.app import EXAMPLES, LAUNCH_OPTIONS, build_demo

RESULTS = Path(__file__).resolve().parent / "results"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
TABLE_ROWS = "#dr-table [role=row].virtual-row"  # Gradio 6 Dataframe rows


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per box count (default 5)")
    parser.add_argument("--screenshot", help="save a screenshot of the page with 4 described boxes here")
    args = parser.parse_args()

    load_before = os.getloadavg()
    describe = pipeline("region-captioning", device="cpu")
    demo = build_demo(describe)
    port = free_port()
    demo.launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **LAUNCH_OPTIONS
    )

    path, shape_boxes = EXAMPLES[0]  # 436x251, 8 shapes
    image = PIL.Image.open(path).convert("RGB")
    box_sets = {1: shape_boxes[:1], 10: shape_boxes + [[0, 0, 218, 125], [218, 125, 436, 251]]}
    page_times: dict[int, list[float]] = {count: [] for count in box_sets}
    pipeline_times: dict[int, list[float]] = {count: [] for count in box_sets}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(120_000)
        page.goto(f"http://127.0.0.1:{port}/")
        page.locator("#dr-image input[type=file]").set_input_files(path)
        page.locator("#dr-board .dr-stage canvas").wait_for()

        def on_page(boxes) -> float:
            page.fill("#dr-boxes textarea", "\n".join(",".join(map(str, box)) for box in boxes))
            assert page.locator(TABLE_ROWS).count() != len(boxes)  # the counts alternate between runs
            start = time.perf_counter()
            page.click("#dr-describe")
            page.wait_for_function(f"document.querySelectorAll('{TABLE_ROWS}').length === {len(boxes)}")
            return time.perf_counter() - start

        first_call = on_page(box_sets[10])  # warm-up; the timed runs then start with 1 box
        for _ in range(args.repeats):
            for count, boxes in box_sets.items():
                page_times[count].append(on_page(boxes))
                start = time.perf_counter()
                describe(image, boxes=boxes, attribute_top_k=3)
                pipeline_times[count].append(time.perf_counter() - start)

        if args.screenshot:
            page.fill("#dr-boxes textarea", "")
            canvas = page.locator("#dr-board .dr-stage canvas").bounding_box()
            scale_x, scale_y = canvas["width"] / image.width, canvas["height"] / image.height
            for box in (shape_boxes[0], shape_boxes[2], shape_boxes[3], shape_boxes[7]):  # real mouse drags
                page.mouse.move(canvas["x"] + box[0] * scale_x, canvas["y"] + box[1] * scale_y)
                page.mouse.down()
                page.mouse.move(canvas["x"] + box[2] * scale_x, canvas["y"] + box[3] * scale_y, steps=6)
                page.mouse.up()
            page.click("#dr-describe")
            page.wait_for_function(f"document.querySelectorAll('{TABLE_ROWS}').length === 4")
            page.locator("#dr-regions img").wait_for()
            time.sleep(1.0)  # let the result picture finish loading
            page.screenshot(path=args.screenshot, full_page=True)
            # 256 colours, as the page has few: about half the bytes, no visible change
            with PIL.Image.open(args.screenshot) as shot:
                picture = shot.convert("RGB").quantize(256, dither=PIL.Image.Dither.NONE)
            picture.save(args.screenshot, optimize=True)
            print(f"wrote {args.screenshot}")
        browser.close()
    demo.close()

    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "load_average_before_after": [load_before, os.getloadavg()],
        "model": "embedded demonstration model (dynrefer_hf/pretrained/shapes-demo), CPU, float32",
        "image": f"{Path(path).name} ({image.width}x{image.height})",
        "repeats": args.repeats,
        "first_call_10_boxes": first_call,
        "seconds": {
            str(count): {
                "page_median": statistics.median(page_times[count]),
                "page_min": min(page_times[count]),
                "pipeline_median": statistics.median(pipeline_times[count]),
                "pipeline_min": min(pipeline_times[count]),
                "page_all": page_times[count],
            }
            for count in box_sets
        },
    }
    print(
        f"{'boxes':>5}  {'page median':>11}  {'page min':>8}  {'pipeline median':>15}  {'pipeline min':>12}"
    )
    for count, row in summary["seconds"].items():
        print(
            f"{count:>5}  {row['page_median']:>10.2f}s  {row['page_min']:>7.2f}s  "
            f"{row['pipeline_median']:>14.2f}s  {row['pipeline_min']:>11.2f}s"
        )
    print(f"first call (10 boxes, not counted): {first_call:.2f}s")
    print(f"load average (1, 5, 15 min) before and after: {summary['load_average_before_after']}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_web_demo_cpu.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
