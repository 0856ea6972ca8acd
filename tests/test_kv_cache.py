"""The cache handed to ``generate`` for reusable generations: the same keys, values and logits as
transformers' DynamicCache, with one copy of the cache per ``SPARE_POSITIONS`` positions instead of one
per generated token."""

import torch

from extensions.llava.reuse.kv_cache import SPARE_POSITIONS, RoomyCache
from extensions.llava.reuse.prefixes import kv_bytes
from testbed.tiny import make_llm


def generated(model, cache, embeds, new_tokens: int = 12):
    out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                         past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits)


def test_generations_match_a_dynamic_cache_through_a_crop_and_a_longer_prompt():
    from transformers import DynamicCache
    model = make_llm(32003, seed=5, layers=2)
    torch.manual_seed(6)
    embeds = torch.randn(1, 300, model.config.hidden_size)
    roomy, dynamic = RoomyCache(), DynamicCache()
    with torch.no_grad():
        for cache in (roomy, dynamic):
            first = generated(model, cache, embeds[:, :200])
            cache.crop(180)  # a follow-up that shares 180 positions, then brings 120 new ones
            second = generated(model, cache, embeds[:, :300])
            cache.results = first, second
    for (ours, theirs) in zip(roomy.results, dynamic.results):
        assert torch.equal(ours[0], theirs[0]) and (ours[1] - theirs[1]).abs().max() <= 1e-5
    for ours, theirs in zip(roomy.layers, dynamic.layers):
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)


def test_storage_is_copied_only_when_full_and_counted_with_its_room():
    model = make_llm(32003, seed=5, layers=2)
    cache = RoomyCache()
    embeds = torch.randn(1, 100, model.config.hidden_size)
    seen = []

    def remember(module, args, kwargs, output):
        seen.append(cache.layers[0].keys.data_ptr())
    hook = model.model.layers[0].register_forward_hook(remember, with_kwargs=True)
    with torch.no_grad():
        generated(model, cache, embeds, new_tokens=SPARE_POSITIONS + 20)
    hook.remove()
    assert len(seen) == SPARE_POSITIONS + 20 and len(set(seen)) == 2  # the prefill's storage, one growth
    layer = cache.layers[0]
    positions = 100 + SPARE_POSITIONS + 19  # the last token generated is never fed
    assert layer.keys.shape[-2] == positions
    width = model.config.hidden_size  # 4 heads of 16
    position_bytes = 2 * 2 * width * 4  # 2 layers, keys and values, float32
    capacity, rest = divmod(kv_bytes(cache), position_bytes)  # the storage, room to spare included
    assert rest == 0 and positions < capacity <= positions + SPARE_POSITIONS


def test_tensors_replaced_by_transformers_start_new_storage():
    model = make_llm(32003, seed=5, layers=2)
    cache = RoomyCache()
    with torch.no_grad():
        generated(model, cache, torch.randn(1, 40, model.config.hidden_size), new_tokens=3)
    cache.batch_repeat_interleave(2)  # as beam search does: the layers get new tensors
    before = [layer.keys.clone() for layer in cache.layers]
    key = torch.randn(2, 4, 1, 16)
    keys, _ = cache.update(key, key.clone(), 0)
    assert torch.equal(keys[:, :, :-1], before[0]) and torch.equal(keys[:, :, -1:], key)
