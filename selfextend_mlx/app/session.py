"""The engine behind chat, ask, summarize and generate: one conversation about some documents.

- The prompt is the model's chat template (or a plain "Question:/Answer:" layout for models
  without one), laid out so the system text and documents form a stable token prefix: that
  prefix is prefilled once (or read from the document cache) and every question is appended.
- Prefill runs in steps with a progress callback; answers stream through mlx-lm.
- Between turns the KV cache is kept: a new question prefills only the tokens that differ
  from what the cache already holds (the cache is trimmed back to the common prefix).
- Before any prefill the input is checked against the reach N_max = (L - W) * G + W (raising G
  within the registry's limit when needed) and against the machine's memory.
"""

import os
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

from ..core.patch import make_cache
from ..core.config import SelfExtendConfig, smallest_group_size
from .doccache import DocumentCache, cache_key
from .documents import Document, format_documents
from ..errors import InputTooLongError, InsufficientMemoryError, SelfExtendError
from ..loading.load import model_info
from ..core.patch import apply_selfextend, selfextend_config

DEFAULT_MAX_TOKENS = 512
DEFAULT_PREFILL_STEP = 512
QUESTION_RESERVE = 128  # tokens kept free for a chat question when planning a chat
MEMORY_FRACTION = 0.9  # refuse a run whose estimate is above this share of the machine's memory
ENV_MAX_MEMORY = "SELFEXTEND_MAX_MEMORY"

ProgressCallback = Callable[[int, int, float], None]  # (tokens done, tokens total, seconds so far)


# -- prompt layout -----------------------------------------------------------------------------

_SENTINEL = "\uE000QUESTION\uE000"  # a private-use marker no document or template contains


class PromptFormat:
    """Renders (system, documents, past turns, question) to prompt text.

    With a chat template the documents open the first user message and the question follows
    them; without one the layout is plain text with Question:/Answer: lines.
    """

    def __init__(self, tokenizer, system: Optional[str] = None, use_chat_template: bool = True):
        self.tokenizer = tokenizer
        self.system = system
        self.chat = use_chat_template and bool(getattr(tokenizer, "has_chat_template", False))
        self._system_role = True

    def render(self, documents: str, turns: Sequence[tuple[str, str]], question: str) -> str:
        return self._render_chat(documents, turns, question) if self.chat else self._render_plain(documents, turns, question)

    def _render_plain(self, documents, turns, question):
        parts = [part for part in (self.system, documents) if part]
        text = "\n\n".join(parts)
        for past_question, answer in turns:
            text += f"{_join(text)}Question: {past_question}\nAnswer: {answer}"
        if not parts and not turns:
            return question  # a bare prompt (generate) goes in as it is
        return text + f"{_join(text)}Question: {question}\nAnswer:"

    def _render_chat(self, documents, turns, question):
        messages = []
        first = lambda q: f"{documents}\n\n{q}" if documents else q
        system = self.system
        if system and self._system_role:
            messages.append({"role": "system", "content": system})
            system = None
        for i, (past_question, answer) in enumerate(turns):
            content = first(past_question) if i == 0 else past_question
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": first(question) if not turns else question})
        if system:  # the template refused a system role: the text leads the first user message
            messages[0]["content"] = f"{system}\n\n{messages[0]['content']}"
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:
            if self.system and self._system_role and "system" in str(error).lower():
                self._system_role = False
                return self._render_chat(documents, turns, question)
            raise SelfExtendError(f"the model's chat template failed: {error}") from None

    def document_prefix(self, documents: str) -> Optional[str]:
        """The text every prompt about these documents starts with, or None when the template
        puts something that depends on the question before the documents' end."""
        if not documents:
            return None
        probes = [self.render(documents, [], f"{_SENTINEL}{tail}") for tail in ("a", "b c")]
        cuts = [probe.find(_SENTINEL) for probe in probes]
        if min(cuts) < 0 or probes[0][: cuts[0]] != probes[1][: cuts[1]]:
            return None
        return probes[0][: cuts[0]]


def _join(text: str) -> str:
    return "\n\n" if text else ""


def encode(tokenizer, text: str, first: bool) -> list[int]:
    """Token ids of `text`; `first` adds the BOS token unless the text already starts with it."""
    bos = getattr(tokenizer, "bos_token", None)
    special = first and (bos is None or not text.startswith(bos))
    return list(tokenizer.encode(text, add_special_tokens=special))


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


# -- planning: reach and memory -----------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    prefill: int  # transient: attention scores and logits of one prefill step
    machine: Optional[int]  # bytes the machine has (or the SELFEXTEND_MAX_MEMORY cap); None if unknown

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.prefill


