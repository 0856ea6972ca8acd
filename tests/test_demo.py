"""Issue 7: the bundled demo model sees, and the `ask` command fails clearly."""

import os
import random
import subprocess
import sys

import pytest

from extensions.llava.chat_ui import picture_data_url
from extensions.llava.cli_ask import DEMO_MODEL, Asker, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from train_demo import COLOURS, SHAPES, draw  # noqa: E402

QUESTION = "What shape is in the picture?"


@pytest.fixture(scope="module")
def asker():
    return Asker()


def tag(image) -> str:
    return f'<img src="{picture_data_url(image)}">'


def test_demo_is_small_enough_to_ship():
    size = sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(DEMO_MODEL)
               for name in names)
    assert size <= 10 * 2**20


def test_demo_names_held_out_pictures(asker):
    rng = random.Random(2026)  # not the training seed: freshly drawn pictures
    results = []
    for colour in COLOURS:
        for shape in SHAPES:
            for _ in range(3):
                answer = asker.ask_tags([tag(draw(colour, shape, rng))], QUESTION)
                results.append(colour in answer and shape in answer)
    accuracy = sum(results) / len(results)
    print(f"demo accuracy on {len(results)} held-out pictures: {accuracy:.1%}")
    assert len(results) == 36 and accuracy >= 0.9


def test_cli_answers_about_the_example(capsys):
    assert main(["--image", os.path.join(ROOT, "examples", "red-circle.png"), QUESTION]) == 0
    answer = capsys.readouterr().out
    assert "red" in answer and "circle" in answer


@pytest.mark.parametrize("args,message", [
    (["--image", "no/such/file.png", QUESTION], "no picture file at 'no/such/file.png'"),
    (["--image", os.path.join(ROOT, "README.md"), QUESTION], "image 1 in the prompt: the data is not a picture"),
    (["--pipeline", "llava-v9", "--image", os.path.join(ROOT, "examples", "red-circle.png"), QUESTION],
     "unknown pipeline 'llava-v9'"),
    (["--model", os.path.join(ROOT, "tests"), "--image", os.path.join(ROOT, "examples", "red-circle.png"), QUESTION],
     "does not load as a causal language model"),
])
def test_cli_errors_are_one_clear_line(args, message, capsys):
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1] and not any("Traceback" in line for line in err)


def test_module_entry_point_exit_code():
    result = subprocess.run([sys.executable, "-m", "extensions.llava", "ask", "--image", "missing.png", QUESTION],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1 and "no picture file" in result.stderr
