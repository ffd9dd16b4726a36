"""Generated PromptSpec folders: many specs over a handful of shared clips, prompts of varied length."""

from __future__ import annotations

import json
import random
from pathlib import Path

from bench.clips import place

SUBJECTS = ("A robot arm", "A forklift", "A humanoid robot", "A delivery drone", "An autonomous car", "A dog")
ACTIONS = ("picks up a red cup", "moves a pallet", "wipes a kitchen counter", "flies over a rocky coast",
           "crosses a busy street", "opens a drawer")
PLACES = ("in a warehouse", "on a cluttered table", "at sunrise", "in light rain", "in a bright kitchen",
          "under street lights")
DETAILS = ("The camera stays still.", "Reflections move on the floor.", "Dust drifts in the light.",
           "A person walks past in the background.", "The motion is slow and careful.")


def prompt_text(rng: random.Random) -> str:
    """A short Cosmos-style prompt with 0-12 extra sentences, so token counts (and hint sizes) vary."""
    words = [f"{rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} {rng.choice(PLACES)}."]
    words += [rng.choice(DETAILS) for _ in range(rng.randint(0, 12))]
    return " ".join(words)


def write_specs(folder: Path, count: int, clips: list[Path], seed: int = 0) -> list[Path]:
    """`count` spec files in folder, the clips hard-linked into folder/videos and shared round-robin."""
    rng = random.Random(seed)
    videos = [place(clip, folder / "videos") for clip in clips]
    paths = []
    for index in range(count):
        spec = {"id": f"spec-{index:05d}", "name": f"bench {index}", "prompt": prompt_text(rng),
                "negative_prompt": "blurry", "input_video_path": f"videos/{videos[index % len(videos)].name}",
                "metadata": {"source": "bench"}}
        path = folder / f"spec-{index:05d}.json"
        path.write_text(json.dumps(spec), encoding="utf-8")
        paths.append(path)
    return paths
