"""The bundled demo model sees (in `ask` and in the webui), and the `ask` command answers or fails clearly,
on the demo and on a converted LLaVA-1.6 model with a 12 MP photo."""

import json
import os
import random
import subprocess
import sys
import tempfile

import pytest
import torch
from PIL import Image

from extensions.llava.cli_ask import DEMO_MODEL, Asker, main
from extensions.llava.families import slot_count
from testbed.photos import make_photo
from testbed.tiny import Loaded, file_url, img_tag
from testbed.tiny_next import PIPELINE
from tools.train_demo import (ASK_LAYOUT, CHAT_TEMPLATE, COLOUR_QUESTION, COLOURS, HELD_OUT_SEED, MESSAGE_LAYOUTS,
                              SHAPES, draw, make_tokenizer, one_message_prompt, train)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "red-circle.png")
QUESTION = "What shape is in the picture?"
COMBINATIONS = [(colour, shape) for colour in COLOURS for shape in SHAPES]


@pytest.fixture(scope="module")
def asker():
    return Asker()


def in_the_webui(asker, **settings) -> dict:
    """The fake webui with the demo loaded by its Transformers loader, from its folder."""
    return Loaded(asker.model, asker.tokenizer, DEMO_MODEL).in_the_webui(**settings)


def names(answer: str, colour: str, shape: str) -> bool:
    return colour in answer and shape in answer


def test_demo_is_small_enough_to_ship():
    size = sum(os.path.getsize(os.path.join(folder, name)) for folder, _, files in os.walk(DEMO_MODEL)
               for name in files)
    assert size <= 10 * 2**20


@pytest.mark.slow
def test_demo_names_held_out_pictures(asker):
    rng = random.Random(HELD_OUT_SEED)
    per_combination = 10
    right = sum(names(asker.ask_tags([img_tag(draw(colour, shape, rng))], QUESTION), colour, shape)
                for colour, shape in COMBINATIONS for _ in range(per_combination))
    accuracy = right / (len(COMBINATIONS) * per_combination)
    print(f"demo accuracy on {len(COMBINATIONS) * per_combination} held-out pictures: {accuracy:.1%}")
    assert accuracy >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("origin", ["attach button", "upload field"])
def test_demo_names_pictures_placed_as_the_webui_places_them(asker, origin):
    """The attach button puts pictures first with a blank line, the upload field after the text."""
    layout = MESSAGE_LAYOUTS[origin]
    rng = random.Random(HELD_OUT_SEED + 3)
    per_combination = 4
    right = 0
    for colour, shape in COMBINATIONS:
        for _ in range(per_combination):
            content = layout.format(images=img_tag(draw(colour, shape, rng)), question=QUESTION)
            right += names(asker.answer(one_message_prompt(asker.tokenizer, content)), colour, shape)
    print(f"demo, pictures placed as by the {origin}: {right} of {len(COMBINATIONS) * per_combination} right")
    assert right >= 0.9 * len(COMBINATIONS) * per_combination


def test_the_webui_and_ask_render_chats_as_the_demo_was_trained(asker):
    """One source: the shipped chat_template.jinja, which the webui's instruct mode and `ask` both render."""
    with open(os.path.join(DEMO_MODEL, "chat_template.jinja")) as f:
        assert f.read() == CHAT_TEMPLATE
    with open(os.path.join(DEMO_MODEL, "llava.json")) as f:
        assert "prompt_template" not in json.load(f)
    tokenizer = make_tokenizer()
    message = {"role": "user", "content": ASK_LAYOUT.format(images="<im_start>", question="Q?")}
    rendered = tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True)
    assert rendered == "<s>" + asker.prompt(["<im_start>"], "Q?")
    assert rendered == "<s>USER: <im_start>\nQ?\nASSISTANT:"


@pytest.mark.slow
def test_demo_chats_in_the_webui(asker, host_factory):
    """Instruct-mode chats in the webui: a picture from the upload field, a follow-up question without
    one, then a new picture from the attach button; every answer is about the latest picture."""
    rng = random.Random(HELD_OUT_SEED + 4)
    right = turns = 0
    for i, (colour, shape) in enumerate(COMBINATIONS):
        host = host_factory(**in_the_webui(asker))
        # the webui's defaults: max_new_tokens 512, truncation_length from the model's config
        state = host.state(mode="instruct", max_new_tokens=512,
                           truncation_length=asker.model.config.max_position_embeddings)
        host.pick(draw(colour, shape, rng), session="user")
        right += names(host.chat(QUESTION, dict(state), session="user"), colour, shape)
        right += host.chat(COLOUR_QUESTION, dict(state), session="user") == f"{colour.capitalize()}."
        new_colour, new_shape = COMBINATIONS[(i + len(SHAPES) + 1) % len(COMBINATIONS)]
        answer = host.chat("What is in the picture?", dict(state), attachments=[draw(new_colour, new_shape, rng)],
                           session="user")
        right += names(answer, new_colour, new_shape) and colour not in answer and shape not in answer
        turns += 3
        assert host.engine().counters.vision_forwards == 2  # each picture encoded once
        host.close()
    print(f"demo chat turns answered right: {right} of {turns}")
    assert right >= 0.9 * turns


