"""Make the decoder families' fixtures: tiny random models saved by transformers, and their fp32 references.

Usage (needs torch + transformers; the tests never import either):
    python tools/make_family_references.py [qwen2] [qwen3] [mistral] [phi3] [gemma2] [gpt2] [olmo2] [granite] [stablelm]

For each family, writes to tests/fixtures/:
  <family>-tiny/                 a randomly initialised *ForCausalLM (2 blocks, hidden 64, vocab 512) with the
                                 family's distinctive pieces switched on (a sliding window of 8 tokens, biases,
                                 q/k norms, longrope with short and long factors, soft-capping...), saved by transformers
  <family>_reference.json        the prompts (5, 12 and 20 tokens: two past the window) and transformers' greedy tokens
  <family>_reference.npz         logits_<i>: the prompt logits, float32 (T, vocab), eager attention in float32
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
PROMPT_LENGTHS = (5, 12, 20)  # the window is 8: the last two reach past it
WINDOW = 8
GREEDY_TOKENS = 8

WEIGHT_STD = {"phi3": 0.1}  # matrices' std, default 0.08: phi3's half-rotated heads give flat logits at 0.08 (argmax ties)

SEED = {"stablelm": 1}  # seed 0's 20-token prompt ends on a near-tie (a logit margin of 0.003) that int8 flips

COMMON: dict[str, Any] = {"vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2, "max_position_embeddings": 64}


def configs() -> dict[str, Any]:
    """Each family's transformers config, its distinctive pieces on."""
    rotary = COMMON | {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "rms_norm_eps": 1e-6}
    return {
        "qwen2": transformers.Qwen2Config(
            **rotary, num_key_value_heads=2, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, tie_word_embeddings=False
        ),
        "qwen3": transformers.Qwen3Config(
            **rotary, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True
        ),  # q width 128 != hidden 64
        "mistral": transformers.MistralConfig(**rotary, num_key_value_heads=1, sliding_window=WINDOW, tie_word_embeddings=False),
        "phi3": transformers.Phi3Config(
            **(rotary | {"max_position_embeddings": 64}),
            num_key_value_heads=2,
            sliding_window=WINDOW,
            original_max_position_embeddings=16,  # a 20-token prompt, and decoding past 16, switch to the long factors
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.3, 1.9, 2.5],
                "long_factor": [1.2, 2.0, 3.5, 6.0],
                "original_max_position_embeddings": 16,
            },
            pad_token_id=0,
            tie_word_embeddings=False,
        ),
        "gemma2": transformers.Gemma2Config(
            **rotary,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=WINDOW,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=8.0,
            hidden_activation="gelu_pytorch_tanh",
            pad_token_id=0,
        ),
        "olmo2": transformers.Olmo2Config(**rotary, num_key_value_heads=2, tie_word_embeddings=False),  # q/k norms across heads
        "granite": transformers.GraniteConfig(
            **rotary,
            num_key_value_heads=2,
            embedding_multiplier=3.0,
            attention_multiplier=0.2,
            residual_multiplier=0.5,
            logits_scaling=2.0,
            tie_word_embeddings=False,
        ),
        "stablelm": transformers.StableLmConfig(
            **{k: v for k, v in rotary.items() if k != "rms_norm_eps"},
            num_key_value_heads=2,
            use_qkv_bias=True,
            partial_rotary_factor=0.25,
            layer_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
        "gpt2": transformers.GPT2Config(
            vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2, activation_function="gelu_new"
        ),
    }


def make(family: str, config: Any) -> None:
    torch.manual_seed(SEED.get(family, 0))
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # the default init (std 0.02, unit norms, zero biases) hides mistakes; widen it
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, WEIGHT_STD.get(family, 0.08))
            else:
                parameter.add_(0.1 * torch.randn_like(parameter))
    folder = FIXTURES / f"{family}-tiny"
    model.save_pretrained(folder, safe_serialization=True)
    rng = np.random.default_rng(1)
    prompts = [[1, *rng.integers(3, config.vocab_size, length - 1).tolist()] for length in PROMPT_LENGTHS]
    logits, greedy = {}, []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            logits[f"logits_{i}"] = model(ids).logits[0].float().numpy().astype(np.float32)
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS, do_sample=False
            )
        greedy.append(out[0, len(prompt) :].tolist())
    np.savez_compressed(FIXTURES / f"{family}_reference.npz", **logits)
    (FIXTURES / f"{family}_reference.json").write_text(
        json.dumps({"prompts": prompts, "greedy": greedy, "torch": torch.__version__, "transformers": transformers.__version__})
    )
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"{family}: {size / 1e6:.2f} MB, greedy {greedy}")


if __name__ == "__main__":
    every = configs()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("families", nargs="*", metavar="FAMILY", help=f"of {', '.join(every)} (default: all)")
    chosen = parser.parse_args().families or list(every)
    unknown = [family for family in chosen if family not in every]
    if unknown:
        parser.error(f"no family {', '.join(unknown)}; the families: {', '.join(every)}")
    for family in chosen:
        make(family, every[family])
