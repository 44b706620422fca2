"""The sparse MLP of Mixtral, Qwen2-MoE and Qwen3-MoE: a router picks each token's top-k experts.

Routing follows transformers op for op: softmax (float32) over the router logits, top-k, then
(Mixtral always, Qwen when ``norm_topk_prob``) the k probabilities renormalised to sum to 1.
The experts then run as a grouped matmul over the step's (token, expert) pairs sorted by expert:
the Triton kernel in ``batchllm.kernels.fused_moe`` on CUDA, one matmul per hit expert on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from batchllm.kernels.fused_moe import fused_moe, sort_by_expert
from batchllm.model.config import ModelConfig
from batchllm.model.layers import MLP, activation, empty_param


def route(
    logits: torch.Tensor,  # [T, num_experts]
    top_k: int,
    renormalize: bool,
    mixtral: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # weights [T, top_k] float32, experts [T, top_k] int64
    """Each token's experts, in increasing expert order, and their weights."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if not mixtral:  # Qwen casts the weights back to the model dtype; Mixtral keeps float32
        weights = weights.to(logits.dtype).float()
    # transformers adds the experts' outputs in expert order: sort so the sum rounds the same way.
    experts, order = experts.sort(dim=-1)
    return weights.gather(1, order), experts


class SparseMoE(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        moe = config.moe
        if moe is None:
            raise ValueError("SparseMoE needs a config with moe set")
        self.moe = moe
        self.act = config.hidden_act
        self.mixtral = config.architecture == "MixtralForCausalLM"
        hidden, inter, n = config.hidden_size, moe.intermediate_size, moe.num_experts
        self.router_weight = empty_param(n, hidden, dtype=dtype, device=device)
        self.w13 = empty_param(n, 2 * inter, hidden, dtype=dtype, device=device)  # gate rows, then up
        self.w2 = empty_param(n, hidden, inter, dtype=dtype, device=device)
        self.shared = None
        self.shared_gate_weight = None
        if moe.shared_expert_size:
            self.shared = MLP(config, dtype, device, inter=moe.shared_expert_size)
            self.shared_gate_weight = empty_param(1, hidden, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        weights, experts = route(
            F.linear(x, self.router_weight), self.moe.top_k, self.moe.norm_topk_prob, self.mixtral
        )
        if x.is_cuda:
            out = fused_moe(x, self.w13, self.w2, weights, experts, self.act)
        else:
            out = grouped_experts_torch(x, self.w13, self.w2, weights, experts, self.act)
        if self.shared is not None and self.shared_gate_weight is not None:
            out = out + torch.sigmoid(F.linear(x, self.shared_gate_weight)) * self.shared(x)
        return out


def grouped_experts_torch(
    x: torch.Tensor,  # [T, hidden]
    w13: torch.Tensor,  # [E, 2 * inter, hidden]
    w2: torch.Tensor,  # [E, hidden, inter]
    weights: torch.Tensor,  # [T, top_k] float32
    experts: torch.Tensor,  # [T, top_k] int64
    act: str,
) -> torch.Tensor:  # [T, hidden], x.dtype
    """The experts on the step's pairs sorted by expert: one gate/up and one down matmul per expert
    that any token picked, each over that expert's contiguous run of pairs. Outputs are added into
    each token in expert order, as transformers adds them, so float32 results round the same way."""
    top_k = experts.shape[1]
    route_ = sort_by_expert(experts, w13.shape[0])
    tokens = route_.pair_order // top_k  # [P], sorted by expert
    pair_weights = weights.flatten()[route_.pair_order]
    out = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(route_.counts.tolist()):
        if count == 0:
            continue
        rows = tokens[start : start + count]
        gate, up = F.linear(x[rows], w13[expert]).chunk(2, dim=-1)
        y = F.linear(activation(act, gate) * up, w2[expert])
        # float32 product of a bf16 output and a bf16-rounded weight is exact: one rounding, as in HF.
        out.index_add_(0, rows, (y.float() * pair_weights[start : start + count, None]).to(x.dtype))
        start += count
    return out
