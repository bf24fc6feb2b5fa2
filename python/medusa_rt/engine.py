"""Python face of the C++ engine: :class:`Engine`, :class:`Session` and their results.

All model math and decoding run in C++ (``medusa_rt._core``); this module resolves model
names, tokenizes, converts options and results, and turns the engine's token callback into
a text stream. The GIL is released while the engine computes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np

from . import _core
from .errors import InvalidArgumentError, ModelFormatError
from .registry import invalidate, is_known_model, resolve_model
from .tokenizer import Tokenizer

Message = Mapping[str, Any]
Prompt = Union[str, Sequence[int], Sequence[Message]]
Stop = Union[None, str, int, Sequence[Union[str, int]]]
Tree = Union[None, str, Sequence[Sequence[int]]]

__all__ = ["Engine", "Session", "GenerationResult", "GenerationStats", "ModelInfo", "TreeSpec"]

ModelInfo = _core.ModelInfo
TreeSpec = _core.TreeSpec


@dataclass(frozen=True)
class GenerationStats:
    """Statistics of one generation (times in seconds).

    ``tokens_per_step`` counts the tokens committed per decode step, the bonus token included
    (1.0 for plain decoding; the first token comes from the prefill and is not counted).
    ``accepted_per_head[d]`` is the number of steps in which d + 1 or more speculative tokens
    were accepted. ``lookup_steps`` counts the steps that verified tokens looked up in the
    context (prompt lookup), ``lookup_tokens`` the looked-up tokens accepted.
    ``cached_prompt_tokens`` is the start of the prompt taken from the session's context, or
    copied from another slot's cache, instead of prefilled (``reuse_context``).
    ``forward_seconds`` is the time spent in model and head forwards, ``other_seconds`` the rest.
    """

    prompt_tokens: int
    new_tokens: int
    steps: int
    prefill_seconds: float
    decode_seconds: float
    seconds: float
    tokens_per_second: float
    decode_tokens_per_second: float
    medusa: bool = False
    tree_steps: int = 0
    tokens_per_step: float = 0.0
    accepted_per_head: List[int] = field(default_factory=list)
    lookup_steps: int = 0
    lookup_tokens: int = 0
    forward_seconds: float = 0.0
    other_seconds: float = 0.0
    cached_prompt_tokens: int = 0

    @classmethod
    def _from_core(cls, s: "_core.GenerationStats") -> "GenerationStats":
        return cls(
            prompt_tokens=s.prompt_tokens,
            new_tokens=s.new_tokens,
            steps=s.steps,
            prefill_seconds=s.prefill_seconds,
            decode_seconds=s.decode_seconds,
            seconds=s.total_seconds,
            tokens_per_second=s.tokens_per_second,
            decode_tokens_per_second=s.decode_tokens_per_second,
            medusa=s.medusa,
            tree_steps=s.tree_steps,
            tokens_per_step=s.tokens_per_step,
            accepted_per_head=list(s.accepted_per_head),
            lookup_steps=s.lookup_steps,
            lookup_tokens=s.lookup_tokens,
            forward_seconds=s.forward_seconds,
            other_seconds=s.other_seconds,
            cached_prompt_tokens=s.cached_prompt_tokens,
        )


@dataclass(frozen=True)
class GenerationResult:
    """Result of :meth:`Session.generate`.

    ``finish_reason`` is ``"stop"`` (a stop/EOS token or stop string was produced; it is not
    part of ``tokens`` or ``text``), ``"length"`` (max_new_tokens or max_seq_len reached) or
    ``"cancelled"``.
    """

    tokens: List[int]
    text: str
    finish_reason: str
    stats: GenerationStats = field(repr=False)


def cuda_device_count() -> int:
    """Number of CUDA GPUs this build of medusa_rt can use (``Engine(..., device="cuda:N")``):
    0 when the package was built without the CUDA backend or the machine has no GPU."""
    return int(_core.cuda_device_count())


class Engine:
    """A loaded model with its KV cache and workspaces, ready to generate.

    Args:
        model: a registry name (``"smollm2-135m"``, pulled and converted on first use) or the
            path of a model directory in the runtime format (see ``medusa-rt export``).
        dtype: weight precision in memory, ``"bf16"``, ``"fp32"``, ``"fp16"`` or ``"int8"``
            (``"bf16"`` or ``"fp16"`` on CUDA); arithmetic is fp32. ``"int8"`` (CPU only) quantizes
            the weights at load (symmetric, one scale per output feature and 32 inputs): about
            half of bf16's bytes, so faster decoding, at a small cost in fidelity (on SmolLM2-135M,
            97.9% of next-token argmaxes equal fp32's against bf16's 99.6%).
        device: ``"cpu"``, or ``"cuda"`` / ``"cuda:N"`` in builds with the CUDA backend
            (:func:`medusa_rt.cuda_device_count`).
        matmul_inputs: ``"fp32"`` (exact), or ``"bf16"``: with bf16 weights on a CPU with
            AVX512-BF16, the matrix products' inputs are rounded to bf16 and use its dot-product
            instruction (prefill about 2x, batches 1.4x, decoding 1.1x on a Zen 4; outputs
            change slightly, as on CUDA; Medusa stays lossless); ``"auto"`` (default): ``"bf16"``
            where the weights are bf16 and the CPU has it, else ``"fp32"`` (``info.matmul_inputs``).
        kv_dtype: KV cache precision, ``"fp32"`` or ``"bf16"`` (CPU only: keys and values rounded
            to bf16 when stored; half the cache memory and the bytes attention reads, for long
            contexts and many sequences; ``info.kv_dtype``).
        max_batch_size: number of sessions that can exist at once (sequence slots).
        max_seq_len: tokens per sequence, prompt included; 0 picks min(model limit, 4096).
        num_threads: CPU threads; 0 uses every available core.
        prefill_chunk: prompt tokens per forward during prefill.
        medusa_heads: a ``medusa_heads.safetensors`` file to use instead of the model
            directory's own (see ``medusa-rt export --medusa-heads``).
        tree: the Medusa tree: a built-in name (``TreeSpec.builtin_names()``, ``"chain-N"``), a
            list of paths of ranks, ``"default"``: the heads file's own tree, or ``"auto"``: the
            tree sized to this machine from the heads' accuracy table (trees fitted to it, of each size and
            depth, are timed at creation; ``info.calibration``);
            default: ``"auto"`` for heads with an accuracy table, else the heads' own tree, else
            ``mc_sim_7b_63`` cut to the number of heads.
        auto_tree_max_nodes: the largest tree ``"auto"`` considers.
        medusa_top_k: candidates kept per head (tree ranks must be below it).
        medusa_heads_dtype: precision of the heads' weights, ``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"int8"``;
            None: the model's dtype, except ``"bf16"`` for an fp32 or int8 model on the CPU (the heads
            only draft, so this changes speed, not the output; ``info.medusa_heads_dtype``).
        medusa_draft_vocab: N > 0: the heads rank only the N most frequent tokens of their
            file's draft vocabulary, by its token counts (all of it for N at least its size;
            InvalidArgumentError when the file has no draft vocabulary, or for N below its size
            without counts or below ``medusa_top_k``); 0: all of it; None: the device's default,
            6144 on the CPU where the file has counts (each heads level reads fewer rows of the
            vocabulary projection: on SmolLM2-135M a 4-node tree step cost 1.12-1.14x a plain
            step instead of 1.18-1.19x, for 0.6% fewer tokens per step) and all on CUDA. Drafts
            only: the output does not change (``info.medusa_draft_vocab``).
        medusa_max_batch: a decode step shared by more sequences than this verifies no trees
            (speculation stops paying once a step is compute-bound); 0 = never; None = measure
            it at creation: the largest batch for which a tree step costs at most
            ``medusa_expected_tokens_per_step`` plain steps here (``info.medusa_max_batch``).
        medusa_expected_tokens_per_step: for that measurement; None = the heads file's own
            figure if it has one, else 2.0.
        prompt_lookup: the longest chain of tokens looked up in the context that a step verifies
            (0: off, at most 64; None: the device's default, 4 on the CPU, 0 on CUDA where it
            has not been measured). Where the context's last 2-4 tokens occurred earlier in it, the
            tokens that followed there are verified too, as a chain under the pending token in
            place of the tree's last nodes (such a step carries as many rows as one without, at
            least 1 + the chain). Lossless like every draft; it pays where the output repeats its
            context (rewriting, summaries, code edits). Steps with a looked-up chain run on the
            host path. ``info.prompt_lookup``; ``GenerationStats.lookup_steps`` / ``lookup_tokens``.
        progress: show progress when a named model must be pulled.

    Raises:
        ModelNotFoundError, ModelFormatError, UnsupportedModelError, InvalidArgumentError,
        CapacityError: see :mod:`medusa_rt.errors`.
    """

    def __init__(
        self,
        model: Union[str, "os.PathLike[str]"] = "smollm2-135m",
        *,
        device: str = "cpu",
        dtype: str = "bf16",
        kv_dtype: str = "fp32",
        matmul_inputs: str = "auto",
        max_batch_size: int = 1,
        max_seq_len: int = 0,
        num_threads: int = 0,
        prefill_chunk: int = 128,
        medusa_heads: Union[None, str, "os.PathLike[str]"] = None,
        tree: Tree = None,
        medusa_top_k: int = 10,
        medusa_heads_dtype: Optional[str] = None,
        medusa_draft_vocab: Optional[int] = None,
        auto_tree_max_nodes: int = 128,
        medusa_max_batch: Optional[int] = None,
        medusa_expected_tokens_per_step: Optional[float] = None,
        prompt_lookup: Optional[int] = None,
        progress: bool = True,
    ) -> None:
        options = _core.EngineOptions()
        if medusa_heads is not None:
            options.medusa_heads = os.fspath(medusa_heads)
        if isinstance(tree, str):
            options.tree = tree
        elif tree is not None:
            try:
                options.tree_paths = [[_check_int("tree rank", r) for r in p] for p in tree]
            except TypeError:
                raise InvalidArgumentError("tree must be a tree name or a list of paths (lists of ranks)") from None
        options.medusa_top_k = _check_int("medusa_top_k", medusa_top_k)
        if medusa_heads_dtype is not None:
            options.medusa_heads_dtype = _check_str("medusa_heads_dtype", medusa_heads_dtype)
        options.medusa_draft_vocab = -1 if medusa_draft_vocab is None else _check_int("medusa_draft_vocab",
                                                                                   medusa_draft_vocab)
        options.auto_tree_max_nodes = _check_int("auto_tree_max_nodes", auto_tree_max_nodes)
        options.medusa_max_batch = -1 if medusa_max_batch is None else _check_int("medusa_max_batch", medusa_max_batch)
        if medusa_expected_tokens_per_step is not None:
            options.medusa_expected_tokens_per_step = _check_float(
                "medusa_expected_tokens_per_step", medusa_expected_tokens_per_step)
        options.device = _check_str("device", device)
        options.dtype = _check_str("dtype", dtype)
        options.kv_dtype = _check_str("kv_dtype", kv_dtype)
        options.matmul_inputs = _check_str("matmul_inputs", matmul_inputs)
        options.max_batch_size = _check_int("max_batch_size", max_batch_size)
        options.max_seq_len = _check_int("max_seq_len", max_seq_len)
        options.num_threads = _check_int("num_threads", num_threads)
        options.prefill_chunk = _check_int("prefill_chunk", prefill_chunk)
        options.prompt_lookup = -1 if prompt_lookup is None else _check_int("prompt_lookup", prompt_lookup)

        path = resolve_model(model, progress=progress)
        try:
            self._engine = _core.Engine(str(path), options)
        except ModelFormatError:
            # A cached registry model that fails to load is rebuilt once; user directories are
            # never touched.
            if not (isinstance(model, str) and is_known_model(model) and not Path(model).exists()):
                raise
            invalidate(model)
            path = resolve_model(model, progress=progress)
            self._engine = _core.Engine(str(path), options)
        self.model_dir: Path = Path(path)
        self.tokenizer: Tokenizer = Tokenizer.from_model_dir(self.model_dir)

    @property
    def info(self) -> "_core.ModelInfo":
        """Model and engine facts: dimensions, max_seq_len, dtype, ISA, memory use."""
        return self._engine.info

    def session(self, *, wait: float = 0.0, prompt: Optional[Prompt] = None, chat: bool = False) -> "Session":
        """Acquires a sequence slot, waiting up to ``wait`` seconds for one to come free.
        Raises CapacityError when none does (all ``max_batch_size`` slots are taken).

        Close the session (or use it as a context manager) to free the slot. A slot keeps its
        cache when let go: the new session's context is empty, but its first request reuses
        what the cache holds (``reuse_context``). ``prompt`` (with ``chat`` as in
        :meth:`Session.generate`), the first request's prompt if known, picks the free slot
        whose cache shares the longest start with it: a conversation's next turn finds its
        earlier turns there.
        """
        ids = [] if prompt is None else _encode_prompt(self, prompt, chat)
        return Session(self, self._engine.session(_check_float("wait", wait), ids))

    def generate(self, prompt: Prompt, **kwargs) -> GenerationResult:
        """A one-off generation on a session of its own (see :meth:`Session.generate`), in the
        free slot whose cache shares the longest start with the prompt (less what it would
        overwrite of a start earlier requests used and no other slot holds): stateless requests
        that continue a conversation, or share an instruction prefix, prefill only what is new."""
        ids = _encode_prompt(self, prompt, kwargs.pop("chat", False))
        with self.session(prompt=ids) as s:
            return s.generate(ids, **kwargs)

    async def agenerate(self, prompt: Prompt, *, wait: float = 60.0,
                        on_text: Optional[Callable[[str], Any]] = None, **kwargs) -> GenerationResult:
        """:meth:`generate` for asyncio code: the engine works in a thread of its own (it releases
        the GIL), so the event loop stays free, and concurrent calls share decode steps like
        sessions in threads (up to ``max_batch_size`` at once). Waits up to ``wait`` seconds for
        a free slot (CapacityError after that). ``on_text(piece)``, if given, is called in the
        event loop with the text as it is decoded. Cancelling the awaiting task cancels the
        generation at its next token block. Keyword arguments are those of
        :meth:`Session.generate`."""
        result: Optional[GenerationResult] = None
        async for kind, payload in _generate_in_thread(self, prompt, wait, kwargs):
            if kind == "text" and on_text is not None:
                on_text(payload)  # type: ignore[arg-type]
            elif kind == "done":
                result = payload  # type: ignore[assignment]
        assert result is not None
        return result

    async def astream(self, prompt: Prompt, *, wait: float = 60.0, **kwargs) -> AsyncIterator[str]:
        """Text pieces as they are decoded, for ``async for`` (see :meth:`agenerate`; use it with
        ``on_text`` to get the statistics as well). Leaving the loop early (closing the
        iterator) cancels the generation at its next token block."""
        async for kind, payload in _generate_in_thread(self, prompt, wait, kwargs):
            if kind == "text":
                yield payload  # type: ignore[misc]

    def generate_batch(
        self,
        prompts: Sequence[Prompt],
        *,
        on_tokens: Optional[Callable[[int, List[int]], Optional[bool]]] = None,
        **kwargs,
    ) -> List[GenerationResult]:
        """Generates for every prompt, batched in the engine: up to ``max_batch_size`` requests
        share each decode step (in the slots no session holds) and waiting requests join as
        others finish. Results come in input order, each with its own statistics.

        Keyword arguments are those of :meth:`Session.generate` and apply to every request.
        ``on_tokens(index, tokens)`` (called from the engine while it works) receives each
        request's new tokens (with stop strings: up to the token block in whose text a stop
        string appears; the results are cut before it); returning False cancels that request
        only. Each request takes the
        free slot whose cache shares the longest start with its prompt and prefills only the rest
        (``reuse_context``): a shared instruction or few-shot prefix is prefilled once, by the
        first request, and copied from its slot's cache for the others.
        """
        # The options are shared: one config; only the prompts differ.
        chat = kwargs.pop("chat", False)
        ids = [_encode_prompt(self, p, chat) for p in prompts]
        config = _make_config(self, **kwargs)
        stops = _stop_strings(kwargs.get("stop"))
        if not stops:
            return [_make_result(self, r) for r in self._engine.generate_batch(ids, config, on_tokens)]
        outs = [_Output(self, stops) for _ in ids]

        def watch(i: int, tokens: List[int]) -> bool:
            go_on = outs[i].feed(tokens)[1]
            return (on_tokens is None or on_tokens(i, tokens) is not False) and go_on

        return [out.result(r)[0] for out, r in zip(outs, self._engine.generate_batch(ids, config, watch))]


class Session:
    """One sequence slot of an :class:`Engine`. Not to be used by two threads at once."""

    def __init__(self, engine: Engine, core_session: "_core.Session") -> None:
        self._engine = engine
        self._session: Optional[_core.Session] = core_session
        self.last_result: Optional[GenerationResult] = None
        self._streams: "set[threading.Event]" = set()  # cancel flags of this session's live streams

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        """Frees the session's slot now, whatever else still refers to the session. A stream
        still open (an iterator not run to its end nor closed) is cancelled: its slot goes back at
        its next token block. A generation running in another thread keeps the slot until it
        returns. The session cannot be used afterwards."""
        core, self._session = self._session, None
        for cancel in list(self._streams):
            cancel.set()
        if core is not None:
            core.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _core(self) -> "_core.Session":
        if self._session is None:
            raise InvalidArgumentError("this session is closed")
        return self._session

    # -- generation ----------------------------------------------------------------------
    def _prepare(self, *args) -> "tuple[List[int], _core.GenerationConfig, List[str]]":
        return _prepare_request(self._engine, *args)

    def _result(self, core_result: "_core.GenerationResult", out: Optional["_Output"] = None) -> GenerationResult:
        self.last_result = out.result(core_result)[0] if out is not None else _make_result(self._engine, core_result)
        return self.last_result

    def generate(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int = 128,
        stop: Stop = None,
        chat: bool = False,
        ignore_eos: bool = False,
        medusa: Optional[bool] = None,
        acceptance: str = "greedy",
        posterior_threshold: float = 0.09,
        posterior_alpha: float = 0.3,
        temperature: float = 1.0,
        prompt_lookup: bool = True,
        do_sample: bool = False,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = -1,
        reuse_context: bool = True,
        cancel: Optional[Callable[[], bool]] = None,
    ) -> GenerationResult:
        """Generates a continuation of ``prompt`` (greedily unless ``do_sample``).

        The session's context becomes the prompt, and afterwards holds the prompt and the answer
        (but its last token), so the next request can pick up from it: with ``reuse_context``
        the start of the prompt that the slot's cache already holds is not prefilled again. In a
        multi-turn chat, pass the whole conversation each turn and only the new turn is
        prefilled. The output is the same either way (the cached entries are bit for bit those a
        prefill writes); ``stats.cached_prompt_tokens`` says how many prompt tokens were reused.

        Args:
            prompt: text, token ids used as they are, or chat messages (a list of
                ``{"role": ..., "content": ...}`` dicts, rendered with the model's chat template
                and its generation prompt).
            max_new_tokens: upper bound on new tokens (>= 0).
            stop: stop strings and/or token ids; the model's EOS tokens always stop unless
                ``ignore_eos``. A stop string is matched on the decoded text, whatever tokens
                carry it: the text ends right before it and ``tokens`` before the token where it
                begins (finish reason "stop").
            chat: wrap a text prompt in the model's chat template (one user turn).
            ignore_eos: keep generating past EOS tokens.
            medusa: Medusa tree decoding: None = when the engine has heads, True = require
                heads, False = plain decoding (no prompt lookup either).
            acceptance: ``"greedy"`` (output identical to plain greedy decoding) or
                ``"typical"`` (Medusa's typical acceptance: accept a speculative token when its
                probability exceeds min(posterior_threshold, posterior_alpha * exp(-entropy)),
                probabilities from softmax(logits / temperature)). The typical parameters are
                checked whatever the mode: thresholds in (0, 1], temperature finite and >= 0
                (> 0 for typical; 0 means greedy).
            prompt_lookup: use the engine's prompt lookup (``Engine(prompt_lookup=N)``) for
                this request (with or without heads; not with ``medusa=False``).
            do_sample: draw each token from softmax(logits / temperature), truncated to the
                ``top_k`` most likely tokens (0: no cut) and then to the smallest set of the most
                likely ones reaching probability ``top_p``, instead of taking the argmax. Each
                position's draw is fixed by (``seed``, position) and a Medusa draft token is
                accepted when it equals the token drawn at its position, so a request gives the
                same tokens with or without Medusa (lossless; greedy acceptance only). Needs
                temperature > 0.
            seed: seed of the draws (>= 0), or -1 for a random one per request;
                :meth:`Engine.generate_batch` gives request i the seed ``seed + i``.
            reuse_context: keep the start of the prompt that the slot's cache holds (see
                above; also what an earlier session or batch request left in the slot), or copy
                a longer start from another slot's cache (a prompt another session prefilled,
                e.g. a shared system prompt); False prefills the whole prompt.
            cancel: called in this thread after each block of tokens the engine commits; when it
                returns True the generation ends there (finish reason ``"cancelled"``, even on
                the last block), e.g. once a server's client has left.

        Raises:
            InvalidArgumentError: bad prompt or options (empty prompt, token id out of range,
                negative max_new_tokens, negative or NaN temperature, ...).
            CapacityError: the prompt does not fit in max_seq_len.
        """
        ids, config, stops = self._prepare(prompt, max_new_tokens, stop, chat, ignore_eos, medusa, acceptance,
                                           posterior_threshold, posterior_alpha, temperature, prompt_lookup,
                                           do_sample, top_k, top_p, seed, reuse_context)
        out = _Output(self._engine, stops) if stops else None
        if out is None and cancel is None:
            return self._result(self._core().generate(ids, config))

        def on_tokens(tokens: List[int]) -> bool:
            go_on = out.feed(tokens)[1] if out is not None else True
            return go_on and not (cancel is not None and cancel())

        return self._result(self._core().generate(ids, config, on_tokens), out)

    def stream(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int = 128,
        stop: Stop = None,
        chat: bool = False,
        ignore_eos: bool = False,
        medusa: Optional[bool] = None,
        acceptance: str = "greedy",
        posterior_threshold: float = 0.09,
        posterior_alpha: float = 0.3,
        temperature: float = 1.0,
        prompt_lookup: bool = True,
        do_sample: bool = False,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = -1,
        reuse_context: bool = True,
    ) -> Iterator[str]:
        """Like :meth:`generate`, but yields text pieces as tokens are decoded.

        Pieces never split a UTF-8 character. Closing the iterator early cancels the
        generation. Afterwards :attr:`last_result` holds the full :class:`GenerationResult`.
        """
        ids, config, stops = self._prepare(prompt, max_new_tokens, stop, chat, ignore_eos, medusa, acceptance,
                                           posterior_threshold, posterior_alpha, temperature, prompt_lookup,
                                           do_sample, top_k, top_p, seed, reuse_context)
        core = self._core()
        out = _Output(self._engine, stops)  # fed by the worker; read here once it is done
        # A short queue: the engine runs at most a block or two ahead of the consumer, and a
        # consumer that stops (closes the iterator) cancels the generation at its next block.
        events: "queue.Queue[tuple[str, object]]" = queue.Queue(maxsize=2)
        cancel = threading.Event()  # set by closing the iterator or the session
        self._streams.add(cancel)

        def on_tokens(tokens: List[int]) -> bool:
            piece, go_on = out.feed(tokens)
            while piece and not cancel.is_set():
                try:
                    events.put(("text", piece), timeout=0.05)
                    break
                except queue.Full:
                    continue
            return go_on and not cancel.is_set()

        def run() -> None:
            try:
                item: "tuple[str, object]" = ("done", core.generate(ids, config, on_tokens))
            except BaseException as exc:  # re-raised in the consumer's thread
                item = ("error", exc)
            while True:
                try:
                    events.put(item, timeout=0.05)
                    return
                except queue.Full:
                    if cancel.is_set():
                        try:  # the consumer is gone: make room for the final item
                            events.get_nowait()
                        except queue.Empty:
                            pass

        worker = threading.Thread(target=run, name="medusa_rt-stream", daemon=True)
        worker.start()
        finished = False
        try:
            while True:
                kind, payload = events.get()
                if kind == "text":
                    yield payload  # type: ignore[misc]
                elif kind == "done":
                    finished = True
                    self.last_result, tail = out.result(payload)  # type: ignore[arg-type]
                    if tail:
                        yield tail
                    return
                else:
                    finished = True
                    raise payload  # type: ignore[misc]
        finally:
            # Closing the iterator early cancels the engine at its next token block; the
            # cancelled result still becomes last_result.
            cancel.set()
            self._streams.discard(cancel)
            while not finished:
                try:
                    kind, payload = events.get(timeout=0.05)
                except queue.Empty:
                    if not worker.is_alive() and events.empty():
                        break
                    continue
                if kind == "done":
                    self._result(payload, out)  # type: ignore[arg-type]
                    finished = True
                elif kind == "error":
                    finished = True
            worker.join()

    # -- low level -----------------------------------------------------------------------
    def forward(self, tokens: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        """Appends ``tokens`` to the session's context and returns logits, shape
        ``[len(tokens), vocab]`` if ``all_logits`` else ``[1, vocab]`` (the last token's)."""
        return self._core().forward([_check_int("token", t) for t in tokens], all_logits)

    def hidden_states(self, tokens: Sequence[int], layers: Sequence[int] = ()) -> np.ndarray:
        """Appends ``tokens`` to the session's context and returns the final normed hidden
        states of every one, shape ``[len(tokens), hidden_size]`` (what Medusa heads read).

        With ``layers`` (at most 8 distinct decoder layers ``L``, ``1 <= L < num_layers``), shape
        ``[len(tokens), 1 + len(layers), hidden_size]``: the final hidden state, then the residual
        stream after each of those layers (transformers' ``hidden_states[L]``), what heads with
        feature layers read. A bad list raises :class:`InvalidArgumentError` before anything is
        appended."""
        return self._core().hidden_states([_check_int("token", t) for t in tokens],
                                          [_check_int("layer", x) for x in layers])

    def reset(self) -> None:
        """Clears the session's context."""
        self._core().reset()

    @property
    def context_length(self) -> int:
        """Tokens currently in the session's context."""
        return self._core().context_length


async def _generate_in_thread(engine: Engine, prompt: Prompt, wait: float,
                              kwargs: dict) -> AsyncIterator["tuple[str, object]"]:
    """One generation on a session of its own, run in a worker thread: yields ("text", piece) as
    tokens are decoded, then ("done", GenerationResult); raises what the generation raised. On
    leaving early the worker is told to stop at its next token block (and releases its slot)."""
    ids, config, stops = _prepare_request(engine, prompt, **kwargs)
    wait = _check_float("wait", wait)
    out = _Output(engine, stops)  # fed by the worker; read here once it is done
    loop = asyncio.get_running_loop()
    events: "asyncio.Queue[tuple[str, object]]" = asyncio.Queue()
    cancel = threading.Event()

    def post(item: "tuple[str, object]") -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            cancel.set()

    def on_tokens(tokens: List[int]) -> bool:
        if cancel.is_set():
            return False
        piece, go_on = out.feed(tokens)
        if piece:
            post(("text", piece))
        return go_on

    def work() -> None:
        try:
            with engine.session(wait=wait, prompt=ids) as s:
                if cancel.is_set():  # given up while waiting for the slot
                    return
                item: "tuple[str, object]" = ("done", s._core().generate(ids, config, on_tokens))
        except BaseException as exc:  # re-raised in the event loop
            item = ("error", exc)
        post(item)

    threading.Thread(target=work, name="medusa_rt-async", daemon=True).start()
    try:
        while True:
            kind, payload = await events.get()
            if kind == "text":
                yield "text", payload
            elif kind == "done":
                result, tail = out.result(payload)  # type: ignore[arg-type]
                if tail:
                    yield "text", tail
                yield "done", result
                return
            else:
                raise payload  # type: ignore[misc]
    finally:
        cancel.set()


def _prepare_request(
    engine: Engine,
    prompt: Prompt,
    max_new_tokens: int = 128,
    stop: Stop = None,
    chat: bool = False,
    ignore_eos: bool = False,
    medusa: Optional[bool] = None,
    acceptance: str = "greedy",
    posterior_threshold: float = 0.09,
    posterior_alpha: float = 0.3,
    temperature: float = 1.0,
    prompt_lookup: bool = True,
    do_sample: bool = False,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = -1,
    reuse_context: bool = True,
) -> "tuple[List[int], _core.GenerationConfig, List[str]]":
    """Token ids, the engine's GenerationConfig and the stop strings (matched on the text by
    :class:`_Output`) of one request (see Session.generate)."""
    ids = _encode_prompt(engine, prompt, chat)
    config = _make_config(engine, max_new_tokens, stop, ignore_eos, medusa, acceptance, posterior_threshold,
                          posterior_alpha, temperature, prompt_lookup, do_sample, top_k, top_p, seed, reuse_context)
    return ids, config, _stop_strings(stop)


def _stop_strings(stop: Stop) -> List[str]:
    """The stop strings among a request's stops (its token ids are the engine's alone)."""
    items = [] if stop is None else [stop] if isinstance(stop, (str, int)) else list(stop)
    return [x for x in items if isinstance(x, str)]


class _Output:
    """One generation's text as the engine commits its tokens, with the request's stop strings
    matched on that text. The engine matches each stop string as the token sequence it encodes
    to, but the same text can come as other tokens ("fruit" inside " fruits"); this catches
    those. :meth:`feed` returns the text that can be shown so far (a tail that could begin a stop
    string is held back) and whether to go on; :meth:`result` cuts the result at the first stop
    string. Not thread-safe: one thread feeds it, and reads the result once generation ended."""

    def __init__(self, engine: Engine, stops: Sequence[str]) -> None:
        self._engine = engine
        self._stops = list(stops)
        self._longest = max((len(x) for x in self._stops), default=0)
        self._decoder = engine.tokenizer.incremental_decoder()
        self._text = ""  # decoded so far
        self._shown = 0  # characters of it handed out
        self._cut: Optional[int] = None  # where the first stop string starts

    def feed(self, tokens: Sequence[int]) -> "tuple[str, bool]":
        if self._cut is None:
            self._scan(self._decoder.feed(tokens))
        return self._take(final=False), self._cut is None

    def _scan(self, piece: str) -> None:
        if not piece:
            return
        start = max(0, len(self._text) - self._longest + 1)  # where a new occurrence can begin
        self._text += piece
        hits = [i for i in (self._text.find(x, start) for x in self._stops) if i >= 0]
        if hits:
            self._cut = min(hits)

    def _take(self, final: bool) -> str:
        end = len(self._text) if self._cut is None else self._cut
        if not final and self._cut is None:  # hold back a tail that may begin a stop string
            end -= next((k for k in range(min(self._longest - 1, end), 0, -1)
                         if any(x.startswith(self._text[-k:]) for x in self._stops)), 0)
        piece = self._text[self._shown:end]
        self._shown = max(self._shown, end)
        return piece

    def result(self, core_result: "_core.GenerationResult") -> "tuple[GenerationResult, str]":
        """The engine's result, cut before the first stop string in its text (finish reason
        "stop"; ``tokens`` then end before the token where the stop string begins), and the text
        not handed out yet."""
        if self._cut is None:
            self._scan(self._decoder.flush())
        result = _make_result(self._engine, core_result)
        if self._cut is not None:
            decode = self._engine.tokenizer.decode
            k = len(result.tokens)
            while k > 0 and len(decode(result.tokens[:k])) > self._cut:
                k -= 1
            result = dataclasses.replace(result, tokens=result.tokens[:k], text=self._text[:self._cut],
                                         finish_reason="stop",
                                         stats=dataclasses.replace(result.stats, new_tokens=k))
        return result, self._take(final=True)


def _encode_prompt(engine: Engine, prompt: Prompt, chat: bool) -> List[int]:
    tok = engine.tokenizer
    if isinstance(prompt, str):
        if chat:
            ids = tok.encode(tok.apply_chat_template(prompt), add_special_tokens=False)
        else:
            ids = tok.encode(prompt)
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, Mapping) for m in prompt):
        ids = tok.encode_chat(prompt)  # chat messages: always through the template
    elif isinstance(prompt, (list, tuple, np.ndarray)):
        if any(isinstance(m, Mapping) for m in prompt):
            raise InvalidArgumentError("prompt mixes chat messages (dicts) with other items: give a list of "
                                       "{'role', 'content'} dicts, a text or token ids")
        if chat:
            raise InvalidArgumentError("chat=True needs a text prompt or chat messages, not token ids")
        ids = [_check_int("prompt token", t) for t in prompt]
    else:
        raise InvalidArgumentError(f"prompt must be a str, a list of token ids or a list of chat messages, "
                                   f"got {type(prompt).__name__}")
    return ids


