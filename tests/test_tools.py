"""Every command the READMEs document runs, each tool in its quick mode: a tool that drifts from the code
fails here, not in a reader's hands. Each runs as a reader runs it, in a process of its own."""

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

from extensions.llava.cli_ask import DEMO_MODEL
from testbed.real_host import ROOT, needs_webui
from testbed.tool_output import QUICK_NOTE

pytestmark = pytest.mark.slow


def run(*command: str, timeout: float = 600, errors: bool = False):
    """The command's output (and what it wrote to stderr, with ``errors``); it must succeed and leave
    nothing in its temporary folder (a fresh TMPDIR of its own)."""
    with tempfile.TemporaryDirectory(prefix="llava-tool-tmp-") as temporary:
        done = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": temporary})
        assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert os.listdir(temporary) == [], f"{command} left {os.listdir(temporary)} in the temporary folder"
    if "--quick" in command:  # says what its figures are, and no library talks between them
        assert done.stdout.splitlines()[0] == QUICK_NOTE and "target" not in done.stdout, done.stdout
        assert done.stderr == "", done.stderr
    return (done.stdout, done.stderr) if errors else done.stdout


def test_every_tool_is_run_here_in_its_quick_mode():
    with open(__file__, encoding="utf-8") as f:
        run_here = set(re.findall(r'run\("tools/(\w+\.py)", "--quick"', f.read()))
    assert run_here == {name for name in os.listdir(os.path.join(ROOT, "tools")) if name.endswith(".py")}


def test_benchmark_prints_its_five_figures():
    out = run("tools/benchmark.py", "--quick")
    for figure in ("1. one image: ours", "2. 10-turn chat, embed all on: 10 vision forwards (re-encoding "
                   "everything: 55)", "2. 10-turn chat, embed all off: 10 vision forwards", "3. cache hit",
                   "4. custom_tokenized_length with 10 × 1 MB images", "5. splice at 4096 tokens"):
        assert figure in out, out


def test_benchmark_next_compares_equal_features():
    out = run("tools/benchmark_next.py", "--quick")
    rows = [line for line in out.splitlines() if line.startswith(("one ", "three "))]
    assert len(rows) == 3 and all(row.endswith("True") for row in rows), out  # the features are equal


def test_benchmark_onevision_compares_equal_features_and_counts_slots():
    out = run("tools/benchmark_onevision.py", "--quick")
    rows = {line[:28].strip(): line.split() for line in out.splitlines() if line.startswith(("one ", "two "))}
    assert len(rows) == 3 and all(row[-1] == "True" for row in rows.values()), out
    # a 12 MP photo alone: base view + 30 tiles (4000x3000 picks the 6x5 canvas), scaled into 9 tiles' worth
    assert rows["one 4000x3000 photo"][-6:-4] == ["31", "7309"], out
    assert rows["two pictures in one prompt"][-6:-4] == ["2", "1460"], out  # one padded view each, 730 slots


def test_benchmark_vision_cpu_prints_both_figures():
    out = run("tools/benchmark_vision_cpu.py", "--quick")
    assert out.count("s/picture") == 3 and out.count("demo held-out accuracy") == 2, out


def test_train_demo_trains_and_scores_without_touching_the_bundled_demo():
    demo = os.path.join(DEMO_MODEL, "model.safetensors")
    before = os.path.getmtime(demo)
    out = run("tools/train_demo.py", "--quick")
    assert "trained in" in out and out.count("held-out accuracy") == 3, out
    assert out.count("(after 4 steps: not meaningful)") == 3, out
    assert os.path.getmtime(demo) == before


def test_convert_command_as_in_the_readme(tmp_path):
    from testbed.tiny_family import build_v15, reference_v15, save_llava_hf
    v15 = build_v15(str(tmp_path / "v15"))
    source = save_llava_hf(str(tmp_path / "llava-1.5-7b-hf"), reference_v15(v15), v15.tokenizer, v15.clip_dir)
    out, progress = run("-m", "extensions.llava", "convert", source, str(tmp_path / "converted"), errors=True)
    assert "converted llava-hf checkpoint" in out and os.path.isfile(tmp_path / "converted" / "llava.json")
    with open(os.path.join(source, "model.safetensors.index.json")) as f:
        shards = len(set(json.load(f)["weight_map"].values()))
    assert shards > 1 and f"llava convert: language model shards: 100%|██████████| {shards}/{shards}" in progress


def test_benchmark_convert_measures_the_peak_for_two_sizes():
    out = run("tools/benchmark_convert.py", "--quick")
    assert out.count("converter peak") == 2, out


@needs_webui
def test_benchmark_webui_runs_against_the_real_webui():
    out = run("tools/benchmark_webui.py", "--quick", timeout=900)
    assert out.count("encode <= ") == 3 and "2-turn chat in the browser" in out, out


@needs_webui
def test_benchmark_followups_prefills_only_the_new_part_with_reuse_on():
    import ast
    out = run("tools/benchmark_followups.py", "--quick", timeout=900)
    rows = {line.split()[4]: line.split("  ")[-1] for line in out.splitlines() if line.startswith("v1.5")}
    (prompts_off, prefilled_off), (prompts_on, prefilled_on) = (
        [ast.literal_eval(part) for part in rows[setting].split(" / ")] for setting in ("off", "on"))
    assert prompts_off == prompts_on == prefilled_off and len(prompts_on) == 2, out
    # the follow-up starts from the whole first prompt, pictures included (the reply may not come back alike)
    assert prefilled_on[0] == prompts_on[0] and prefilled_on[1] <= prompts_on[1] - prompts_on[0], out


def quick_start_commands() -> list[str]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    block = readme.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_the_quick_start_as_the_readme_gives_it(tmp_path):
    """Every line of the quick start: the virtual environment is made and entered, torch's CPU build is the
    version requirements-dev.txt pins, the demo answers, the tests run (this suite)."""
    import shlex
    with open(os.path.join(ROOT, "requirements-dev.txt")) as f:
        torch_pin = next(line.strip() for line in f if line.startswith("torch=="))
    expected = ["python3 -m venv .venv", ". .venv/bin/activate",
                f"pip install {torch_pin} --index-url https://download.pytorch.org/whl/cpu",
                "pip install -r requirements-dev.txt"]
    commands = quick_start_commands()
    assert commands[:4] == expected and commands[-1] == "python -m pytest -q tests", commands
    made = subprocess.run(shlex.split(commands[0]), cwd=tmp_path, timeout=300)  # ensurepip needs no network
    assert made.returncode == 0 and os.path.isfile(tmp_path / ".venv" / "bin" / "activate")
    [ask] = commands[4:-1]
    answer = run(*shlex.split(ask)[1:])  # with this suite's Python, as the activated environment's
    assert answer.strip() == "A red circle.", answer
