"""FlexLoRA: average the clients' full updates, hand each client the best approximation at its own rank.

With client ranks r_k (``lora.client-ranks``, each ≤ the global rank R = ``lora.rank``) and
scales s_k = α / r_k, per module:

    ΔW̄ = Σ_k p_k s_k B_k A_k = P Σ Qᵀ                 (SVD from the stacked factors, never dense)
    global:    T_R(ΔW̄) = P_R Σ_R Q_Rᵀ                   (Eckart–Young: the best rank-R approximation)
    client k:  T_{r_k}(ΔW̄), its first r_k components

The SVD is formed from the Σr_k×Σr_k Grams of the d×Σr_k and Σr_k×k factors (their Cholesky
factors, or eigendecompositions where a factor lacks full numerical rank, then an SVD of the
small core; :func:`fedlora.strategies.common.svd_of_stack`).
The strategy is approximate: ``agg_error`` is the global truncation error
‖ΔW̄ − T_R(ΔW̄)‖_F / ‖ΔW̄‖_F, and ``client_truncation_error`` the p-weighted one of the
clients' ranks, sqrt(Σ_k p_k ‖ΔW̄ − T_{r_k}(ΔW̄)‖²_F) / ‖ΔW̄‖_F.
"""

from fedlora.strategies.registry import Capabilities, DocsRow, StrategySpec, client_ranks_within_rank, register

register(StrategySpec(
    name="flexlora",
    server=f"{__name__}.server:FlexLoRAServer",
    client="fedlora.client.role:OwnRank",
    traffic=f"{__name__}.math:traffic",
    capabilities=Capabilities(heterogeneous_ranks=True,
                              not_linear="FlexLoRA releases a truncated SVD of the averaged products, not one linear "
                                         "average of the uploads"),
    docs=DocsRow(idea="FlexLoRA: average the full updates, each client gets the best rank-r_k approximation",
                 inexact="no (truncation error)", up="r_k(d+k)", down="r_k(d+k)"),
    check=client_ranks_within_rank,
))