@dataclass(frozen=True)
class Plan:
    model_id: str
    trained_context: int
    config: SelfExtendConfig
    prompt_tokens: int  # the document part (chat) or the whole prompt (ask, generate)
    max_tokens: int
    requested_group_size: int
    memory: MemoryEstimate

    @property
    def max_length(self) -> int:
        return self.config.max_length(self.trained_context)

    @property
    def group_size_raised(self) -> bool:
        return self.config.group_size != self.requested_group_size


def choose_config(
    model_name: str,
    trained_context: int,
    needed_tokens: int,
    group_size: Optional[int] = None,
    window: Optional[int] = None,
    answer_tokens: int = 0,
) -> tuple[SelfExtendConfig, int]:
    """SelfExtend settings for `needed_tokens` (prompt + `answer_tokens` budget): the requested
    G (the registry's by default) when it reaches that far, else a larger G chosen by the
    registry's rule, never above its max_group_size. Returns (config, requested G)."""
    from dataclasses import replace

    from ..loading.registry import max_group_size, recommended_settings, registry_entry

    entry = registry_entry(model_name)
    default_g, default_w = recommended_settings(trained_context, None, entry)
    requested, window = group_size or default_g, window or default_w
    if window >= trained_context:
        raise SelfExtendError(f"--window {window} must be smaller than the model's trained context {trained_context}")
    if SelfExtendConfig(requested, window).max_length(trained_context) >= needed_tokens:
        return SelfExtendConfig(requested, window), requested
    limit = max(max_group_size(entry), requested)
    needed_g = smallest_group_size(trained_context, window, needed_tokens)
    if needed_g > limit:
        prompt = needed_tokens - answer_tokens
        reach = SelfExtendConfig(limit, window).max_length(trained_context)
        raise InputTooLongError(
            f"input too long: {prompt} prompt tokens + {answer_tokens} answer tokens = {needed_tokens} > N_max {reach} "
            f"(L={trained_context}, W={window}, G={limit}, the most this model allows); it would need G={needed_g}: "
            "shorten the document or lower --max-tokens"
        )
    if entry is not None and group_size is None and window < entry.rule_context:
        # The registry's rule may pick a G with more headroom (it fills the context the model really handles).
        needed_g = recommended_settings(trained_context, needed_tokens, replace(entry, window=window))[0]
    return SelfExtendConfig(needed_g, window), requested


def machine_memory() -> Optional[int]:
    cap = os.environ.get(ENV_MAX_MEMORY)
    if cap:
        return parse_size(cap)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def parse_size(text: str) -> int:
    """'8GB', '512M', '1e9' or a plain number of bytes."""
    units = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
    value = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = units.get(value[-1:], 1) if value else 1
    try:
        return int(float(value[:-1] if scale != 1 else value) * scale)
    except ValueError:
        raise SelfExtendError(f"{ENV_MAX_MEMORY}={text!r} is not a size (use bytes or e.g. 8GB)") from None


def _model_shape(model):
    args = getattr(model, "args", None)
    layers = len(model.layers)
    heads = getattr(args, "num_attention_heads", None) or 1
    hidden = getattr(args, "hidden_size", None) or 0
    kv_heads = getattr(args, "num_key_value_heads", None) or heads
    head_dim = getattr(args, "head_dim", None) or (hidden // heads if hidden else 128)
    vocab = getattr(args, "vocab_size", None) or 32000
    return layers, heads, kv_heads, head_dim, vocab


def _activation_bytes(model) -> int:
    """Bytes per element of the activations (and so of the KV cache): the floating dtype of the weights."""
    sizes = {v.dtype.size for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)}
    return min(sizes) if sizes else 4


def estimate_memory(
    model, tokens: int, config: SelfExtendConfig, kv_bits: Optional[int] = None, prefill_step: int = DEFAULT_PREFILL_STEP
) -> MemoryEstimate:
    """What a run over `tokens` tokens needs at its peak: the weights, the SelfExtend KV cache
    (keys at grouped positions and values for every token, keys at plain positions for the
    last W), and one prefill step's attention scores (per chunk of queries) and logits."""
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    layers, heads, kv_heads, head_dim, vocab = _model_shape(model)
    item = _activation_bytes(model)
    per_element = item if kv_bits is None else kv_bits / 8 + 2 * item / 64  # + scales and biases
    grouped_and_values = 2 * tokens * kv_heads * head_dim * per_element
    neighbors = (min(tokens, config.window) + prefill_step) * kv_heads * head_dim * item
    kv_cache = int(layers * (grouped_and_values + neighbors))
    queries = min(prefill_step, config.chunk_size)
    scores = 3 * heads * queries * tokens * 4  # float32 scores, softmax, band
    logits = prefill_step * vocab * 4
    return MemoryEstimate(weights, kv_cache, scores + logits, machine_memory())


