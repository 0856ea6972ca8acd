"""No picture encoded twice, none encoded in vain: vision forwards and tower batches per chat, the
feature cache (LRU, bounded, thread-safe), 16 bits on the CPU, and counting that never decodes.
Counts are asserted exactly, never times."""

import base64

import pytest
import torch

from extensions.llava.api.check import check_pictures
from extensions.llava.errors import LlavaError
from extensions.llava.families.pipelines import PIPELINES
from extensions.llava.media import pictures
from extensions.llava.prompt.messages import items_in_body
from extensions.llava.stores import FeatureCache
from testbed.tiny import PATCH_ID, img_tag, picture, quiet_engine
from testbed.tiny_next import SIZES
from testbed.watch import record_calls, refuse_calls, run_in_threads

V0_FEATURE_BYTES = 256 * 64 * 4  # a v0 picture's features: 256 slots of the 64-wide float32 embeddings


def test_vision_loads_lazily_once(v0):
    engine = v0.engine()
    assert engine.counters.loads == 0
    for seed in range(2):
        v0.prepare(engine, "x " + img_tag(picture(seed=seed)))
    assert engine.counters.loads == 1 and engine.counters.vision_forwards == 2


@pytest.mark.parametrize("embed_all", [True, False])
def test_ten_turn_chat_encodes_each_picture_once(v0, host_factory, embed_all):
    host = host_factory(model=v0.llm, tokenizer=v0.tokenizer,
                        settings=v0.webui_settings(add_all_images_to_prompt=embed_all))
    engine = host.engine()
    for turn in range(10):
        host.chat(f"turn {turn}: {img_tag(picture(40, 40, seed=100 + turn))}",
                  host.state(max_new_tokens=1, truncation_length=4096))
    assert engine.counters.vision_forwards == 10
    assert engine.counters.vision_batches == 10
    # "embed all" on: turn t looks up t earlier pictures in the cache and misses its new one
    assert engine.cache.stats.hits == (45 if embed_all else 0)
    assert engine.cache.stats.misses == 10
    assert engine.cache.stats.evictions == 0


def test_without_cache_every_turn_reencodes(v0, host_factory):
    host = host_factory(model=v0.llm, tokenizer=v0.tokenizer,
                        settings=v0.webui_settings(add_all_images_to_prompt=True, cache_size_mb=0))
    for turn in range(4):
        host.chat(f"turn {turn}: {img_tag(picture(40, 40, seed=200 + turn))}", host.state(max_new_tokens=1))
    assert host.engine().counters.vision_forwards == 1 + 2 + 3 + 4


def test_new_pictures_of_one_prompt_go_in_one_batch_and_repeats_once(v0):
    engine = v0.engine(add_all_images_to_prompt=True)
    same = img_tag(picture(seed=7))
    prompt = "a " + img_tag(picture(seed=1)) + same + " b " + img_tag(picture(seed=2)) + same
    prepared = v0.prepare(engine, prompt)
    assert prepared.items_embedded == 4
    assert engine.counters.vision_batches == 1 and engine.counters.vision_forwards == 3
    slots = (prepared.input_ids[0] == PATCH_ID).nonzero().flatten().view(4, 256)
    assert torch.equal(prepared.inputs_embeds[0, slots[1]], prepared.inputs_embeds[0, slots[3]])
    # a batch gives the same features as one picture at a time
    single = v0.prepare(v0.engine(), "x " + img_tag(picture(seed=2)))
    single_slots = (single.input_ids[0] == PATCH_ID).nonzero().flatten()
    assert torch.allclose(single.inputs_embeds[0, single_slots], prepared.inputs_embeds[0, slots[2]], atol=1e-5)


def test_embed_all_off_opens_only_the_last_picture(v0):
    engine = v0.engine()
    broken = '<img src="data:image/png;base64,AAAA">'  # would fail if it were opened
    prepared = v0.prepare(engine, "a " + broken + " b " + img_tag(picture(seed=3)))
    assert prepared.items_embedded == 1 and engine.counters.vision_forwards == 1


def test_cache_serves_a_picture_again_without_the_tower(next_converted):
    engine = quiet_engine()
    tag = img_tag(picture(*SIZES["tall"], seed=95))
    first = next_converted.prepare(engine, f"Look {tag}")
    again = next_converted.prepare(engine, f"Look {tag} again {img_tag(picture(*SIZES['wide'], seed=96))}",
                                   embed_all=True)
    assert engine.counters.vision_forwards == 2 and engine.cache.stats.hits == 1
    n = first.input_ids.shape[1]
    assert torch.equal(again.inputs_embeds[0, :n], first.inputs_embeds[0, :n])


def test_concurrent_requests_each_get_their_own_picture(v0):
    engine = v0.engine(cache_size_mb=1)
    prompts = ["q " + img_tag(picture(32, 32, seed=300 + i)) for i in range(12)]
    alone = [v0.prepare(v0.engine(), p).inputs_embeds for p in prompts[:3]]
    results = {}

    def ask(i):
        for _ in range(3):
            results[i] = v0.prepare(engine, prompts[i]).inputs_embeds

    assert run_in_threads(ask, 12) == []
    for i in range(3):
        assert torch.allclose(results[i], alone[i], atol=1e-5)
    assert len({tuple(r[0, 5, :4].tolist()) for r in results.values()}) == 12  # twelve different answers
    stats = engine.cache.stats
    assert len(engine.cache) == 12 and stats.stored_bytes == 12 * V0_FEATURE_BYTES <= 2**20
    assert engine.counters.vision_forwards == 12 and (stats.misses, stats.hits, stats.evictions) == (12, 24, 0)


