"""Calibration for progressive conversion: how many bits of each int8 matrix the coarse plane keeps.

``convert --progressive`` splits each int8 matrix of an execution step into coarse
levels (its top k = 8 - s bits, FORMAT.md "Progressive tensors") and a refinement.
How coarse a matrix may be depends on what it does (errors on the query and key
weights are squashed by the softmax; errors on the value, output and feed-forward
weights pass on nearly as they are) and on where it is (late layers matter more).
So the converter runs the quantized model, with the runtime itself, on a
calibration input (the sentences below, tokenized with the model's own tokenizer;
random token ids when it has none) and measures, per matrix t and shift s:

* the preview loss of t alone at its coarse levels: the mean 1 - cosine of the
  final output (the pooled embedding, or the logits) to the exact one, the steps
  after t's running on from its step's output;
* the zstd size of those levels.

A deeper model, where that would cost over ``MAX_PROPAGATED_STEPS`` step runs,
has the loss estimated instead as g_i D(t, s): step i's gain (the loss per unit of
relative noise energy added at its output, measured once per step) times the
relative change of the step's output with t coarse.

A greedy search then takes the choice with the fewest coarse bytes whose summed
loss stays within ``PREVIEW_LOSS``: each move makes one matrix one step coarser
(exact in pass 0, then s = 3, 4, 5), best bytes saved per loss added first. The
whole coarse model is then run once to record its measured cosine in the file.
Every step is handed over at once (the int8 values as read-only memory maps of
the converter's spill file, docs/memory.md); a step the runtime does not compute
(BERT's pooler) stays exact. ``CalibratedShifts`` is what the CLI passes to
``convert(calibrator=...)``: the converter itself imports nothing of the runtime.

On all-MiniLM-L6-v2 this picks a preview tier of 0.61 of the blocks' bytes with a
mean cosine of 0.983 to PyTorch fp32 on 64 other sentences, where every matrix at
5 bits (0.60 of the bytes) gives 0.980 (``python tools/bench_progressive.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zstandard

from .formats.progressive_convert import ShiftChoice
from .formats.quantize import coarse_levels
from .formats.writer import PLANE_ZSTD_LEVEL
from .layer import Layer
from .runtime import bert, decoder, ops

logger = logging.getLogger(__name__)

StoredPair = tuple[np.ndarray, np.ndarray | None]

PREVIEW_LOSS = 0.015
"""Estimated mean 1 - cosine of the preview to the exact result that the greedy search may spend on the calibration
input (``python tools/bench_progressive.py --loss 0.005,0.01,0.02`` measures what it gives on other inputs)."""

SHIFTS_TRIED = (3, 4, 5)
"""Coarse planes of 5, 4 and 3 bits. s = 1 or 2 would leave a refinement of 1 or 2 bits, whose zstd frames cost more
than the bits they hold (s = 2: 1.03-1.05x the file); a matrix too sensitive for s = 3 stays exact in pass 0."""

MAX_PLANE_OVERHEAD = 0.05
"""A shift is not tried for a matrix whose coarse and refinement planes would take over 5% more bytes than its int8
values (3 bits of Gaussian weights: 7% more; 4 and 5 bits: 2-3%)."""

MAX_PROPAGATED_STEPS = 2000
"""Step runs the end-to-end measurement may cost (a matrix and shift runs its step and every step after it); a deeper
model has each choice's loss estimated instead, as its step's gain times its output change."""

NOISE_PROBE = 1e-3
"""Relative noise energy injected at a step's output to measure its gain (small: the loss is linear there)."""

RANDOM_PROMPT_TOKENS = 64

LOSS_ROWS = 16
"""Rows of the outputs compared at a time: a Llama prompt's logits are (tokens, vocabulary), 0.23 GB for 450 tokens of
a 128,256-token vocabulary, and comparing them whole made three temporaries that size."""

