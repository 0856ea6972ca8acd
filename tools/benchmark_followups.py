"""Follow-up questions in the real webui: what a turn costs after pictures, with earlier prompts reused
(``llava-prefix_cache_mb`` unset: the device decides) and without (``0``).

    LLAVA_WEBUI_PATH=... LLAVA_WEBUI_PYTHON=... python tools/benchmark_followups.py [--runs N] [--quick]

Two converted tiny LLaVA models whose language model is 10 layers deep and 768 wide, so that prefill
dominates on a CPU:
- v1.5, turn 1 brings two 640x480 pictures (576 tokens each);
- 1.6, turn 1 brings one 12 MP photo (a 4000x3000 JPEG of 4 MB: 2340 tokens).

For each model and setting the webui is started with its defaults (the Transformers loader on the CPU),
and a 6-turn chat runs over /v1/chat/completions, the client sending the whole history each turn as
OpenAI clients do: once with the pictures in turn 1, once with the same text and no pictures, ``--runs``
times each, alternating. Replies are 16 greedy tokens of plain characters (a random model's other tokens
would not come back the same from their text). Printed: turn 1's seconds, the mean seconds of turns 2-6,
their ratio to the text-only chat's follow-ups, the server's peak memory, what the store of earlier
prompts held at the end, and the prompt positions each turn computed (from the extension's log line).
``--quick`` runs the v1.5 shape with a 2-layer, 64-wide language model, 2 turns, once: it checks the
script against the real webui (CI runs it).
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from testbed import tool_output  # noqa: E402
from testbed.real_host import WEBUI, post  # noqa: E402
from testbed.real_models import convert_into, serving  # noqa: E402

QUESTIONS = ["Describe the pictures in a few words.", "And what colour is the biggest shape?",
             "Is there anything written on it?", "How many shapes are there in all?",
             "Which one is closest to the top?", "Say it again in one sentence."]
REUSED = re.compile(r"llava: (\d+) of (\d+) prompt positions came from an earlier prompt")
KEPT = re.compile(r"earlier prompts kept: \d+ \(([\d.]+) MB")


def v15_model(models: str, quick: bool) -> tuple[str, object]:
    from testbed.tiny_family import build_v15, reference_v15, save_llava_hf
    width, layers = (64, 2) if quick else (768, 10)
    v15 = build_v15(os.path.join(models, "v15-parts"), width=width, layers=layers)
    convert_into(models, "llava-v15-shaped",
                 lambda folder: save_llava_hf(folder, reference_v15(v15), v15.tokenizer, v15.clip_dir))
    return "llava-v15-shaped", v15.tokenizer


def next_model(models: str, quick: bool) -> tuple[str, object]:
    from testbed.tiny_next import build_next, save_next_hf
    reference, tokenizer = build_next(width=768, layers=10)
    convert_into(models, "llava-next-shaped", lambda folder: save_next_hf(folder, reference, tokenizer))
    return "llava-next-shaped", tokenizer


def picture_urls(kind: str, folder: str, run: int) -> list[str]:
    """Turn 1's pictures in run ``run``: new ones each run, so that turn 1 always computes them."""
    from testbed.photos import make_photo
    from testbed.tiny import data_url, file_url, picture
    if kind == "photo":
        return [file_url(make_photo(os.path.join(folder, f"photo-{run}.jpg"), seed=7 + run))]
    return [data_url(picture(640, 480, seed=seed)) for seed in (10 * run + 1, 10 * run + 2)]


def plain_characters_only(tokenizer) -> str:
    """Every token id but the printable characters', for custom_token_bans."""
    allowed = {tokenizer.convert_tokens_to_ids(chr(code)) for code in range(32, 127)}
    return ",".join(str(i) for i in range(len(tokenizer)) if i not in allowed)


def chat(server, urls: list[str], turns: int, bans: str, label: str) -> tuple[list[float], list[int]]:
    """One chat over /v1/chat/completions, the whole history sent each turn; each turn's seconds and
    prompt tokens. ``label`` starts the system message, so that no chat shares a prefix with another."""
    messages, times, prompts = [{"role": "system", "content": f"Conversation {label}."}], [], []
    for turn, question in enumerate(QUESTIONS[:turns]):
        content = [{"type": "text", "text": question}]
        if turn == 0:
            content += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
        messages.append({"role": "user", "content": content})
        start = time.perf_counter()
        status, body = post(server.api_base + "/v1/chat/completions",
                            {"messages": messages, "max_tokens": 16, "temperature": 0, "ban_eos_token": True,
                             "custom_token_bans": bans})
        times.append(time.perf_counter() - start)
        assert status == 200, body
        prompts.append(body["usage"]["prompt_tokens"])
        messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
    return times, prompts


