"""``python -m extensions.llava ask``: answer a question about pictures, headless.

The same core as the webui extension: the pictures become ``<img>`` tags in the prompt, the
engine splices their features, and the model generates greedily.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys

from .errors import LlavaError

DEMO_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")
DEFAULT_TEMPLATE = "USER: {images}\n{question}\nASSISTANT:"


def picture_tag(path: str) -> str:
    if not os.path.isfile(path):
        raise LlavaError(f"no picture file at '{path}'")
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    # the declared subtype does not matter: the data is recognised by its content
    return f'<img src="data:image/png;base64,{data}">'


def prompt_template(model_dir: str) -> str:
    try:
        with open(os.path.join(model_dir, "llava.json")) as f:
            return json.load(f).get("prompt_template") or DEFAULT_TEMPLATE
    except (OSError, ValueError):
        return DEFAULT_TEMPLATE


class Asker:
    """A loaded model with its extension engine, ready for questions."""

    def __init__(self, model_dir: str = DEMO_MODEL, pipeline: str = "auto", device: str = "cpu",
                 embed_all: bool = False, log=lambda message: None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .engine import LlavaEngine
        from .settings import Settings
        if not os.path.isdir(model_dir):
            raise LlavaError(f"no model folder at '{model_dir}'")
        settings = Settings.from_params({"pipeline": pipeline, "clip_device": device, "projector_device": device,
                                         "add_all_images_to_prompt": embed_all})
        from .pipelines import get_pipeline
        if pipeline != "auto":
            get_pipeline(pipeline)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            self.model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
        except Exception as error:
            raise LlavaError(f"'{model_dir}' does not load as a causal language model: "
                             f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
        self.model_dir = model_dir
        self.template = prompt_template(model_dir)
        self.engine = LlavaEngine(settings, log=log)

    def prompt(self, tags: list[str], question: str) -> str:
        return self.template.format(images="".join(tags), question=question)

    def ask_tags(self, tags: list[str], question: str, max_new_tokens: int = 24) -> str:
        import torch
        prompt = self.prompt(tags, question)

        def encode(text):
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            return torch.tensor([[self.tokenizer.bos_token_id] + ids])

        prepared = self.engine.prepare(prompt, model=self.model, tokenizer=self.tokenizer, encode=encode,
                                       max_length=None, model_path=self.model_dir)
        if prepared is None:
            ids, embeds = encode(prompt), None
        else:
            ids, embeds = prepared.input_ids, prepared.inputs_embeds
        with torch.no_grad():
            output = self.model.generate(inputs=ids.to(self.model.device), inputs_embeds=embeds,
                                         max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=self.tokenizer.eos_token_id)
        new_tokens = output[0, ids.shape[1]:] if output.shape[1] > ids.shape[1] else output[0]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip().split("\n")[0]

    def ask(self, image_paths: list[str], question: str, max_new_tokens: int = 24) -> str:
        return self.ask_tags([picture_tag(path) for path in image_paths], question, max_new_tokens)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m extensions.llava ask",
                                     description="Answer a question about one or more pictures.")
    parser.add_argument("question")
    parser.add_argument("--image", action="append", required=True, help="a picture file (repeat for several)")
    parser.add_argument("--model", default=DEMO_MODEL, help="a model folder (default: the bundled demo)")
    parser.add_argument("--pipeline", default="auto", help="auto, or a pipeline name")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--embed-all", action="store_true", help="give every picture its features, not only the last")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args(argv)
    try:
        asker = Asker(args.model, args.pipeline, args.device, args.embed_all)
        print(asker.ask(args.image, args.question, args.max_new_tokens))
    except LlavaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
