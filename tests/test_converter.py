"""``python -m extensions.llava convert``: original and llava-hf checkpoints of every family come out as
folders the webui loads, whose pictures give what transformers' LLaVA gives; a converter that cannot
convert refuses without leaving anything behind."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import LlavaForConditionalGeneration, MistralConfig

from extensions.llava.converter import convert as converter
from extensions.llava.families.recognise import read_metadata
from extensions.llava.families.pipelines import CLIP_336, NEXT_PINPOINTS, PIPELINES
from testbed.reference import assert_matches, compare_next, ours, reference_pixels
from testbed.tiny import (BosEncoder, convert_and_load, img_tag, load_folder, make_llm, make_tokenizer, picture,
                          quiet_engine, reference_run)
from testbed.tiny_family import IMAGE_ID, reference_v15, save_llava_hf, save_original, with_vocab
from testbed.tiny_next import SIZES, build_next, save_next_hf, save_next_original, save_tower

VISION_SIDE = ("image_size", "patch_size", "feature_count", "projector_type", "image_token", "start_token", "end_token",
               "preprocess", "vision_feature_layer", "keeps_cls", "grid_pinpoints")


def described_as(pipeline, name: str, width: int = 64) -> bool:
    """A tiny checkpoint's pipeline is read from its config (no named pipeline is 64 wide): it has the
    vision side of the named pipeline ``name`` and the tiny width."""
    named = PIPELINES[name]
    return pipeline.name.endswith("(from its config)") and pipeline.llm_hidden_size == width \
        and all(getattr(pipeline, k) == getattr(named, k) for k in VISION_SIDE)


def converted_pipeline(dst):
    return read_metadata(dst)["pipeline"]


def weight_map(folder: str, index: str = "model.safetensors.index.json") -> dict:
    with open(os.path.join(folder, index)) as f:
        return json.load(f)["weight_map"]


def assert_equals_reference(label, loaded, reference, clip_dir, images, pad: bool, template: str, vocab=None):
    """Our pipeline on the converted folder ``loaded`` (chosen by "auto") against ``reference`` on the
    prompt ``template`` with ``images`` in its places; ``vocab`` limits the logits compared to the
    reference's own vocabulary. Returns our engine."""
    engine = quiet_engine()
    prepared, logits = ours(engine, template.format(*(img_tag(image) for image in images)), loaded.model,
                            loaded.tokenizer)
    ref_embeds, ref_logits = reference_run(reference, prepared.input_ids, reference_pixels(clip_dir, images, pad))
    assert_matches(label, prepared.inputs_embeds, ref_embeds, logits[..., :vocab], ref_logits[..., :vocab])
    return engine


# ---------------------------------------------------------------- LLaVA v0 and v1.5


@pytest.mark.parametrize("style", ["new", "old"])
def test_llava_hf_round_trip(v15, v15_reference, tmp_path, style, capsys):
    src = save_llava_hf(str(tmp_path / "llava-1.5-7b-hf"), v15_reference, v15.tokenizer, v15.clip_dir, style=style)
    keys = weight_map(src)
    language_model = {"new": ("model.language_model.", "lm_head."), "old": ("language_model.",)}[style]
    assert any(k.startswith({"new": "model.language_model.", "old": "language_model.model."}[style]) for k in keys)
    assert any(k.startswith({"new": "model.vision_tower.", "old": "vision_tower.vision_model."}[style]) for k in keys)
    dst = str(tmp_path / "converted")
    assert converter.main([src, dst]) == 0
    out = capsys.readouterr().out
    assert "pipeline: read from the checkpoint's config (family v1.5)" in out and "llava-1.5-7b-hf (" not in out and "mm_projector.safetensors" in out and "vision_tower/" in out
    metadata = json.load(open(os.path.join(dst, "llava.json")))
    assert described_as(converted_pipeline(dst), "llava-v1.5-7b") and metadata["vision_tower"] == "vision_tower"
    assert metadata["projector"] == "mm_projector.safetensors" and metadata["added_tokens"] == []
    assert os.path.isfile(os.path.join(dst, "vision_tower", "preprocessor_config.json"))
    config = json.load(open(os.path.join(dst, "config.json")))
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert "processor_class" not in json.load(open(os.path.join(dst, "tokenizer_config.json")))
    # shard by shard: one written shard for each source shard that holds language model tensors
    shards = {name for key, name in keys.items() if key.startswith(language_model)}
    assert len(shards) > 1 and len([f for f in os.listdir(dst) if f.startswith("model-")]) == len(shards)

    loaded = load_folder(dst)
    assert loaded.tokenizer.convert_tokens_to_ids("<image>") == IMAGE_ID
    original = LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    engine = assert_equals_reference(f"llava-hf ({style} names) → converted", loaded, original, v15.clip_dir,
                                     [picture(90, 40, seed=21), picture(50, 50, seed=22)], True,
                                     "USER: {} and {} differ how? ASSISTANT:")
    assert described_as(engine.bind(loaded.model, loaded.tokenizer).choice.pipeline, "llava-v1.5-7b")


