"""Batch jobs: describe the regions of many images, write one JSON line per image, resume after a stop, and
split the images over processes (``torchrun`` / ``accelerate launch``).

    from dynrefer_hf.batch import describe_dataset, read_region_requests

    describe = pipeline("region-captioning", model=...)
    for line in describe_dataset(describe, read_region_requests("regions.jsonl"), output="out.jsonl"):
        print(line["image"], [region["caption"] for region in line["regions"]])

A `RegionRequest` is one image and its boxes; `read_region_requests` reads them from a JSON Lines file, a COCO
detection file or a Hugging Face ``datasets`` folder (or Hub id). `describe_dataset` yields
``{"image": key, "regions": [pipeline records]}`` per image, in input order. With ``output``, each line is
also written as soon as it is known, and a stopped job is resumed from that file: the lines already there
are checked against the input and kept, the rest computed. The splitting over processes is the one of
`dynrefer_hf.sharding` (as ``dynrefer eval``): process r takes every W-th image left, appends its lines to
``OUT.rank<r>``; process 0 writes ``OUT`` in input order as the lines arrive and removes those files at the end.
Each image is described by its own pipeline call, so an image's regions do not depend on the process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .data.common import AnnotationError
from .sharding import barrier, open_for_append, process_group, read_json_lines

__all__ = ["RegionRequest", "describe_dataset", "read_region_requests", "requests_from_images"]

# JSON Lines input: one image per line
_JSONL_KEYS = {"image", "boxes", "controls"}


@dataclass(frozen=True)
class RegionRequest:
    """One image and its regions. ``key`` names the image in the output (a path, a COCO file name, a row id);
    ``image`` is what the pipeline reads (a path, URL or PIL image)."""

    key: Any
    image: Any
    boxes: list = field(default_factory=list)
    controls: Any = None

    def pipeline_input(self) -> dict:
        item = {"image": self.image, "boxes": self.boxes}
        if self.controls is not None:
            item["controls"] = self.controls
        return item


def requests_from_images(images: Sequence[str], boxes: Sequence[Sequence[float]], controls=None) -> list[RegionRequest]:
    """The same ``boxes`` (and ``controls``) on every image of ``images``."""
    if not boxes:
        raise ValueError("no regions given: give at least one box [x1, y1, x2, y2] (pixels)")
    return [RegionRequest(key=image, image=image, boxes=[list(box) for box in boxes], controls=controls) for image in images]


def _jsonl_requests(path: str, images: str | None) -> list[RegionRequest]:
    folder = images if images is not None else os.path.dirname(os.path.abspath(path))
    requests = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            record = f"line {number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise AnnotationError(path, record, "(whole line)", f"is not valid JSON ({error})") from None
            if not isinstance(item, dict):
                raise AnnotationError(path, record, "(whole line)", "must be a JSON object")
            unknown = sorted(set(item) - _JSONL_KEYS)
            if unknown:
                raise AnnotationError(path, record, unknown[0], f"is not a known key ({sorted(_JSONL_KEYS)})")
            if not isinstance(item.get("image"), str):
                raise AnnotationError(path, record, "image", "is missing or not a path string")
            boxes = item.get("boxes")
            if not isinstance(boxes, list) or not boxes or not all(_is_box(box) for box in boxes):
                raise AnnotationError(path, record, "boxes", "must be a non-empty list of [x1, y1, x2, y2] number boxes")
            image = item["image"]
            source = image if image.startswith(("http://", "https://")) else os.path.join(folder, image)
            requests.append(RegionRequest(key=image, image=source, boxes=boxes, controls=item.get("controls")))
    return requests


def _is_box(box) -> bool:
    return (
        isinstance(box, list)
        and len(box) == 4
        and all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in box)
    )


def _coco_requests(path: str, images: str | None) -> list[RegionRequest]:
    from datasets import Image

    from .data.coco import load_coco_detection

    folder = images if images is not None else os.path.dirname(os.path.abspath(path))
    dataset = load_coco_detection(path, folder).cast_column("image", Image(decode=False))
    return [
        RegionRequest(key=os.path.relpath(row["image"]["path"], folder), image=row["image"]["path"], boxes=row["boxes"])
        for row in dataset
        if row["boxes"]  # an image without annotations has no region to describe
    ]


def _dataset_requests(name: str, split: str | None) -> list[RegionRequest]:
    import datasets

    if os.path.isdir(name):
        loaded = datasets.load_from_disk(name)
    else:
        loaded = datasets.load_dataset(name, split=split)
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            raise ValueError(f"{name} holds the splits {sorted(loaded)}: choose one (split=..., --split)")
        if split not in loaded:
            raise ValueError(f"{name} has no split {split!r}; its splits: {sorted(loaded)}")
        loaded = loaded[split]
    missing = [column for column in ("image", "boxes") if column not in loaded.column_names]
    if missing:
        raise ValueError(f"{name} lacks the column(s) {missing}; a region dataset needs 'image' and 'boxes' (xyxy pixels)")
    keys = loaded["image_id"] if "image_id" in loaded.column_names else range(len(loaded))
    controls = loaded["controls"] if "controls" in loaded.column_names else [None] * len(loaded)
    return [
        _DatasetRequest(key=key, image=(loaded, index), boxes=boxes, controls=control)
        for index, (key, boxes, control) in enumerate(zip(keys, loaded["boxes"], controls))
    ]


class _DatasetRequest(RegionRequest):
    """A row of a ``datasets.Dataset``: its image is decoded only when the row is described."""

    def pipeline_input(self) -> dict:
        dataset, index = self.image
        return {**super().pipeline_input(), "image": dataset[index]["image"]}


def read_region_requests(source: str | os.PathLike, images: str | os.PathLike | None = None, split: str | None = None) -> list[RegionRequest]:
    """The images and regions of ``source``:

    - a ``.jsonl`` file: ``{"image": path, "boxes": [[x1, y1, x2, y2], ...], "controls": optional}`` per line,
      paths relative to ``images`` (default: the file's folder);
    - a ``.json`` COCO detection file (``bbox`` as x, y, width, height), read by `load_coco_detection`;
    - a folder saved by ``datasets`` (``save_to_disk``) or a Hub dataset id, with an ``image`` and a ``boxes``
      column (xyxy pixels), optionally ``image_id`` (the output key; default the row number) and ``controls``;
      ``split`` chooses the split of a ``DatasetDict`` or a Hub dataset.
    """
    source = os.fspath(source)
    images = None if images is None else os.fspath(images)
    if images is not None and not os.path.isdir(images):
        raise FileNotFoundError(f"image folder not found: {images}")
    if os.path.isdir(source):
        return _dataset_requests(source, split)
    if source.endswith(".jsonl"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"region file not found: {source}")
        return _jsonl_requests(source, images)
    if source.endswith(".json"):
        return _coco_requests(source, images)
    if os.path.exists(source):
        raise ValueError(f"{source}: give a .jsonl region file, a .json COCO file or a datasets folder")
    return _dataset_requests(source, split or "train")


def _count_regions(requests: Iterable[RegionRequest]) -> int:
    return sum(len(request.boxes) for request in requests)


def _done_lines(output: str, requests: Sequence[RegionRequest]) -> int:
    """How many lines of an earlier run's ``output`` are complete; each must name the image of its input line."""
    done = 0
    for number, item in enumerate(read_json_lines(output)):
        if number >= len(requests) or item.get("image") != _jsonable(requests[number].key):
            expected = "no more images" if number >= len(requests) else f"image {requests[number].key!r}"
            raise ValueError(
                f"{output} line {number + 1} is for image {item.get('image')!r} but the input has {expected} there: "
                "it holds another job's output; restart (restart=True, --restart) or choose another output file"
            )
        done += 1
    return done


def _jsonable(key):
    return json.loads(json.dumps(key))


def _truncate_torn_tail(path: str, lines: int) -> None:
    """Keep the first ``lines`` lines of ``path`` (drops a half-written line of a killed run)."""
    with open(path, "rb+") as file:
        kept = 0
        for _ in range(lines):
            kept += len(file.readline())
        file.truncate(kept)


def _line(request: RegionRequest, regions: list) -> dict:
    return {"image": request.key, "regions": regions}


def describe_dataset(
    describe,
    requests: Sequence[RegionRequest],
    *,
    output: str | os.PathLike | None = None,
    restart: bool = False,
    progress: bool = True,
    **pipeline_kwargs,
) -> Iterator[dict]:
    """Describe every request with the ``region-captioning`` pipeline ``describe``; yields
    ``{"image": key, "regions": [...]}`` per image, in input order (see the module docstring).

    ``output``: a JSON Lines file written as the lines are known and read back to resume (``restart`` starts it
    afresh). Under several processes ``output`` is required; process 0 yields every line, the others nothing.
    ``pipeline_kwargs`` go to every pipeline call (``batch_size``, ``max_new_tokens``, ``tag_threshold``...).
    """
    requests = list(requests)
    rank, world = process_group()
    if output is None:
        if world > 1:
            raise ValueError("several processes need an output file (output=..., --output) to merge their lines")
        yield from _describe_each(describe, requests, range(len(requests)), progress, pipeline_kwargs)
        return
    output = os.fspath(output)
    if os.path.isdir(output):
        raise ValueError(f"output {output} is a folder; give a .jsonl file name")
    parts = [f"{output}.rank{other}" for other in range(world)]
    if restart and rank == 0:
        for path in [output, *parts]:
            if os.path.exists(path):
                os.remove(path)
    barrier(world)
    done = _done_lines(output, requests)
    finished = {item["index"]: item["line"] for path in parts for item in read_json_lines(path) if item["index"] >= done}
    left = [index for index in range(done, len(requests)) if index not in finished]
    mine = left[rank::world]
    barrier(world)  # every process has read the files before process 0 changes them
    if rank != 0:
        with open_for_append(parts[rank]) as part:
            for index, regions in zip(mine, _describe_lines(describe, requests, mine, pipeline_kwargs)):
                part.write(json.dumps({"index": index, "line": _line(requests[index], regions)}) + "\n")
                part.flush()
        barrier(world)
        return

    yield from (json.loads(line) for line in _lines_of(output, done))
    if os.path.exists(output):
        _truncate_torn_tail(output, done)
    merger = _OrderedWriter(output, done, finished, parts[1:], requests)
    bar = _progress_bar(progress, _count_regions(requests[index] for index in left))
    try:
        for index, regions in zip(mine, _describe_lines(describe, requests, mine, pipeline_kwargs)):
            yield from merger.add(index, _line(requests[index], regions), bar)
            yield from merger.poll(bar)
        barrier(world)  # the other processes have written all their lines
        yield from merger.poll(bar)
    finally:
        merger.close()
        if bar is not None:
            bar.close()
    if merger.next_index != len(requests):
        raise RuntimeError(f"{output}: {len(requests) - merger.next_index} images were not described; run the job again")
    for path in parts[1:]:
        if os.path.exists(path):
            os.remove(path)


def _lines_of(path: str, count: int) -> Iterator[str]:
    if count == 0:
        return
    with open(path, encoding="utf-8") as file:
        for _, line in zip(range(count), file):
            yield line


def _describe_lines(describe, requests, indices, pipeline_kwargs) -> Iterator[list]:
    """The pipeline's records for each request of ``indices``: one pipeline call over them all, streamed (the
    pipeline describes each image on its own and prepares the next image while the model runs)."""
    if not indices:
        return
    results = iter(describe((requests[index].pipeline_input() for index in indices), **pipeline_kwargs))
    for index in indices:
        try:
            yield next(results)
        except (ValueError, TypeError, OSError) as error:
            raise ValueError(f"image {requests[index].key!r}: {error}") from error


def _describe_each(describe, requests, indices, progress, pipeline_kwargs) -> Iterator[dict]:
    bar = _progress_bar(progress, _count_regions(requests))
    try:
        for index, regions in zip(indices, _describe_lines(describe, requests, list(indices), pipeline_kwargs)):
            if bar is not None:
                bar.update(len(regions))
            yield _line(requests[index], regions)
    finally:
        if bar is not None:
            bar.close()


def _progress_bar(progress: bool, total: int):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="region", desc="dynrefer caption", dynamic_ncols=True)


