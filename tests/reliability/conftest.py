"""One real DAG run over a folder of every kind of bad and odd input (shared by test_bad_inputs and test_security).

The folder holds the good specs too, so one `airflow dags test` (about a minute here) shows at once that each bad
spec gets its own reason and that the odd-but-valid ones (tiny, 4K, portrait, rotated, hostile strings) are
upsampled. Paths hold shell metacharacters on purpose; secret-looking values sit in the environment and the conf.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from include.cosmos_upsample.specs import id_from_file_name
from tests.helpers import latest_report, make_video, run_dag
from tests.reliability.invariants import tree_digest, tree_listing

# Model answers are kept short: these tests are about the pipeline, not the prose.
FAST = {"max_output_tokens": 64}
METACHAR_STEM = "a;rm -rf x $(touch pwned)"
NOT_UTF8_NAME = b"caf\xe9 spec.json"
XSS = '<script>alert("xss")</script><img src=x onerror=alert(1)> & "quoted"'
PWNED_NAMES = {"pwned", "pwned_prompt", "pwned_name", "pwned_path"}
SECRETS = {
    "AIRFLOW_VAR_COSMOS_UPSAMPLE_API_TOKEN": "sk-live-VARIABLE-9f8e7d6c5b4a",
    "COSMOS_UPSAMPLE_API_TOKEN": "sk-live-ENVIRON-1a2b3c4d5e6f",
    "AIRFLOW_CONN_COSMOS_GPU_SECRET": "ssh://cosmos:sk-live-CONNPASS-0a9b8c7d@gpu.invalid:22",
}
CONF_SECRET = ("api_token", "sk-live-PARAM-5e4d3c2b1a00")

# spec file stem -> words its `invalid` reason must hold (besides starting with the file's name)
BAD = {
    "broken": "broken JSON at line 1",
    "a_list": "JSON is a list, expected an object",
    "a_string": "JSON is a str, expected an object",
    "no_prompt": "missing prompt",
    "not_utf8": "not valid UTF-8",
    "bad_id": "not usable as a file name",
    "missing_video": "not found under input_dir",
    "no_video_path": "no input_video_path",
    "empty_video": "empty (0 bytes)",
    "truncated": "unreadable video",
    "truncated_faststart": "no frame could be decoded",
    "audio_only": "no video stream",
    "one_frame": "has 1 frame(s), fewer than num_frames=2",
    "png_as_mp4": "png_pipe, not as a video",
    "playlist": "hls, not as a video",
    "dotdot": "leaves input_dir",
    "absolute_outside": "leaves input_dir",
    "symlink_video": "leaves input_dir",
    "symlink_spec": "symlink to a file outside input_dir",
    "too_long": "over the budget",
    "dup_b": "duplicate id 'dup', already used by dup_a.json",
}
# spec file name -> the id its output is written under
GOOD = {
    f"{METACHAR_STEM}.json": id_from_file_name(METACHAR_STEM),
    "html.json": "html",
    "dup_a.json": "dup",
    "portrait.json": "portrait",
    "phone.json": "phone",
    os.fsdecode(NOT_UTF8_NAME): "caf_spec",
}


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


def spec(folder: Path, file_name: str, **fields) -> Path:
    path = folder / file_name
    path.write_text(json.dumps({"prompt": "A robot arm picks up a red cup.", **fields}))
    return path


def truncated_copy(source: Path, target: Path) -> None:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 3])


def make_videos(folder: Path, root: Path) -> None:
    make_video(folder / "v $(id).mp4", 16, 16, seconds=1)
    make_video(folder / "tiny.mp4", 32, 18, seconds=1)
    make_video(folder / "uhd.mp4", 3840, 2160, seconds=0.5)
    make_video(folder / "portrait.mp4", 720, 1280, seconds=1)
    make_video(root / "landscape.mp4", 1280, 720, seconds=1)
    # A phone clip: stored landscape, shown portrait through rotation metadata.
    ffmpeg("-i", str(root / "landscape.mp4"), "-c", "copy", "-metadata:s:v", "rotate=90", str(folder / "phone.mp4"))
    (folder / "empty.mp4").write_bytes(b"")
    make_video(root / "whole.mp4", 640, 360)
    truncated_copy(root / "whole.mp4", folder / "truncated.mp4")
    ffmpeg("-i", str(root / "whole.mp4"), "-c", "copy", "-movflags", "+faststart", str(root / "faststart.mp4"))
    truncated_copy(root / "faststart.mp4", folder / "truncated_faststart.mp4")
    ffmpeg("-f", "lavfi", "-i", "sine=duration=1", str(folder / "tone.m4a"))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=320x180:rate=12", "-frames:v", "1", "-c:v", "libx264",
           "-pix_fmt", "yuv420p", str(folder / "one_frame.mp4"))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=320x180", "-frames:v", "1", "-c:v", "png", "-f", "image2",
           str(folder / "still.mp4"))
    make_video(root / "outside.mp4", 64, 64)
    # A playlist that would make ffmpeg read a video outside input_dir.
    (folder / "playlist.mp4").write_text("#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\n../outside.mp4\n"
                                         "#EXT-X-ENDLIST\n")
    os.symlink(root / "outside.mp4", folder / "link.mp4")


def make_specs(folder: Path, root: Path) -> None:
    spec(folder, f"{METACHAR_STEM}.json", input_video_path="v $(id).mp4", name="x'; touch pwned_name; echo '",
         prompt=f"A robot arm picks up a red cup; $(touch {root}/pwned_prompt) `touch pwned_prompt` && rm -rf ~ |")
    spec(folder, "html.json", id="html", name="<b>bold</b>", input_video_path="tiny.mp4", prompt=f"A cup {XSS}")
    spec(folder, "dup_a.json", id="dup", input_video_path="uhd.mp4", guidance=7,
         nested={"a": [1, None, "x"]}, **{"x-custom": "keep me"})
    spec(folder, "dup_b.json", id="dup", input_video_path="tiny.mp4")
    spec(folder, "portrait.json", id="portrait", input_video_path=str(folder / "portrait.mp4"))
    spec(folder, "phone.json", id="phone", input_video_path="phone.mp4")
    (folder / os.fsdecode(NOT_UTF8_NAME)).write_text(json.dumps({"prompt": "A cup.", "input_video_path": "tiny.mp4"}))

    (folder / "broken.json").write_text('{"prompt": "A cup",')
    (folder / "a_list.json").write_text("[1, 2]")
    (folder / "a_string.json").write_text('"A robot arm picks up a red cup."')
    (folder / "no_prompt.json").write_text('{"input_video_path": "tiny.mp4"}')
    (folder / "not_utf8.json").write_bytes(b'{"prompt": "caf\xe9", "input_video_path": "tiny.mp4"}')
    spec(folder, "bad_id.json", id="../../escape", input_video_path="tiny.mp4")
    spec(folder, "missing_video.json", input_video_path="nope.mp4")
    spec(folder, "no_video_path.json")
    spec(folder, "empty_video.json", input_video_path="empty.mp4")
    spec(folder, "truncated.json", input_video_path="truncated.mp4")
    spec(folder, "truncated_faststart.json", input_video_path="truncated_faststart.mp4")
    spec(folder, "audio_only.json", input_video_path="tone.m4a")
    spec(folder, "one_frame.json", input_video_path="one_frame.mp4")
    spec(folder, "png_as_mp4.json", input_video_path="still.mp4")
    spec(folder, "playlist.json", input_video_path="playlist.mp4")
    spec(folder, "dotdot.json", input_video_path="../outside.mp4")
    spec(folder, "absolute_outside.json", input_video_path=str(root / "outside.mp4"))
    spec(folder, "symlink_video.json", input_video_path="link.mp4")
    # Its video is inside input_dir: only the spec file itself lies outside.
    spec(root, "outside_spec.json", input_video_path=str(folder / "tiny.mp4"))
    os.symlink(root / "outside_spec.json", folder / "symlink_spec.json")
    spec(folder, "too_long.json", input_video_path="tiny.mp4", prompt="A red cup " * 3000)


@dataclass
class HostileRun:
    root: Path
    input_dir: Path
    output_dir: Path
    before: dict[str, str]
    outside_before: set[str]
    output: str
    report: dict
    airflow_home: str
    secrets: list[str] = field(default_factory=list)

    def item(self, file_name: str) -> dict:
        [found] = [item for item in self.report["items"] if Path(item["source_path"]).name == file_name]
        return found

    def xcom_values(self) -> str:
        with sqlite3.connect(Path(self.airflow_home) / "airflow.db") as db:
            return "\n".join(str(row) for row in db.execute("SELECT * FROM xcom"))


@pytest.fixture(scope="session")
def hostile_run(airflow_home, tmp_path_factory) -> HostileRun:
    root = tmp_path_factory.mktemp("hostile")
    input_dir = root / "in $(touch pwned_path); `id` & 'q\""
    output_dir = root / "out $(touch pwned_path); & 'q\""
    input_dir.mkdir()
    make_videos(input_dir, root)
    make_specs(input_dir, root)
    before, outside_before = tree_digest(input_dir), tree_listing(root, output_dir)
    conf = {"input_dir": str(input_dir), "output_dir": str(output_dir), **FAST, CONF_SECRET[0]: CONF_SECRET[1]}
    # Some specs are invalid on purpose; they do not count as failures, so the run itself must succeed.
    result = run_dag(airflow_home, conf, extra_env=SECRETS)
    return HostileRun(root, input_dir, output_dir, before, outside_before, result.stdout + result.stderr,
                      latest_report(output_dir), airflow_home["AIRFLOW_HOME"],
                      [*SECRETS.values(), CONF_SECRET[1], "sk-live-CONNPASS-0a9b8c7d"])
