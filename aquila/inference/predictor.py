"""`Predictor(model, tokenizer)`: FlagAI's generation API for Aquila, plus batch, streaming and chat forms.

Prompt encoding: pretraining documents are `[BOS] text [EOS]` (BOS = `[CLS]`, `tokenizer.token_start_id`), so a
text prompt is encoded as `[BOS] + tokenizer.encode(text)` (FlagAI omitted the BOS, issue #389). Chat prompts are
`[BOS] + encode(render_prompt(messages))`, the same template and BOS rule as SFT training. `prompts_tokens` are
used exactly as given. Generation ends at EOS (`</s>`) or unk/pad (id 0), like FlagAI, or at a stop string.

A Predictor holds the model's KV cache: use one thread at a time (the server serialises requests).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from aquila.chat_template import DEFAULT_SYSTEM, STOP_STRINGS, render_prompt
from aquila.errors import AquilaError
from aquila.inference.generate import beam_search, cache_length, check_prompts, generate_tokens, model_device
from aquila.inference.sampling import SamplingParams

REPLACEMENT = "\ufffd"


class TextAssembler:
    """Generated ids -> text, with stop strings; hands out pieces that are safe to show.

    A piece never ends inside a multi-byte character (while the decode of the ids so far ends in U+FFFD that
    tail is held back) nor in a prefix of a stop string, so `"".join(pieces)` equals the final text.
    `strip` drops leading and trailing whitespace (trailing whitespace is held back until more text follows).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), strip: bool = False) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.strip = strip
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string was found: the text is final

    def push(self, token_ids: Sequence[int]) -> str:
        """Add generated ids; returns the newly safe text (maybe "")."""
        if self.stopped:
            return ""
        self.ids.extend(int(t) for t in token_ids)
        text = self.tokenizer.decode(self.ids)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            text, self.stopped = text[: min(hits)], True
        self.text = text.lstrip() if self.strip else text
        if self.stopped:
            return self.finish()
        safe = len(self.text)
        while safe and self.text[safe - 1] == REPLACEMENT:
            safe -= 1
        safe -= self._stop_prefix_len(self.text[:safe])
        if self.strip:
            safe = len(self.text[:safe].rstrip())
        return self._emit(max(safe, self.emitted))

    def finish(self) -> str:
        """The rest of the text, once generation has ended."""
        if self.strip:
            self.text = self.text.rstrip()
        return self._emit(max(len(self.text), self.emitted))

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _emit(self, upto: int) -> str:
        piece = self.text[self.emitted : upto]
        self.emitted = upto
        return piece


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # generated ids (a final stop id excluded)
    finish_reason: str | None = None  # "stop" (EOS/unk or a stop string) or "length"
    prompt_tokens: int = 0
    logprobs: list[float] | None = None  # per generated id, from the model's distribution


class TextStream:
    """Iterate for text pieces; afterwards `completion` holds the finish reason, ids and full text."""

    def __init__(self, pieces: Iterator[list[str]], completion: Completion) -> None:
        self._pieces = pieces
        self.completion = completion

    def __iter__(self) -> Iterator[str]:
        for piece in self.steps():
            if piece:
                yield piece

    def steps(self) -> Iterator[str]:
        """One piece per generated token (often ""), so a consumer can stop between any two tokens."""
        for step in self._pieces:
            yield step[0]

    def close(self) -> None:
        self._pieces.close()


