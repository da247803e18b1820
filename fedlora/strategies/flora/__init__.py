"""FLoRA: stack the clients' LoRA factors so the aggregate is exact for any mix of ranks.

Each round clients start from a fresh LoRA (A random, B = 0) on the current base. For one
module with client factors B_k (d×r_k), A_k (r_k×k), scales s_k and weights p_k:

    B_stack = [B_1  B_2  …  B_K]                        d × Σ_k r_k
    A_stack = [p_1 s_1 A_1; p_2 s_2 A_2; …; p_K s_K A_K]   Σ_k r_k × k
    B_stack · A_stack = Σ_k p_k s_k B_k A_k              (exact)

The server merges ``ΔW = B_stack·A_stack`` into the base weights, and every client must
receive the same update (rank Σ_k r_k). It travels as a weighted stack
(:mod:`fedlora.adapters.stack`): the clients' own B_k, A_k as uploaded and c_k = p_k s_k in
float64, so nothing is rounded and ``agg_error`` is 0. Fully-trained tensors (a head) are
averaged plainly.
"""

from fedlora.strategies.registry import Capabilities, DocsRow, StrategySpec, register

register(StrategySpec(
    name="flora",
    traffic=f"{__name__}.math:traffic",
    server=f"{__name__}.server:FLoRAServer",
    client=f"{__name__}.client:FreshLoRA",
    capabilities=Capabilities(exact=True, heterogeneous_ranks=True,
                              needs_dense_base="it merges updates into every client's base weights",
                              not_linear="FLoRA releases every client's stacked LoRA factors (per-client products "
                                         "B_k·A_k), not one average"),
    docs=DocsRow(idea="FLoRA: stack factors, merge into the base, fresh LoRA each round; mixed ranks",
                 up="r_k(d+k)", down="Σ_j r_j(d+k) per missed merge"),
))
