"""Continuous batching: many generations share one model, advancing together one pass at a time.
New requests join at the next step, their prompts in the same pass as the others' next tokens;
finished and cancelled ones leave and free their KV-cache slot. Each request samples with its own
RNG and the kernels compute a pass's rows independently (see kernels.SMALL_BATCH), so a request
gets the same tokens alone or in a crowd.

KV memory is taken as positions are written, within a budget of positions shared by all slots:
when the next round would go beyond it, the engine gives back what finished requests left
cached (least recently freed first), then preempts the latest admitted request, which waits at
the head of the queue to be fed again, prompt and answer so far, when there is room (vLLM's
recompute preemption; its rows get the same bits again, so its tokens stay the same).

The engine is plain Python over `Transformer`: `step()` runs one scheduling round, `start()`
runs rounds on a thread of its own. Output goes to each request's `on_event` callback.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numba
import numpy as np

from llamette.completion import StopStrings
from llamette.errors import LlametteError
from llamette.kernels import SMALL_BATCH
from llamette.metrics import Metrics
from llamette.model import PREFILL_CHUNK, Transformer
from llamette.sampler import Sampler, TokenLogprob, token_logprob
from llamette.structured import JsonConstraint
from llamette.tokenizer import StreamDecoder, Tokenizer
from llamette.weights import BOS_ID

log = logging.getLogger("llamette")

MIN_REUSED = 16  # cached prompt tokens worth taking a slot for (and evicting what it holds)


@dataclass(frozen=True)
class Event:
    """Output of a request: text, then once a finish_reason: "stop", "length", "error", or
    "abort" (the engine drained); a request dropped as "cancelled" gets no event."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None
    embedding: list[float] | None = None  # an embedding request's answer
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens since the last event, if asked for


@dataclass(eq=False)
class Request:
    """One generation: prompt tokens, limits and sampler; `on_event` is called on the engine's
    thread with each piece of text and the end."""

    prompt_tokens: list[int]
    max_tokens: int
    sampler: Sampler
    on_event: Callable[[Event], None]
    stop: StopStrings = field(default_factory=StopStrings)
    strip_leading_space: bool = False  # chat answers start without the first token's space
    end_ids: frozenset[int] | None = None  # the tokens that end it; None: the tokenizer's
    siblings: list[Request] = field(default_factory=list)  # the other choices of the same prompt
    constraint: JsonConstraint | None = None  # masks the tokens a structured answer cannot take
    logprobs: int | None = None  # each token's log-probability and its top N alternatives
    echo_logprobs: bool = False  # the prompt's tokens' too (logprobs or not: top 0)
    embed: bool = False  # the prompt's embedding (Transformer.embedding) instead of tokens
    normalize: bool = True  # the embedding at unit length
    cancelled: bool = False  # set from any thread: the engine drops the request at its next step

    # progress, kept by the engine
    slot: int = -1
    fed: int = 0  # positions of prompt and tokens through the model (or found in the cache)
    written: int = 0  # positions of its slot's KV cache written for it
    cacheable: bool = True  # its KV rows came from passes of at most SMALL_BATCH rows
    tokens: list[int] = field(default_factory=list)  # sampled so far, a final EOS/BOS excluded
    end_token: int | None = None  # the end id that finished it, if one did
    token_logprobs: list[TokenLogprob] = field(default_factory=list)  # the prompt's, if echoed,
    sent_logprobs: int = 0  # then the sampled tokens' (an end id's not); how many were sent
    text: str = ""
    shown: int = 0  # characters of text sent (text beyond may start a stop string)
    decoder: StreamDecoder | None = None
    submitted_at: float = 0.0  # time.perf_counter() when it was queued,
    admitted_at: float = 0.0  # when it got its slot,
    first_token_at: float = 0.0  # when its first token was sampled,
    last_token_at: float = 0.0  # its latest,
    finished_at: float = 0.0  # and when it ended

    @property
    def next_pos(self) -> int:
        """Position of the last sampled token, the next one to feed (the prompt's last token's
        before the first draw); its logits give the next token."""
        return len(self.prompt_tokens) + len(self.tokens) - 1

    def token_at(self, pos: int) -> int:
        """The token at position pos of the prompt followed by the tokens sampled."""
        n_prompt = len(self.prompt_tokens)
        return self.prompt_tokens[pos] if pos < n_prompt else self.tokens[pos - n_prompt]


