"""The one model behind the server: requests planned as the CLI plans a run, then answered one
at a time, in the order they came.

- prepare() (any thread; tokenizer and planning only, no MLX): the prompt's tokens, the plan
  (selfextend_mlx.planning: plain attention inside the model's context, the smallest G that
  reaches beyond it) and the memory pre-flight. A prompt beyond the largest reach is a 400
  `context_length_exceeded` with the numbers; a request that leaves out max_tokens gets what
  is left of the reach, up to the server's default.
- submit() queues a Job (a bounded queue: a full one is a 503 with Retry-After).
- run_forever() runs the jobs in one thread, the only one that touches MLX: the nearest cached
  prefix is taken from the in-memory prompt store and handed to the turn runner (app.turns),
  which reads the document prefix from the disk cache or prefills it, prefills the rest and
  generates the answer; the cache goes back to the store after the turn. Each job's events
  (progress, text, the outcome or an error) go to its asyncio queue.
- A job whose client went away is cancelled (job.cancel()); `stopping` (a plain attribute, so a
  signal handler may set it) cancels the running job and fails the queued ones.
"""

import asyncio
import math
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Optional

import mlx.core as mx

from ..app.doccache import DocumentCache
from ..app.generation import Sampling
from ..app.turns import Answer, DocumentPrefix, TurnCancelled, TurnRunner
from ..defaults import MAX_TOKENS, PREFILL_STEP
from ..errors import InputTooLongError, InsufficientMemoryError, SelfExtendError
from ..loading.load import model_info
from ..planning import Plan, check_memory, choose_settings, largest_reach, plan_run
from .prompt_cache import PromptCacheStore
from .prompting import Prompt
from .protocol import SERVER_ERROR, APIError, bad_request

DISK_MIN_TOKENS = 1024  # shorter document prefixes prefill in seconds: not worth a file each
DEFAULT_CACHE_BYTES = 2_000_000_000
DEFAULT_QUEUE_SIZE = 16
# A cancellation (a client gone, SIGTERM) waits for the prefill step under way: the server keeps
# steps near this long, so that it is heard within seconds.
STEP_SECONDS = 1.0


@dataclass(frozen=True)
class EngineOptions:
    group_size: Optional[int] = None  # -G for every request (default: planned per request)
    window: Optional[int] = None
    max_tokens: int = MAX_TOKENS  # the answer budget of requests that give none
    temp: float = 0.0  # sampling for requests that give none
    top_p: float = 1.0
    kv_bits: Optional[int] = None
    prefill_step_size: int = PREFILL_STEP
    cache_bytes: int = DEFAULT_CACHE_BYTES  # the in-memory prompt caches
    queue_size: int = DEFAULT_QUEUE_SIZE  # requests waiting behind the running one
    disk_min_tokens: int = DISK_MIN_TOKENS
    step_seconds: float = STEP_SECONDS  # a prefill step shrinks until it takes about this long


@dataclass(frozen=True)
class Work:
    """A prepared request: everything the engine thread needs."""

    tokens: list[int]
    prefix_length: int  # leading tokens worth keeping in the disk cache (0: none)
    plan: Plan
    sampling: Sampling
    stop: tuple[str, ...] = ()
    label: str = ""  # names the document in `selfextend cache list`


@dataclass(frozen=True)
class Progress:
    done: int
    total: int


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Finished:
    outcome: Answer


@dataclass(frozen=True)
class Failed:
    error: APIError


