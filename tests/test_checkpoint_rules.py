"""A checkpoint whose parts do not belong together, or not to the pipeline, is one clear error that says
what is wrong and what to change: each rule of ``checkpoint_rules`` by itself, then the mismatches a
user meets when the vision parts load at the first picture."""

from __future__ import annotations

from dataclasses import replace

import pytest

from extensions.llava.errors import LlavaError
from extensions.llava.vision.checkpoint_rules import RULES, Parts, check, problems
from extensions.llava.families.pipelines import PIPELINES
from testbed.tiny import img_tag, make_llm, make_tokenizer, picture, prepare, save_projector

TOWER_WIDTH = 1024  # CLIP ViT-L/14's


def fitting(pipeline) -> Parts:
    """Parts that fit ``pipeline`` in every respect a rule looks at."""
    return Parts(projector_type=pipeline.projector_type, projector_in=TOWER_WIDTH,
                 projector_out=pipeline.llm_hidden_size,
                 newline_shape=(pipeline.llm_hidden_size,) if pipeline.anyres else None, tower_width=TOWER_WIDTH,
                 tower_grid=pipeline.feature_count - pipeline.keeps_cls, tower_image_size=pipeline.image_size,
                 llm_width=pipeline.llm_hidden_size, config_width=TOWER_WIDTH,
                 feature_layer=pipeline.vision_feature_layer, keeps_cls=pipeline.keeps_cls,
                 activation="linear" if pipeline.projector_type == "linear" else "gelu",
                 image_token=pipeline.image_token, start_end=pipeline.start_token is not None)


V15, V0, NEXT = PIPELINES["llava-v1.5-7b"], PIPELINES["llava-v0-13b"], PIPELINES["llava-v1.6-vicuna-7b"]
KEEPS_CLS = replace(V15, name="keeps-cls", keeps_cls=True, feature_count=577)

# pipeline, what differs from parts that fit it, and the one rule that is then broken: its kind and words
# (one row per rule, in no particular order)
BROKEN = [
    (V15, {"tower_width": 768}, "parts", "the projector takes 1024-wide features but the vision tower gives 768-wide "
                                         "ones (pipeline llava-v1.5-7b)"),
    (NEXT, {"newline_shape": (5120,)}, "parts", "the image_newline has shape (5120,); the projector gives 4096-wide "
                                                "features"),
    (V15, {"config_width": 768}, "parts", "the projector takes 1024-wide features but mm_hidden_size is 768 "
                                          "(pipeline llava-v1.5-7b)"),
    (V15, {"keeps_cls": True}, "pipeline", "the checkpoint keeps the CLS feature but pipeline llava-v1.5-7b drops it"),
    (V15, {"llm_width": 5120}, "parts", "the projector gives 4096-wide features but the language model's embeddings "
                                        "are 5120 wide (pipeline llava-v1.5-7b)"),
    (V15, {"image_token": "<im_patch>"}, "pipeline", "the checkpoint puts image features at '<im_patch>' but pipeline "
                                                     "llava-v1.5-7b uses '<image>'"),
    (V15, {"tower_grid": 256}, "pipeline", "the vision tower gives 256 patches per image but pipeline llava-v1.5-7b "
                                           "has 576 image slots"),
    (V15, {"start_end": True}, "pipeline", "the checkpoint uses image start/end tokens but pipeline llava-v1.5-7b "
                                           "does not"),
    (V15, {"tower_image_size": 224}, "pipeline", "the vision tower sees 224 px views but pipeline llava-v1.5-7b makes "
                                                 "336 px ones"),
    (V15, {"projector_type": "linear"}, "pipeline", "the projector is linear but pipeline llava-v1.5-7b uses mlp2x_gelu"),
    (V15, {"feature_layer": -1}, "pipeline", "the checkpoint takes vision features from layer -1 but pipeline "
                                             "llava-v1.5-7b uses layer -2"),
    (V15, {"activation": "silu"}, "pipeline", "the projector uses the activation 'silu'; pipeline llava-v1.5-7b (like "
                                              "every LLaVA release) uses exact GELU, so it cannot be used faithfully"),
    (NEXT, {"newline_shape": None}, "pipeline", "pipeline llava-v1.6-vicuna-7b tiles pictures and ends each row of "
                                                "tiles with the model's image_newline feature, but the checkpoint has none"),
    (KEEPS_CLS, {"keeps_cls": False}, "pipeline", "the checkpoint drops the CLS feature but pipeline keeps-cls keeps it"),
    (V0, {"start_end": False}, "pipeline", "the checkpoint does not use image start/end tokens but pipeline "
                                           "llava-v0-13b does"),
    (V15, {"newline_shape": (4096,)}, "pipeline", "the checkpoint is a LLaVA-1.6 one (it has an image_newline) but "
                                                  "pipeline llava-v1.5-7b does not tile pictures"),
]