def test_demo_answers_the_colour_question(asker):
    rng = random.Random(HELD_OUT_SEED + 1)
    answers = [(colour, asker.ask_tags([img_tag(draw(colour, shape, rng))], "What colour is the shape?"))
               for colour, shape in COMBINATIONS]
    assert sum(answer == f"{colour.capitalize()}." for colour, answer in answers) >= 0.9 * len(answers)


def test_two_pictures_without_embed_all_answer_about_the_last(asker):
    """Only the last picture gets features; the answer is about it, never about the first."""
    rng = random.Random(HELD_OUT_SEED + 2)
    step = len(SHAPES) + 1  # the next colour and the next shape
    pairs = [(COMBINATIONS[i], COMBINATIONS[(i + step) % len(COMBINATIONS)]) for i in range(len(COMBINATIONS))]
    assert all(first[0] != last[0] and first[1] != last[1] for first, last in pairs)
    forwards_before = asker.engine.counters.vision_forwards
    about_last = about_first = 0
    for first, last in pairs:
        answer = asker.ask_tags([img_tag(draw(*first, rng)), img_tag(draw(*last, rng))], QUESTION)
        about_last += names(answer, *last)
        about_first += first[0] in answer or first[1] in answer
    assert asker.engine.counters.vision_forwards - forwards_before == len(pairs)  # one picture each time
    assert about_last >= 0.9 * len(pairs) and about_first == 0


def test_cli_answers_about_the_example(capsys):
    assert main(["--image", EXAMPLE, QUESTION]) == 0
    captured = capsys.readouterr()
    assert "red" in captured.out and "circle" in captured.out and captured.err == ""


@pytest.mark.parametrize("args,message", [
    (["--image", "no/such/file.png", QUESTION], "no picture file at 'no/such/file.png'"),
    (["--image", os.path.join(ROOT, "README.md"), QUESTION], "README.md' cannot be used: the data is not a picture"),
    (["--image", EXAMPLE, "--pipeline", "llava-v9", QUESTION], "unknown pipeline 'llava-v9'"),
    (["--image", EXAMPLE, "--model", os.path.join(ROOT, "tests"), QUESTION], "is not a model folder"),
    (["--image", EXAMPLE, "--model", os.path.join(ROOT, "no-such-model"), QUESTION], "no model folder at"),
    (["--image", EXAMPLE, "--device", "cuda:99", QUESTION], "--device is 'cuda:99', which is not a device this machine has"),
])
def test_cli_errors_are_one_clear_line(args, message, capsys):
    assert main(args) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert captured.out == ""


def run_module(*args):
    """``ask`` as a reader runs it, with a fresh TMPDIR of its own: it must leave nothing there."""
    with tempfile.TemporaryDirectory(prefix="llava-ask-tmp-") as temporary:
        done = subprocess.run([sys.executable, "-m", "extensions.llava", "ask", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                   "TMPDIR": temporary})
        assert os.listdir(temporary) == []
    return done


@pytest.mark.slow
def test_module_entry_point_as_in_the_readme():
    result = run_module("--image", "examples/red-circle.png", QUESTION)
    assert result.returncode == 0, result.stderr
    assert "red" in result.stdout and "circle" in result.stdout
    result = run_module("--image", "missing.png", QUESTION)
    assert result.returncode == 1 and result.stderr.strip() == "error: no picture file at 'missing.png'"


def test_training_is_seeded():
    """Two short runs with the same seed give the same weights (the demo's recipe is reproducible)."""
    from extensions.llava.vision.processors import load_image_processor
    processor = load_image_processor(os.path.join(DEMO_MODEL, "vision_tower"))
    tokenizer = make_tokenizer()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = [train(steps=3, batch_size=2, seed=7, processor=processor, tokenizer=tokenizer, log=lambda m: None)
                for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    for first, second in zip(*runs):
        for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
            assert torch.equal(a, b), name


def test_demo_in_the_webui(asker, host_factory, tmp_path, monkeypatch):
    """The webui's Transformers loader gives the extension the demo as a plain causal LM from its folder;
    the fake webui's uploads go when it closes, leaving nothing in the temporary folder."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    host = host_factory(**in_the_webui(asker, **{"llava-pipeline": "auto"}))
    picture = f'<img src="{file_url(EXAMPLE)}">'
    reply = host.generate(f"USER: {picture}\n{QUESTION}\nASSISTANT:", host.state(max_new_tokens=20))
    assert "red" in reply and "circle" in reply
    assert os.listdir(tmp_path) != []  # its upload folder
    host.close()
    assert os.listdir(tmp_path) == []


def test_ask_answers_about_a_large_photo(next_converted, tmp_path):
    """The headless ``ask`` on a converted 1.6 model: a 12 MP photo is tiled and embedded at its size."""
    path = make_photo(str(tmp_path / "photo.jpg"))
    asker = Asker(next_converted.folder)
    prompt = asker.prompt(["<img>"], "What is it?")
    assert prompt.startswith("USER: ") and prompt.endswith(" ASSISTANT:")  # the vicuna format of v1.6
    asker.ask([path], "What is it?", max_new_tokens=3)
    width, height = Image.open(path).size
    assert os.path.getsize(path) > 2_000_000 and (width, height) == (4000, 3000)
    assert asker.engine.counters.vision_forwards == 1
    # the one cached feature block has exactly the picture's slots: [slot_count, 64] float32
    assert asker.engine.cache.stats.stored_bytes == slot_count(PIPELINE, width, height) * 64 * 4