CALIBRATION_TEXT = (
    "The committee postponed its decision until the auditors had finished reviewing the accounts.",
    "A heavy storm knocked out power across the northern suburbs late on Tuesday night.",
    "She learned to play the cello at forty and now performs with a community orchestra.",
    "Preheat the oven, grease the tin and fold the flour gently into the beaten eggs.",
    "The new firmware update fixes a bug that drained the battery while the phone was idle.",
    "Migrating birds use the earth's magnetic field to find their way across oceans.",
    "Our train was delayed by forty minutes because of a signal failure near the bridge.",
    "Quarterly revenue rose eight percent, driven mostly by subscriptions in Asia.",
    "He apologised for the misunderstanding and offered to refund the full amount.",
    "Glaciers in the Alps have lost roughly a third of their volume since the eighties.",
    "Which library should I use to parse dates with time zones in Python?",
    "The museum reopened after a two-year renovation with a new wing for modern sculpture.",
    "Children who read for pleasure tend to build a larger vocabulary over time.",
    "Please restart the router and wait until the green light stops blinking.",
    "The striker scored twice in the final ten minutes to win the cup for his club.",
    "Volcanic ash grounded hundreds of flights and stranded travellers for days.",
    "Interest rates were left unchanged, although two members voted for a cut.",
    "Wear sturdy boots; the trail is rocky and the last mile climbs steeply.",
    "A small bakery on the corner sells sourdough loaves that sell out by nine.",
    "The treaty limits fishing quotas and protects several endangered species of shark.",
    "My laptop fan gets loud whenever I compile the project with all optimisations on.",
    "Researchers sequenced the genome of a wheat variety that tolerates drought.",
    "The tenants' association demanded repairs to the heating before winter arrives.",
    "Ancient traders carried silk, spices and glassware along routes through the desert.",
)


def _pair_layer(index: int, tensors: Mapping[str, StoredPair]) -> Layer:
    """A runtime ``Layer`` over a step's arrays as the converter holds them (scales beside their matrix)."""
    arrays: dict[str, np.ndarray] = {}
    quant: dict[str, str] = {}
    for name, (values, scales) in tensors.items():
        arrays[name] = values
        if scales is not None:
            arrays[name + ".scales"] = scales
            quant[name] = name + ".scales"
    return Layer(index=index, name=f"layer {index}", tensors=arrays, quant=quant)