@pytest.mark.parametrize("name", [*PIPELINES, "keeps-cls"])
def test_parts_that_fit_their_pipeline_break_no_rule(name):
    pipeline = PIPELINES.get(name, KEEPS_CLS)
    assert problems(fitting(pipeline), pipeline) == []
    # parts whose files say nothing more than the projector's shape break no rule either
    if not pipeline.anyres:
        assert problems(Parts(pipeline.projector_type, TOWER_WIDTH, pipeline.llm_hidden_size), pipeline) == []


@pytest.mark.parametrize("pipeline,change,kind,says", BROKEN,
                         ids=[f"{pipeline.name}-{next(iter(change))}" for pipeline, change, *_ in BROKEN])
def test_each_rule_says_what_is_wrong(pipeline, change, kind, says):
    assert problems(replace(fitting(pipeline), **change), pipeline) == [(kind, says)]


def test_every_rule_is_in_the_table():
    assert len(BROKEN) == len(RULES) == len({says for *_, says in BROKEN})


def test_check_raises_the_first_problem_with_the_fix_for_its_kind():
    parts = replace(fitting(V15), llm_width=5120, image_token="<im_patch>", projector_type="linear")
    assert [kind for kind, _ in problems(parts, V15)] == ["pipeline", "parts", "pipeline"]  # in the order of RULES
    with pytest.raises(LlavaError) as error:
        check(parts, V15, {"parts": "fix the files", "pipeline": "choose another pipeline"}, where="folder x")
    assert str(error.value) == "folder x: the projector is linear but pipeline llava-v1.5-7b uses mlp2x_gelu; " \
                               "choose another pipeline"
    with pytest.raises(LlavaError) as error:
        check(replace(fitting(V15), llm_width=5120), V15, {"parts": "fix the files", "pipeline": "other pipeline"})
    assert str(error.value) == "the projector gives 4096-wide features but the language model's embeddings are " \
                               "5120 wide (pipeline llava-v1.5-7b); fix the files"
    check(fitting(V15), V15, {})  # nothing broken: nothing raised


# ---------------------------------------------------------------- met at the first picture


def first_picture_error(model, **kwargs) -> str:
    """The error that preparing a prompt with a picture raises, with ``model``'s settings and ``kwargs``
    (``llm``, ``tokenizer`` or settings) changed."""
    llm, tokenizer = kwargs.pop("llm", model.llm), kwargs.pop("tokenizer", model.tokenizer)
    with pytest.raises(LlavaError) as error:
        prepare(model.engine(**kwargs), "x " + img_tag(picture()), llm, tokenizer)
    return str(error.value)


@pytest.mark.parametrize("name", ["v0", "v15"])
def test_projector_width_mismatch_is_one_clear_error(request, name):
    model = request.getfixturevalue(name)
    message = first_picture_error(model, llm=make_llm(len(model.tokenizer), width=96))
    assert "64-wide" in message and "96 wide" in message and f"(pipeline {model.pipeline})" in message
    assert "wrong model" in message and "set llava-pipeline" in message


@pytest.mark.parametrize("name,tokens", [("v0", "<im_patch>, <im_start>, <im_end>"), ("v15", "<image>")])
def test_tokenizer_without_image_tokens_is_one_clear_error(request, name, tokens):
    model = request.getfixturevalue(name)
    message = first_picture_error(model, tokenizer=make_tokenizer(image_tokens=()))
    assert message == f"the loaded tokenizer has no {tokens} token(s), which pipeline {model.pipeline} needs: wrong " \
                      "model or wrong pipeline (set llava-pipeline, or convert the checkpoint with " \
                      "`python user_data/extensions/llava convert SRC DST` from the webui's root)"


def test_mismatch_feature_count(v15, v0):
    """A 224 px tower (256 features) under a v1.5 pipeline (576 slots)."""
    message = first_picture_error(v15, clip_repo=v0.clip_dir)
    assert "256 patches" in message and "576 image slots" in message and "llava-v1.5-7b" in message
    assert "llava-clip_repo" in message and "llava-pipeline" in message


def test_mismatch_projector_type(v15, tmp_path):
    """A linear (v0-style) projector under v1.5."""
    save_projector(str(tmp_path / "mm_projector.bin"), "linear")
    message = first_picture_error(v15, projector_repo=str(tmp_path))
    assert "linear" in message and "mlp2x_gelu" in message and "llava-v1.5-7b" in message
    assert "llava-pipeline" in message
