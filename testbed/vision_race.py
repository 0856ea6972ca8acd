"""The timed loop both vision benchmarks share: one chat turn's new pictures, ours against a reference.

Each turn starts from an empty feature cache (the tower and projector are loaded, and run once on a
small picture so that their weights are in memory, before the clock starts) and times
``PictureFeatures.features_for`` against the reference's processor and ``get_image_features``, per picture;
it prints the median of the repeats, the views and slots the turn's pictures take and whether the
features are equal within 1e-4.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

PHOTO_SIZE = (4000, 3000)


def save_projector(reference, folder: str) -> None:
    """The reference's mlp2x_gelu projector and image newline in the original checkpoints' names."""
    from safetensors.torch import save_file
    projector = reference.multi_modal_projector
    save_file({"model.mm_projector.0.weight": projector.linear_1.weight.detach(),
               "model.mm_projector.0.bias": projector.linear_1.bias.detach(),
               "model.mm_projector.2.weight": projector.linear_2.weight.detach(),
               "model.mm_projector.2.bias": projector.linear_2.bias.detach(),
               "model.image_newline": reference.image_newline.detach()},
              os.path.join(folder, "mm_projector.safetensors"))


def turn_pictures(photo, sizes: Sequence[tuple[int, int]]) -> list:
    """The turn's pictures: the decoded 12 MP photo where its size is asked for, flat test pictures elsewhere."""
    from testbed.tiny import picture
    return [photo if size == PHOTO_SIZE else picture(*size, seed=i) for i, size in enumerate(sizes)]


def race(turns: dict, photo, choice, settings, llm_width: int,
         reference_features: Callable[[list], list[torch.Tensor]], repeats: int) -> None:
    from extensions.llava.engine import LlavaEngine
    from extensions.llava.families import family_of, slot_count, view_count
    from extensions.llava.media.items import DecodedPicture
    from extensions.llava.prompt.parse import PlacedItem

    pipeline = choice.pipeline
    print(f"device {settings.clip_device}, {torch.get_num_threads()} threads; seconds per picture, median of {repeats}")
    print(f"{'turn':28} {'views':>5} {'slots':>6} {'ours':>8} {'reference':>10} {'ratio':>6}  equal")
    for name, sizes in turns.items():
        images = turn_pictures(photo, sizes)
        among = len(images)
        layouts = family_of(pipeline).arrange(pipeline, among)
        views = sum(view_count(pipeline, *image.size, among) for image in images)
        slots = sum(slot_count(pipeline, *image.size, among) for image in images)
        ours_times, reference_times = [], []
        for _ in range(repeats):
            engine = LlavaEngine(settings, log=lambda message: None)
            warm_up = PlacedItem(0, 0, 0, DecodedPicture(turn_pictures(photo, [(32, 32)])[0]))
            engine.features.features_for([warm_up], family_of(pipeline).arrange(pipeline, 1), choice, llm_width)  # loading, weights paged in included, is not timed
            refs = [PlacedItem(i + 1, 0, 0, DecodedPicture(image)) for i, image in enumerate(images)]
            start = time.perf_counter()
            ours = engine.features.features_for(refs, layouts, choice, llm_width)
            ours_times.append((time.perf_counter() - start) / len(images))
            start = time.perf_counter()
            theirs = reference_features(images)
            reference_times.append((time.perf_counter() - start) / len(images))
        equal = all(a.shape == b.shape and (a - b).abs().max().item() <= 1e-4 for a, b in zip(ours, theirs))
        ours_s, theirs_s = statistics.median(ours_times), statistics.median(reference_times)
        print(f"{name:28} {views:>5} {slots:>6} {ours_s:>8.2f} {theirs_s:>10.2f} {ours_s / theirs_s:>6.2f}  {equal}")


@dataclass(frozen=True)
class Contest:
    """What one benchmark names: its turns, its pipeline, and how it builds and runs its reference."""

    doc: str
    turns: dict
    pipeline: str
    build: Callable  # (folder, quick) -> (reference model, tower folder); writes the projector into folder
    processor: Callable  # () -> the reference's image processor
    features: Callable  # (reference, processor, images, device) -> the reference's features per picture
    repeats: int = 3


def main(contest: Contest, argv=None) -> int:
    from PIL import Image

    from extensions.llava.families.pipelines import PIPELINES
    from extensions.llava.families.recognise import Choice
    from extensions.llava.settings import Settings
    from testbed import tool_output
    from testbed.photos import make_photo

    parser = argparse.ArgumentParser(description=contest.doc.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=contest.repeats)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="a narrow tower, one run: checks the script")
    args = parser.parse_args(argv)
    tool_output.start(args.quick)
    if args.quick:
        args.repeats = 1
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as folder:
        reference, tower_dir = contest.build(folder, args.quick)
        reference.to(args.device)
        photo = Image.open(make_photo(os.path.join(folder, "photo.jpg"))).convert("RGB")
        choice = Choice(PIPELINES[contest.pipeline], "benchmark", vision_source=tower_dir, projector_repo=folder,
                        projector_filename="mm_projector.safetensors")
        settings = Settings.from_params({"clip_device": args.device, "projector_device": args.device})
        processor = contest.processor()
        race(contest.turns, photo, choice, settings, reference.config.text_config.hidden_size,
             lambda images: contest.features(reference, processor, images, args.device), args.repeats)
    return 0