def test_llava_hf_linear_projector_round_trip(v0, v0_reference, tmp_path):
    """A v0 model in the llava-hf layout (projector_hidden_act linear, identity linear_2): the two
    linears are composed into one linear projector, which the v0 pipeline check accepts."""
    src = save_llava_hf(str(tmp_path / "llava-13b-v0-hf"), v0_reference, v0.tokenizer, v0.clip_dir, style="new",
                        max_shard_size=None)
    result, loaded = convert_and_load(src, str(tmp_path / "converted"))
    assert described_as(converted_pipeline(loaded.folder), "llava-v0-13b") and result["shards"] == 1
    engine = assert_equals_reference("llava-hf linear → converted", loaded, v0_reference, v0.clip_dir,
                                     [picture(80, 60, seed=3)], False, "Look {} now")
    vision = engine.features.vision_parts(loaded.bound(engine).choice)
    assert vision.parts.projector_type == "linear" and engine.counters.loads == 1


def test_original_v15_round_trip(v15, tmp_path):
    """Original layout, sharded .bin, tokenizer without <image>: the converter adds it."""
    plain = make_tokenizer(image_tokens=())
    llm = make_llm(len(plain), seed=31)
    src = save_original(str(tmp_path / "llava-v1.5-7b"), llm, v15.projector_state, plain, v15.clip_dir,
                        projector_type="mlp2x_gelu", start_end=False, fmt="bin", shards=3)
    result, loaded = convert_and_load(src, str(tmp_path / "converted"))
    dst = loaded.folder
    assert described_as(converted_pipeline(dst), "llava-v1.5-7b") and result["added_tokens"] == {"<image>": IMAGE_ID}
    assert result["vocab_size"] == IMAGE_ID + 1 and result["shards"] == 3
    assert json.load(open(os.path.join(dst, "llava.json")))["vision_tower"] == v15.clip_dir
    # shard by shard: each written shard holds exactly the language model tensors of one source shard
    source_map = weight_map(src, "pytorch_model.bin.index.json")
    groups = lambda mapping: sorted(sorted(k for k in mapping if mapping[k] == f and "mm_projector" not in k)
                                    for f in set(mapping.values()))
    assert groups(weight_map(dst)) == [g for g in groups(source_map) if g]

    model, tokenizer = loaded.model, loaded.tokenizer
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_ID and model.config.vocab_size == IMAGE_ID + 1
    for converted, original in ((model.model.embed_tokens.weight, llm.model.embed_tokens.weight),
                                (model.lm_head.weight, llm.lm_head.weight)):
        assert torch.equal(converted[:IMAGE_ID], original)
        assert torch.allclose(converted[IMAGE_ID], original.double().mean(0).float(), atol=1e-7)
    reference = reference_v15(SimpleNamespace(clip_dir=v15.clip_dir, llm=with_vocab(llm, IMAGE_ID + 1),
                                              projector_state=v15.projector_state))
    # the original model has no <image> row: compare over its own vocabulary
    assert_equals_reference("original v1.5 (.bin shards) → converted", loaded, reference, v15.clip_dir,
                            [picture(30, 70, seed=23)], True, "USER: {}\nDescribe. ASSISTANT:", vocab=IMAGE_ID)