class Job:
    """One request in the engine: its work, its events (read on the event loop), its cancel flag."""

    def __init__(self, work: Work, loop: asyncio.AbstractEventLoop):
        self.work = work
        self.events: asyncio.Queue = asyncio.Queue()
        self._loop = loop
        self.cancelled = threading.Event()
        self.outcome = Answer()  # filled in as the engine answers
        self.started: Optional[float] = None  # when the engine took it up
        self.prompt_done = 0  # prompt tokens read so far (cached ones included)

    def emit(self, event) -> None:
        """Called from the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (the server stopped): nobody listens
            pass

    def cancel(self) -> None:
        self.cancelled.set()


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", type=SERVER_ERROR, code="server_shutting_down")


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        options: EngineOptions = EngineOptions(),
        *,
        doc_cache: Optional[DocumentCache] = None,
        log: Callable[[str], None] = lambda line: None,
    ):
        info = model_info(model)
        if info is None:
            raise SelfExtendError("the model has no model_info; load it with selfextend_mlx.load")
        self.model, self.tokenizer, self.info, self.options = model, tokenizer, info, options
        choose_settings(info.limits, None, group_size=options.group_size, window=options.window)  # bad -G/-W: now
        self._plan_run(1, 1)  # and a KV quantization the model's heads cannot take
        self.doc_cache, self.log = doc_cache, log
        self.runner = TurnRunner(
            model, tokenizer, doc_cache=doc_cache, model_info=info, notice=log, step_seconds=options.step_seconds
        )
        self.store = PromptCacheStore(options.cache_bytes)
        self.stopping = False
        self.running: Optional[Job] = None
        self._jobs: deque[Job] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._seconds = deque(maxlen=16)  # recent jobs' durations, for Retry-After

    # -- preparing (any thread) -------------------------------------------------------------------
    def prepare(self, prompt, *, max_tokens=None, temperature=None, top_p=None, seed=None, stop=()) -> Work:
        """`prompt`: a Prompt, or token ids. Raises APIError (400) for what cannot run."""
        if isinstance(prompt, Prompt):
            tokens, prefix = prompt.tokens(self.tokenizer)
        else:
            tokens, prefix = list(prompt), 0
            vocab = self.info.shape.vocab
            if any(not 0 <= token < vocab for token in tokens):
                raise bad_request(f"prompt: token ids must be between 0 and {vocab - 1}", "prompt")
        if not tokens:
            raise bad_request("the prompt is empty", "prompt")
        plan = self._plan(len(tokens), max_tokens)
        sampling = Sampling(
            temp=self.options.temp if temperature is None else temperature,
            top_p=self.options.top_p if top_p is None else top_p,
            seed=None if seed is None else seed % 2**64,
        )
        prefix = min(prefix, len(tokens) - 1) if prefix >= self.options.disk_min_tokens else 0
        label = getattr(prompt, "label", "") or "server request"
        return Work(tokens, prefix, plan, sampling, tuple(stop), label)

    def _plan(self, prompt_tokens: int, requested: Optional[int]) -> Plan:
        budget = requested or self.options.max_tokens
        try:
            plan = self._plan_run(prompt_tokens, budget)
        except InputTooLongError:
            reach = self.reach()
            if requested is not None or prompt_tokens >= reach:
                raise self._too_long(prompt_tokens, budget, reach) from None
            budget = reach - prompt_tokens  # no budget asked for: what is left of the reach
            plan = self._plan_run(prompt_tokens, budget)
        try:
            check_memory(plan.memory)
        except InsufficientMemoryError as error:
            raise bad_request(str(error), "messages", code="insufficient_memory") from None
        return plan

    def _plan_run(self, prompt_tokens: int, budget: int) -> Plan:
        options = self.options
        return plan_run(
            self.info,
            prompt_tokens + budget,
            prompt_tokens=prompt_tokens,
            max_tokens=budget,
            group_size=options.group_size,
            window=options.window,
            kv_bits=options.kv_bits,
            prefill_step=options.prefill_step_size,
        )

    def reach(self) -> int:
        """The most prompt + answer tokens a request can have."""
        limits, options = self.info.limits, self.options
        if options.group_size is not None:
            return choose_settings(limits, None, group_size=options.group_size, window=options.window).reach
        return largest_reach(limits, options.window)

    def _too_long(self, prompt_tokens: int, budget: int, reach: int) -> APIError:
        trained = self.info.trained_context
        return APIError(
            400,
            f"This model's maximum context length is {reach:,} tokens with SelfExtend (it was trained on "
            f"{trained:,}). However, you requested {prompt_tokens + budget:,} tokens ({prompt_tokens:,} in the "
            f"prompt, {budget:,} for the completion). Please shorten the prompt or lower max_tokens.",
            param="messages",
            code="context_length_exceeded",
            prompt_tokens=prompt_tokens,
            completion_tokens=budget,
            requested_tokens=prompt_tokens + budget,
            max_context_length=reach,
            trained_context=trained,
        )

    # -- the queue (event loop thread) --------------------------------------------------------------
    def submit(self, job: Job) -> int:
        """Queue `job`; returns how many requests are ahead of it."""
        with self._lock:
            if self.stopping or self._closed:
                raise shutting_down()
            self._drop_cancelled()
            if len(self._jobs) + (self.running is not None) > self.options.queue_size:
                seconds = self.retry_after()
                raise APIError(
                    503,
                    f"the server is busy: {len(self._jobs)} requests are waiting; retry in about {seconds} s",
                    type=SERVER_ERROR,
                    code="server_busy",
                    headers={"Retry-After": str(seconds)},
                )
            self._jobs.append(job)
            ahead = len(self._jobs) - 1 + (self.running is not None)
        self._wake.set()
        return ahead

    def _drop_cancelled(self) -> None:
        """Forget queued jobs whose clients left (under the lock): they hold no place."""
        if any(job.cancelled.is_set() for job in self._jobs):
            self._jobs = deque(job for job in self._jobs if not job.cancelled.is_set())

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely free, that is until the running job
        ends: from its own progress (the time so far, scaled by the work left of prompt and
        answer budget), else the mean of recent jobs."""
        running, mean = self.running, (sum(self._seconds) / len(self._seconds) if self._seconds else 10.0)
        seconds = mean
        if running is not None and running.started is not None:
            elapsed = time.perf_counter() - running.started
            work = len(running.work.tokens) + running.work.plan.max_tokens
            done = running.prompt_done + running.outcome.generation_tokens
            seconds = elapsed * (work - done) / done if done > 0 else max(mean - elapsed, elapsed)
        return max(1, min(600, math.ceil(seconds)))

    @property
    def waiting(self) -> int:
        with self._lock:
            self._drop_cancelled()
            return len(self._jobs)

    # -- running (the engine thread) ------------------------------------------------------------------
    def run_forever(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        """Answer jobs until `stopping` is set (or should_stop() says so), then fail the rest."""
        try:
            while True:
                job = self._next(should_stop)
                if job is None:
                    break
                self._run(job)
        finally:
            with self._lock:
                self._closed = True
                left = list(self._jobs)
                self._jobs.clear()
            for job in left:
                job.emit(Failed(shutting_down()))

    def _next(self, should_stop) -> Optional[Job]:
        while True:
            self._wake.clear()
            with self._lock:
                if self.stopping or should_stop():
                    return None
                if self._jobs:
                    self.running = self._jobs.popleft()  # under the lock: submit() counts it at once
                    return self.running
            self._wake.wait(0.2)

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set():
            self.running = None
            return  # its client left while it waited
        started = job.started = time.perf_counter()
        try:
            job.emit(Finished(self._answer(job)))
        except TurnCancelled:
            why = "the server is stopping" if self.stopping else "its client left"
            self.log(f"request cancelled after {job.outcome.generation_tokens:,} answer tokens: {why}")
            if self.stopping:
                job.emit(Failed(shutting_down()))
        except APIError as error:
            job.emit(Failed(error))
        except SelfExtendError as error:
            job.emit(Failed(bad_request(str(error))))
        except Exception as error:  # a bug or an MLX failure: the server goes on
            self.log(f"error: {type(error).__name__}: {error}\n{traceback.format_exc()}".rstrip())
            job.emit(Failed(APIError(500, f"internal error: {type(error).__name__}: {error}", type=SERVER_ERROR)))
        finally:
            self.running = None
            self._seconds.append(time.perf_counter() - started)
            mx.clear_cache()

    def _answer(self, job: Job) -> Answer:
        work, runner = job.work, self.runner
        runner.use(work.plan)
        self._make_room(work.plan)
        cache, reused = self.store.fetch(work.plan.cache_settings, work.tokens)
        runner.hold(cache, work.tokens[:reused])
        document = DocumentPrefix(work.prefix_length, work.label) if work.prefix_length else None
        cancelled = lambda: job.cancelled.is_set() or self.stopping
        total = len(work.tokens)

        def progress(done: int, _total: int, _seconds: float) -> None:
            job.outcome, job.prompt_done = runner.last, len(runner.tokens) + done
            job.emit(Progress(job.prompt_done, total))

        def text(piece: str) -> None:
            job.outcome = runner.last
            job.emit(Text(piece))

        try:
            return runner.answer(
                work.tokens,
                work.sampling,
                document=document if self.doc_cache is not None else None,
                on_text=text,
                on_progress=progress,
                cancel=cancelled,
                stop=work.stop,
            )
        finally:
            job.outcome = runner.last
            cache, tokens = runner.release()
            if cache is not None and len(tokens) > 1:
                self.store.insert(work.plan.cache_settings, tokens, cache)

    # -- caches -------------------------------------------------------------------------------------
    def _make_room(self, plan: Plan) -> None:
        """Evict cached prompts, oldest first, until this request's memory pre-flight passes
        with the ones left counted (alone it passed in prepare)."""
        while len(self.store):
            try:
                check_memory(replace(plan.memory, kv_cache=plan.memory.kv_cache + self.store.nbytes))
                return
            except InsufficientMemoryError:
                self.store.evict_oldest()
