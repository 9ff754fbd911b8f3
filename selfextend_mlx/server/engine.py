"""The one model behind the server: requests planned as the CLI plans a run, then answered
together, in the order they came.

- prepare() (any thread; tokenizer and planning only, no MLX): the prompt's tokens, the plan
  (selfextend_mlx.planning: plain attention inside the model's context, the smallest G that
  reaches beyond it) and the memory pre-flight. A prompt beyond the largest reach is a 400
  `context_length_exceeded` with the numbers; a request that leaves out max_tokens gets what
  is left of the reach, up to the server's default.
- submit() queues a Job (a bounded queue: a full one is a 503 with Retry-After).
- run_forever() runs the jobs in one thread, the only one that touches MLX. Up to
  `batch_size` jobs are active at once and share every decode step (core.batch: one model
  call for all of them, each with its own KV cache). A queued job joins between steps when it
  has the active jobs' batch key (server.batch.batch_key: the same attention mode) and the
  memory estimates of all of them fit; otherwise it, and the ones behind it, wait. Its
  prompt is read by a turn runner (app.turns: the nearest cached prefix from the in-memory
  prompt store, the document prefix from the disk cache or prefilled, the rest a timed step
  at a time) with one decode step of the others after every prefill step. Its cache goes back
  to the store when it ends. Each job's events (progress, text, the outcome or an error) go
  to its asyncio queue.
- A job whose client went away is cancelled (job.cancel()); `stopping` (a plain attribute, so a
  signal handler may set it) cancels the active jobs and fails the queued ones.
"""

import asyncio
import importlib
import math
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from ..app.doccache import DocumentCache
from ..app.generation import Sampling
from ..app.turns import INTERRUPTED, Answer, DocumentPrefix, TurnCancelled, TurnRunner
from ..core.batch import batched_logits
from ..core.patch import make_cache
from ..defaults import MAX_TOKENS, PREFILL_STEP
from ..errors import InputTooLongError, InsufficientMemoryError, SelfExtendError
from ..loading.load import model_info
from ..planning import Plan, check_memory, choose_settings, largest_reach, memory_together, plan_run
from .batch import Decoding, batch_key
from .prompt_cache import PromptCacheStore
from .prompting import Prompt
from .protocol import SERVER_ERROR, APIError, bad_request

