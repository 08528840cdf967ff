"""``dynrefer info`` names the Pillow version, on which the views' pixels depend (docs/processor.md)."""

import json

import PIL

from dynrefer_hf.cli import main


def test_info_shows_the_pillow_version(tiny_region_captioner, capsys):
    assert main(["info", str(tiny_region_captioner), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pillow"] == PIL.__version__
    assert main(["info", str(tiny_region_captioner)]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("pillow")]
    assert line.split()[1] == PIL.__version__ and "docs/processor.md" in line