def kv_group_size(model, kv_bits: Optional[int]) -> int:
    """The quantization group for a KV cache of `kv_bits`: 64 values, or 32 for small heads."""
    head_dim = _model_shape(model)[3]
    if kv_bits is None or head_dim % 64 == 0:
        return 64
    if head_dim % 32 == 0:
        return 32
    raise SelfExtendError(f"--kv-bits needs a head size divisible by 32; this model's is {head_dim}: leave --kv-bits out")


def check_memory(estimate: MemoryEstimate) -> None:
    if estimate.machine is None or estimate.total <= MEMORY_FRACTION * estimate.machine:
        return
    raise InsufficientMemoryError(
        f"not enough memory: this run needs about {format_bytes(estimate.total)} (weights "
        f"{format_bytes(estimate.weights)}, KV cache {format_bytes(estimate.kv_cache)}, prefill "
        f"{format_bytes(estimate.prefill)}) and the machine has {format_bytes(estimate.machine)}; "
        "use a shorter document, --kv-bits 4, or a smaller --prefill-step-size"
    )


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# -- running the model ---------------------------------------------------------------------------


def prefill(model, cache: list, tokens: Sequence[int], step: int, on_progress: Optional[ProgressCallback] = None) -> float:
    """Run `tokens` through the model into `cache`, `step` tokens at a time; returns seconds."""
    start = time.perf_counter()
    total = len(tokens)
    if on_progress:
        on_progress(0, total, 0.0)
    for begin in range(0, total, step):
        chunk = mx.array(tokens[begin : begin + step])
        model(chunk[None], cache=cache)
        mx.eval([entry.state for entry in cache])
        mx.clear_cache()
        if on_progress:
            on_progress(min(begin + step, total), total, time.perf_counter() - start)
    return time.perf_counter() - start


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temp: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None

    def sampler(self):
        from mlx_lm.sample_utils import make_sampler

        if self.seed is not None:
            mx.random.seed(self.seed)
        return make_sampler(temp=self.temp, top_p=self.top_p)


@dataclass
class Answer:
    text: str = ""
    prompt_tokens: int = 0  # the whole prompt this answer followed
    prefilled_tokens: int = 0  # how many of them this call computed (the rest were cached)
    prompt_seconds: float = 0.0
    generation_tokens: int = 0
    generation_seconds: float = 0.0
    finish_reason: str = "length"  # "stop", "length" or "interrupted"
    peak_memory_bytes: int = 0

    @property
    def prompt_tps(self) -> float:
        return self.prefilled_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0


def stream_answer(model, tokenizer, cache, last_token: int, sampling: Sampling, on_token) -> None:
    """Generate after `last_token` (the prompt's final token, not yet in the cache); calls
    on_token(token_id, text_segment, finish_reason) for every token that enters the cache."""
    from mlx_lm.generate import stream_generate

    for response in stream_generate(
        model,
        tokenizer,
        mx.array([last_token]),
        max_tokens=sampling.max_tokens,
        sampler=sampling.sampler(),
        prompt_cache=cache,
    ):
        on_token(response.token, response.text, response.finish_reason)


# -- the session ---------------------------------------------------------------------------------


@dataclass
class SessionOptions:
    group_size: Optional[int] = None
    window: Optional[int] = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    kv_bits: Optional[int] = None
    prefill_step_size: int = DEFAULT_PREFILL_STEP
    use_chat_template: bool = True


@dataclass
class _Prefill:
    tokens: int = 0
    seconds: float = 0.0