def _as_stop_list(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    if not all(isinstance(s, str) for s in stop):
        raise AquilaError("stop must be a string or a list of strings")
    return tuple(s for s in stop if s)


def _check_max_new(n: object, name: str = "out_max_length") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
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
            if isinstance(input_max_length, bool) or not isinstance(input_max_length, int) or input_max_length < 2:
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

    # --- the core: a batch of id prompts -> text pieces per step ------------------------------------------------------
    def _pieces(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        params: SamplingParams,
        seed: int | None,
        stop: Sequence[str],
        strip: bool,
        completions: list[Completion],
    ) -> Iterator[list[str]]:
        generator = None
        if seed is not None:
            generator = torch.Generator(device=model_device(self.model)).manual_seed(int(seed))
        texts = [TextAssembler(self.tokenizer, stop, strip) for _ in prompts]
        logprobs: list[torch.Tensor] | None = [] if completions[0].logprobs is not None else None
        stop_ids = set(self.stop_ids)
        steps = generate_tokens(
            self.model, prompts, max_new_tokens, params, self.stop_ids, generator, self.compile, logprobs
        )
        try:
            for tokens in steps:
                pieces = []
                for row, token in enumerate(tokens.tolist()):
                    done, text = completions[row], texts[row]
                    if done.finish_reason is not None:
                        pieces.append("")
                        continue
                    if token in stop_ids:
                        done.finish_reason = "stop"
                        pieces.append("")
                        continue
                    done.token_ids.append(token)
                    if done.logprobs is not None:
                        done.logprobs.append(float(logprobs[-1][row]))
                    pieces.append(text.push([token]))
                    if text.stopped:
                        done.finish_reason = "stop"
                yield pieces
                if all(c.finish_reason is not None for c in completions):
                    break
        finally:
            steps.close()
            for done, text in zip(completions, texts):  # also when the consumer stops early
                done.finish_reason = done.finish_reason or "length"
                done.text = text.text.rstrip() if strip else text.text
        final = [text.finish() for text in texts]
        for done, text in zip(completions, texts):
            done.text = text.text
        yield final

    def _start(self, prompts, max_new_tokens, params, seed, stop, strip, logprobs=False):
        completions = [Completion(prompt_tokens=len(p), logprobs=[] if logprobs else None) for p in prompts]
        return self._pieces(prompts, max_new_tokens, params, seed, _as_stop_list(stop), strip, completions), completions

    def complete(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        params: SamplingParams,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        strip: bool = False,
        logprobs: bool = False,
    ) -> Completion:
        """Generate for one id prompt: text, ids, finish reason and (optionally) per-token log-probabilities."""
        pieces, completions = self._start([prompt_ids], max_new_tokens, params, seed, stop, strip, logprobs)
        for _ in pieces:
            pass
        return completions[0]

    def stream(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        params: SamplingParams,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        strip: bool = False,
        logprobs: bool = False,
    ) -> TextStream:
        """Like `complete`, as text pieces (never splitting a character)."""
        pieces, completions = self._start([prompt_ids], max_new_tokens, params, seed, stop, strip, logprobs)
        return TextStream(pieces, completions[0])

    def complete_batch(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        params: SamplingParams,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        strip: bool = False,
    ) -> list[Completion]:
        """Several id prompts at once (left-padded into one batch)."""
        pieces, completions = self._start(prompts, max_new_tokens, params, seed, stop, strip)
        for _ in pieces:
            pass
        return completions

    @torch.no_grad()
    def score(self, prompt_ids: Sequence[int]) -> list[float]:
        """Log-probability of each prompt token after the ones before it (len(prompt_ids) - 1 values)."""
        ids = [int(t) for t in prompt_ids]
        check_prompts(self.model, [ids], 1)
        args = self.model.args
        self.model.setup_caches(1, cache_length(len(ids), args.max_seq_len))
        x = torch.tensor([ids], device=model_device(self.model))
        logits = self.model(x)["logits"][0, :-1]
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
        return self.complete(ids, _check_max_new(out_max_length), params, seed, stop).text

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
        """predict_generate_randomsample for a list of prompts, run as one left-padded batch."""
        if isinstance(texts, str) or not texts:
            raise AquilaError("texts must be a non-empty list of prompts")
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
        prompts = [self.encode_prompt(t, input_max_length) for t in texts]
        return [c.text for c in self.complete_batch(prompts, _check_max_new(out_max_length), params, seed, stop)]

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
        return iter(self.stream(ids, _check_max_new(out_max_length), params, seed, stop))

    def predict_generate_beamsearch(
        self, text: str, input_max_length: int = 256, out_max_length: int = 100, beam_size: int = 1
    ) -> str:
        """Beam search (length-normalised, ends when beam_size hypotheses have ended); beam 1 is greedy."""
        ids = self.encode_prompt(text, input_max_length)
        if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
            raise AquilaError(f"beam_size must be an integer >= 1, got {beam_size!r}")
        out = beam_search(self.model, ids, _check_max_new(out_max_length), beam_size, self.stop_ids)
        return self.tokenizer.decode(out)

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
        return iter(self.stream(ids, _check_max_new(out_max_length), params, seed, STOP_STRINGS, strip=True))


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