def _make_config(
    engine: Engine,
    max_new_tokens: int = 128,
    stop: Stop = None,
    ignore_eos: bool = False,
    medusa: Optional[bool] = None,
    acceptance: str = "greedy",
    posterior_threshold: float = 0.09,
    posterior_alpha: float = 0.3,
    temperature: float = 1.0,
    prompt_lookup: bool = True,
    do_sample: bool = False,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = -1,
    reuse_context: bool = True,
) -> "_core.GenerationConfig":
    tok = engine.tokenizer
    config = _core.GenerationConfig()
    config.max_new_tokens = _check_int("max_new_tokens", max_new_tokens)
    config.ignore_eos = bool(ignore_eos)
    stop_ids: List[int] = []
    stop_seqs: List[List[int]] = []
    items = [] if stop is None else [stop] if isinstance(stop, (str, int)) else list(stop)
    for item in items:
        if isinstance(item, str):
            if not item:
                raise InvalidArgumentError("stop strings must not be empty")
            special = tok.token_to_id(item)
            seq = [special] if special is not None else tok.encode(item, add_special_tokens=False)
            stop_seqs.append(seq)
        else:
            stop_ids.append(_check_int("stop token", item))
    config.stop_token_ids = stop_ids
    config.stop_sequences = stop_seqs
    if medusa and not engine.info.medusa_heads:
        raise InvalidArgumentError(
            f"medusa=True but the model at {engine.model_dir} has no Medusa heads "
            "(export some with `medusa-rt export --medusa-heads`)")
    config.medusa = medusa is not False
    config.acceptance = _check_str("acceptance", acceptance)
    config.posterior_threshold = _check_float("posterior_threshold", posterior_threshold)
    config.posterior_alpha = _check_float("posterior_alpha", posterior_alpha)
    config.temperature = _check_float("temperature", temperature)
    config.prompt_lookup = bool(prompt_lookup)
    config.do_sample = bool(do_sample)
    config.top_k = _check_int("top_k", top_k)
    config.top_p = _check_float("top_p", top_p)
    config.seed = _check_int("seed", seed, bits=64)
    config.reuse_context = bool(reuse_context)
    return config


def _make_result(engine: Engine, core_result: "_core.GenerationResult") -> GenerationResult:
    tokens = list(core_result.tokens)
    return GenerationResult(
        tokens=tokens,
        text=engine.tokenizer.decode(tokens),
        finish_reason=core_result.finish_reason,
        stats=GenerationStats._from_core(core_result.stats),
    )


def _check_int(name: str, value: object, bits: int = 32) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidArgumentError(f"{name} must be an integer, got {value!r}")
    if not -(2**(bits - 1)) <= int(value) < 2**(bits - 1):
        raise InvalidArgumentError(f"{name} {int(value)} is out of range ({bits}-bit integers)")
    return int(value)


def _check_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InvalidArgumentError(f"{name} must be a number, got {value!r}")
    return float(value)


def _check_str(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{name} must be a string, got {value!r}")
    return value
