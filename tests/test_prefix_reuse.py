"""A follow-up costs only its new tokens: each generation with pictures starts from the language model's
cache of the longest prefix it shares, position for position, with an earlier generation of its own
conversation. Every case runs twice, in two fake webuis over the same model, one reusing and one not
(``llava-prefix_cache_mb: 0``): the replies are identical and every step's logits agree within 1e-4."""

import os
import re

import pytest
import torch

from testbed.tiny import PATCH_ID, img_tag, picture
from testbed.watch import run_in_threads


class Twins:
    """Two fake webuis on one model: ``reusing`` with the prefix cache, ``plain`` without."""

    def __init__(self, host_factory, v0, **settings):
        self.reusing = host_factory(model=v0.llm, tokenizer=v0.tokenizer, settings=v0.webui_settings(**settings))
        self.plain = host_factory(model=v0.llm, tokenizer=v0.tokenizer,
                                  settings=v0.webui_settings(**{**settings, "prefix_cache_mb": 0}))

    def each(self, action):
        """``action(host)`` on both; the replies must be the same and the logits agree."""
        ours, theirs = action(self.reusing), action(self.plain)
        assert ours == theirs
        assert len(self.reusing.last_scores) == len(self.plain.last_scores)
        for a, b in zip(self.reusing.last_scores, self.plain.last_scores):
            assert (a - b).abs().max().item() <= 1e-4
        return ours

    def chat(self, text: str, state=None, **kwargs) -> str:
        return self.each(lambda host: host.chat(text, host.state(**(state or {})), **kwargs))

    def generate(self, prompt: str, **state) -> str:
        return self.each(lambda host: host.generate(prompt, host.state(**state)))

    @property
    def saved(self) -> int:
        """Positions the reusing webui did not compute again in its last generation."""
        return len(self.reusing.last_prompt_ids[0]) - self.reusing.last_prefill


@pytest.fixture
def twins(host_factory, v0):
    return Twins(host_factory, v0)


@pytest.fixture
def twins_embedding_all(host_factory, v0):
    return Twins(host_factory, v0, add_all_images_to_prompt=True)


TURN = {"max_new_tokens": 6, "truncation_length": 2048}


def test_a_follow_up_prefills_only_its_new_tokens(twins):
    twins.chat("What is this?", TURN, attachments=[picture(seed=1)])
    first = len(twins.reusing.last_prompt_ids[0])
    assert twins.reusing.last_prefill == first  # nothing to reuse yet
    twins.chat("And its colour?", TURN)
    # the first prompt came from the cache; the reply (the random model's tokens come back from its text as
    # other tokens) and the follow-up were computed
    assert twins.saved == first > 258 and twins.plain.last_prefill == len(twins.plain.last_prompt_ids[0])
    second = len(twins.reusing.last_prompt_ids[0])
    twins.chat("Anything else?", TURN)
    assert twins.saved == second


def test_a_new_picture_in_a_later_turn_gets_its_features(twins_embedding_all):
    twins = twins_embedding_all  # with "embed all" off the first picture would lose its features, and reuse
    twins.chat("What is this?", TURN, attachments=[picture(seed=2)])
    first = len(twins.reusing.last_prompt_ids[0])
    twins.chat("And this one?", TURN, attachments=[picture(seed=3)])
    assert twins.reusing.logged.count("llava: 2 picture(s) in the prompt, 2 embedded") == 1
    assert twins.saved == first and twins.reusing.last_prefill > 258  # the new picture was computed


def test_a_different_picture_under_the_same_ids_is_not_reused(twins):
    """An API client sends the same history with another picture of the same size in turn 1: the same ids,
    another picture: the prefix reused ends where that picture begins."""
    before = "USER: Please look at this picture closely: "
    text = before + "{} What is it?\nASSISTANT: noise\nUSER: Sure?\nASSISTANT:"
    twins.generate(text.format(img_tag(picture(seed=4))), **TURN)
    twins.generate(text.format(img_tag(picture(seed=5))), **TURN)
    assert twins.saved == len(twins.reusing.encode(before)[0]) + 1  # BOS, the text, <im_start>


