"""One model on one device, loaded once, with its KV cache: builds an engine for each piece of work."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from batchllm.config import EngineConfig, SamplingParams
from batchllm.engine.cuda_graphs import DecodeGraphs, decode_graph_mode
from batchllm.engine.guide import Guide
from batchllm.engine.loop import Engine
from batchllm.engine.model_runner import ModelRunner
from batchllm.engine.placement import kv_pool_blocks, make_backend, resolve_placement
from batchllm.engine.stopping import StopChecker
from batchllm.errors import JobError
from batchllm.model.config import ModelConfig
from batchllm.model.decoder import allocate_kv_caches, kv_bytes_per_block
from batchllm.model.loader import load_model
from batchllm.scheduler.block_pool import BlockPool
from batchllm.scheduler.scheduler import Scheduler


class ModelHost:
    """The model, its attention backend and KV cache on the device the engine config resolves to."""

    jump_forward = True  # structured output: forced tokens join a row without sampling (see Guide)

    def __init__(
        self,
        model_path: Path,
        mcfg: ModelConfig,
        tokenizer,
        engine_cfg: EngineConfig,
        sampling: SamplingParams,
        loader: Callable = load_model,  # the driver passes its own, so benchmarks can time it
    ) -> None:
        self.mcfg, self.cfg, self.sampling = mcfg, engine_cfg, sampling
        self.place = resolve_placement(engine_cfg)
        dummy = engine_cfg.load_format == "dummy"
        self.model = loader(model_path, mcfg, self.place.dtype, self.place.device, dummy)
        self.backend = make_backend(engine_cfg, self.place.device)
        self.stopper = StopChecker(tokenizer, mcfg.eos_token_ids, sampling)
        self.kv_caches: list = []
        self.kv_blocks = 0  # blocks in the KV cache now allocated
        self.grammars = None  # a GrammarCache (engine.constraints) when the job has output grammars
        # Decode steps through CUDA graphs ("capture"), the same padded path run eagerly ("padded", for
        # tests on the CPU), or eagerly (None); set before the first engine is built.
        graphs = decode_graph_mode(engine_cfg, self.place.device, self.backend.name, mcfg.moe is not None)
        self.graph_mode = "capture" if graphs else None
        self.graphs: DecodeGraphs | None = None

    @property
    def device_name(self) -> str:
        return str(self.place.device)

    @property
    def dtype_name(self) -> str:
        return str(self.place.dtype).removeprefix("torch.")

    def pool_blocks(self, blocks_needed: int) -> int:
        """Blocks a pool for ``blocks_needed`` gets: that many, unless the memory setting allows fewer."""
        bytes_per_block = kv_bytes_per_block(self.mcfg, self.cfg.block_size, self.place.dtype)
        return kv_pool_blocks(self.cfg, self.place.device, bytes_per_block, blocks_needed)

    def engine(self, blocks_needed: int, blocks_least: int) -> Engine:
        """An engine for one piece of work over the host's one KV cache, refused below ``blocks_least``
        (the longest row with its prefixes). ``blocks_needed`` is all the work at once."""
        cfg = self.cfg
        bytes_per_block = kv_bytes_per_block(self.mcfg, cfg.block_size, self.place.dtype)
        self._ensure_kv_cache(bytes_per_block, blocks_needed)
        if self.kv_blocks < blocks_least:
            raise JobError(
                f"the KV cache holds {self.kv_blocks} blocks but the longest row needs {blocks_least} "
                f"({blocks_least * bytes_per_block / 2**20:.1f} MiB); raise --kv-cache-memory"
            )
        pool = BlockPool(self.kv_blocks)
        scheduler = Scheduler(
            pool, cfg.block_size, cfg.token_budget, cfg.max_running, self.sampling.max_new_tokens
        )
        runner = ModelRunner(self.model, self.kv_caches, self.backend, cfg.block_size, self.sampling)
        runner.graphs = self.graphs
        guide = None
        if self.grammars is not None:
            guide = Guide(self.grammars, self.sampling.max_new_tokens, self.jump_forward)
        return Engine(scheduler, runner, self.stopper, guide=guide)

    def _ensure_kv_cache(self, bytes_per_block: int, blocks_needed: int) -> None:
        """Allocate the KV cache once, sized before anything else holds KV memory, and reuse it for
        every unit and window. On CUDA it takes the whole memory setting; on the CPU (where memory is
        not reserved up front) only what the work needs, grown when a later unit needs more."""
        cuda = self.place.device.type == "cuda"
        if self.kv_caches and (cuda or self.kv_blocks >= blocks_needed):
            return
        self.kv_caches = []  # the CPU's smaller cache goes before the larger one is allocated
        num_blocks = kv_pool_blocks(
            self.cfg, self.place.device, bytes_per_block, None if cuda else blocks_needed
        )
        scratch = 1 if self.graph_mode else 0  # graphs' padding rows write to a block past the pool's
        self.kv_caches = allocate_kv_caches(
            self.mcfg, num_blocks + scratch, self.cfg.block_size, self.place.dtype, self.place.device
        )
        self.kv_blocks = num_blocks
        self.graphs = self._decode_graphs(num_blocks) if self.graph_mode else None

    def _decode_graphs(self, scratch_block: int) -> DecodeGraphs:
        cfg = self.cfg
        return DecodeGraphs(
            self.model, self.kv_caches, self.backend, cfg.block_size,
            max_rows=min(cfg.cuda_graph_max_batch, cfg.max_running),
            width=-(-self.mcfg.max_position_embeddings // cfg.block_size),
            scratch_block=scratch_block, capture=self.graph_mode == "capture",
        )  # fmt: skip