class CalibratedShifts:
    """A ``formats.convert.Calibrator``: made with (architecture, config, tokenizer JSON), called as the converter's
    ``ShiftChooser`` (see the module docstring)."""

    def __init__(self, architecture: str, config: Mapping[str, Any], tokenizer_json: bytes | None, *, loss: float | None = None) -> None:
        self.architecture = architecture
        self.config = dict(config)
        self.ids = self._calibration_ids(tokenizer_json)
        self.loss_budget = PREVIEW_LOSS if loss is None else loss
        self.table: StoredPair | None = None
        self.estimated_loss = 0.0  # of the choice made
        self.propagated = False  # whether each choice's loss was measured end to end (else estimated as gain x D)
        # an encoder's float32 weight copies, reused over the calibration's many passes (the exact steps' weights)
        self.float_weights = ops.FloatWeightCache(ops.default_float_weight_budget_bytes())

    def _calibration_ids(self, tokenizer_json: bytes | None) -> list[list[int]]:
        vocab = int(self.config.get("vocab_size", 0))
        if tokenizer_json is None:
            rng = np.random.default_rng(0)
            return [rng.integers(0, vocab, RANDOM_PROMPT_TOKENS).tolist()]
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        if self.architecture != "bert":  # one prompt of every sentence: a decoder's input is a running text
            return [tokenizer.encode(" ".join(CALIBRATION_TEXT)).ids[: int(self.config.get("max_position_embeddings", 512))]]
        return [e.ids for e in tokenizer.encode_batch(list(CALIBRATION_TEXT))]

    def __call__(self, steps: Sequence[Mapping[str, StoredPair]], table: StoredPair) -> ShiftChoice:
        self.table = table
        layers = [_pair_layer(i, tensors) for i, tensors in enumerate(steps)]
        inputs: list[Any] = []  # the state before each step
        outputs: list[np.ndarray | None] = []
        state: Any = None
        for index, layer in enumerate(layers):
            inputs.append(state)
            state, output = self._step(index, layer, state)
            outputs.append(output)
        final = self._final(state)
        options: list[tuple[int, str, list[tuple[int | None, int, float]]]] = []  # (step, name, [(shift, bytes, loss)])
        rng = np.random.default_rng(0)
        trials = sum(
            len(SHIFTS_TRIED) * (len(steps) - i) for i, t in enumerate(steps) for v, sc in t.values() if sc is not None and v.ndim == 2
        )
        self.propagated = trials <= MAX_PROPAGATED_STEPS
        for index, tensors in enumerate(steps):
            exact = outputs[index]
            if exact is None or index == 0:  # not computed, or the embeddings (added to every token as they are): exact
                continue
            energy = float(np.square(exact, dtype=np.float64).mean())
            gain = 0.0
            if not self.propagated:
                noisy = exact + rng.standard_normal(exact.shape).astype(np.float32) * np.float32(np.sqrt(NOISE_PROBE * energy))
                gain = self._loss(final, self._finish(index, noisy, inputs, layers)) / NOISE_PROBE
            for name, (values, scales) in tensors.items():
                if scales is None or values.ndim != 2:
                    continue
                plain_bytes = _zstd_size(values)
                choices: list[tuple[int | None, int, float]] = [(None, plain_bytes, 0.0)]
                for shift in SHIFTS_TRIED:
                    levels = coarse_levels(values, shift)
                    coarse_bytes = _zstd_size(levels)
                    if coarse_bytes + _zstd_size(values - levels) > (1 + MAX_PLANE_OVERHEAD) * plain_bytes:
                        continue  # two planes that cost too much more than one
                    trial = _pair_layer(index, dict(tensors) | {name: (levels, scales)})
                    _, output = self._step(index, trial, inputs[index])
                    assert output is not None
                    if self.propagated:  # the loss itself: the steps after this one run on from its output
                        loss = self._loss(final, self._finish(index, output, inputs, layers))
                    else:
                        loss = gain * float(np.square(output - exact, dtype=np.float64).mean()) / max(energy, 1e-30)
                    choices.append((shift, coarse_bytes, loss))
                options.append((index, name, choices))
        chosen = _allocate([choices for _, _, choices in options], self.loss_budget)
        shifts: list[dict[str, int]] = [{} for _ in steps]
        for (index, name, choices), pick in zip(options, chosen, strict=True):
            shift = choices[pick][0]
            if shift is not None:
                shifts[index][name] = shift
            self.estimated_loss += choices[pick][2]
        state = None
        for index, tensors in enumerate(steps):  # the preview as a client computes it: every matrix at its levels at once
            coarse = {
                name: (coarse_levels(pair[0], shifts[index][name]), pair[1]) if name in shifts[index] else pair
                for name, pair in tensors.items()
            }
            state, _ = self._step(index, _pair_layer(index, coarse), state)
        preview_cosine = 1.0 - self._loss(final, self._final(state))  # measured: the whole coarse model against the exact one
        logger.info(
            "progressive: coarse shifts %s, estimated preview loss %.4f, measured %.4f",
            [sorted(s.values()) for s in shifts],
            self.estimated_loss,
            1.0 - preview_cosine,
        )
        return ShiftChoice(shifts, preview_cosine)

    def _finish(self, index: int, output: np.ndarray, inputs: list[Any], layers: list[Layer]) -> Any:
        """The final state when step ``index`` put out ``output``: the steps after it run on from there."""
        state = self._with_output(index, inputs[index], output)
        for later in range(index + 1, len(layers)):
            state, _ = self._step(later, layers[later], state)
        return self._final(state)

    @staticmethod
    def _loss(exact: np.ndarray, other: np.ndarray) -> float:
        """Mean over rows of 1 - cosine, LOSS_ROWS rows at a time (each row's sums are the same whatever the block)."""
        exact, other = exact.reshape(-1, exact.shape[-1]), other.reshape(-1, other.shape[-1])
        dtype = np.result_type(exact, other)
        dots, norms = np.empty(len(exact), dtype), np.empty(len(exact), dtype)
        for start in range(0, len(exact), LOSS_ROWS):  # temporaries of a few rows, not of the whole (tokens, vocabulary) logits
            e, o = exact[start : start + LOSS_ROWS], other[start : start + LOSS_ROWS]
            dots[start : start + LOSS_ROWS] = (e * o).sum(axis=-1)
            norms[start : start + LOSS_ROWS] = np.linalg.norm(e, axis=-1) * np.linalg.norm(o, axis=-1)
        return float(np.mean(1.0 - dots / np.maximum(norms, 1e-30)))

    # ------------------------------------------------------------ the families' steps, as pure functions of a state

    def _step(self, index: int, layer: Layer, state: Any) -> tuple[Any, np.ndarray | None]:
        """(the state after step ``index``, its output) from the state before it; None for a step not computed."""
        if self.architecture == "bert":
            return self._step_bert(index, layer, state)
        return self._step_llama(index, layer, state)  # a decoder: Llama or a family described like it

    def _with_output(self, index: int, before: Any, output: np.ndarray) -> Any:
        """The state step ``index`` leaves when its output is ``output``."""
        if self.architecture == "bert":
            return (output, *before[1:])
        if index > int(self.config["num_hidden_layers"]):  # the head: its output is the logits
            return (before[0], before[1], output)
        return (before[0], output, before[2])

    def _final(self, state: Any) -> np.ndarray:
        if self.architecture == "bert":
            ht, _, shape, mask = state
            config = bert.BertConfig.from_manifest(self.config)
            return bert.pool(ht.T.reshape(*shape, ht.shape[0]), mask, config)
        return state[2]  # the logits

    def _step_bert(self, index: int, layer: Layer, state: Any) -> tuple[Any, np.ndarray | None]:
        config = bert.BertConfig.from_manifest(self.config)
        if index == 0:
            length = max(len(ids) for ids in self.ids)
            input_ids = np.full((len(self.ids), length), config.pad_token_id, dtype=np.int64)
            mask = np.zeros_like(input_ids)
            for row, ids in enumerate(self.ids):
                input_ids[row, : len(ids)], mask[row, : len(ids)] = ids, 1
            batch = bert.EncodedBatch(input_ids, np.zeros_like(input_ids), mask)
            assert self.table is not None
            values, scales = self.table
            h = bert.embed_tokens(layer, (values[input_ids], None if scales is None else scales[input_ids]), batch, config)
            mask_bias = ((1 - mask) * np.float32(-1e9)).astype(np.float32)[:, None, None, :]
            ht = np.ascontiguousarray(h.reshape(-1, h.shape[-1]).T)  # no padding columns: the losses compare every column
            return (ht, mask_bias, input_ids.shape, mask), ht
        if index <= config.num_hidden_layers:
            ht, mask_bias, shape, mask = state
            out = bert.encoder_block(layer, ht, mask_bias, index - 1, config, shape, self.float_weights)
            return (out, mask_bias, shape, mask), out
        return state, None

    def _step_llama(self, index: int, layer: Layer, state: Any) -> tuple[Any, np.ndarray | None]:
        config = decoder.DecoderConfig.from_manifest(self.config)
        if index == 0:
            ids = np.asarray(self.ids[0], dtype=np.int64)
            assert self.table is not None
            values, scales = self.table
            runner = decoder.DecoderRunner(config, len(ids))
            x = runner.embed((values[ids], None if scales is None else scales[ids]), layer)
            return (runner, x, None), x
        runner, x, _ = state
        if index <= config.num_hidden_layers:
            runner.cache.length = 0  # every call is the same prefill: it rewrites its own block's KV cache
            out = runner.block(layer, x, index - 1)
            return (runner, out, None), out
        tied = config.layout.lm_head not in layer
        table = _pair_layer(index, {config.layout.embed_tokens: self.table}) if tied and self.table is not None else None
        logits = runner.head(layer, table, x)
        return (runner, x, logits), logits


