"""The converter's memory against the size of the checkpoint it converts.

    python tools/benchmark_convert.py [--layers 4 12] [--quick]

Writes llava-hf LLaVA-1.6-mistral-shaped checkpoints with random float16 weights at the real widths
(hidden 4096, MLP 14336, vocabulary 32064, a CLIP ViT-L/14-336 tower, the mlp2x_gelu projector and
the image newline) in 1 GB shards, one per number of language layers given; converts each in a
process of its own, and prints the checkpoint's size, the converter's peak resident memory and
its time. The peak should stay near one shard plus the tower, whatever the checkpoint's size.
``--quick`` uses narrow widths and 4 MB shards: it checks that the script still runs (CI runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from testbed import tool_output  # noqa: E402

REAL = dict(hidden=4096, mlp=14336, vocab=32064, heads=32, kv_heads=8, tower=1024, tower_mlp=4096, tower_layers=24,
            shard_bytes=1 << 30)
QUICK = dict(hidden=256, mlp=512, vocab=32064, heads=4, kv_heads=2, tower=64, tower_mlp=128, tower_layers=2,
             shard_bytes=4 << 20)


def shapes(size: dict, layers: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint and its shape, in the llava-hf names of transformers 5."""
    h, m, kv = size["hidden"], size["mlp"], size["hidden"] // size["heads"] * size["kv_heads"]
    out = {"model.language_model.embed_tokens.weight": (size["vocab"], h), "lm_head.weight": (size["vocab"], h),
           "model.language_model.norm.weight": (h,), "model.image_newline": (h,),
           "model.multi_modal_projector.linear_1.weight": (h, size["tower"]),
           "model.multi_modal_projector.linear_1.bias": (h,),
           "model.multi_modal_projector.linear_2.weight": (h, h), "model.multi_modal_projector.linear_2.bias": (h,)}
    for i in range(layers):
        layer = f"model.language_model.layers.{i}."
        out.update({layer + "self_attn.q_proj.weight": (h, h), layer + "self_attn.k_proj.weight": (kv, h),
                    layer + "self_attn.v_proj.weight": (kv, h), layer + "self_attn.o_proj.weight": (h, h),
                    layer + "mlp.gate_proj.weight": (m, h), layer + "mlp.up_proj.weight": (m, h),
                    layer + "mlp.down_proj.weight": (h, m), layer + "input_layernorm.weight": (h,),
                    layer + "post_attention_layernorm.weight": (h,)})
    out.update(tower_shapes(size))
    return out


def tower_shapes(size: dict) -> dict[str, tuple[int, ...]]:
    from transformers import CLIPVisionConfig, CLIPVisionModel
    config = CLIPVisionConfig(**tower_config(size))
    with torch.device("meta"):
        tower = CLIPVisionModel(config)
    return {"model.vision_tower." + key: tuple(value.shape) for key, value in tower.state_dict().items()}


def tower_config(size: dict) -> dict:
    return dict(hidden_size=size["tower"], intermediate_size=size["tower_mlp"], num_hidden_layers=size["tower_layers"],
                num_attention_heads=16 if size["tower"] >= 1024 else 2, image_size=336, patch_size=14,
                projection_dim=768)


def write_checkpoint(folder: str, size: dict, layers: int) -> int:
    """A random float16 checkpoint in shards of about ``shard_bytes``; returns its bytes."""
    from safetensors.torch import save_file

    from testbed.tiny import make_tokenizer
    from testbed.tiny_next import PINPOINTS
    os.makedirs(folder)
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, shard_bytes, total, number = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, shard_bytes, number
        number += 1
        name = f"model-{number:05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
        shard, shard_bytes = {}, 0

    for key, shape in shapes(size, layers).items():
        tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.float16)
        shard[key], shard_bytes, total = tensor, shard_bytes + tensor.nbytes, total + tensor.nbytes
        if shard_bytes >= size["shard_bytes"]:
            flush()
    if shard:
        flush()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    text = dict(model_type="mistral", hidden_size=size["hidden"], intermediate_size=size["mlp"],
                num_hidden_layers=layers, num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"],
                vocab_size=size["vocab"], max_position_embeddings=4096)
    config = dict(model_type="llava_next", architectures=["LlavaNextForConditionalGeneration"], text_config=text,
                  vision_config=dict(model_type="clip_vision_model", **tower_config(size)), image_token_index=32000,
                  vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                  image_grid_pinpoints=[list(p) for p in PINPOINTS], dtype="float16")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    make_tokenizer(image_tokens=("<image>",)).save_pretrained(folder)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        from testbed.tiny import processor_config
        json.dump(processor_config(336), f)
    return total


def convert_peak(src: str, dst: str) -> tuple[float, float]:
    """(peak resident GiB, seconds) of ``python -m extensions.llava convert SRC DST`` in a process of its own."""
    started = time.perf_counter()
    # VmHWM is the peak of this process's own memory (ru_maxrss would carry the parent's over the fork)
    done = subprocess.run([sys.executable, "-c", (
        "import sys; from extensions.llava.converter.convert import main; code = main(sys.argv[1:]); "
        "print('peak-kb', next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM'))); "
        "sys.exit(code)"), src, dst],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"the converter failed:\n{done.stdout}\n{done.stderr}")
    peak_kb = int(done.stdout.rsplit("peak-kb", 1)[1].split()[0])
    return peak_kb / 2**20, time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 12])
    parser.add_argument("--quick", action="store_true", help="narrow widths, small shards: checks the script")
    args = parser.parse_args(argv)
    tool_output.start(args.quick)
    size = QUICK if args.quick else REAL
    tower_bytes = sum(2 * torch.Size(shape).numel() for shape in tower_shapes(size).values())
    print(f"shards of {size['shard_bytes'] / 2**30:.3f} GiB; the tower holds {tower_bytes / 2**30:.2f} GiB")
    with tempfile.TemporaryDirectory() as folder:
        for layers in args.layers:
            src, dst = os.path.join(folder, f"src-{layers}"), os.path.join(folder, f"dst-{layers}")
            total = write_checkpoint(src, size, layers)
            peak, seconds = convert_peak(src, dst)
            print(f"{layers:3d} language layers: checkpoint {total / 2**30:.2f} GiB, converter peak {peak:.2f} GiB, "
                  f"{seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
