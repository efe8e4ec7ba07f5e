"""`Predictor(model, tokenizer)`: FlagAI's generation API for Aquila, plus batch, streaming and chat forms.

Prompt encoding: pretraining documents are `[BOS] text [EOS]` (BOS = `[CLS]`, `tokenizer.token_start_id`), so a
text prompt is encoded as `[BOS] + tokenizer.encode(text)` (FlagAI omitted the BOS, issue #389). Chat prompts are
`[BOS] + encode(render_prompt(messages))`, the same template and BOS rule as SFT training. `prompts_tokens` are
used exactly as given. Generation ends at EOS (`</s>`) or unk/pad (id 0), like FlagAI, or at a stop string.

Every method builds `Request`s and decodes them with the core (`aquila.inference.generate.DecodeBatch`), each call
in a KV block pool of its own; the model is shared, so one thread at a time (the server's engine thread owns the
model instead).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from aquila.chat_template import DEFAULT_SYSTEM, STOP_STRINGS, render_prompt
from aquila.errors import AquilaError
from aquila.inference.generate import (
    Completion,
    DecodeBatch,
    Request,
    beam_search,
    cache_length,
    check_request,
    model_device,
    run,
)
from aquila.inference.kv_cache import BlockPool
from aquila.inference.sampling import SamplingParams
from aquila.inference.sequence import SequenceState
from aquila.inference.text import TextAssembler
from aquila.typed_config import is_int

__all__ = ["Completion", "Predictor", "Request", "TextAssembler", "TextStream", "chat_messages"]


class TextStream:
    """Iterate for text pieces; afterwards `completion` holds the finish reason, ids and full text."""

    def __init__(self, batch: DecodeBatch, seq: SequenceState) -> None:
        self._batch, self._seq = batch, seq
        self._steps = self._run()

    @property
    def completion(self) -> Completion:
        return self._seq.completion

    def _run(self) -> Iterator[str]:
        while not self._seq.finished:
            for _, piece in self._batch.step():
                yield piece

    def __iter__(self) -> Iterator[str]:
        for piece in self.steps():
            if piece:
                yield piece

    def steps(self) -> Iterator[str]:
        """One piece per generated token (often ""), so a consumer can stop between any two tokens."""
        yield from self._steps

    def close(self) -> None:
        """Stop early: the completion ends with finish_reason "length"."""
        self._steps.close()
        self._batch.cancel(self._seq, "length")


def _as_stop_list(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    if not all(isinstance(s, str) for s in stop):
        raise AquilaError("stop must be a string or a list of strings")
    return tuple(s for s in stop if s)


def _check_max_new(n: object, name: str = "out_max_length") -> int:
    if not is_int(n, 1):
        raise AquilaError(f"{name} must be an integer >= 1, got {n!r}")
    return n


class Predictor:
    def __init__(self, model: torch.nn.Module, tokenizer, compile: bool = False) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.compile = compile
        self.bos_id = _token_id(tokenizer, "token_start_id", "cls")
        self.eos_id = _token_id(tokenizer, "token_end_id", "sep")
        self.unk_id = _token_id(tokenizer, "token_unk_id", "unk")
        self.stop_ids = tuple(dict.fromkeys((self.eos_id, self.unk_id)))

    # --- prompts -------------------------------------------------------------------------------------------------
    def encode_prompt(self, text: str, input_max_length: int | None = None) -> list[int]:
        """[BOS] + encode(text); if longer than input_max_length, BOS + the last input_max_length-1 tokens."""
        if not isinstance(text, str):
            raise AquilaError(f"prompt must be a string, got {type(text).__name__}")
        if not text:
            raise AquilaError("prompt is empty")
        ids = [self.bos_id, *self.tokenizer.encode(text)]
        if input_max_length is not None:
            if not is_int(input_max_length, 2):
                raise AquilaError(f"input_max_length must be an integer >= 2, got {input_max_length!r}")
            if len(ids) > input_max_length:
                ids = [self.bos_id, *ids[len(ids) - input_max_length + 1 :]]
        return ids

    def encode_chat(
        self,
        messages: str | Sequence[dict],
        history: Sequence | None = None,
        instruction: str | None = None,
        system: str | None = DEFAULT_SYSTEM,
    ) -> list[int]:
        """[BOS] + encode(render_prompt(history + messages)): the SFT template."""
        return [
            self.bos_id,
            *self.tokenizer.encode(render_prompt(chat_messages(messages, history), instruction, system)),
        ]

    def _prompt_ids(self, text: str | None, prompts_tokens, input_max_length: int | None) -> list[int]:
        if prompts_tokens is None:
            return self.encode_prompt(text, input_max_length)
        ids = list(prompts_tokens)
        if len(ids) == 1 and isinstance(ids[0], (list, tuple, torch.Tensor)):
            ids = list(ids[0])  # FlagAI passes a batch of one
        ids = [int(t) for t in ids]
        if not ids:
            raise AquilaError("prompts_tokens is empty")
        return ids

    # --- the one request type and the core -------------------------------------------------------------------
    def request(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        params: SamplingParams | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        strip: bool = False,
        logprobs: bool = False,
    ) -> Request:
        """A checked `Request` that ends at this tokenizer's EOS/unk ids or a stop string."""
        r = Request(
            tuple(int(t) for t in prompt_ids),
            _check_max_new(max_new_tokens),
            params or SamplingParams(),
            seed,
            _as_stop_list(stop),
            self.stop_ids,
            strip,
            logprobs,
        )
        check_request(self.model, r)
        return r

    def _batch(self, requests: Sequence[Request]) -> DecodeBatch:
        need = max(len(r.prompt) + r.max_new_tokens for r in requests)
        max_len = cache_length(need, self.model.args.max_seq_len)
        bs = BlockPool.BLOCK_SIZE  # the pool holds what the requests can reach, in whole blocks each
        positions = sum(-(-min(len(r.prompt) + r.max_new_tokens, max_len) // bs) * bs for r in requests)
        pool = BlockPool.for_model(self.model, positions)
        return DecodeBatch(self.model, len(requests), max_len, self.tokenizer, compile=self.compile, pool=pool)

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """Decode requests together (one row each); each result is what the request gives alone."""
        if not requests:
            raise AquilaError("no prompts given")
        return run(self._batch(requests), requests)

    def stream(self, request: Request) -> TextStream:
        """One request as text pieces (never splitting a character)."""
        batch = self._batch([request])
        return TextStream(batch, batch.add(request))

    def complete(self, prompt_ids: Sequence[int], max_new_tokens: int, params: SamplingParams, **kwargs) -> Completion:
        """One id prompt: text, ids, finish reason and (`logprobs=True`) per-token log-probabilities."""
        return self.generate([self.request(prompt_ids, max_new_tokens, params, **kwargs)])[0]

    def beam(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        beam_size: int,
        stop: str | Sequence[str] | None = None,
        strip: bool = False,
    ) -> str:
        """Beam search over one id prompt; the best hypothesis' text, cut at the first stop string."""
        if not is_int(beam_size, 1):
            raise AquilaError(f"beam_size must be an integer >= 1, got {beam_size!r}")
        r = self.request(prompt_ids, max_new_tokens, stop=stop, strip=strip)
        text = TextAssembler(self.tokenizer, r.stop, r.strip)
        text.push(beam_search(self.model, r.prompt, r.max_new_tokens, beam_size, self.stop_ids))
        text.finish()
        return text.text

    @torch.no_grad()
    def score(self, prompt_ids: Sequence[int]) -> list[float]:
        """Log-probability of each prompt token after the ones before it (len(prompt_ids) - 1 values)."""
        ids = [int(t) for t in prompt_ids]
        check_request(self.model, Request(tuple(ids), 1))
        x = torch.tensor([ids], device=model_device(self.model))
        logits = self.model(x)["logits"][0, :-1]  # a plain forward: the KV cache is not touched
        return torch.log_softmax(logits, -1).gather(1, x[0, 1:, None]).squeeze(1).tolist()

    # --- FlagAI's API ------------------------------------------------------------------------------------------------
    def predict_generate_randomsample(
        self,
        text: str | None,
        input_max_length: int = 256,
        out_max_length: int = 200,
        top_k: int = 30,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        temperature: float = 1.0,
        prompts_tokens: Sequence[int] | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> str:
        """Sample a continuation of `text` (temperature 0 = greedy). Returns the generated text only."""
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
        ids = self._prompt_ids(text, prompts_tokens, input_max_length)
        return self.complete(ids, out_max_length, params, seed=seed, stop=stop).text

    def predict_generate_batch(
        self,
        texts: Sequence[str],
        input_max_length: int = 256,
        out_max_length: int = 200,
        top_k: int = 30,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        temperature: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> list[str]:
        """predict_generate_randomsample for a list of prompts, decoded together (one cache row each)."""
        if isinstance(texts, str) or not texts:
            raise AquilaError("texts must be a non-empty list of prompts")
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
        requests = [
            self.request(self.encode_prompt(t, input_max_length), out_max_length, params, seed, stop) for t in texts
        ]
        return [c.text for c in self.generate(requests)]

    def predict_generate_stream(
        self,
        text: str | None,
        input_max_length: int = 256,
        out_max_length: int = 200,
        top_k: int = 30,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        temperature: float = 1.0,
        prompts_tokens: Sequence[int] | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> Iterator[str]:
        """predict_generate_randomsample as a generator of text pieces; they join to the same text."""
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
        ids = self._prompt_ids(text, prompts_tokens, input_max_length)
        return iter(self.stream(self.request(ids, out_max_length, params, seed, stop)))

    def predict_generate_beamsearch(
        self, text: str, input_max_length: int = 256, out_max_length: int = 100, beam_size: int = 1
    ) -> str:
        """Beam search (length-normalised, ends when beam_size hypotheses have ended); beam 1 is greedy."""
        return self.beam(self.encode_prompt(text, input_max_length), out_max_length, beam_size)

    # --- chat ------------------------------------------------------------------------------------------------------
    def predict_chat(
        self,
        messages: str | Sequence[dict],
        history: Sequence | None = None,
        instruction: str | None = None,
        system: str | None = DEFAULT_SYSTEM,
        out_max_length: int = 200,
        top_k: int = 30,
        top_p: float = 0.95,
        repetition_penalty: float = 1.0,
        temperature: float = 0.8,
        seed: int | None = None,
    ) -> str:
        """The assistant's answer (stripped) to a user text or a message list, after `history`."""
        return "".join(
            self.predict_chat_stream(
                messages, history, instruction, system, out_max_length, top_k, top_p, repetition_penalty,
                temperature, seed,
            )
        )  # fmt: skip

    def predict_chat_stream(
        self,
        messages: str | Sequence[dict],
        history: Sequence | None = None,
        instruction: str | None = None,
        system: str | None = DEFAULT_SYSTEM,
        out_max_length: int = 200,
        top_k: int = 30,
        top_p: float = 0.95,
        repetition_penalty: float = 1.0,
        temperature: float = 0.8,
        seed: int | None = None,
    ) -> Iterator[str]:
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
        ids = self.encode_chat(messages, history, instruction, system)
        return iter(self.stream(self.request(ids, out_max_length, params, seed, STOP_STRINGS, strip=True)))


def chat_messages(messages: str | Sequence[dict], history: Sequence | None = None) -> list[dict]:
    """history + messages as [{"role", "content"}]. A str is one user turn. History items are message dicts or
    FlagAI's server pairs [role, text] (role "ASSISTANT" = assistant, anything else = user)."""
    out: list[dict] = []
    for i, item in enumerate(history or []):
        if isinstance(item, dict):
            out.append(item)
        elif isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item):
            role = "assistant" if item[0].strip().upper() == "ASSISTANT" else "user"
            out.append({"role": role, "content": item[1]})
        else:
            raise AquilaError(f"history item {i}: expected a message object or a [role, text] pair")
    if isinstance(messages, str):
        if not messages.strip():
            raise AquilaError("prompt is empty")
        out.append({"role": "user", "content": messages})
    else:
        out.extend(messages)
    return out


def _token_id(tokenizer, attribute: str, command: str) -> int:
    value = getattr(tokenizer, attribute, None)
    if value is None and hasattr(tokenizer, "get_command_id"):
        value = tokenizer.get_command_id(command)
    if value is None:
        raise AquilaError(f"tokenizer has no {attribute}")
    return int(value)