DISK_MIN_TOKENS = 1024  # shorter document prefixes prefill in seconds: not worth a file each
DEFAULT_CACHE_BYTES = 2_000_000_000
DEFAULT_QUEUE_SIZE = 16
DEFAULT_BATCH_SIZE = 16  # requests decoded together at most
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
    queue_size: int = DEFAULT_QUEUE_SIZE  # requests waiting behind the running ones
    batch_size: int = DEFAULT_BATCH_SIZE  # requests answered together (1: one at a time)
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
        self.key = batch_key(work.plan, work.sampling, id(self))  # jobs with one key decode together

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
        self.store = PromptCacheStore(options.cache_bytes)
        self.stopping = False
        self.running: Optional[Job] = None  # the oldest job being answered
        self.active: list[_Active] = []  # the jobs decoding together, oldest first
        self._starting: Optional[Job] = None  # the job whose prompt is being read
        self._steps = 0
        self.largest_batch = 0  # the most jobs one decode step has run (for tests and benchmarks)
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
        """Answer jobs until `stopping` is set (or should_stop() says so), then fail the rest.

        Each round takes at most one queued job (its prefill runs a step at a time, with a decode
        step of the others after each), then runs one decode step for every active job."""
        generation = importlib.import_module("mlx_lm.generate")  # the module (its package re-exports a function)
        self._stream = generation.generation_stream  # mlx-lm's decoding stream, as stream_generate uses
        try:
            with generation.wired_limit(self.model, [self._stream]):
                while not (self.stopping or should_stop()):
                    job = self._take()
                    if job is not None:
                        self._start(job)
                    if self.active:
                        self._decode_step()
                    elif job is None:
                        self._wake.wait(0.2)
                        self._wake.clear()
        finally:
            self._stop_active()
            with self._lock:
                self._closed = True
                left = list(self._jobs)
                self._jobs.clear()
            for job in left:
                job.emit(Failed(shutting_down()))

    def _take(self) -> Optional[Job]:
        """The first queued job, if it may join the active ones now: a free place in the batch,
        the same batch key, and the memory estimates of all of them together fit. Arrival
        order is kept: a job that must wait holds up the ones behind it."""
        with self._lock:
            self._drop_cancelled()
            if not self._jobs or len(self.active) >= max(1, self.options.batch_size):
                return None
            job = self._jobs[0]
            if self.active and (job.key != self.active[0].job.key or not self._fits(job.work.plan)):
                return None
            self._jobs.popleft()
            self._starting = job
            self._show_running()
        return job

    def _fits(self, plan: Plan) -> bool:
        """Whether `plan`'s memory estimate, with the KV caches of every active job, passes the
        pre-flight (the weights are counted once; cached prompts can be evicted for it)."""
        return fits_with(plan, [active.job.work.plan for active in self.active])

    def _show_running(self) -> None:
        """`running`: the oldest job being answered (None when idle), for /health and Retry-After."""
        self.running = self.active[0].job if self.active else self._starting

    def _start(self, job: Job) -> None:
        """Prefill `job`'s prompt; on success it joins the active jobs, else its client hears why."""
        try:
            if job.cancelled.is_set():
                return  # its client left while it waited
            job.started = time.perf_counter()
            self.active.append(self._prefill(job))
        except TurnCancelled:
            self._log_cancelled(job)
        except Exception as error:
            self._fail(job, error)
        finally:
            self._starting = None
            self._show_running()

    def _prefill(self, job: Job) -> "_Active":
        """Everything of the prompt but its last token into a cache of its own (the nearest
        cached prefix, the document cache, then timed prefill steps, each followed by a decode
        step of the active jobs); the cache goes back to the store if it stops there."""
        work = job.work
        runner = TurnRunner(
            self.model,
            self.tokenizer,
            doc_cache=self.doc_cache,
            model_info=self.info,
            notice=self.log,
            step_seconds=self.options.step_seconds,
        )
        runner.use(work.plan)
        self._make_room(work.plan)
        cache, reused = self.store.fetch(work.plan.cache_settings, work.tokens)
        runner.hold(cache, work.tokens[:reused])
        answer = job.outcome = Answer(prompt_tokens=len(work.tokens))
        began = time.perf_counter()
        try:
            source, fed = self._read_prompt(job, runner)
        except BaseException:
            answer.finish_reason = INTERRUPTED
            self._keep(work.plan, *runner.release())
            raise
        cache, held = runner.release()
        if cache is None:
            cache = make_cache(self.model, work.plan.kv_bits, work.plan.kv_group_size)
        answer.prefilled_tokens = min(len(work.tokens), fed + 1)  # the last token goes in with the first step
        answer.cache_source = source if answer.cached_tokens else "none"
        decoding = Decoding(
            self.tokenizer, work.sampling, work.plan.max_tokens, work.stop, answer, cache, held, work.tokens[-1]
        )
        return _Active(job, decoding, time.perf_counter() - began)

    def _read_prompt(self, job: Job, runner: TurnRunner) -> tuple[str, int]:
        """Feed all but the prompt's last token (as TurnRunner.answer does); returns where the
        reused tokens came from and how many tokens were computed."""
        work = job.work
        tokens, total = work.tokens, len(work.tokens)
        cancelled = lambda: job.cancelled.is_set() or self.stopping

        def progress(done: int, _total: int, _seconds: float) -> None:
            job.prompt_done = len(runner.tokens) + done
            job.emit(Progress(job.prompt_done, total))
            self._decode_step()  # the others go on between this prompt's steps

        held = runner.rewind(tokens[:-1])
        source, fed = (runner.origin if held else "none"), 0
        document = DocumentPrefix(work.prefix_length, work.label) if work.prefix_length else None
        if self.doc_cache is not None and document is not None and held < document.length < total:
            how = runner.read_document(tokens, document, progress, cancelled)
            source = "disk" if how == "disk" else source
            fed += len(runner.tokens) - held if how == "prefill" else 0
        before = len(runner.tokens)
        runner.feed(tokens[before:-1], progress, cancelled)
        return source, fed + len(runner.tokens) - before

    def _decode_step(self) -> None:
        """One token for every active job, in one batched model call; finished and cancelled
        jobs leave. Never raises: a failed step fails the jobs in it (their caches are dropped)."""
        self._retire_cancelled()
        rows = list(self.active)
        if not rows:
            return
        self.largest_batch = max(self.largest_batch, len(rows))
        try:
            with mx.stream(self._stream):
                caches, pending = [r.decoding.cache for r in rows], [r.decoding.pending for r in rows]
                logits = batched_logits(self.model, caches, pending)
                sampled = [r.decoding.sample(logits[i : i + 1]) for i, r in enumerate(rows)]
                mx.eval(sampled)
        except Exception as error:
            for row in rows:
                self._leave(row)
                self._fail(row.job, error)
            return
        for row, token in zip(rows, sampled):
            piece = row.decoding.push(token.item())
            if piece:
                row.job.emit(Text(piece))
            if row.decoding.finished:
                self._end(row)
                row.job.emit(Finished(row.decoding.answer))
        self._steps += 1
        if self._steps % 256 == 0:
            mx.clear_cache()

    def _retire_cancelled(self) -> None:
        """Active jobs whose client left, or all of them when stopping, end here."""
        for row in list(self.active):
            if row.job.cancelled.is_set() or self.stopping:
                row.decoding.interrupt()
                self._end(row)
                self._log_cancelled(row.job)

    def _stop_active(self) -> None:
        self.stopping = True
        self._retire_cancelled()

    def _end(self, row: "_Active") -> None:
        """`row` leaves the batch; its cache (exactly its held tokens) goes to the store."""
        row.decoding.close(row.prompt_seconds)
        self._leave(row)
        self._keep(row.job.work.plan, row.decoding.cache, row.decoding.held)

    def _leave(self, row: "_Active") -> None:
        self.active.remove(row)
        self._show_running()
        if row.job.started is not None:
            self._seconds.append(time.perf_counter() - row.job.started)
        if not self.active:
            mx.clear_cache()

    def _keep(self, plan: Plan, cache: Optional[list], tokens: list[int]) -> None:
        if cache is not None and len(tokens) > 1:
            self.store.insert(plan.cache_settings, tokens, cache)

    def _log_cancelled(self, job: Job) -> None:
        why = "the server is stopping" if self.stopping else "its client left"
        self.log(f"request cancelled after {job.outcome.generation_tokens:,} answer tokens: {why}")
        if self.stopping:
            job.emit(Failed(shutting_down()))

    def _fail(self, job: Job, error: Exception) -> None:
        if isinstance(error, APIError):
            job.emit(Failed(error))
        elif isinstance(error, SelfExtendError):
            job.emit(Failed(bad_request(str(error))))
        else:  # a bug or an MLX failure: the server goes on
            self.log(f"error: {type(error).__name__}: {error}\n{traceback.format_exc()}".rstrip())
            job.emit(Failed(APIError(500, f"internal error: {type(error).__name__}: {error}", type=SERVER_ERROR)))

    # -- caches -------------------------------------------------------------------------------------
    def _make_room(self, plan: Plan) -> None:
        """Evict cached prompts, oldest first, until this request's memory pre-flight passes
        with the ones left and the active jobs' caches counted (alone it passed in prepare)."""
        others = [active.job.work.plan for active in self.active]
        while len(self.store) and not fits_with(plan, others, self.store.nbytes):
            self.store.evict_oldest()


@dataclass
class _Active:
    """A job in the batch: its answer being decoded and what its prefill took."""

    job: Job
    decoding: Decoding
    prompt_seconds: float


def fits_with(plan: Plan, others: list, extra_bytes: int = 0) -> bool:
    """Whether `plan` passes the memory pre-flight alive beside `others` (plans of requests
    running with it) with `extra_bytes` of cached prompts counted."""
    try:
        check_memory(memory_together([plan.memory] + [other.memory for other in others], extra_bytes))
    except InsufficientMemoryError:
        return False
    return True
