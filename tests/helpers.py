"""Helpers of the tests: running a script to its one-line error, drawing the tests' concept.
(The tiny models live in toy_infinity.tiny.)"""

import runpy
import sys

import pytest


def run_script_expecting_error(script: str, argv: list, capsys) -> str:
    """Runs `python script argv` in this process (the script's own __main__ block) and returns
    its one-line error, after checking the exit: status 1 with the message for bad input, or
    argparse's status 2 with its usage line and message on stderr."""
    saved = sys.argv
    sys.argv = [script, *map(str, argv)]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = saved
    code = exit_info.value.code
    if isinstance(code, str):  # sys.exit("error: ...") prints it and exits with status 1
        assert code.startswith("error: ") and "\n" not in code, code
        return code
    assert code == 2, code
    return capsys.readouterr().err.strip().splitlines()[-1]


def draw_concept(path, size=(96, 80), shift=0, mode="RGB"):
    """A small training image of the tests' concept: an orange blob on a blue ground."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (40 + 20 * shift, 110, 190))
    ImageDraw.Draw(image).ellipse((10 + 4 * shift, 12, size[0] - 12, size[1] - 10), fill=(240, 90, 30))
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path)
