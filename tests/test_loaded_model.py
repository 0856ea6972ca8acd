"""The loaded model's context: bound once per loaded model (its pipeline, vocabulary and image-token ids
worked out once, not at every request), and never what keeps an unloaded model in memory."""

from __future__ import annotations

import gc
import weakref

from testbed.tiny import BosEncoder, img_tag, picture


class CountingVocab:
    """A tokenizer whose ``get_vocab`` calls are counted."""

    def __init__(self, tokenizer):
        self.inner, self.calls = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def get_vocab(self):
        self.calls += 1
        return self.inner.get_vocab()


def test_the_vocabulary_is_built_once_per_loaded_tokenizer(v0):
    engine = v0.engine()
    tokenizer = CountingVocab(v0.tokenizer)
    for turn in range(3):
        loaded = engine.bind(v0.llm, tokenizer, encode=BosEncoder(v0.tokenizer))
        prepared = engine.prepare(f"turn {turn} " + img_tag(picture(seed=turn)), loaded)
        assert prepared.input_ids.shape[1] == len(BosEncoder(v0.tokenizer)(f"turn {turn} ")[0]) + 258
        assert engine.token_count("again " + img_tag(picture(seed=turn)), loaded) is not None
    assert tokenizer.calls == 1


def test_a_binding_does_not_keep_an_unloaded_model(v0):
    import copy
    engine = v0.engine()
    model = copy.deepcopy(v0.llm)
    engine.prepare("x " + img_tag(picture()), engine.bind(model, v0.tokenizer, encode=BosEncoder(v0.tokenizer)))
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


def test_another_model_gets_its_own_binding(v0, v15):
    engine = v0.engine()
    first = engine.bind(v0.llm, v0.tokenizer)
    assert engine.bind(v0.llm, v0.tokenizer) is first
    assert engine.bind(v15.llm, v15.tokenizer) is not first