def test_original_v0_round_trip(v0, v0_reference, tmp_path):
    """Original layout, sharded safetensors, start/end tokens already in the tokenizer."""
    src = save_original(str(tmp_path / "LLaVA-13b-v0"), v0.llm, v0.projector_state, v0.tokenizer, v0.clip_dir,
                        projector_type="linear", start_end=True, fmt="safetensors", shards=2, model_type="llava")
    result, loaded = convert_and_load(src, str(tmp_path / "converted"))
    assert described_as(converted_pipeline(loaded.folder), "llava-v0-13b")
    assert result["added_tokens"] == {} and result["vocab_size"] == 32003
    assert_equals_reference("original v0 (safetensors shards) → converted", loaded, v0_reference, v0.clip_dir,
                            [picture(70, 90, seed=4)], False, "What is {}?")


def test_original_mistral_round_trip(v15, tmp_path):
    """BakLLaVA's layout (llava_mistral): a MistralForCausalLM comes out, with the same logits."""
    from transformers import MistralForCausalLM
    torch.manual_seed(41)
    mistral = MistralForCausalLM(MistralConfig(vocab_size=len(v15.tokenizer), hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               rope_theta=1e6, sliding_window=None)).eval()
    src = save_original(str(tmp_path / "BakLLaVA-1"), mistral, v15.projector_state, v15.tokenizer, CLIP_336,
                        projector_type="mlp2x_gelu", start_end=False, fmt="safetensors", shards=2,
                        model_type="llava_mistral")
    result, loaded = convert_and_load(src, str(tmp_path / "converted"))
    assert described_as(converted_pipeline(loaded.folder), "bakllava-1") and result["vision_tower"] == CLIP_336
    model, tokenizer = loaded.model, loaded.tokenizer
    assert type(model).__name__ == "MistralForCausalLM" and model.config.rope_parameters["rope_theta"] == 1e6
    ids = BosEncoder(tokenizer)("a short text")
    with torch.no_grad():
        assert (model(ids).logits - mistral(ids).logits).abs().max().item() <= 1e-6
    choice = quiet_engine().bind(model, tokenizer).choice
    assert described_as(choice.pipeline, "bakllava-1") and choice.vision_source == CLIP_336


# ---------------------------------------------------------------- LLaVA-1.6


def test_original_next_layout_round_trip(next_reference, tmp_path):
    model, tokenizer = next_reference
    tower = save_tower(str(tmp_path / "clip-vit-large-patch14-336"), model)
    src = save_next_original(str(tmp_path / "llava-v1.6-vicuna-7b"), model, tokenizer, tower)
    _, loaded = convert_and_load(src, str(tmp_path / "converted"))
    row = json.load(open(os.path.join(loaded.folder, "llava.json")))["pipeline"]
    assert row["preprocess"] == "anyres" and [tuple(p) for p in row["grid_pinpoints"]] == list(NEXT_PINPOINTS)
    compare_next(loaded, next_reference, [picture(*SIZES["square"], seed=71)])


def test_llava_hf_next_mistral_round_trip(tmp_path):
    """llava-v1.6-mistral-7b-hf's layout: a MistralForCausalLM comes out, equal to the reference."""
    model, tokenizer = build_next(seed=52, mistral=True)
    assert model.config.text_config.model_type == "mistral"
    src = save_next_hf(str(tmp_path / "llava-v1.6-mistral-7b-hf"), model, tokenizer)
    _, loaded = convert_and_load(src, str(tmp_path / "converted"))
    assert type(loaded.model).__name__ == "MistralForCausalLM"
    compare_next(loaded, (model, tokenizer), [picture(*SIZES["tall"], seed=54)])


def test_llava_hf_round_trip_keeps_the_newline(next_converted, next_reference):
    from safetensors.torch import load_file
    saved = load_file(os.path.join(next_converted.folder, "mm_projector.safetensors"))
    assert torch.equal(saved["model.image_newline"], next_reference[0].model.image_newline.detach())
    assert json.load(open(os.path.join(next_converted.folder, "llava.json")))["pipeline"]["name"] \
        == "llava-v1.6-vicuna-7b-hf (from its config)"


# ---------------------------------------------------------------- refusals