class _OrderedWriter:
    """Process 0's side of a job: appends lines to ``output`` in input order as they become known, its own
    and those the other processes append to their part files."""

    def __init__(self, output: str, done: int, finished: Mapping[int, dict], parts: Sequence[str], requests):
        self.next_index = done
        self.pending = dict(finished)
        self.requests = requests
        self.file = open(output, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.parts = {path: 0 for path in parts}  # bytes already read of each part file

    def add(self, index: int, line: dict, bar=None) -> Iterator[dict]:
        self.pending[index] = line
        written = []
        while self.next_index in self.pending:
            ready = self.pending.pop(self.next_index)
            self.file.write(json.dumps(ready) + "\n")
            written.append(ready)
            self.next_index += 1
        self.file.flush()
        if bar is not None:
            bar.update(sum(len(ready["regions"]) for ready in written))
        return iter(written)

    def poll(self, bar=None) -> Iterator[dict]:
        """Lines the other processes have finished since the last poll."""
        for path, offset in self.parts.items():
            if not os.path.exists(path):
                continue
            with open(path, encoding="utf-8") as file:
                file.seek(offset)
                for line in iter(file.readline, ""):
                    if not line.endswith("\n"):  # still being written
                        break
                    self.parts[path] += len(line.encode("utf-8"))
                    try:
                        item = json.loads(line)
                    except json.JSONDecodeError:  # a killed run's torn line
                        continue
                    if item["index"] >= self.next_index:
                        yield from self.add(item["index"], item["line"], bar)

    def close(self) -> None:
        self.file.close()
