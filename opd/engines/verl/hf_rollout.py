"""The `opd_hf` rollout backend for verl: transformers `generate` in a Ray actor, weights synced from the actor.

verl's async rollout has three parts, and this module provides each:
- `HFRolloutServer`, the Ray actor the agent loop sends token-in/token-out requests to (vLLM's server in verl);
- `HFReplica`, which verl's LLMServerManager builds per replica to launch that actor (`RolloutReplicaRegistry`);
- `HFServerAdapter`, which every hybrid actor worker builds (`_ROLLOUT_REGISTRY`) and through which verl pushes
  the trained weights after each step (and once before the first rollout).
It is a CPU backend for tests and toy runs: one request at a time per replica, full fp32 state dict through Ray's
object store per sync. Only the hybrid mode (rollout colocated with the FSDP actor) is supported.
"""

from __future__ import annotations

import asyncio
import logging
import os

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica, TokenOutput

from opd.engines.verl.hf_generator import HFGenerator, sampling_from_verl
from opd.engines.verl.registration import ROLLOUT_NAME

logger = logging.getLogger(__name__)


def server_actor_name(replica_rank: int, suffix: str = "") -> str:
    return f"{ROLLOUT_NAME}_server_{replica_rank}{suffix}"


class HFRolloutServer:
    """The Ray actor verl's agent loop calls `generate` on; also takes the actor's weights each step."""

    def __init__(self, config, model_path: str, replica_rank: int):
        """`config`: verl's RolloutConfig (dtype, seed, lengths, load_format)."""
        self.config = config
        random_init = "dummy" in (config.load_format or "")
        self.generator = HFGenerator(
            model_path, dtype=config.dtype, random_init=random_init, seed=int(config.seed) + replica_rank
        )
        self.global_steps = None
        self.lock = asyncio.Lock()

    async def ready(self) -> bool:
        return True

    async def generate(
        self, prompt_ids, sampling_params: dict, request_id: str, image_data=None, video_data=None, **kwargs
    ) -> TokenOutput:
        if image_data is not None or video_data is not None or kwargs.get("audio_data") is not None:
            raise NotImplementedError(f"the {ROLLOUT_NAME} rollout is text-only")
        prompt_ids = [int(t) for t in prompt_ids]
        sampling = sampling_from_verl(self.config, dict(sampling_params), len(prompt_ids))
        async with self.lock:
            tokens, log_probs, _finish = await asyncio.to_thread(self.generator.generate, prompt_ids, sampling)
        return TokenOutput(
            token_ids=tokens,
            log_probs=log_probs,
            stop_reason="completed",
            extra_fields={"global_steps": self.global_steps},
        )

    async def load_weights(self, named: dict, global_steps=None) -> int:
        async with self.lock:
            n = await asyncio.to_thread(self.generator.load_weights, named)
        self.global_steps = global_steps
        return n

    # lifecycle calls verl's replica / checkpoint manager makes; on the CPU there is no memory to free or restore
    async def wake_up(self):
        return None

    async def sleep(self):
        return None

    async def abort_all_requests(self, reject_request: bool = False):
        return None

    async def resume_generation(self):
        return None

    async def clear_kv_cache(self):
        return None

    async def release_kv_cache(self):
        return None

    async def resume_kv_cache(self):
        return None

    async def start_profile(self, **kwargs):
        return None

    async def stop_profile(self):
        return None


def _model_path(model_config) -> str:
    from verl.utils.fs import copy_to_local

    return copy_to_local(model_config.path, use_shm=bool(model_config.get("use_shm", False)))


class HFReplica(RolloutReplica):
    """Launches one `HFRolloutServer` per replica, on the node of the replica's first actor worker."""

    def rollout_worker_use_gpu(self) -> bool:
        return False

    async def launch_servers(self):
        if self.rollout_mode != RolloutMode.HYBRID:
            raise NotImplementedError(
                f"the {ROLLOUT_NAME} rollout supports only the hybrid mode (rollout colocated "
                f"with the actor), not {self.rollout_mode}"
            )
        node_id = await self.workers[0].__ray_call__.remote(lambda worker: ray.get_runtime_context().get_node_id())
        name = server_actor_name(self.replica_rank, self.name_suffix)
        server = (
            ray.remote(HFRolloutServer)
            .options(
                name=name,
                num_cpus=0,
                num_gpus=0,
                max_concurrency=self.max_concurrency,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
            )
            .remote(config=self.config, model_path=_model_path(self.model_config), replica_rank=self.replica_rank)
        )
        await server.ready.remote()  # a model that fails to load fails here, not at the first request
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"{ROLLOUT_NAME}://{name}"  # only a key for verl's load balancer; no HTTP


class HFServerAdapter(BaseRollout):
    """The rollout as a hybrid actor worker sees it: forwards the actor's weights to its replica's server."""

    def __init__(self, config, model_config, device_mesh, *args, replica_rank: int = -1, **kwargs):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", 0))
        per_replica = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        self.replica_rank = rank // per_replica if replica_rank == -1 else replica_rank
        self.is_leader = rank % per_replica == 0
        self._server = None  # looked up on first use: the adapter is built before verl launches the servers

    def _server_handle(self):
        if self._server is None:
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]):
        return None

    async def release(self):
        return None

    async def update_weights(self, weights, wire_format: str = "named_tensors", **kwargs):
        """Every rank drains the generator (each full tensor is gathered collectively); the leader sends the dict."""
        if wire_format != "named_tensors":
            raise NotImplementedError(f"the {ROLLOUT_NAME} rollout takes full named tensors, not {wire_format!r}")
        if kwargs.get("peft_config") is not None:
            raise NotImplementedError(
                f"the {ROLLOUT_NAME} rollout does not take LoRA adapters; set actor_rollout_ref.model.lora.merge=True"
            )
        named = {}
        for name, tensor in weights:
            if self.is_leader:
                named[name] = tensor.detach().to("cpu", copy=True)
        if self.is_leader:
            n = await self._server_handle().load_weights.remote(named, kwargs.get("global_steps"))
            logger.info(
                "synced %d tensors into %s (global_steps=%s)",
                n,
                server_actor_name(self.replica_rank),
                kwargs.get("global_steps"),
            )