def test_embed_all_toggled_between_turns(twins):
    twins.chat("A long first question without any picture at all, to come before them", TURN, session="a")
    twins.chat("Both?", TURN, attachments=[picture(seed=6), picture(seed=7)], session="a")
    for host in (twins.reusing, twins.plain):
        host.choose_embed_all(True, session="a")
    twins.chat("Now with both?", TURN, session="a")
    assert twins.reusing.logged.count("llava: 2 picture(s) in the prompt, 2 embedded") == 1
    # the first picture now has its features where it had the plain embedding: reused up to its slots
    assert twins.saved == int((twins.reusing.last_prompt_ids[0] == PATCH_ID).nonzero()[0])


def again(host, prompt: str) -> str:
    """The webui's regenerate and continue: the chat's prompt generated from again, its pictures in the state."""
    return host.generate(prompt, host.state(image_attachments=host.image_attachments(), **TURN), is_chat=True)


def test_regenerate_continue_edit_and_branch(twins):
    twins.chat("A first question, with some words before the picture", TURN)
    twins.chat("What is this?", TURN, attachments=[picture(seed=8)])
    # regenerate: the same prompt again
    twins.each(lambda host: again(host, host.last_prompt))
    assert twins.saved == len(twins.reusing.last_prompt_ids[0]) - 1
    length = len(twins.reusing.last_prompt_ids[0])
    # continue: the prompt with the reply so far, and generation goes on from it
    twins.each(lambda host: again(host, host.last_prompt + " nois"))
    assert twins.saved >= length - 1
    # edit the second message ("this" becomes "that") and send it again: a branch from the edit on
    before = twins.reusing.last_prompt_ids[0]
    for host in (twins.reusing, twins.plain):
        host.history = {"internal": host.internal[:1], "visible": host.visible[:1], "metadata": {}}
    twins.chat("What is that?", TURN, attachments=[picture(seed=8)])
    after = twins.reusing.last_prompt_ids[0]
    assert twins.saved == int((before[:len(after)] != after[:len(before)]).nonzero()[0]) > 258


def test_history_trimming_that_drops_the_oldest_turn_reuses_nothing_wrong(twins):
    small = {"max_new_tokens": 6, "truncation_length": 600}
    twins.chat("first", small, attachments=[picture(seed=9)])
    twins.chat("second", small, attachments=[picture(seed=10)])
    twins.chat("third", small)  # the first turn no longer fits: the prompt now starts elsewhere
    assert int((twins.reusing.last_prompt_ids == PATCH_ID).sum()) == 256


def test_two_browser_sessions_interleaved(twins):
    twins.chat("Session a?", TURN, attachments=[picture(seed=11)], session="a")
    twins.chat("Session b?", TURN, attachments=[picture(seed=12)], session="b")
    twins.chat("Again a?", TURN, session="a")
    twins.chat("Again b?", TURN, session="b")
    assert twins.saved > 258


def test_api_clients_sending_their_whole_history_interleaved(twins):
    """Two clients, each sending its whole history each time, in turns: each reuses its own prefix."""
    first = "USER: {} What is it?\nASSISTANT:".format(img_tag(picture(seed=13)))
    second = "USER: {} What is it?\nASSISTANT:".format(img_tag(picture(seed=14)))
    replies = [twins.generate(first, **TURN), twins.generate(second, **TURN)]
    twins.generate(first + replies[0] + "\nUSER: More?\nASSISTANT:", **TURN)
    assert twins.saved > 258
    twins.generate(second + replies[1] + "\nUSER: More?\nASSISTANT:", **TURN)
    assert twins.saved > 258


