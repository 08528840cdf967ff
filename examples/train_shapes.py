"""Train the demonstration DynRefer on synthetic shapes scenes with the Python API, then use it.

    python examples/train_shapes.py --output-dir shapes-demo            # the shipped model's settings (~30 min)
    python examples/train_shapes.py --output-dir /tmp/quick --quick     # a 2-minute run, to see it work

`dynrefer train-demo` runs the same training from the shell.
"""

import argparse

from transformers import pipeline

import dynrefer_hf  # noqa: F401  (registers the model type and the "region-captioning" task)
from dynrefer_hf.shapes import ShapesDemoSettings, shapes_split, train_shapes_demo


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", default="shapes-demo")
    parser.add_argument("--quick", action="store_true", help="train on 200 scenes for 1 epoch")
    args = parser.parse_args()

    settings = ShapesDemoSettings()
    if args.quick:
        settings = ShapesDemoSettings(num_train_images=200, num_test_images=20, epochs=1.0, warmup_steps=10)
    evaluation = train_shapes_demo(args.output_dir, settings)
    print({name: round(value, 1) for name, value in evaluation.percentages().items()})

    # The saved folder is an ordinary model folder: load it with the pipeline and describe a new scene.
    describe = pipeline("region-captioning", model=args.output_dir)
    scene = shapes_split("test", 1, seed=123)[0]
    for result, reference in zip(describe(scene["image"], boxes=scene["boxes"]), scene["captions"]):
        print(f"{result['caption']!r:60} reference: {reference!r}")


if __name__ == "__main__":
    main()