def test_cache_is_lru_and_bounded_by_bytes():
    row = torch.zeros(256, 64)  # 64 KiB
    cache = FeatureCache(max_bytes=3 * FeatureCache.size_of(row))
    for key in "abc":
        cache.put((key,), row.clone())
    assert cache.get(("a",)) is not None  # a is now the most recent
    cache.put(("d",), row.clone())  # evicts b, the least recently used
    assert ("b",) not in cache and ("a",) in cache and ("c",) in cache and ("d",) in cache
    assert cache.stats.evictions == 1 and cache.stats.stored_bytes == 3 * 65536
    assert (cache.stats.hits, cache.stats.misses) == (1, 0)
    assert cache.get(("b",)) is None and cache.stats.misses == 1
    cache.put(("huge",), torch.zeros(1024, 1024))  # larger than the whole cache: not stored
    assert ("huge",) not in cache and len(cache) == 3
    cache.resize(FeatureCache.size_of(row))
    assert len(cache) == 1 and ("d",) in cache and cache.stats.evictions == 3


def test_cache_keeps_count_under_threads():
    cache = FeatureCache(max_bytes=10 * 4 * 16)

    def worker(offset):
        for i in range(200):
            key = ((offset + i) % 25,)
            if cache.get(key) is None:
                cache.put(key, torch.zeros(16))

    assert run_in_threads(worker, 8) == []
    assert len(cache) == 10 and cache.stats.stored_bytes == 10 * 64  # 25 keys fill all ten places
    assert cache.stats.hits + cache.stats.misses == 1600


def test_sixteen_bits_on_cpu_is_bfloat16_and_lands_in_the_llm_dtype(v0):
    engine = v0.engine(clip_bits=16, projector_bits=16)
    prepared = v0.prepare(engine, "x " + img_tag(picture()))
    vision = engine.features.vision_parts(engine.bind(v0.llm, v0.tokenizer).choice)
    assert vision.tower.dtype == torch.bfloat16 and engine.counters.loads == 1  # the parts that were used
    assert next(vision.projector.parameters()).dtype == torch.bfloat16
    assert prepared.inputs_embeds.dtype == torch.float32
    full = v0.prepare(v0.engine(), "x " + img_tag(picture()))
    assert (prepared.inputs_embeds - full.inputs_embeds).abs().max() < 0.1  # bfloat16 rounding, not garbage


def test_counting_tokens_never_decodes_base64(v0, host_factory, monkeypatch):
    host = host_factory(model=v0.llm, tokenizer=v0.tokenizer, settings=v0.webui_settings())
    big = "data:image/png;base64," + "A" * (1 << 20)
    prompt = "".join(f"turn {i} <img src=\"{big}\">" for i in range(10))
    refuse_calls(monkeypatch, base64, "b64decode", "base64 was decoded")
    seen = record_calls(monkeypatch, v0.tokenizer, "encode", note=lambda text, *args, **kwargs: text)
    length = host.script.custom_tokenized_length(prompt)
    # the tokenizer saw each picture as one stand-in, never the 1 MB payloads
    stand_in = PIPELINES["llava-v0-13b"].image_stand_in()
    assert seen == ["".join(f"turn {i} {stand_in}" for i in range(10))]
    assert length == len(host.encode("".join(f"turn {i} " for i in range(10)))[0]) + 10 * 258


def test_http_check_reads_headers_and_generation_decodes_a_picture_once(v0, monkeypatch):
    engine = v0.engine()
    decoded = record_calls(monkeypatch, pictures, "open_picture")
    prompt = "q " + img_tag(picture(seed=61)) + " and " + img_tag(picture(seed=62))
    check_pictures(items_in_body("/v1/completions", {"prompt": prompt}), embed_all=True)
    assert decoded == []  # the check reads headers only
    for _ in range(2):  # the second time the features come from the cache, keyed on the data
        v0.prepare(engine, prompt)
        assert len(decoded) == 1 and engine.counters.vision_forwards == 1
    with pytest.raises(LlavaError) as error:
        check_pictures(items_in_body("/v1/completions", {"prompt": 'x <img src="data:image/png;base64,AAAA">'}),
                       embed_all=False)
    assert str(error.value) == \
        "picture 1 in the prompt: the data is not a picture in a supported format (PNG, JPEG, GIF, WebP, BMP or TIFF)"


def test_large_pictures_give_their_memory_back(v0):
    """The C library keeps freed memory for later; after a large picture it is asked to hand it back."""
    engine = v0.engine()
    v0.prepare(engine, "small " + img_tag(picture(64, 48, seed=90)))
    assert engine.counters.memory_releases == 0
    v0.prepare(engine, "large " + img_tag(picture(2500, 2000, seed=91)))  # 5 million pixels
    assert engine.counters.memory_releases == 1
