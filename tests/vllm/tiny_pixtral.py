"""Write a tiny random-weight Pixtral in Mistral's native format: `python tiny_pixtral.py OUT_DIR`.

Runs under <root>/.venv-vllm's python (torch, safetensors, mistral-common). The folder has the layout of
nvidia/Cosmos-UpsamplePrompt1-12B-Transfer (`params.json`, `consolidated.safetensors`, `tekken.json`), so vLLM
loads it with tokenizer_mode/config_format/load_format "mistral" exactly as it loads the real model, but with 34M
parameters (68 MB) instead of 12B. Weights come from a fixed seed: the same bytes on every run.
"""

from __future__ import annotations

import json
import shutil
import sys
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

SEED = 0
PARAMS = {
    "dim": 128,
    "n_layers": 2,
    "head_dim": 32,
    "hidden_dim": 256,
    "n_heads": 4,
    "n_kv_heads": 2,
    "rope_theta": 1e9,
    "norm_eps": 1e-5,
    "vocab_size": 131072,
    "max_position_embeddings": 8192,
    "vision_encoder": {
        "hidden_size": 64,
        "num_channels": 3,
        "image_size": 1024,
        "patch_size": 16,
        "rope_theta": 1e4,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_token_id": 10,
        "image_break_token_id": 12,
        "image_end_token_id": 13,
        "adapter_bias": True,
    },
}
# Pixtral-12B-2409's tokenizer; it has the image section (patch 16, max 1024, tokens 10/12/13) that
# tekken_240718.json lacks.
TEKKEN = "tekken_240911.json"


def _layer_shapes(prefix: str, dim: int, hidden: int, heads: int, kv_heads: int, head_dim: int) -> dict:
    return {
        f"{prefix}.attention.wq.weight": (heads * head_dim, dim),
        f"{prefix}.attention.wk.weight": (kv_heads * head_dim, dim),
        f"{prefix}.attention.wv.weight": (kv_heads * head_dim, dim),
        f"{prefix}.attention.wo.weight": (dim, heads * head_dim),
        f"{prefix}.attention_norm.weight": (dim,),
        f"{prefix}.ffn_norm.weight": (dim,),
        f"{prefix}.feed_forward.w1.weight": (hidden, dim),
        f"{prefix}.feed_forward.w2.weight": (dim, hidden),
        f"{prefix}.feed_forward.w3.weight": (hidden, dim),
    }


def tensor_shapes(params: dict) -> dict[str, tuple[int, ...]]:
    dim, vocab = params["dim"], params["vocab_size"]
    vision = params["vision_encoder"]
    vdim, vheads = vision["hidden_size"], vision["num_attention_heads"]
    patch = vision["patch_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "tok_embeddings.weight": (vocab, dim),
        "norm.weight": (dim,),
        "output.weight": (vocab, dim),
    }
    for n in range(params["n_layers"]):
        shapes |= _layer_shapes(f"layers.{n}", dim, params["hidden_dim"], params["n_heads"], params["n_kv_heads"],
                                params["head_dim"])
    shapes["vision_encoder.patch_conv.weight"] = (vdim, vision["num_channels"], patch, patch)
    shapes["vision_encoder.ln_pre.weight"] = (vdim,)
    for n in range(vision["num_hidden_layers"]):
        shapes |= _layer_shapes(f"vision_encoder.transformer.layers.{n}", vdim, vision["intermediate_size"], vheads,
                                vheads, vdim // vheads)
    shapes |= {
        "vision_language_adapter.w_in.weight": (dim, vdim),
        "vision_language_adapter.w_in.bias": (dim,),
        "vision_language_adapter.w_out.weight": (dim, dim),
        "vision_language_adapter.w_out.bias": (dim,),
    }
    return shapes


def random_weights(params: dict, seed: int = SEED) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in tensor_shapes(params).items():
        if name.endswith("norm.weight") or name.endswith("ln_pre.weight"):
            tensor = torch.ones(shape)
        else:
            tensor = torch.randn(shape, generator=generator) * 0.02
        weights[name] = tensor.to(torch.bfloat16).contiguous()
    return weights


def write_model(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "params.json").write_text(json.dumps(PARAMS, indent=2) + "\n")
    save_file(random_weights(PARAMS), str(out_dir / "consolidated.safetensors"))
    with resources.as_file(resources.files("mistral_common") / "data" / TEKKEN) as tekken:
        shutil.copyfile(tekken, out_dir / "tekken.json")
    return out_dir


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tiny_pixtral.py OUT_DIR", file=sys.stderr)
        return 2
    print(write_model(Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