def _zstd_size(values: np.ndarray) -> int:
    """Bytes of ``values`` as the writer stores a plane: zstd at PLANE_ZSTD_LEVEL, in chunks of 1 MiB."""
    data = memoryview(np.ascontiguousarray(values)).cast("B")
    compressor = zstandard.ZstdCompressor(level=PLANE_ZSTD_LEVEL)
    return sum(len(compressor.compress(data[start : start + (1 << 20)])) for start in range(0, len(data), 1 << 20))


def _allocate(options: Sequence[Sequence[tuple[int | None, int, float]]], budget: float) -> list[int]:
    """Per matrix, which of its (shift, bytes, loss) options to take: greedily one step coarser at a time, the move
    that saves the most bytes per loss added first, while the summed loss stays within ``budget``."""
    picks = [0] * len(options)
    spent = 0.0
    while True:
        best, best_rate = None, -1.0
        for t, choices in enumerate(options):
            if picks[t] + 1 >= len(choices):
                continue
            saved = choices[picks[t]][1] - choices[picks[t] + 1][1]
            added = choices[picks[t] + 1][2] - choices[picks[t]][2]
            if saved <= 0 or spent + added > budget:
                continue
            rate = saved / max(added, 1e-12)
            if rate > best_rate:
                best, best_rate = t, rate
        if best is None:
            return picks
        spent += options[best][picks[best] + 1][2] - options[best][picks[best]][2]
        picks[best] += 1