def unwrapped_log(server) -> str:
    return re.sub(r"\s*\n\s+", " ", server.log_text())  # the webui's log wraps long lines


def reuse_lines(server) -> list[tuple[str, str]]:
    """(reused, prompt length) of each generation the extension logged."""
    return REUSED.findall(unwrapped_log(server))


def peak_mb(server) -> float:
    with open(f"/proc/{server.process.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def measure(models: str, model: str, tokenizer, urls_for, reuse: bool, args, work: str) -> dict:
    """Both chats, ``args.runs`` times, on a webui started with reuse on or off."""
    values = {"max_new_tokens": 16, "auto_max_new_tokens": False}
    if not reuse:
        values["llava-prefix_cache_mb"] = 0
    bans = plain_characters_only(tokenizer)
    with serving(models, model, work, ui=False, **values) as server:
        chat(server, urls_for(args.runs), 2, bans, "warm-up")  # the vision parts load on the first picture
        pictures, text = [], []
        for run in range(args.runs):
            marks = len(reuse_lines(server))
            times, prompts = chat(server, urls_for(run), args.turns, bans, f"{run} with pictures")
            pictures.append(times)
            text.append(chat(server, [], args.turns, bans, f"{run} in words")[0])
        # what each turn of the last picture chat prefilled: the extension logs what it reused
        lines = reuse_lines(server)[marks:]
        prefilled = [int(total) - int(reused) for reused, total in lines[:args.turns]] if reuse else prompts
        assert len(prefilled) == args.turns, server.log_text()[-3000:]
        return {"turn 1": statistics.median(times[0] for times in pictures),
                "follow-ups": statistics.mean(t for times in pictures for t in times[1:]),
                "text follow-ups": statistics.mean(t for times in text for t in times[1:]),
                "prefilled": prefilled, "prompts": prompts, "peak": peak_mb(server),
                "kept": float((KEPT.findall(unwrapped_log(server)) or [0])[-1])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a small v1.5, 2 turns, once: checks the script")
    args = parser.parse_args(argv)
    tool_output.start(args.quick)
    args.turns = 2 if args.quick else len(QUESTIONS)
    if args.quick:
        args.runs = 1
    if not WEBUI:
        sys.exit("set LLAVA_WEBUI_PATH and LLAVA_WEBUI_PYTHON (the hosts' prepare.sh prints both)")
    shapes = [("v1.5, two 640x480 pictures", v15_model, "pictures")]
    if not args.quick:
        shapes.append(("1.6, one 12 MP photo", next_model, "photo"))
    print(f"{args.turns}-turn chats over /v1/chat/completions, {args.runs} run(s) each; seconds")
    print(f"{'model':28} {'reuse':5} {'turn 1':>7} {'turns 2+':>9} {'text only':>10} {'ratio':>6} "
          f"{'peak MB':>8} {'kept MB':>8}  prompt tokens per turn / prefilled")
    with tempfile.TemporaryDirectory() as folder:
        for name, build, kind in shapes:
            models = os.path.join(folder, "models-" + kind)
            os.makedirs(models)
            model, tokenizer = build(models, args.quick)
            for reuse in (False, True):
                work = os.path.join(folder, f"work-{kind}-{reuse}")
                os.makedirs(work)
                urls_for = functools.partial(picture_urls, kind, folder)
                row = measure(models, model, tokenizer, urls_for, reuse, args, work)
                ratio = row["follow-ups"] / row["text follow-ups"]
                print(f"{name:28} {'on' if reuse else 'off':5} {row['turn 1']:>7.2f} {row['follow-ups']:>9.2f} "
                      f"{row['text follow-ups']:>10.2f} {ratio:>6.2f} {row['peak']:>8.0f} {row['kept']:>8.0f}  {row['prompts']} / {row['prefilled']}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
