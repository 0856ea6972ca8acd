"""Which of the webui's loaders give the extension's features to the model, and what a user is told
when pictures go to one that does not."""

from __future__ import annotations

from .prompt.parse import parse_prompt

# Loaders whose generation passes the tokenizer hook's embeddings to the model. The webui's ExLlamav3_HF
# calls the hook, but its forward reads only input_ids; the 2023 webui names no loader (None).
HOOKED_LOADERS = {"transformers"}
# Loaders that read the webui's image attachments themselves (a vision model in their own format).
NATIVE_IMAGE_LOADERS = {"llama.cpp", "exllamav3"}


def _loader_key(loader: str | None) -> str:
    return (loader or "").lower().replace(" ", "")


def loader_sees_images(loader: str | None, model) -> bool:
    if model is None:
        return True  # nothing loaded: the webui reports that itself
    if loader and _loader_key(loader) not in HOOKED_LOADERS:
        return False
    return hasattr(model, "get_input_embeddings")


def ignored_pictures_warning(text: str, loader: str | None, model, attached: int = 0) -> str | None:
    """What to tell the user when pictures are sent to a loader whose model will not see them; None
    when it sees them or the message holds none.

    ``attached`` counts the field's pictures that went into this message as attachments; the
    webui's llama.cpp and ExLlamaV3 loaders read attachments themselves, others drop them.
    """
    if loader_sees_images(loader, model):
        return None
    count = len(parse_prompt(text).items) if "<" in text else 0
    if _loader_key(loader) not in NATIVE_IMAGE_LOADERS:
        count += attached
    if not count:
        return None
    return (f"llava: the {loader or 'current'} loader does not give the extension's image features to the "
            f"model, so the {count} picture(s) in this message are not seen by it; load the model with the "
            "Transformers loader to use the llava extension")
