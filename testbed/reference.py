"""transformers' own LLaVA models as the reference: the pixels their processors make, and the check
that our spliced embeddings and the logits they give equal theirs."""

from __future__ import annotations

import torch

from testbed.tiny import img_tag, prepare, quiet_engine, reference_run


def logits_of(model, embeds: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs_embeds=embeds).logits


def assert_matches(label: str, embeds, ref_embeds, logits, ref_logits, embed_tol: float = 1e-6,
                   logit_tol: float = 1e-4) -> None:
    """Our embeddings and logits equal the reference's within float32 noise (the largest gaps are printed)."""
    embed_diff = (embeds - ref_embeds).abs().max().item()
    logit_diff = (logits - ref_logits).abs().max().item()
    print(f"{label}: max embed diff {embed_diff:.3g}, max logit diff {logit_diff:.3g}")
    assert embed_diff <= embed_tol
    assert logit_diff <= logit_tol


def ours(engine, prompt: str, model, tokenizer, **kwargs):
    """Our ids and embeddings for ``prompt`` (every picture embedded unless ``kwargs`` say otherwise),
    and the logits the language model gives on them."""
    prepared = prepare(engine, prompt, model, tokenizer, **{"embed_all": True, **kwargs})
    return prepared, logits_of(model, prepared.inputs_embeds)


def reference_pixels(clip_dir: str, images, pad: bool, colour=None) -> torch.Tensor:
    """What LLaVA feeds its tower, by transformers' own processors: LlavaImageProcessor pads to a square
    of the mean colour (v1.5), CLIPImageProcessor does not; ``colour`` pads with another one."""
    import numpy as np
    from transformers import CLIPImageProcessor, LlavaImageProcessorPil
    if not pad:
        return CLIPImageProcessor.from_pretrained(clip_dir)(images=images, return_tensors="pt")["pixel_values"]
    processor = LlavaImageProcessorPil.from_pretrained(clip_dir, do_pad=True)
    if colour is not None:
        from PIL import Image
        images = [Image.fromarray(processor.pad_to_square(np.asarray(image).transpose(2, 0, 1),
                                                          background_color=colour).transpose(1, 2, 0))
                  for image in images]
    return processor(images=images, return_tensors="pt")["pixel_values"]


def compare_next(loaded, reference, images, embed_all: bool = True):
    """A LLaVA-1.6 model folder against transformers' LlavaNextForConditionalGeneration ``reference`` (a
    (model, tokenizer) pair) on one prompt with ``images``; returns our engine and what it prepared."""
    from testbed.tiny_family import IMAGE_ID
    from testbed.tiny_next import image_processor
    engine = quiet_engine()
    prompt = "USER: " + " ".join(img_tag(image) for image in images) + "\nWhat is shown? ASSISTANT:"
    prepared, logits = ours(engine, prompt, loaded.model, loaded.tokenizer, embed_all=embed_all)
    batch = image_processor()(images=images, return_tensors="pt")
    model = reference[0]
    earlier = None if embed_all else model.model.language_model.embed_tokens.weight[IMAGE_ID]
    ref_embeds, ref_logits = reference_run(model, prepared.input_ids, batch["pixel_values"], earlier,
                                           image_sizes=batch["image_sizes"])
    assert_matches(f"{[image.size for image in images]} embed_all={embed_all}", prepared.inputs_embeds, ref_embeds,
                   logits, ref_logits, embed_tol=1e-4)
    return engine, prepared


def chatml_prompt(images, question: str = "What is shown?") -> str:
    """A one-message Qwen2 (ChatML) prompt with ``images`` before the question, as OneVision's template puts them."""
    return ("<|im_start|>user\n" + "".join(img_tag(image) for image in images) + f"\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n")


def compare_onevision(loaded, reference, images, embed_all: bool = True, added_token: str | None = None):
    """A LLaVA-OneVision or llava-interleave model folder against transformers' model ``reference`` (a
    (model, tokenizer) pair) on one ChatML prompt with ``images``, laid out as transformers lays out that many
    pictures; returns our engine and what it prepared. ``added_token``: a token the converter added to the
    vocabulary (its row of the logits is the converter's, not the reference's, and is not compared)."""
    model, tokenizer = reference
    engine = quiet_engine()
    prepared, logits = ours(engine, chatml_prompt(images), loaded.model, loaded.tokenizer, embed_all=embed_all)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if type(model).__name__.startswith("LlavaOnevision"):
        from testbed.tiny_onevision import onevision_image_processor
        batch = dict(onevision_image_processor()(images=[list(images)], return_tensors="pt"))
    else:
        from testbed.tiny_onevision import interleave_processor
        batch = dict(interleave_processor(tokenizer).image_processor(images=list(images), return_tensors="pt"))
    ids = prepared.input_ids.clone()
    ids[ids == loaded.tokenizer.convert_tokens_to_ids("<image>")] = image_id
    earlier = None if embed_all else model.model.language_model.embed_tokens.weight[image_id]
    ref_embeds, ref_logits = reference_run(model, ids, batch.pop("pixel_values"), earlier, **batch)
    if added_token is not None:
        keep = torch.ones(logits.shape[-1], dtype=torch.bool)
        keep[loaded.tokenizer.convert_tokens_to_ids(added_token)] = False
        logits, ref_logits = logits[..., keep], ref_logits[..., keep]
    assert_matches(f"{[image.size for image in images]} embed_all={embed_all}", prepared.inputs_embeds, ref_embeds,
                   logits, ref_logits, embed_tol=1e-4)
    return engine, prepared