def test_concurrent_generations_each_start_from_their_own_cache(host_factory, v0):
    """The webui generates one at a time, but its hooks and its generate run in different threads: each
    generation finds the cache its own hook left."""
    host = host_factory(model=v0.llm, tokenizer=v0.tokenizer, settings=v0.webui_settings())
    prompts = ["USER: {} What is it?\nASSISTANT:".format(img_tag(picture(seed=20 + i))) for i in range(4)]
    lock, replies = __import__("threading").Lock(), {}

    def ask(i):
        with lock:  # the webui's generation lock
            replies[i] = host.generate(prompts[i], host.state(stream=True, **TURN))

    assert run_in_threads(ask, 4) == []
    plain = host_factory(model=v0.llm, tokenizer=v0.tokenizer, settings=v0.webui_settings(prefix_cache_mb=0))
    assert [replies[i] for i in range(4)] == [plain.generate(p, plain.state(**TURN)) for p in prompts]


def test_the_webuis_other_settings_keep_their_meaning(twins):
    twins.chat("What is this?", TURN, attachments=[picture(seed=15)])
    twins.chat("Guided?", {**TURN, "guidance_scale": 1.5, "negative_prompt": "nothing"})
    twins.chat("Streamed?", {**TURN, "stream": True})
    assert twins.saved > 258
    twins.chat("Static?", {**TURN, "static_cache": True})
    assert twins.saved == 0  # the webui's own static cache: nothing is reused
    twins.chat("Up to the end?", {"max_new_tokens": 8, "truncation_length": 700, "auto_max_new_tokens": True})
    assert len(twins.reusing.last_prompt_ids[0]) + len(twins.reusing.last_reply_ids) <= 700


def test_text_only_generations_are_left_alone(twins):
    twins.chat("Hello there", TURN)
    twins.chat("And again", TURN)
    assert twins.saved == 0 and len(twins.reusing.extension.prefix_reuse.store) == 0


def test_the_cache_is_bounded_and_a_sessions_entries_go_with_it(host_factory, v0):
    host = host_factory(model=v0.llm, tokenizer=v0.tokenizer, settings=v0.webui_settings(prefix_cache_mb=1))
    store = host.extension.prefix_reuse.store
    for i in range(6):  # six browser sessions, a chat each
        host.history = {"internal": [], "visible": [], "metadata": {}}
        host.chat(f"Picture {i}?", host.state(**TURN), attachments=[picture(seed=30 + i)], session=f"s{i}")
        assert store.nbytes <= 2**20
    assert store.evictions > 0 and len(store) >= 1
    assert any("earlier prompts kept:" in line and "of at most 1.0 MB" in line for line in host.logged)
    assert "s5" in store.owners()
    owners_before = store.owners()
    host.gradio.fire("page", "unload", session="s5")  # its tab closed
    assert any(line.startswith("llava: a browser session ended; its 1 earlier prompt(s) (") for line in host.logged)
    assert store.owners() == owners_before - {"s5"} and "s5" not in host.extension.sessions


def test_a_prompt_larger_than_the_bound_is_said_and_not_kept(host_factory, v0):
    host = host_factory(model=v0.llm, tokenizer=v0.tokenizer, settings=v0.webui_settings(prefix_cache_mb=0.05))
    host.chat("What is this?", host.state(**TURN), attachments=[picture(seed=35)])
    assert len(host.extension.prefix_reuse.store) == 0
    said = [re.search(r"this prompt's cache \(([\d.]+) MB\) is larger than llava-prefix_cache_mb allows", line)
            for line in host.logged]
    sizes = [float(found[1]) for found in said if found]
    assert len(sizes) == 1 and sizes[0] > 0.05  # said once, with the size that did not fit


