"""Ray Serve LLM callbacks for convert's engine deployment (vllm_engine.llm_config names them by path, so this
module, and Ray's internal callback base it extends, are imported only in the engine replicas).

    LLMConfig(..., callback_config={"callback_class": "transformllm_ray.convert.serve_callbacks.LocalWeights"})
"""

from __future__ import annotations

from ray.llm._internal.common.callbacks.base import CallbackBase  # the base LLMConfig.callback_config expects


class LocalWeights(CallbackBase):
    """Weights already in a local folder: skip Serve's per-node model download task (it would only import
    vLLM once more to find nothing to fetch)."""

    async def on_before_node_init(self) -> None:
        self.ctx.run_init_node = False