class Session:
    """A conversation with a model about some documents (or none, for a bare prompt)."""

    def __init__(
        self,
        model,
        tokenizer,
        documents: Sequence[Document] = (),
        *,
        system: Optional[str] = None,
        options: SessionOptions = SessionOptions(),
        doc_cache: Optional[DocumentCache] = None,
        first_question: Optional[str] = None,
        notice: Callable[[str], None] = lambda message: None,
    ):
        info = model_info(model)
        if info is None:
            raise SelfExtendError("the model has no model_info; load it with selfextend_mlx.load")
        if options.max_tokens < 1:
            raise SelfExtendError(f"--max-tokens must be at least 1, got {options.max_tokens}")
        if options.prefill_step_size < 1:
            raise SelfExtendError(f"--prefill-step-size must be at least 1, got {options.prefill_step_size}")
        self.model, self.tokenizer, self.info = model, tokenizer, info
        self.kv_group_size = kv_group_size(model, options.kv_bits)
        self.options, self.doc_cache, self.notice = options, doc_cache, notice
        self.documents = list(documents)
        self.format = PromptFormat(tokenizer, system, options.use_chat_template)
        self.documents_text = format_documents(self.documents) if self.documents else ""
        self.prefix_text = self.format.document_prefix(self.documents_text)
        self.prefix_tokens = encode(tokenizer, self.prefix_text, first=True) if self.prefix_text else []
        if self.documents and self.prefix_text is None:
            notice("the chat template puts the question before the documents end: the document prefill is not reused")
        self.history: list[tuple[str, str]] = []
        self.cache: Optional[list] = None
        self.cache_tokens: list[int] = []  # exactly the tokens the cache holds
        self.document_source = "none"  # "cache", "prefill" or "none" (no reusable document part)
        self._pending = _Prefill()  # document prefill not yet reported in an Answer
        self.last_answer: Optional[Answer] = None

        # G is planned on the documents plus room for a question, so chat and ask about the same
        # documents pick the same G (and share the document cache); a longer question raises it.
        prompt = len(self.prefix_tokens) or len(self.prompt_tokens(""))
        if first_question is not None:
            prompt = len(self.prompt_tokens(first_question))
        planned = max(prompt, len(self.prefix_tokens) + QUESTION_RESERVE) + options.max_tokens
        registry_name = getattr(info, "registry_name", None) or info.model_id
        plan_for = lambda tokens: choose_config(
            registry_name, info.trained_context, tokens, options.group_size, options.window, options.max_tokens
        )
        try:
            config, requested = plan_for(planned)
        except InputTooLongError:  # without the room for a question it may still fit; else say by how much
            planned = prompt + options.max_tokens
            config, requested = plan_for(planned)
        memory = estimate_memory(model, planned, config, options.kv_bits, options.prefill_step_size)
        self.plan = Plan(info.model_id, info.trained_context, config, prompt, options.max_tokens, requested, memory)
        check_memory(memory)
        if selfextend_config(model) != config:
            apply_selfextend(model, config)

    # -- prompts ------------------------------------------------------------------------------
    def prompt_tokens(self, question: str) -> list[int]:
        """The whole prompt for `question` after the turns so far; the document prefix is
        tokenized on its own so it stays the same token prefix whatever follows it."""
        text = self.format.render(self.documents_text, self.history, question)
        if self.prefix_text and text.startswith(self.prefix_text):
            return self.prefix_tokens + encode(self.tokenizer, text[len(self.prefix_text) :], first=False)
        return encode(self.tokenizer, text, first=True)

    # -- the document part ----------------------------------------------------------------------
    def _document_key(self) -> str:
        return cache_key(self.info.model_id, self.plan.config, self.options.kv_bits, self.prefix_tokens)

    def prepare(self, on_progress: Optional[ProgressCallback] = None) -> str:
        """Have the document part in the KV cache: from the document cache, or by prefilling
        it (and saving it). Returns where it came from: "cache", "prefill" or "none"."""
        if self.cache is not None:
            return self.document_source
        config = self.plan.config
        if self.prefix_tokens and self.doc_cache is not None:
            cache = self.doc_cache.load(self._document_key(), model_id=self.info.model_id, config=config, tokens=len(self.prefix_tokens))
            if cache is not None:
                self.cache, self.cache_tokens, self.document_source = cache, list(self.prefix_tokens), "cache"
                return self.document_source
        self.cache, self.cache_tokens = make_cache(self.model, self.options.kv_bits, self.kv_group_size), []
        if not self.prefix_tokens:
            self.document_source = "none"
            return self.document_source
        seconds = prefill(self.model, self.cache, self.prefix_tokens, self.options.prefill_step_size, on_progress)
        self.cache_tokens = list(self.prefix_tokens)
        self._pending = _Prefill(len(self.prefix_tokens), seconds)
        self.document_source = "prefill"
        if self.doc_cache is not None:
            self._save_document_cache()
        return self.document_source

    def _save_document_cache(self):
        try:
            self.doc_cache.save(
                self._document_key(),
                self.cache,
                model_id=self.info.model_id,
                config=self.plan.config,
                metadata={
                    "documents": ", ".join(doc.name for doc in self.documents),
                    "tokens": len(self.prefix_tokens),
                    "kv_bits": self.options.kv_bits,
                },
            )
        except OSError as error:
            self.notice(f"could not save the document cache: {error.strerror or error}")

    # -- turns --------------------------------------------------------------------------------
    def check_length(self, prompt_tokens: int) -> None:
        needed = prompt_tokens + self.options.max_tokens
        if needed > self.plan.max_length:
            raise InputTooLongError(
                f"too long: {prompt_tokens} prompt tokens + {self.options.max_tokens} answer tokens = {needed} "
                f"> N_max {self.plan.max_length} (L={self.plan.trained_context}, G={self.plan.config.group_size}, "
                f"W={self.plan.config.window})" + (": /reset to start the conversation over" if self.history else "")
            )

    def ask(
        self,
        question: str,
        sampling: Optional[Sampling] = None,
        on_text: Callable[[str], None] = lambda text: None,
        on_progress: Optional[ProgressCallback] = None,
    ) -> Answer:
        """Answer `question` after the conversation so far, streaming text through on_text.

        Ctrl-C (KeyboardInterrupt) stops the answer: the part already given stays in the
        conversation and the cache, and the interrupt is raised again for the caller."""
        sampling = sampling or Sampling(max_tokens=self.options.max_tokens)
        tokens = self.prompt_tokens(question)
        self.check_length(len(tokens))
        self.prepare(on_progress)
        answer = Answer(prompt_tokens=len(tokens))
        answer.prefilled_tokens, answer.prompt_seconds = self._pending.tokens, self._pending.seconds
        self._pending = _Prefill()

        keep = self._rewind_to(tokens[:-1], on_progress)
        fed = list(tokens)  # what the cache holds once this turn is through, kept exact
        new = tokens[keep:]
        start = time.perf_counter()
        first_token_at = None

        def on_token(token, text, finish_reason):
            nonlocal first_token_at
            if first_token_at is None:
                first_token_at = time.perf_counter()
            fed.append(token)
            answer.text += text
            if finish_reason != "stop":
                answer.generation_tokens += 1
            if finish_reason:
                answer.finish_reason = finish_reason
            if text:
                on_text(text)

        try:
            prefill(self.model, self.cache, new[:-1], self.options.prefill_step_size, on_progress)
            stream_answer(self.model, self.tokenizer, self.cache, new[-1], sampling, on_token)
        except KeyboardInterrupt:
            answer.finish_reason = "interrupted"
            raise
        finally:
            end = time.perf_counter()
            first = first_token_at or end
            answer.prefilled_tokens += len(new)
            answer.prompt_seconds += first - start
            answer.generation_seconds = end - first
            answer.peak_memory_bytes = mx.get_peak_memory()
            self._settle(fed)
            if answer.text or answer.finish_reason != "interrupted":
                self.history.append((question, answer.text))
            self.last_answer = answer
        return answer

    def _rewind_to(self, target: Sequence[int], on_progress=None) -> int:
        """Cut the cache back to its longest common prefix with `target`; returns its length."""
        keep = common_prefix_length(self.cache_tokens, target)
        drop = len(self.cache_tokens) - keep
        if drop == 0:
            return keep
        if all(entry.is_trimmable() for entry in self.cache):
            for entry in self.cache:
                entry.trim(drop)
            self.cache_tokens = self.cache_tokens[:keep]
            return keep
        # A cache that cannot go back (a full rotating window): start again from the
        # document part, or from nothing when even that does not fit.
        self.cache = None
        self.prepare(on_progress)
        self._pending = _Prefill()
        keep = common_prefix_length(self.cache_tokens, target)
        if keep < len(self.cache_tokens):
            self.cache, self.cache_tokens = make_cache(self.model, self.options.kv_bits, self.kv_group_size), []
            return 0
        return keep

    def _settle(self, fed: list[int]) -> None:
        """After a turn (finished or interrupted), make cache_tokens match the cache exactly."""
        if self.cache is None:
            return
        offsets = {entry.offset for entry in self.cache}
        if len(offsets) != 1:  # interrupted between layers: the cache is unusable
            self.cache, self.cache_tokens = None, []
            return
        held = offsets.pop()
        if held > len(fed):  # a token computed but never handed out
            for entry in self.cache:
                entry.trim(held - len(fed))
            held = len(fed)
        self.cache_tokens = fed[:held]

    def reset(self) -> None:
        """Forget the conversation, keep the documents (the cache goes back to their end)."""
        self.history = []
        if self.cache is not None:
            self._rewind_to(self.prefix_tokens)

    @property
    def conversation_tokens(self) -> int:
        return len(self.cache_tokens)
