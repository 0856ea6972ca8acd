"""Settings: each bad value named with its key, the defaults as the settings template ships them, a bad
setting in the webui reported on use without breaking text generation, and validation only when a value
changed."""

import json
import os

import pytest

from extensions.llava.errors import LlavaError
from extensions.llava.settings import DEFAULTS, Settings, SettingsError, SettingsWatch
from testbed.tiny import embedded_line, img_tag, picture, two_pictures
from testbed.watch import record_calls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("key,value,allowed", [
    ("clip_bits", 8, "16 or 32"), ("projector_bits", "x", "16 or 32"),
    ("clip_device", "tpu:7", "allowed on this machine: cpu"), ("projector_device", "cuda:99", "cpu"),
    ("add_all_images_to_prompt", "maybe", "true or false"), ("cache_size_mb", -1, "0 or more"),
    ("preprocess", "crop", "as_trained, as_processor"),
    ("cache_size_mb", float("nan"), "0 or more"), ("cache_size_mb", float("inf"), "0 or more"),
    ("prefix_cache_mb", float("nan"), "0 or more"), ("prefix_cache_mb", float("-inf"), "0 or more"),
    ("projector_filename", "../../../../etc/passwd", "no '..', no absolute path"),
    ("projector_filename", "/etc/passwd", "no '..', no absolute path"),
    ("pipeline", "llava-v9", "allowed values: auto, llava-v0-13b"),
    ("clip_repo", "https://example.com/tower", "a Hub repo id (owner/name) or a local folder"),
    ("projector_repo", "http://example.com/p", "a Hub repo id (owner/name) or a local folder"),
])
def test_bad_settings_name_the_setting(key, value, allowed):
    with pytest.raises(SettingsError) as error:
        Settings.from_params({key: value})
    assert f"llava-{key}" in str(error.value) and allowed in str(error.value)


def test_every_bad_setting_is_named_at_once():
    with pytest.raises(SettingsError) as error:
        Settings.from_params({"cache_size_mb": float("nan"), "prefix_cache_mb": float("inf"), "clip_bits": 8})
    assert all(f"llava-{key}" in str(error.value) for key in ("cache_size_mb", "prefix_cache_mb", "clip_bits"))


def test_settings_defaults_match_template():
    with open(os.path.join(ROOT, "settings-template.json")) as f:
        template = json.load(f)
    assert template == {f"llava-{k}": v for k, v in DEFAULTS.items()}


def test_bad_setting_in_host_does_not_crash_and_reports_on_use(v0, host_factory):
    host = host_factory(model=v0.llm, tokenizer=v0.tokenizer, settings=v0.webui_settings(clip_bits=8))
    with pytest.raises(LlavaError) as error:
        host.generate("x " + img_tag(picture()))
    assert "llava-clip_bits" in str(error.value)
    # text-only generation is untouched by the bad setting: the same reply as with good settings
    reply = host.generate("text only", host.state(max_new_tokens=4))
    clean = host_factory(model=v0.llm, tokenizer=v0.tokenizer, settings=v0.webui_settings())
    assert reply == clean.generate("text only", clean.state(max_new_tokens=4))


@pytest.mark.parametrize("value,expected", [("false", False), ("true", True), (True, True), (False, False)])
def test_embed_all_setting_is_read_as_validated(v0, host_factory, value, expected):
    """A settings file may hold the text "false": it must not count as a true value."""
    host = host_factory(model=v0.llm, tokenizer=v0.tokenizer,
                        settings=v0.webui_settings(add_all_images_to_prompt=value))
    host.generate(two_pictures(), host.state(max_new_tokens=1))
    assert embedded_line(2, 2 if expected else 1) in host.logged


def test_settings_are_validated_only_when_they_change(monkeypatch):
    validated = record_calls(monkeypatch, Settings, "from_params", note=lambda params: dict(params))
    params = {"display_name": "LLaVA", **DEFAULTS, "clip_device": "cpu", "projector_device": "cpu"}
    watch = SettingsWatch(params)
    first = watch.current()
    assert all(watch.current() is first for _ in range(50)) and len(validated) == 1
    params["display_name"] = "renamed"  # not a setting of the extension's
    assert watch.current() is first and len(validated) == 1
    params["clip_bits"] = 16
    assert watch.current().clip_bits == 16 and len(validated) == 2
    assert watch.current().clip_bits == 16 and len(validated) == 2
    # a bad value keeps its error, without being validated again, until it changes
    params["clip_bits"] = 8
    for _ in range(3):
        with pytest.raises(SettingsError) as error:
            watch.current()
        assert str(error.value) == "llava-clip_bits is 8; allowed values: 16 or 32"
    assert len(validated) == 3
    params["clip_bits"] = "32"
    assert watch.current().clip_bits == 32 and len(validated) == 4
    assert [p["clip_bits"] for p in validated] == [32, 16, 8, "32"]


def test_the_host_validates_settings_only_when_they_change(v0, host, monkeypatch):
    validated = record_calls(monkeypatch, Settings, "from_params")
    for _ in range(3):
        host.generate("text only", host.state(max_new_tokens=1))
        host.generate("x " + img_tag(picture()), host.state(max_new_tokens=1))
        assert host.script.custom_tokenized_length("y " + img_tag(picture())) is not None
    assert validated == [] and host.engine().settings.embed_all is False
    host.script.params["add_all_images_to_prompt"] = True
    host.generate(two_pictures(), host.state(max_new_tokens=1))
    assert len(validated) == 1 and host.engine().settings.embed_all is True
    assert host.logged.count(embedded_line(2, 2)) == 1 and len(validated) == 1


@pytest.mark.parametrize("setting", ["clip_repo", "projector_repo"])
def test_a_tower_or_projector_that_does_not_load_names_its_setting(v0, host_factory, tmp_path, setting):
    host = host_factory(model=v0.llm, tokenizer=v0.tokenizer, settings=v0.webui_settings(**{setting: str(tmp_path)}))
    with pytest.raises(LlavaError) as error:
        host.generate("x " + img_tag(picture()))
    assert f"llava-{setting} is '{tmp_path}'" in str(error.value)


@pytest.mark.parametrize("value", [0, -3, 2.5, "many", float("nan")])
def test_the_item_limit_is_a_whole_number(value):
    with pytest.raises(SettingsError) as error:
        Settings.from_params({"max_items": value})
    assert "llava-max_items" in str(error.value) and "1 or more" in str(error.value)
