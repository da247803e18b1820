"""HetLoRA: clients of different ranks share one global LoRA of rank R by truncation and zero-padding.

Client k (rank r_k ≤ R = ``lora.rank``, scale s_k = α/r_k) receives the first r_k rank
components of the global adapter, trains, and uploads (B_k, A_k). The server zero-pads each
to rank R at the global scale s_R = α/R — B'_k = [(s_k/s_R)·B_k, 0], A'_k = [A_k; 0], so that
s_R·B'_k·A'_k = s_k·B_k·A_k — and averages with sparsity weights, per module:

    w_k ∝ p_k · ‖s_k B_k A_k‖_F   (normalised; p_k alone when every norm is 0)
    B̄ = Σ_k w_k B'_k,   Ā = Σ_k w_k A'_k

Approximate (like FedIT, and the padding shrinks the components only some clients train):
``agg_error`` compares s_R·B̄Ā with Σ_k p_k s_k B_k A_k. With ``weighting = "uniform"`` the
weights are the paper's pure norm weights. The paper's optional rank self-pruning on the
clients is not implemented: clients train at their configured rank.
"""

from fedlora.strategies.registry import Capabilities, DocsRow, StrategySpec, client_ranks_within_rank, register

register(StrategySpec(
    name="hetlora",
    server=f"{__name__}.server:HetLoRAServer",
    client="fedlora.client.role:OwnRank",
    traffic=f"{__name__}.math:traffic",
    capabilities=Capabilities(heterogeneous_ranks=True,
                              not_linear="HetLoRA weights each client by the norm of its own update, so the release "
                                         "is not a fixed linear average"),
    docs=DocsRow(idea="HetLoRA: truncate to each client's rank, zero-pad back, sparsity-weighted average",
                 inexact="no (`agg_error` > 0)", up="r_k(d+k)", down="r_k(d+k)"),
    check=client_ranks_within_rank,
))
