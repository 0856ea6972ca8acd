"""``python -m extensions.llava ask``: answer a question about pictures, without the webui.

    python -m extensions.llava ask --image PATH [--image PATH ...] [--model FOLDER]
        [--pipeline NAME] [--device cpu|cuda:0] [--embed-all] [--max-new-tokens N] "question"

The same core as the extension: every picture becomes an ``<img>`` tag in the prompt, the
engine splices the pictures' features at the image tokens, and the model answers greedily.
With no ``--model`` the bundled demo (``extensions/llava/models/demo``) answers. Any failure is one
line on stderr starting with ``error:`` and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys

from .errors import LlavaError, first_line
from .media.items import DataUrlItem, ItemError
from .settings import SettingsError, available_devices, resolve_device
from .vision.weights import quiet_transformers

DEMO_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "demo")
# The user's message: the pictures' tags, then the question. A model with a chat template (the demo
# has one) gets it rendered by that template; others get their family's format below.
ASK_MESSAGE = "{images}\n{question}"
# How each family's chat models were trained to see a question. {images} becomes the pictures' tags.
FAMILY_TEMPLATES = {
    "v0": "###Human: {images}\n{question}###Assistant:",
    "llama-2": "[INST] {images}\n{question} [/INST]",
    "v1.5": "USER: {images}\n{question} ASSISTANT:",
    "v1.6": "USER: {images}\n{question} ASSISTANT:",  # vicuna; the mistral and 34b releases carry chat templates
}
FALLBACK_TEMPLATE = FAMILY_TEMPLATES["v1.5"]


def picture_tag(path: str, position: int) -> str:
    """The ``<img>`` tag for a picture file, checked to be a picture the extension can use."""
    if not os.path.exists(path):
        raise LlavaError(f"no picture file at '{path}'")
    if not os.path.isfile(path):
        raise LlavaError(f"'{path}' is not a file")
    try:
        with open(path, "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
    except OSError as error:
        raise LlavaError(f"cannot read '{path}': {error.strerror or error}") from None
    # The declared subtype does not matter: the picture is recognised by its content.
    url = f"data:image/png;base64,{data}"
    try:
        DataUrlItem.from_url(url, position).load()
    except ItemError as error:
        raise LlavaError(f"'{path}' cannot be used: {error.reason}") from None
    return f'<img src="{url}">'


class Asker:
    """A loaded model with the extension's engine, ready for questions about pictures."""

    def __init__(self, model_dir: str = DEMO_MODEL, pipeline: str = "auto", device: str = "cpu",
                 embed_all: bool = False, log=lambda message: None):
        from .engine import LlavaEngine
        from .families.pipelines import get_pipeline
        from .settings import Settings

        if pipeline != "auto":
            get_pipeline(pipeline)  # an unknown name fails before the model loads
        settings = Settings.from_params({"pipeline": pipeline, "clip_device": device, "projector_device": device,
                                         "add_all_images_to_prompt": embed_all})  # the setting's key
        if not os.path.isdir(model_dir):
            raise LlavaError(f"no model folder at '{model_dir}'")
        self.model_dir = model_dir
        self.tokenizer, self.model = load_language_model(model_dir, settings.clip_device)
        self.engine = LlavaEngine(settings, log=log)

    def template(self) -> str:
        """The prompt with {images} and {question} to fill in: the model's own chat template rendering a
        one-message chat (without BOS: ``encode`` adds it), else the family's format."""
        if getattr(self.tokenizer, "chat_template", None):
            message = {"role": "user", "content": ASK_MESSAGE}
            return self.tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True,
                                                      bos_token="")
        family = self.loaded.choice.pipeline.family
        return FAMILY_TEMPLATES.get(family, FALLBACK_TEMPLATE)

    def prompt(self, tags: list[str], question: str) -> str:
        return self.template().replace("{images}", "".join(tags)).replace("{question}", question)

    @property
    def loaded(self):
        """The model's context for the engine (bound once)."""
        return self.engine.bind(self.model, self.tokenizer, self.model_dir, self.encode)

    def encode(self, text: str, **options):
        """Text → ids [1, n] with one BOS in front, as the webui encodes a prompt."""
        import torch
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        bos = self.tokenizer.bos_token_id
        return torch.tensor([([bos] if bos is not None else []) + ids])

    def ask_tags(self, tags: list[str], question: str, max_new_tokens: int = 64) -> str:
        """The model's answer to ``question`` about the pictures behind ``<img>`` tags."""
        return self.answer(self.prompt(tags, question), max_new_tokens)

    def answer(self, prompt: str, max_new_tokens: int = 64) -> str:
        """The model's greedy continuation of ``prompt``, a text with ``<img>`` tags (BOS is added)."""
        import torch
        prepared = self.engine.prepare(prompt, self.loaded)
        if prepared is None:
            raise LlavaError("the prompt holds no picture")
        ids = prepared.input_ids.to(self.model.device)
        embeds = prepared.inputs_embeds.to(self.model.device, self.model.dtype)
        pad = self.tokenizer.pad_token_id
        with torch.no_grad():
            output = self.model.generate(input_ids=ids, inputs_embeds=embeds, attention_mask=torch.ones_like(ids),
                                         max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=pad if pad is not None else self.tokenizer.eos_token_id)
        return self.tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()

    def ask(self, image_paths: list[str], question: str, max_new_tokens: int = 64) -> str:
        tags = [picture_tag(path, position) for position, path in enumerate(image_paths, 1)]
        return self.ask_tags(tags, question, max_new_tokens)