def test_the_device_decides_the_bound_when_the_setting_is_unset(v0):
    from extensions.llava.reuse.prefixes import default_megabytes
    memory_mb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20
    assert default_megabytes(v0.llm) == min(8192, memory_mb // 10)  # a tenth of the machine's, at most 8 GB


def test_loaders_that_drop_the_embeddings_keep_their_generate(host_factory, v0):
    host = host_factory(model=v0.llm, tokenizer=v0.tokenizer, settings=v0.webui_settings(), loader="ExLlamav3_HF")
    host.chat("What is this?", host.state(**TURN), attachments=[picture(seed=40)])
    host.chat("And now?", host.state(**TURN))
    assert len(host.extension.prefix_reuse.store) == 0 and host.last_prefill == len(host.last_prompt_ids[0])


def test_api_clients_with_a_cache_salt_own_their_entries(host_factory, v0):
    from testbed.fake_webui_api import AUTH
    host = host_factory(model=v0.llm, tokenizer=v0.tokenizer, settings=v0.webui_settings(), api=True)
    client = host.api.client()
    prompt = "USER: {} What is it?\nASSISTANT:".format(img_tag(picture(seed=15)))

    def reused(**extra) -> int:
        response = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, **extra}, headers=AUTH)
        assert response.status_code == 200, response.text
        return len(host.last_prompt_ids[0]) - host.last_prefill

    assert reused(cache_salt="alice") == 0
    assert reused(cache_salt="bob") == 0  # another salt: nothing of alice's
    assert reused() == 0  # no salt: the shared owner, nothing of alice's either
    everything_but_the_last = len(host.last_prompt_ids[0]) - 1
    assert reused(cache_salt="alice") == everything_but_the_last
    assert reused() == everything_but_the_last  # the shared owner's own entry
    response = client.post("/v1/completions", json={"prompt": prompt, "cache_salt": 5}, headers=AUTH)
    assert response.status_code == 400 and response.json()["error"]["message"] == "'cache_salt' must be a non-empty text"


def test_a_reused_entry_stays_for_its_owner_and_the_longer_one_replaces_it():
    from extensions.llava.reuse.kv_cache import RoomyCache
    from extensions.llava.reuse.positions import PositionKey
    from extensions.llava.reuse.prefixes import PrefixStore
    store = PrefixStore(2**30)

    def generation(ids: torch.Tensor) -> int:
        """What a generation of ``ids`` reused; its cache is then filled to all of ``ids`` and kept."""
        reuse = store.take("owner", PositionKey(ids), RoomyCache)
        start = reuse.reused
        for layer in range(2):
            reuse.cache.update(torch.randn(1, 2, len(ids) - start, 4), torch.randn(1, 2, len(ids) - start, 4), layer)
        store.put(reuse, ids)
        return start

    first = torch.arange(100)
    assert generation(first) == 0
    diverging = torch.cat([first[:40], torch.arange(500, 530)])
    assert generation(diverging) == 40 and len(store) == 2  # the first entry stayed, whole
    follow_up = torch.cat([first, torch.arange(600, 620)])
    assert generation(follow_up) == 100  # all of the first entry, not the 40 the diverging prompt shared
    assert len(store) == 2 and sorted(len(key.ids) for key in store.keys()) == [70, 120]


def test_a_cache_salt_keeps_a_pictures_features_its_own(host_factory, v0):
    """A picture seen before costs no encoding: with a salt, only the salt's own requests see it as seen."""
    from testbed.fake_webui_api import AUTH
    host = host_factory(model=v0.llm, tokenizer=v0.tokenizer, settings=v0.webui_settings(), api=True)
    client = host.api.client()

    def encoded(**extra) -> int:
        before = host.engine().counters.vision_forwards
        body = {"prompt": "x {} y".format(img_tag(picture(seed=16))), "max_tokens": 1, **extra}
        assert client.post("/v1/completions", json=body, headers=AUTH).status_code == 200
        return host.engine().counters.vision_forwards - before

    assert [encoded(cache_salt="alice"), encoded(cache_salt="bob"), encoded(), encoded(cache_salt="alice"), encoded()] \
        == [1, 1, 1, 0, 0]
