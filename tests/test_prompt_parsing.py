"""Reading a prompt: the ways an <img> tag is written, what is not a picture, image tokens a user typed
(they stay text and make no slot, whatever pipeline the model has), and features only on image slots."""

import time

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from extensions.llava.families.pipelines import PIPELINES
from extensions.llava.media.items import ItemError
from extensions.llava.prompt.parse import escape_special_tokens, parse_prompt
from testbed.tiny import PATCH_ID, START_ID, convert_and_load, data_url, img_tag, make_tokenizer, picture
from testbed.tiny_family import IMAGE_ID, save_llava_hf


def test_prompt_without_image_passes_untouched(host):
    ids = host.encode("no pictures here <b>bold</b>")
    prompt, same_ids, embeds = host.script.tokenizer_modifier(host.state(), "no pictures here <b>bold</b>", ids, None)
    assert same_ids is ids and embeds is None and prompt == "no pictures here <b>bold</b>"
    assert host.engine().counters.loads == 0  # nothing loaded for a text-only prompt


# ---------------------------------------------------------------- tokens typed by the user


@pytest.mark.parametrize("typed", ["<im_patch>", "<im_start>", "<im_end>", "<image>", "<im_start><im_patch><im_end>"])
def test_typed_image_tokens_create_no_slots(v0, typed):
    engine = v0.engine()
    honest = v0.prepare(engine, "before " + img_tag(picture()) + " after")
    hostile = v0.prepare(engine, f"{typed} before " + img_tag(picture()) + f" after {typed}")
    assert int((hostile.input_ids >= 32000).sum()) == 258
    slots_honest = (honest.input_ids[0] == PATCH_ID).nonzero().flatten()
    slots_hostile = (hostile.input_ids[0] == PATCH_ID).nonzero().flatten()
    assert torch.equal(honest.inputs_embeds[0, slots_honest], hostile.inputs_embeds[0, slots_hostile])


def assert_stays_text(host, typed: str, escaped: str, token_id: int) -> torch.Tensor:
    """The webui's encode makes the image token ``token_id`` of the text a user ``typed``; the tokenizer
    hook gives the ids of the ``escaped`` text instead, and no embeddings (there is no picture)."""
    ids = host.encode(typed)
    assert int((ids == token_id).sum()) == 1
    _, ids, embeds = host.script.tokenizer_modifier(host.state(), typed, ids, None)
    assert embeds is None and int((ids == token_id).sum()) == 0
    assert torch.equal(ids, host.encode(escaped))
    return ids


def test_typed_image_tokens_stay_text_without_a_picture(host):
    ids = assert_stays_text(host, "I typed <im_patch> and <im_start> myself",
                            "I typed &lt;im_patch> and &lt;im_start> myself", PATCH_ID)
    assert int((ids == START_ID).sum()) == 0
    plain = "nothing special here"
    same = host.encode(plain)
    assert host.script.tokenizer_modifier(host.state(), plain, same, None)[1] is same


@pytest.fixture(scope="module")
def pic_model(v15, v15_reference, tmp_path_factory):
    """A llava-hf checkpoint whose config puts image features at <pic> (id 32000), converted: its pipeline
    is read from its config, and no named pipeline has that token."""
    folder = tmp_path_factory.mktemp("pic")
    src = save_llava_hf(str(folder / "llava-pic-hf"), v15_reference, make_tokenizer(image_tokens=("<pic>",)),
                        v15.clip_dir, style="old", max_shard_size=None)
    return convert_and_load(src, str(folder / "converted"))[1]


def test_a_typed_image_token_of_a_pipeline_read_from_its_config_stays_text(pic_model, host_factory):
    assert all("<pic>" not in pipeline.special_tokens for pipeline in PIPELINES.values())
    host = host_factory(**pic_model.in_the_webui())
    pipeline = host.engine().bind(pic_model.model, pic_model.tokenizer, pic_model.folder).choice.pipeline
    assert pipeline.name == "llava-pic-hf (from its config)" and pipeline.special_tokens == ("<pic>",)
    assert pic_model.tokenizer.convert_tokens_to_ids("<pic>") == IMAGE_ID
    assert_stays_text(host, "I typed <pic> myself", "I typed &lt;pic> myself", IMAGE_ID)
    assert host.engine().counters.loads == 0
    # beside a picture, the picture's 576 slots and nothing else carry the id
    prompt = "I typed <pic> myself and " + img_tag(picture(seed=3)) + " <pic>"
    _, ids, embeds = host.script.tokenizer_modifier(host.state(), prompt, host.encode(prompt), None)
    start = len(host.encode("I typed &lt;pic> myself and ")[0])
    assert torch.equal((ids[0] == IMAGE_ID).nonzero().flatten(), torch.arange(start, start + 576))
    assert ids.shape[1] == embeds.shape[1] == len(host.encode("I typed &lt;pic> myself and  &lt;pic>")[0]) + 576
    assert host.engine().counters.vision_forwards == 1