def save_v0_original(v0, tmp_path) -> str:
    return save_original(str(tmp_path / "LLaVA-13b-v0"), v0.llm, v0.projector_state, v0.tokenizer, v0.clip_dir,
                         projector_type="linear", start_end=True, fmt="safetensors", shards=1)


def test_converter_refuses_to_overwrite(v0, tmp_path, capsys):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert converter.main([save_v0_original(v0, tmp_path), str(dst)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert os.listdir(dst) == ["keep.txt"] and (dst / "keep.txt").read_text() == "mine"


def test_converter_pipeline_mismatch_and_non_llava(v0, tmp_path, capsys):
    src = save_v0_original(v0, tmp_path)
    dst = tmp_path / "out"
    assert converter.main([src, str(dst), "--pipeline", "no-such-pipeline"]) == 1
    assert "unknown pipeline" in capsys.readouterr().err
    assert converter.main([src, str(dst), "--pipeline", "llava-v1.5-7b"]) == 1
    err = capsys.readouterr().err
    assert "llava-v1.5-7b" in err and "--pipeline" in err and "linear" in err
    assert not dst.exists()  # nothing half-written is left behind
    plain = tmp_path / "plain"
    v0.llm.save_pretrained(str(plain))
    assert converter.main([str(plain), str(dst)]) == 1
    assert "not a LLaVA checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------- hostile checkpoints, as a user runs the converter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _RunsCode:
    """A pickled object that would run code when unpickled (it prints a marker)."""

    def __reduce__(self):
        return print, ("UNPICKLED-AND-RAN",)


def run_converter(src: str, dst: str):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "extensions.llava", "convert", src, dst], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def _index_naming(folder: str, shard: str) -> None:
    index_path = os.path.join(folder, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    with open(index_path, "w") as f:
        json.dump(index, f)


def _config_with(folder: str, **values) -> None:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, **values}, f)


def _link_out(folder: str) -> None:
    shard = next(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    outside = os.path.join(os.path.dirname(folder), "elsewhere.safetensors")
    os.replace(os.path.join(folder, shard), outside)
    os.symlink(outside, os.path.join(folder, shard))


def _pickle_that_runs_code(folder: str) -> None:
    for name in os.listdir(folder):
        if name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".json")):
            os.remove(os.path.join(folder, name))
    torch.save({"model.embed_tokens.weight": _RunsCode()}, os.path.join(folder, "pytorch_model.bin"))


def _cut_config(folder: str) -> None:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text[:len(text) // 2])


@pytest.mark.parametrize("spoil,expected", [
    (lambda folder: _index_naming(folder, "../../../../etc/passwd"), "names the weight file '../../../../etc/passwd', "
                                                                    "which lies outside its folder"),
    (lambda folder: _index_naming(folder, "/etc/passwd"), "names the weight file '/etc/passwd', which lies outside"),
    (_link_out, "which lies outside its folder"),
    (lambda folder: _config_with(folder, vocab_size=10**12), "'vocab_size' is 1000000000000; expected a whole number "
                                                            "from 1 to 4,194,304"),
    (lambda folder: _config_with(folder, num_hidden_layers=-3), "'num_hidden_layers' is -3; expected a whole number"),
    (lambda folder: _config_with(folder, hidden_size="wide"), "'hidden_size' is 'wide'"),
    (_pickle_that_runs_code, "is not a plain tensor checkpoint, refused unread"),
    (_cut_config, "config.json' is not valid JSON"),
])
def test_a_hostile_checkpoint_is_refused_in_one_line(v0, tmp_path, spoil, expected):
    src = save_original(str(tmp_path / "checkpoint" / "LLaVA-13b-v0"), v0.llm, v0.projector_state, v0.tokenizer,
                        v0.clip_dir, projector_type="linear", start_end=True, fmt="safetensors", shards=2)
    spoil(src)
    dst = tmp_path / "out"
    result = run_converter(src, str(dst))
    lines = [line for line in result.stderr.splitlines() if line.startswith("llava convert:")]
    assert result.returncode == 1 and len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "UNPICKLED-AND-RAN" not in result.stdout + result.stderr
    assert not dst.exists()
