"""FedEx-LoRA: FedIT's averages plus the exact residual, folded into every client's frozen base.

For one module with client factors B_k, A_k, weights p_k and the shared scale s:

    Ā = Σ_k p_k A_k,   B̄ = Σ_k p_k B_k
    R = Σ_k p_k B_k A_k − B̄Ā = [B_1 … B_K, −B̄] · [p_1A_1; …; p_KA_K; Ā]      rank ≤ (K+1)r
    W0 ← W0 + s·R   (server and every client),   clients continue from (Ā, B̄)

so W0 + s·B̄Ā + s·R = W0 + s·Σ_k p_k B_k A_k exactly. R travels with each node's next
training message as a ``merge-<round>`` record: factored when (K+1)r(d+k) < d·k, dense
otherwise — whichever is smaller, and counted. (The reference code transposes its residual
for nn.Linear; the factors here are peft's B (d×r) and A (r×k), tested against the dense sum.)
"""

from fedlora.strategies.registry import Capabilities, DocsRow, StrategySpec, register

register(StrategySpec(
    name="fedex",
    server=f"{__name__}.server:FedExServer",
    client=f"{__name__}.client:ResidualBase",
    traffic=f"{__name__}.math:traffic",
    capabilities=Capabilities(exact=True, needs_dense_base="it merges updates into every client's base weights",
                              not_linear="FedEx-LoRA releases the residual Σ_k p_k B_k A_k − B̄Ā, built from "
                                         "per-client products, beside the averages"),
    docs=DocsRow(idea="FedEx-LoRA: FedIT plus the exact residual folded into every base",
                 up="r(d+k)", down="r(d+k) + min((K+1)r(d+k), d·k) per missed residual"),
))