def load_language_model(model_dir: str, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise LlavaError(f"'{model_dir}' is not a model folder (it has no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    except Exception as error:
        raise LlavaError(f"'{model_dir}' does not load as a causal language model: "
                         f"{first_line(error) or type(error).__name__}") from None
    return tokenizer, model


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def checked_device(text: str) -> str:
    """``--device``'s value, checked against the devices this machine has (the error names the flag)."""
    try:
        return str(resolve_device("clip_device", text))
    except SettingsError:
        raise LlavaError(f"--device is {text!r}, which is not a device this machine has; allowed here: "
                         f"{', '.join(available_devices())}") from None


def parser(prog: str = "python -m extensions.llava ask") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Answer a question about one or more pictures with a LLaVA model.")
    p.add_argument("question", help="what to ask about the pictures, in quotes")
    p.add_argument("--image", action="append", required=True, metavar="PATH",
                   help="a picture file (PNG, JPEG, GIF, WebP, BMP or TIFF); repeat for several")
    p.add_argument("--model", default=DEMO_MODEL, metavar="FOLDER",
                   help="a model folder, for example a converted checkpoint (the default: the bundled demo)")
    p.add_argument("--pipeline", default="auto", metavar="NAME",
                   help="auto (from the folder's llava.json or the model) or a pipeline name")
    p.add_argument("--device", default="cpu", help="cpu, cuda:0, ...")
    p.add_argument("--embed-all", action="store_true",
                   help="give every picture its features, not only the last one (as the extension's "
                        "\"embed all\" checkbox)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N",
                   help="the longest answer, in tokens")
    return p


def main(argv=None, prog: str = "python -m extensions.llava ask") -> int:
    args = parser(prog).parse_args(argv)
    try:
        with quiet_transformers():  # no progress bars or advice: stderr carries only errors
            tags = [picture_tag(path, position) for position, path in enumerate(args.image, 1)]
            asker = Asker(args.model, args.pipeline, checked_device(args.device), args.embed_all)
            print(asker.ask_tags(tags, args.question, args.max_new_tokens))
    except LlavaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # anything unforeseen is still one line, not a traceback
        print(f"error: {type(error).__name__}: {first_line(error)}", file=sys.stderr)
        return 1
    return 0
