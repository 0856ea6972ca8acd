"""The commands as a webui user runs them: from the webui's root, with the webui's Python, the extension
installed in ``user_data/extensions/llava`` (exactly the commands the READMEs give)."""

import json
import os
import subprocess

import pytest

from testbed.real_host import PYTHON, WEBUI, is_current, needs_webui, webui_tree_with_extension

pytestmark = [needs_webui, pytest.mark.slow,
              pytest.mark.skipif(bool(WEBUI) and not is_current(WEBUI), reason="the 2023 webui has no user_data")]
COMMAND = os.path.join("user_data", "extensions", "llava")


@pytest.fixture(scope="module")
def webui_root(tmp_path_factory):
    return webui_tree_with_extension(str(tmp_path_factory.mktemp("installed")))


def run_there(root: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, COMMAND, *args], cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_help_from_the_webui_root(webui_root):
    done = run_there(webui_root, "--help")
    assert done.returncode == 0 and done.stdout.startswith(f"usage: python {COMMAND} {{ask,convert}}"), done


def test_ask_from_the_webui_root(webui_root):
    picture = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "red-circle.png")
    done = run_there(webui_root, "ask", "--image", picture, "What shape is in the picture?")
    assert done.returncode == 0 and done.stdout.strip() == "A red circle.", done


def test_convert_from_the_webui_root_into_its_models(webui_root, tmp_path):
    from testbed.tiny_family import build_v15, reference_v15, save_llava_hf
    v15 = build_v15(str(tmp_path / "v15"))
    source = save_llava_hf(str(tmp_path / "llava-1.5-7b-hf"), reference_v15(v15), v15.tokenizer, v15.clip_dir)
    done = run_there(webui_root, "convert", source, "user_data/models/my-llava")
    assert done.returncode == 0, done
    converted = os.path.join(webui_root, "user_data", "models", "my-llava")
    assert f"→ '{converted}'" in done.stdout
    with open(os.path.join(converted, "llava.json")) as f:
        assert json.load(f)["vision_tower"] == "vision_tower"
    assert os.path.isfile(os.path.join(converted, "vision_tower", "config.json"))