class QueueFull(LlametteError):
    """Every slot is busy and the waiting queue is full."""


class ShuttingDown(LlametteError):
    """The engine is draining: it takes no more requests."""


class Engine:
    """Schedules requests over the model's KV-cache slots: at most one per slot runs, up to
    `max_queue` more wait. Its thread runs the kernels with `threads` threads (default: as many
    as the thread that made the engine was set to use, see kernels.set_threads). With
    `chunked_prefill` (the server's), long prompts share the passes instead of stalling them,
    and `kv_budget` positions (default: every slot's whole context) bound the KV memory held."""

    def __init__(
        self, model: Transformer, tokenizer: Tokenizer, max_queue: int = 64,
        threads: int | None = None, metrics: Metrics | None = None,
        chunked_prefill: bool = False, kv_budget: int | None = None,
    ):  # fmt: skip
        self.model = model
        self.tokenizer = tokenizer
        # what ends a request: every end-of-text and end-of-turn id (llama2.c's: BOS and EOS)
        self.end_ids = tokenizer.end_ids() | tokenizer.end_ids(chat=True)
        # Numba's thread count belongs to the thread that sets it: the engine's thread sets its own
        self.threads = threads or numba.get_num_threads()
        self.n_slots = model.kv_cache.keys.shape[0]
        self.max_queue = max_queue
        self._free_slots = list(range(self.n_slots))  # the least recently freed first
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()  # the kernels are loaded (or failed to)
        self.failure: Exception | None = None
        self.cancelled = 0  # requests dropped because their client went away
        self._masker: ThreadPoolExecutor | None = None  # computes structured answers' masks
        self.metrics = metrics  # time to first token, between tokens, tokens
        # every prompt fed in the room of the passes, never alone: others go on decoding; every
        # row then gets the same bits however it is batched, so a free slot's KV rows can serve
        # any later prompt that starts with the tokens they hold (the prompt cache)
        self.chunked_prefill = chunked_prefill
        self._cached: dict[int, np.ndarray] = {}  # slot: the tokens its KV rows hold
        self._draining = False  # ending every request, taking no more
        whole = self.n_slots * model.config.seq_len
        if kv_budget is not None and not (model.config.seq_len <= kv_budget and chunked_prefill):
            raise LlametteError("a KV budget needs chunked prefill and room for one context")
        self.kv_budget = min(kv_budget or whole, whole)  # positions held at most, all slots
        self._budgeted = self.kv_budget < whole  # (else every slot fits its whole context)
        self.preempted = 0  # times a request gave its memory back to make room

    def submit(self, request: Request) -> None:
        """Queue a request (with its siblings, which run beside it from its prompt's pass);
        raises QueueFull when it would wait beyond max_queue."""
        if not request.prompt_tokens:
            raise LlametteError("a request needs at least one prompt token")
        # the last token is sampled, never fed: it needs no position of its own
        if len(request.prompt_tokens) + request.max_tokens > self.model.config.seq_len + 1:
            raise LlametteError(
                f"{len(request.prompt_tokens)} prompt tokens and max_tokens {request.max_tokens} "
                f"exceed the context of {self.model.config.seq_len}"
            )
        group = 1 + len(request.siblings)
        if group > self.n_slots:
            raise LlametteError(f"{group} choices need as many slots; there are {self.n_slots}")
        if group * len(request.prompt_tokens) > self.kv_budget:  # each holds the prompt's rows
            raise LlametteError(f"{group} choices of {len(request.prompt_tokens)} prompt tokens "
                                f"exceed the KV budget of {self.kv_budget} positions")  # fmt: skip
        for member in (request, *request.siblings):
            member.submitted_at = time.perf_counter()
        with self._wakeup:
            if self._draining:
                raise ShuttingDown("the server is shutting down")
            waiting_for_slot = len(self._running) + len(self._waiting) + group - self.n_slots
            if waiting_for_slot > self.max_queue:
                raise QueueFull(
                    f"{self.n_slots} requests running and {len(self._waiting)} waiting: try later"
                )
            self._waiting.append(request)
            self._wakeup.notify()

    def stats(self) -> dict[str, int]:
        with self._wakeup:
            return {"slots": self.n_slots, "running": len(self._running),
                    "waiting": len(self._waiting), "cancelled": self.cancelled,
                    "kv_budget": self.kv_budget, "kv_held": int(self.model.kv_held.sum()),
                    "preempted": self.preempted}  # fmt: skip

    def slots_used(self) -> int:
        with self._wakeup:
            return self.n_slots - len(self._free_slots)

    def idle(self) -> bool:
        with self._wakeup:
            return not self._running and not self._waiting

    def warm_up(self) -> None:
        """Compile (or load) the kernels a step runs: a prompt, a batch of two rows, a draw."""
        self.model.prefill([BOS_ID], 0, 0)
        self.model.forward_batch([BOS_ID, BOS_ID], [0, 0], [0, 0])
        self.model.release_positions(0)
        Sampler(self.model.config.vocab_size, temperature=1.0, topp=0.9, seed=1).warm_up()

    def step(self) -> None:
        """One round: admit waiting requests to free slots, then one pass through the model.

        A pass takes the last sampled token of every running request and, in the room left in
        its last SMALL_BATCH rows, prompt tokens of the admitted (a prompt may span rounds). The
        kernels compute each row of a pass of at most SMALL_BATCH rows as they would in any
        other, so a request's tokens do not depend on the others'. Prompts longer than
        SMALL_BATCH go alone through the batched kernels (the faster way for one request), unless
        `chunked_prefill` feeds them through the passes' room as well, in chunks that leave the
        running requests decoding meanwhile.
        """
        if self._draining:
            self._end_all("abort")
            return
        for request in self._admit():
            if request.embed:
                self._embed_alone(request)
            elif not request.tokens and (  # (a preempted request's rows go in the passes)
                request.echo_logprobs
                or (len(request.prompt_tokens) > SMALL_BATCH and not self.chunked_prefill)
            ):
                self._prefill_alone(request)
        self._drop_cancelled()
        rows = self._rows()  # (request, token, position)
        if self._budgeted:
            rows = self._within_budget(rows)
        for request, _, pos in rows:
            request.fed = pos + 1
        for start in range(0, len(rows), SMALL_BATCH):
            batch = rows[start : start + SMALL_BATCH]
            # rows whose logits give a token: every decode row, and a prompt's last
            sampling = [i for i, (request, _, pos) in enumerate(batch) if pos == request.next_pos]
            masks = self._prepare_masks([batch[i][0] for i in sampling])
            request, token, pos = batch[0]
            if len(batch) == 1 and sampling == [0] and request.tokens:  # one decode step
                logits = [self.model.forward(token, pos, request.slot)]
            else:
                logits = self.model.forward_batch(
                    [token for _, token, _ in batch],
                    [pos for _, _, pos in batch],
                    [request.slot for request, _, _ in batch],
                    sampling,
                )  # (len(sampling), vocab_size)
            if masks is not None:
                masks.result()
            for request, _, pos in batch:
                request.written = pos + 1
            for i, row in zip(sampling, logits, strict=True):
                request = batch[i][0]
                self._advance(request, self._draw(request, row), row)

    def _prepare_masks(self, requests: list[Request]) -> Future | None:
        """Start computing the masks of the structured answers among requests, on a thread of
        their own, to overlap the pass (both release the GIL)."""
        constrained = [r.constraint for r in requests if r.constraint is not None]
        if not constrained:
            return None
        if self._masker is None:
            self._masker = ThreadPoolExecutor(1, thread_name_prefix="llamette-masks")
        return self._masker.submit(lambda: [constraint.prepare() for constraint in constrained])

    @staticmethod
    def _draw(request: Request, logits: np.ndarray) -> int:
        """The request's next token: its sampler's draw, among the tokens its constraint allows."""
        if request.constraint is not None:
            logits = request.constraint.masked(logits)
        return request.sampler.sample(logits)

    def _rows(self) -> list[tuple[Request, int, int]]:
        """This round's rows: every decoding request's last token, then tokens of prompts (and
        of preempted requests' answers) up to the end of the last pass of SMALL_BATCH rows (a
        pass of their own when there is no room)."""
        rows = [(r, r.tokens[-1], r.next_pos) for r in self._running if r.tokens and
                r.fed == r.next_pos]  # fmt: skip
        room = SMALL_BATCH - len(rows) % SMALL_BATCH
        for request in self._running:
            if room == 0:
                break
            if request.tokens and request.fed == request.next_pos:
                continue  # decoding
            take = min(room, request.next_pos + 1 - request.fed)
            rows += [(request, request.token_at(pos), pos)
                     for pos in range(request.fed, request.fed + take)]  # fmt: skip
            room -= take
        return rows

    def _within_budget(self, rows: list[tuple[Request, int, int]]) -> list[tuple]:
        """This round's rows once the KV memory they need is free: cached rows given back, then
        requests preempted as needed (never the last one holding memory, which fits alone)."""
        while self._over_budget(rows):
            if self._evict_cached():
                continue
            if not self._preempt_latest():
                break
            rows = self._rows()
        return rows

    def _over_budget(self, rows: list[tuple[Request, int, int]]) -> bool:
        """Whether the KV positions held, those the rows add and those the choices waiting for
        their prompt's pass will copy exceed the budget."""
        held = self.model.kv_held
        reach: dict[int, int] = {}  # slot: positions it holds after the rows
        for request, _, pos in rows:
            reach[request.slot] = max(reach.get(request.slot, held[request.slot]), pos + 1)
        added = sum(reach[slot] - held[slot] for slot in reach)
        copies = sum(len(r.prompt_tokens) * len(r.siblings) for r in self._running)
        return int(held.sum()) + added + copies > self.kv_budget

    def _evict_cached(self, keep: int = -1) -> bool:
        """Give back the memory of the least recently freed slot holding any (but slot `keep`);
        whether there was one."""
        for slot in self._free_slots:
            if slot != keep and self.model.kv_held[slot] > 0:
                self.model.release_positions(slot)
                self._cached.pop(slot, None)
                return True
        return False

    def _preempt_latest(self) -> bool:
        """Send the latest admitted request that holds memory back to the head of the queue, its
        memory given back, to be fed again from position 0 when there is room; whether one
        could go (never the only one holding memory, nor one whose choices wait to branch)."""
        holding = [r for r in self._running if self.model.kv_held[r.slot] > 0]
        candidates = [r for r in holding if not r.siblings and r.cacheable]
        if len(holding) < 2 or not candidates:
            return False
        victim = max(candidates, key=lambda r: r.admitted_at)
        self.model.release_positions(victim.slot)
        with self._wakeup:
            self._running.remove(victim)
            self._cached.pop(victim.slot, None)
            self._free_slots.insert(0, victim.slot)
            victim.slot, victim.fed, victim.written = -1, 0, 0
            self._waiting.appendleft(victim)
        self.preempted += 1
        if self.metrics is not None:
            self.metrics.preempted()
        log.debug(f"preempted a request at position {victim.next_pos} to stay within the KV "
                  f"budget of {self.kv_budget} positions")  # fmt: skip
        return True

    def _prefill_alone(self, request: Request) -> None:
        try:
            if request.echo_logprobs:
                logits = self._prefill_with_logprobs(request)
            else:
                logits = self.model.prefill(request.prompt_tokens, 0, request.slot)
        except Exception as error:  # a failed request must not take the others down
            log.exception("prefill failed")
            self._finish(request, "error", error=str(error))
            return
        request.fed = request.written = len(request.prompt_tokens)
        # rows of batched passes get other bits than the passes' rows
        request.cacheable = self.chunked_prefill
        self._advance(request, self._draw(request, logits), logits)

    def _prefill_with_logprobs(self, request: Request) -> np.ndarray:
        """Prefill keeping each prompt token's log-probability (the first has none); the last
        position's logits (vocab_size,)."""
        prompt, top_n = request.prompt_tokens, request.logprobs or 0
        request.token_logprobs.append(TokenLogprob(prompt[0], None))
        chunk = SMALL_BATCH if self.chunked_prefill else PREFILL_CHUNK  # the passes' bits
        for start in range(0, len(prompt), chunk):
            batch = prompt[start : start + chunk]
            positions = np.arange(start, start + len(batch))
            logits = self.model.forward_batch(batch, positions, np.full(len(batch), request.slot))
            for pos, row in zip(positions, logits, strict=True):
                if pos + 1 < len(prompt):  # the last row's logits give the first sampled token
                    request.token_logprobs.append(token_logprob(row, prompt[pos + 1], top_n))
        return logits[-1]

    def _embed_alone(self, request: Request) -> None:
        try:
            vector = self.model.embedding(request.prompt_tokens, request.slot, request.normalize)
        except Exception as error:
            log.exception("embedding failed")
            self._finish(request, "error", error=str(error))
            return
        request.cacheable = False  # rows of batched passes
        self._finish(request, "stop", embedding=vector.tolist())

    def stream(self, request: Request) -> Iterator[Event]:
        """Run `request` on the calling thread, without the engine's own: rounds until it ends,
        its events as they come (its on_event is replaced). Closing the iterator early, or an
        error in a round, cancels it."""
        events: deque[Event] = deque()
        request.on_event = events.append
        self.submit(request)
        finished = False
        try:
            while not finished:
                if not events:
                    self.step()
                while events:
                    event = events.popleft()
                    finished = event.finish_reason is not None
                    yield event
        finally:
            if not finished:
                self._cancel_now(request)

    def drain(self) -> None:
        """Take no more requests, and end every waiting and running one at the next round with
        finish_reason "abort" (their text so far sent): a server's graceful stop."""
        with self._wakeup:
            self._draining = True
            self._wakeup.notify()

    def _end_all(self, reason: str) -> None:
        with self._wakeup:
            waiting, self._waiting = list(self._waiting), deque()
        for request in waiting:
            for member in (request, *request.siblings):
                member.finished_at = time.perf_counter()
                if member.tokens:  # preempted: it ends as a running request would
                    self._send(member, len(member.text))
                    if self.metrics is not None:
                        self.metrics.finished(len(member.tokens))
                member.on_event(Event("", reason, len(member.tokens)))
        for request in list(self._running):
            if request in self._running:  # a sibling may have ended with its request
                self._finish(request, reason)

    def _cancel_now(self, request: Request) -> None:
        """Drop a request at once, waiting or running (its slot freed for the next)."""
        request.cancelled = True
        with self._wakeup:
            waiting = request in self._waiting
            if waiting:
                self._waiting.remove(request)
                self.cancelled += 1
        if not waiting and request in self._running:
            self._finish(request, "cancelled")

    def run(self) -> None:
        """Run rounds until stop(); sleep while there is nothing to do."""
        while True:
            with self._wakeup:
                while not self._stopping and not self._running and not self._waiting:
                    self._wakeup.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as error:  # the engine outlives any one step
                log.exception("decode step failed")
                for request in list(self._running):
                    self._finish(request, "error", error=str(error))

    def start(self, wait: bool = True) -> None:
        """Run rounds on a thread of the engine's own, once warm_up has run there.

        Every call into the model stays on that thread: OpenMP gives each thread that starts
        parallel work a team of workers, which spin between kernels, so a second team (say, the
        main thread's, from a warm-up there) would take a core from the engine's. Returns when
        the kernels are ready, raising what warm_up raised; without `wait`, at once (`ready` is
        set when they are, `failure` holds what went wrong).
        """

        def warm_up_then_run() -> None:
            try:
                numba.set_num_threads(self.threads)
                start = time.perf_counter()
                self.warm_up()
                log.info(f"ready: the kernels loaded in {time.perf_counter() - start:.1f} s")
            except Exception as error:
                self.failure = error
                log.error(f"the engine cannot start: {error}")
                return
            finally:
                self.ready.set()
            self.run()

        self._thread = threading.Thread(
            target=warm_up_then_run, name="llamette-engine", daemon=True
        )
        self._thread.start()
        if wait:
            self.ready.wait()
            if self.failure:
                raise self.failure

    def fault(self) -> str | None:
        """Why the engine can no longer answer (its warm-up failed, or its thread ended), or
        None while it warms up or runs."""
        if self.failure is not None:
            return f"the engine could not start: {self.failure}"
        if self.ready.is_set() and self._thread is not None and not self._thread.is_alive():
            return "the engine's thread has stopped"
        return None

    def stop(self) -> None:
        """End the engine's thread after its round; while it still compiles, leave it (a daemon
        thread: it ends with the process) rather than wait for the compiler."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None and self.ready.is_set():
            self._thread.join()

    def _admit(self) -> list[Request]:
        """Waiting requests that get a slot now, up to about PREFILL_CHUNK tokens to feed, as
        long as the KV budget has room for them beside the running requests' next rows."""
        admitted, budget = [], PREFILL_CHUNK
        if not self._waiting:  # the common case of a decode step: nothing to take the lock for
            return admitted
        with self._wakeup:
            while self._waiting and self._free_slots and (not admitted or budget > 0):
                request = self._waiting[0]
                if request.cancelled:
                    self._waiting.popleft()
                    self.cancelled += 1
                    continue
                if len(self._free_slots) < 1 + len(request.siblings):
                    break  # the choices go in together, in their turn
                reuse = self.chunked_prefill and not (request.embed or request.echo_logprobs)
                slot, shared = self._choose_slot(request, reuse)
                to_feed = request.next_pos + 1 - shared
                if not self._room_for(to_feed + len(request.prompt_tokens) * len(request.siblings),
                                      slot, shared):  # fmt: skip
                    break
                self._waiting.popleft()
                self._take_slot(request, slot, shared)
                for sibling in request.siblings:
                    self._take_slot(sibling, self._free_slots[0], 0)
                    sibling.fed = len(sibling.prompt_tokens)  # it takes the request's prompt pass
                for member in (request, *request.siblings):
                    self._running.append(member)
                    if member.decoder is not None:
                        continue  # a preempted request, back
                    member.admitted_at = time.perf_counter()
                    member.decoder = StreamDecoder(
                        self.tokenizer,
                        self.tokenizer.bos_id
                        if member.strip_leading_space
                        else member.prompt_tokens[-1],
                    )
                    if self.metrics is not None and member is request:
                        self.metrics.admitted(len(request.prompt_tokens), shared)
                admitted.append(request)
                budget -= to_feed
        return admitted

    def _choose_slot(self, request: Request, reuse: bool) -> tuple[int, int]:
        """A free slot for a request, and how many of its first tokens (prompt, and answer so far
        if it was preempted) the slot's KV rows hold already (never the last, whose logits are
        needed): the slot sharing the longest prefix if that is at least MIN_REUSED tokens, else
        the least recently freed one (with what it shares)."""
        if not reuse:
            return self._free_slots[0], 0
        wanted = np.asarray((request.prompt_tokens + request.tokens)[: request.next_pos], np.int64)
        shared = {slot: _shared_prefix(self._cached[slot], wanted) if slot in self._cached else 0
                  for slot in self._free_slots}  # fmt: skip
        best = max(self._free_slots, key=shared.__getitem__)
        if shared[best] < MIN_REUSED:
            best = self._free_slots[0]
        return best, shared[best]

    def _room_for(self, positions: int, slot: int, shared: int) -> bool:
        """Whether the budget holds `positions` more, and a position for each running request's
        next row, once free slots' cached rows are given back as needed (and `slot` keeps only
        its first `shared`). With nothing running, anything goes: a request fits alone."""
        if not self._running or not self._budgeted:
            return True
        held = self.model.kv_held
        needed = positions + len(self._running) - max(0, int(held[slot]) - shared)
        while int(held.sum()) + needed > self.kv_budget:
            if not self._evict_cached(keep=slot):
                return False
        return True

    def _take_slot(self, request: Request, slot: int, shared: int) -> None:
        """Give a request a free slot whose KV rows hold its first `shared` tokens (the rest
        given back)."""
        self._free_slots.remove(slot)
        self.model.release_positions(slot, keep=shared)
        request.slot, request.fed, request.written = slot, shared, shared

    def _drop_cancelled(self) -> None:
        for request in list(self._running):
            if request.cancelled:
                self._finish(request, "cancelled")

    def _advance(self, request: Request, token: int, logits: np.ndarray) -> None:
        """Take a token sampled from logits: end the request on an end id, a stop string or its
        length limit, else send the text that cannot be the start of a stop string."""
        if request.cancelled:  # it leaves at the next step
            return
        if request.siblings:
            self._branch(request, logits)
        now = time.perf_counter()
        if not request.first_token_at:
            request.first_token_at = now
            if self.metrics is not None:
                self.metrics.first_token(now - request.submitted_at)
        elif self.metrics is not None:
            self.metrics.next_token(now - request.last_token_at)
        request.last_token_at = now
        if token in (self.end_ids if request.end_ids is None else request.end_ids):
            request.end_token = token
            request.text += request.decoder.flush()
            self._finish(request, "stop")
            return
        if request.logprobs is not None:
            request.token_logprobs.append(token_logprob(logits, token, request.logprobs))
        request.tokens.append(token)
        request.text += request.decoder.push(token)
        cut = request.stop.find(request.text, request.shown) if request.stop.strings else None
        problem = request.constraint.accept(token) if request.constraint is not None else None
        if problem is not None:
            self._finish(request, "error", error=problem)
        elif cut is not None:
            request.text = request.text[:cut]
            self._finish(request, "stop")
        elif request.constraint is not None and request.constraint.finished:
            request.text += request.decoder.flush()
            self._finish(request, "stop")
        elif len(request.tokens) >= request.max_tokens:
            request.text += request.decoder.flush()
            self._finish(request, "length")
        else:
            stop = request.stop
            self._send(
                request, stop.safe_length(request.text) if stop.strings else len(request.text)
            )

    def _branch(self, request: Request, logits: np.ndarray) -> None:
        """At a request's first token, its siblings take its prompt's KV rows (and echoed
        log-probabilities) and draw their own first tokens from the same logits."""
        siblings, request.siblings = request.siblings, []
        for sibling in siblings:
            self.model.copy_positions(request.slot, sibling.slot, len(request.prompt_tokens))
            sibling.written, sibling.cacheable = len(request.prompt_tokens), request.cacheable
            sibling.token_logprobs = list(request.token_logprobs)
            self._advance(sibling, self._draw(sibling, logits), logits)

    def _send(self, request: Request, upto: int) -> None:
        if upto > request.shown:
            text, request.shown = request.text[request.shown : upto], upto
            request.on_event(Event(text, logprobs=self._new_logprobs(request)))

    @staticmethod
    def _new_logprobs(request: Request) -> tuple[TokenLogprob, ...]:
        new = tuple(request.token_logprobs[request.sent_logprobs :])
        request.sent_logprobs = len(request.token_logprobs)
        return new

    def _finish(
        self, request: Request, reason: str, error: str | None = None,
        embedding: list[float] | None = None,
    ) -> None:  # fmt: skip
        with self._wakeup:
            if request not in self._running:  # ended already (with the request it branches from)
                return
            self._running.remove(request)
            if self.chunked_prefill and request.cacheable:
                fed = (request.prompt_tokens + request.tokens)[: request.written]
                self._cached[request.slot] = np.asarray(fed, np.int64)
                self._free_slots.append(request.slot)
            else:  # nothing to offer later prompts: its memory goes back at once
                self.model.release_positions(request.slot)
                self._cached.pop(request.slot, None)
                self._free_slots.insert(0, request.slot)
            request.slot = -1
        request.finished_at = time.perf_counter()
        if self.metrics is not None:
            self.metrics.finished(len(request.tokens))
        siblings, request.siblings = request.siblings, []
        for sibling in siblings:  # it ended before its prompt's pass did: so do they
            self._finish(sibling, reason, error)
        if reason == "cancelled":
            self.cancelled += 1
            return
        if error is None:
            self._send(request, len(request.text))
        logprobs = self._new_logprobs(request)
        request.on_event(Event("", reason, len(request.tokens), error, embedding, logprobs))


def _shared_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many tokens a and b share from the start."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n
