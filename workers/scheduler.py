"""Continuous-batching scheduler: which sequences compute how many tokens this step.

Each step has a token budget (``max_num_batched_tokens``). The scheduler fills it in order:

1. **Decodes first**: every running sequence that has one token to compute gets it.
2. **Running prefills**: sequences part-way through their prompt get their next chunk.
3. **Waiting** sequences, first come first served, while the budget, ``max_num_seqs`` and
   the KV blocks last; each first looks up its prompt in the prefix cache.

When a running sequence needs a block and none is free, the latest-arrived running
sequence is **preempted by recompute**: its blocks are freed and it returns to the front of
the waiting queue, to prefill prompt + output again later. Nothing is admitted in a step
that preempted. After the model runs, `update_from_output` advances each sequence, registers
its full blocks in the prefix cache, appends the sampled tokens and retires the sequences they
finish (`stop_checker`).

The scheduler owns a sequence's progress: it alone writes ``num_computed_tokens``, the block
table (what `BlockManager.allocate` hands out, recorded by `_allocate`) and the status. The
engine's text, when it follows it (stop strings), comes in through a `TextFn`; whether a
finished sequence's blocks go back at once is the ``on_finished`` hook's call (a prefill
group's role keeps them until decode has them: engine_roles.py).

Pipeline parallelism keeps several micro-batches in flight: a sequence in a batch that has
not come back yet is *in flight* and is neither scheduled again nor preempted until its
`update_from_output`; ``max_seqs`` caps one micro-batch so the others get sequences too.

With ``lookahead`` (async scheduling, pp = 1) the engine schedules step n+1 while the GPU
runs step n: an in-flight sequence may be scheduled once more, for its next prompt chunk or
for the token step n samples (a *placeholder*, filled in on the device by the runner). A
sequence sure to end when that token lands (``max_tokens``, the model's length) is not; one
that ends by a stop token wastes the one extra row, which the engine discards.

**Isolated** sequences (`isolate`: suspects of a step that raised, engine.py) run in batches of
their own, one at a time: every other batch is one of them while any is ready, so a step that
raises again has exactly one request in it. The rest are scheduled around them as usual.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from splitserve.workers.block_manager import BlockManager, CachedPrefix
from splitserve.workers.config import SchedulerConfig
from splitserve.workers.sampler import SamplerOutput, TokenLogprobs
from splitserve.workers.sequence import Sequence, SequenceStatus
from splitserve.workers.stop_checker import StopDecision, check_stop

#: The engine's text for a sequence's new token: (its output text so far, the new text's
#: length), or (None, 0) when its text is not followed here (no stop strings, no stream).
TextFn = Callable[[Sequence, int], tuple[str | None, int]]

#: Called as a sequence finishes; True keeps its blocks (the caller frees them later, with
#: `Scheduler.free_blocks`): a prefill group holds them until decode has the KV.
FinishHook = Callable[[Sequence, SequenceStatus], bool]

_NO_PREFIX = CachedPrefix(())


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    #: Tokens to compute this step, starting at position ``start``.
    num_new_tokens: int
    #: This step reaches the sequence's last token, so it yields a new one.
    samples: bool
    #: Position of the first token (after what is computed or in flight).
    start: int
    #: Output tokens before the one this step samples (min_tokens, seeded RNG).
    num_prior_outputs: int
    #: The last token is a placeholder: the previous step samples it.
    placeholder: bool = False

    @classmethod
    def of(cls, seq: Sequence, num_new_tokens: int) -> "ScheduledSeq":
        start = seq.num_scheduled_tokens
        end = start + num_new_tokens
        return cls(seq, num_new_tokens, samples=end == seq.num_tokens + seq.num_placeholders, start=start,
                   num_prior_outputs=seq.num_generated, placeholder=end > seq.num_tokens)


@dataclass(frozen=True)
class TokenUpdate:
    """A sampled token appended to a sequence by `Scheduler.update_from_output`."""

    seq: Sequence
    #: Why the token ended the sequence (now retired); None: it runs on.
    stop: StopDecision | None


@dataclass
class SchedulerOutput:
    """One step's work, in the order the model runner lays tokens out."""

    #: Single-token decode rows (first in the flattened batch).
    decodes: list[ScheduledSeq] = field(default_factory=list)
    #: Prefill chunks (whole prompts or parts of them).
    prefills: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    #: The engine's number for the step that computes it (set when it is submitted).
    step_id: int = 0

    @property
    def scheduled(self) -> list[ScheduledSeq]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, *, lookahead: bool = False,
                 max_model_len: int | None = None, eos_token_ids: tuple[int, ...] = (),
                 on_finished: FinishHook | None = None):
        self.config = config
        self.block_manager = block_manager
        #: In-flight sequences may be scheduled again (async scheduling; see the module doc).
        self.lookahead = lookahead
        #: Prompt + output limit: a sequence (or a placeholder) that reaches it ends.
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self._on_finished = on_finished
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        #: Unfinished isolated sequences, oldest first (a dict as an ordered set).
        self._isolated: dict[Sequence, None] = {}
        self._last_isolated = False  # the latest batch was an isolated one

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def isolate(self, seq: Sequence) -> None:
        """From now on ``seq`` runs in batches of its own (until it finishes)."""
        if not seq.is_finished:
            self._isolated[seq] = None

    def is_isolated(self, seq: Sequence) -> bool:
        return seq in self._isolated

    def schedule(self, max_seqs: int | None = None) -> SchedulerOutput:
        out = SchedulerOutput()
        cap = max_seqs or self.config.max_num_seqs
        if not (self._isolated and self._schedule_isolated(out)):
            budget = self._schedule_running(out, self.config.max_num_batched_tokens, cap)
            if not out.preempted:
                self._schedule_waiting(out, budget, cap)
        for item in out.scheduled:
            item.seq.num_inflight_tokens += item.num_new_tokens
            item.seq.num_placeholders += item.samples
        return out

    def has_schedulable(self) -> bool:
        """Some sequence could go into another micro-batch now."""
        return bool(self.waiting) or any(self._schedulable(s) for s in self.running)

    def _schedulable(self, seq: Sequence) -> bool:
        if not seq.in_flight:
            return True
        if not self.lookahead or seq.num_unscheduled_tokens == 0 or seq.num_placeholders > 1:
            return False  # one step ahead at most: a placeholder comes from the step before
        # Its in-flight step samples the last token: schedule the next one only if the
        # sequence can still go on once that token lands.
        return seq.num_placeholders == 0 or not self._ends_with_placeholders(seq)

    def _ends_with_placeholders(self, seq: Sequence) -> bool:
        total = seq.num_tokens + seq.num_placeholders
        return (seq.num_generated >= seq.params.max_tokens
                or (self.max_model_len is not None and total >= self.max_model_len))

    # ---- isolated ---------------------------------------------------------------------

    def _schedule_isolated(self, out: SchedulerOutput) -> bool:
        """A batch of one isolated sequence (the oldest that can go), every other batch while
        others wait too; True if ``out`` is that batch."""
        others = any(self._schedulable(s) for s in self.running if s not in self._isolated) or \
            any(s not in self._isolated for s in self.waiting)
        if self._last_isolated and others:
            self._last_isolated = False
            return False
        budget = self.config.max_num_batched_tokens
        for seq in self._isolated:
            if seq.status is SequenceStatus.RUNNING and self._schedulable(seq):
                num_new = self._chunk(seq, budget)
                if num_new and self._make_room(seq, num_new, out):
                    self._allocate(seq, num_new)
                    (out.decodes if num_new == seq.num_unscheduled_tokens == 1 else out.prefills).append(
                        ScheduledSeq.of(seq, num_new))
            elif seq.status is SequenceStatus.WAITING and not out.preempted:
                self._admit(seq, budget, out)
            if not out.is_empty or out.preempted:
                break
        self._last_isolated = not out.is_empty
        return self._last_isolated

    # ---- running ---------------------------------------------------------------------

    def _schedule_running(self, out: SchedulerOutput, budget: int, cap: int) -> int:
        idle = [s for s in self.running if self._schedulable(s) and s not in self._isolated]
        decodes = [s for s in idle if s.num_unscheduled_tokens == 1]
        prefills = [s for s in idle if s.num_unscheduled_tokens > 1]
        for seq in decodes + prefills:
            if budget == 0 or len(out.decodes) + len(out.prefills) >= cap:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this step
            num_new = self._chunk(seq, budget)
            if num_new == 0 or not self._make_room(seq, num_new, out):
                continue
            self._allocate(seq, num_new)
            (out.decodes if num_new == seq.num_unscheduled_tokens == 1 else out.prefills).append(
                ScheduledSeq.of(seq, num_new))
            budget -= num_new
        return budget

    def _make_room(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> bool:
        """Preempt the latest arrivals until ``seq`` fits; False if ``seq`` itself went (or
        only in-flight sequences are left to take blocks from: it waits for them)."""
        while not self.block_manager.can_allocate(seq, num_new):
            victims = [s for s in self.running if not s.in_flight]
            if not victims:
                return False
            victim = victims[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        for group in (out.decodes, out.prefills):
            group[:] = [s for s in group if s.seq is not seq]
        self._restart(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)

    def _restart(self, seq: Sequence) -> None:
        """To the front of the waiting queue, to compute prompt + output again: its blocks go,
        its tokens stay (preempted, or requeued after a lost batch)."""
        self.free_blocks(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1  # prompt + output may outgrow the budget: it may be chunked
        self.waiting.appendleft(seq)

    # ---- waiting ---------------------------------------------------------------------

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, cap: int) -> None:
        skip = 0  # isolated sequences at the head of the queue: they run in batches of their own
        while (budget > 0 and len(self.running) < self.config.max_num_seqs
               and len(out.decodes) + len(out.prefills) < cap):
            while skip < len(self.waiting) and self.waiting[skip] in self._isolated:
                skip += 1
            if skip == len(self.waiting):
                break
            num_new = self._admit(self.waiting[skip], budget, out)
            if not num_new:
                break
            budget -= num_new

    def _admit(self, seq: Sequence, budget: int, out: SchedulerOutput) -> int:
        """Start the waiting ``seq`` (its prefix-cache hits, then a first chunk within
        ``budget``): the tokens it takes, or 0 if it does not fit now."""
        if len(self.running) >= self.config.max_num_seqs:
            return 0
        prefix = self.block_manager.find_cached_prefix(seq)
        remaining = seq.num_tokens - prefix.num_blocks * self.block_manager.block_size
        num_new = min(remaining, budget)
        if num_new < remaining and not self._may_chunk(seq):
            return 0
        if not self.block_manager.can_allocate(seq, num_new, prefix):
            return 0
        self.waiting.remove(seq)  # the head, but for isolated sequences passed over
        self._allocate(seq, num_new, prefix)
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = seq.num_computed_tokens
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        out.prefills.append(ScheduledSeq.of(seq, num_new))
        return num_new

    def _chunk(self, seq: Sequence, budget: int) -> int:
        remaining = seq.num_unscheduled_tokens
        if remaining <= budget:
            return remaining
        return budget if self._may_chunk(seq) else 0

    def _may_chunk(self, seq: Sequence) -> bool:
        # A preempted sequence recomputes prompt + output, which may outgrow the budget even
        # when its prompt fit: it is chunked regardless, or it would never run again.
        return self.config.enable_chunked_prefill or seq.num_preemptions > 0

    # ---- blocks ------------------------------------------------------------------------

    def _allocate(self, seq: Sequence, num_new: int, prefix: CachedPrefix = _NO_PREFIX) -> None:
        """Blocks for ``num_new`` more tokens of ``seq`` (and its prefix hits, which count as
        computed), recorded on it."""
        got = self.block_manager.allocate(seq, num_new, prefix)
        seq.block_ids.extend(got.block_ids)
        if got.hit_block_ids:
            seq.num_computed_tokens += got.num_hit_tokens
            seq.num_registered_blocks = len(got.hit_block_ids)

    def free_blocks(self, seq: Sequence) -> None:
        """Give ``seq``'s blocks back (cached ones stay reusable until evicted)."""
        self.block_manager.free(seq.block_ids)
        seq.block_ids = []
        seq.num_registered_blocks = 0

    def _cache_full_blocks(self, seq: Sequence) -> None:
        seq.num_registered_blocks = self.block_manager.cache_full_blocks(seq)

    # ---- after the step --------------------------------------------------------------

    def update_from_output(self, out: SchedulerOutput, sampled: SamplerOutput,
                           text: TextFn | None = None) -> list[TokenUpdate]:
        """The batch came back: advance every scheduled sequence past the tokens it computed
        (their full blocks go into the prefix cache), then append each sampling row's token
        (`append_token`: the sequences it ends are retired). A sequence that ended while the
        batch was in flight (aborted, or a stop token one step ahead) takes no token; its
        blocks go back once no other batch writes them."""
        for item in out.scheduled:
            seq = item.seq
            seq.num_inflight_tokens -= item.num_new_tokens
            seq.num_placeholders -= item.samples  # its token is appended below
            if seq.is_finished:
                if not seq.in_flight:  # another batch still writes its blocks: that one frees them
                    self.free_blocks(seq)
                continue
            seq.num_computed_tokens += item.num_new_tokens
            self._cache_full_blocks(seq)
        updates = []
        rows = [item for item in out.scheduled if item.samples]
        for item, token, logprobs in zip(rows, sampled.token_ids, sampled.logprobs, strict=True):
            if not item.seq.is_finished:
                updates.append(TokenUpdate(item.seq, self.append_token(item.seq, token, logprobs, text)))
        return updates

    def append_token(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None,
                     text: TextFn | None = None) -> StopDecision | None:
        """Append a generated token and retire ``seq`` if it ends with it (`check_stop`, or the
        model's length): why it ended, or None."""
        seq.output_token_ids.append(token)
        if seq.params.logprobs is not None:
            seq.logprobs.append(logprobs)
        so_far, new_len = text(seq, token) if text is not None else (None, 0)
        decision = check_stop(seq.params, seq.output_token_ids, token, self.eos_token_ids, so_far, new_len)
        if decision is None and self.max_model_len is not None and seq.num_tokens >= self.max_model_len:
            decision = StopDecision("length")
        if decision is not None:
            seq.stop_reason = decision.stop_reason
            length = decision.finish_reason == "length"
            self.finish(seq, SequenceStatus.FINISHED_LENGTH if length else SequenceStatus.FINISHED_STOPPED)
        return decision

    def discard(self, out: SchedulerOutput) -> None:
        """The batch came back without results (computing it raised): its sequences are no
        longer in flight for it and advance by nothing; one that ended meanwhile, and is in no
        other batch, frees its blocks now (as `postprocess` would)."""
        for item in out.scheduled:
            seq = item.seq
            seq.num_inflight_tokens -= item.num_new_tokens
            seq.num_placeholders -= item.samples
            if seq.is_finished and not seq.in_flight:
                self.free_blocks(seq)

    def requeue(self, seq: Sequence) -> None:
        """Back to the front of the waiting queue to compute prompt + output again (a batch of
        it was lost; none is in flight): its blocks go, its tokens stay, as after a preemption."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._restart(seq)

    def forget_in_flight(self, seqs: list[Sequence]) -> None:
        """The group is gone: nothing computes these sequences' batches any more."""
        for seq in seqs:
            seq.num_inflight_tokens = seq.num_placeholders = 0

    # ---- KV from elsewhere (a decode group) --------------------------------------------

    def reserve(self, seq: Sequence, num_extra: int) -> bool:
        """Blocks for a sequence whose prompt KV is to arrive (not queued): its prefix hits
        (counted as computed and cached) and room for the rest of the prompt plus
        ``num_extra`` tokens; False (nothing taken) if they are not free now."""
        prefix = self.block_manager.find_cached_prefix(seq)
        num_new = seq.num_tokens + num_extra - prefix.num_blocks * self.block_manager.block_size
        if not self.block_manager.can_allocate(seq, num_new, prefix):
            return False
        self._allocate(seq, num_new, prefix)
        seq.num_cached_tokens = seq.num_computed_tokens
        return True

    def admit_prefilled(self, seq: Sequence) -> None:
        """Run a reserved sequence whose prompt KV has arrived in its blocks: the prompt is
        computed (its full blocks now cached here too); it decodes from its next token."""
        seq.num_computed_tokens = seq.num_prompt_tokens
        self._cache_full_blocks(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Retire a sequence (stopped, length, aborted) and free its blocks, unless the
        ``on_finished`` hook keeps them (a prefill group holds them until decode has them)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._isolated.pop(seq, None)
        seq.status = status
        keep = self._on_finished is not None and self._on_finished(seq, status)
        # A micro-batch still in flight writes into its blocks: they go back when it returns.
        if not keep and not seq.in_flight:
            self.free_blocks(seq)
