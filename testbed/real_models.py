"""Models written into a real webui's models folder for the real-webui tests, and their pictures."""

import json
import os
import shutil

from testbed import tiny


def write_model(folder: str, current: bool):
    """The tiny v0 model as a webui model folder; returns its parts (tokenizer included)."""
    v0 = tiny.build_v0(folder + "-parts")
    if current:
        v0.llm.save_pretrained(folder)
    else:
        # The 2023 webui loads every LlamaForCausalLM with a sentencepiece LlamaTokenizer, which a
        # tiny test tokenizer cannot provide; a tiny GPT-2 goes through its AutoTokenizer path instead.
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(vocab_size=len(v0.tokenizer), n_embd=64, n_layer=2, n_head=4,
                                   n_positions=2048, bos_token_id=1, eos_token_id=2)).save_pretrained(folder)
    v0.tokenizer.save_pretrained(folder)
    if not current:  # a tokenizer class name the 2023 transformers knows
        config_path = os.path.join(folder, "tokenizer_config.json")
        with open(config_path) as f:
            config = json.load(f)
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(config_path, "w") as f:
            json.dump(config, f)
    shutil.copytree(v0.clip_dir, os.path.join(folder, "vision_tower"))
    shutil.copy(os.path.join(v0.projector_dir, "mm_projector.bin"), folder)
    with open(os.path.join(folder, "llava.json"), "w") as f:
        json.dump({"pipeline": "llava-v0-13b", "vision_tower": "vision_tower", "projector": "mm_projector.bin"}, f)
    return v0


def picture_url(seed: int) -> str:
    return tiny.data_url(tiny.picture(64, 48, seed=seed))


def v0_prompt_tokens(tokenizer, text_with_pictures: str, placeholder: str = "<picture>", bos: bool = True) -> int:
    """The tokens a prompt takes on the tiny v0 model, each ``placeholder`` counted as a picture's 258
    tokens, with one BOS in front when ``bos`` (as the webui's encode puts it)."""
    expanded = text_with_pictures.replace(placeholder, "<im_start>" + "<im_patch>" * 256 + "<im_end>")
    ids = tokenizer(expanded, add_special_tokens=False)["input_ids"]
    return len(ids) + (bos and (not ids or ids[0] != tokenizer.bos_token_id))


def convert_into(models, name: str, save) -> str:
    """The checkpoint ``save(folder)`` writes, converted into ``models/name`` (a webui models folder)."""
    from extensions.llava.converter.convert import convert
    source = save(os.path.join(str(models), name + "-source"))
    convert(source, os.path.join(str(models), name), log=lambda line: None)
    shutil.rmtree(source)
    return str(models)


def settings_file(work, **values) -> str:
    """A webui settings file in ``work`` holding ``values``."""
    path = os.path.join(str(work), "settings.yaml")
    with open(path, "w") as f:
        f.write("".join(f"{key}: {str(value).lower() if isinstance(value, bool) else value}\n"
                        for key, value in values.items()))
    return path


def serving(models, name: str, work, *, ui: bool = True, probe_encode: bool = False, **settings):
    """The webui serving ``models/name`` over the API (and the UI, with ``ui``), started with ``settings``
    written into a settings file in ``work``; a context manager giving the server."""
    from testbed.real_host import running_webui
    return running_webui(str(models), name, str(work), ui=ui, api=True, probe_encode=probe_encode,
                         extra_args=("--settings", settings_file(work, **settings)))