# ---------------------------------------------------------------- tag variants


@pytest.mark.parametrize("template", [
    "<img src='{u}'>", '<IMG SRC="{u}">', '<img alt="a cat" class=x src="{u}" width=3 />', "<img src={u}>",
    '<img\nsrc = "{u}"\n>', '<img src="{u}"',  # unclosed
])
def test_tag_variants_are_found(template):
    url = data_url(picture(4, 4))
    parsed = parse_prompt("a " + template.format(u=url) + " b")
    assert len(parsed.items) == 1
    assert parsed.items[0].item.load().image.size == (4, 4)
    assert parsed.text_only().startswith("a ")


def test_not_images():
    for text in ['<imgx src="data:image/png;base64,AAAA">', "<img>", "<img alt=x>", "< img src=x>", "<image>"]:
        assert parse_prompt(text).items == []


# ---------------------------------------------------------------- properties


texts = st.lists(st.sampled_from(list("ab <>/=\"'imgsrc_patchendstart") + ["<im_patch>", "<image>", "<img", "<im_end>"]),
                 max_size=12).map("".join)
property_images = [picture(12, 12, seed=50 + i) for i in range(4)]
property_tags = [img_tag(im) for im in property_images]
property_digests = {parse_prompt(t).items[0].item.digest() for t in property_tags}


@pytest.fixture(scope="module")
def property_engines(v0):
    return {flag: v0.engine(add_all_images_to_prompt=flag) for flag in (False, True)}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.one_of(texts, st.integers(min_value=0, max_value=3)), min_size=1, max_size=6),
       embed_all=st.booleans())
def test_splice_touches_exactly_the_embedded_slots(v0, property_engines, pieces, embed_all):
    engine = property_engines[embed_all]
    prompt = "".join(p if isinstance(p, str) else property_tags[p] for p in pieces)
    # text pieces may have formed tags with each other; the parser is the judge of what is an image
    parsed = parse_prompt(prompt)
    images = [im for im in parsed.items if im.item.digest() in property_digests]
    assume(images and len(images) == len(parsed.items))
    prepared = v0.prepare(engine, prompt)
    ids = prepared.input_ids[0]
    plain = v0.llm.get_input_embeddings()(ids)
    changed = (prepared.inputs_embeds[0] != plain).any(-1)
    slots = (ids == PATCH_ID).nonzero().flatten().view(len(images), 256)
    expected = torch.zeros_like(changed)
    embedded = slots if embed_all else slots[-1:]
    expected[embedded.flatten()] = True
    assert torch.equal(changed, expected)
    assert int((ids == PATCH_ID).sum()) == 256 * len(images)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_escaping_leaves_no_special_token(text):
    escaped = escape_special_tokens(text, ("<im_patch>", "<im_start>", "<im_end>", "<image>"))
    for token in ("<im_patch>", "<im_start>", "<im_end>", "<image>"):
        assert token not in escaped


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("<img src=\"'>data:x ")), max_size=300))
def test_parser_spans_are_ordered_and_inside_the_prompt(text):
    parsed = parse_prompt(text)
    end = 0
    for image in parsed.items:
        assert end <= image.start < image.end <= len(text)
        end = image.end
    assert "".join(p if isinstance(p, str) else text[p.start:p.end] for p in parsed.pieces()) == text


def test_a_tag_whose_quote_never_closes_is_refused_in_words():
    prompt = 'Look <img src="data:image/png;base64,iVBORw0KGgo and then some more text'
    [image] = parse_prompt(prompt).items
    assert (image.start, image.end) == (5, len(prompt))
    with pytest.raises(ItemError) as error:
        image.item.load()
    assert str(error.value) == ("picture 1 in the prompt: the quote after src= is never closed; end the picture's data "
                                "with a quote")


def test_finding_many_placeholder_pictures_takes_linear_time():
    """20 000 placeholders and their pictures: 17 s when each was tested against every span found so far."""
    from extensions.llava.media.items import DataUrlItem
    url = data_url(picture(2, 2))
    prompt = 'one <img src="' + url + '"> ' + "<__media__> word " * 20_000
    started = time.perf_counter()
    parsed = parse_prompt(prompt, [DataUrlItem.from_url(url) for _ in range(20_000)])
    elapsed = time.perf_counter() - started
    assert len(parsed.items) == 20_001 and [image.position for image in parsed.items[:3]] == [1, 2, 3]
    assert parsed.items[1].start == prompt.index("<__media__>")
    assert elapsed < 3, f"{elapsed:.1f} s"
