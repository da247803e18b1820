"""FedSA-LoRA: selective aggregation — A is shared and averaged, each client keeps its own B.

    Ā = Σ_k p_k A_k   (sent to the clients, with the averaged head)
    client k trains (Ā, B_k) from its own B_k, kept in its node state (B_k = 0 at first)

A learns what the clients share, B what is particular to each; the personalised model of
client k is s·B_k Ā. The clients also upload B_k so that the server can form the global
model it evaluates and saves as the final adapter,

    B̄ = Σ_k p_k B_k,   global ΔW = s·B̄Ā,

which is never sent to the clients. That global model is inexact as FedIT's is:
Σ_k p_k B_k A_k − B̄Ā = Σ_k p_k (B_k − B̄)(A_k − Ā).
"""

from fedlora.strategies.registry import Capabilities, DocsRow, StrategySpec, register

register(StrategySpec(
    name="fedsa",
    traffic=f"{__name__}.math:traffic",
    server=f"{__name__}.server:FedSAServer",
    client=f"{__name__}.client:PersonalB",
    capabilities=Capabilities(linear=True),
    docs=DocsRow(idea="FedSA-LoRA: average A, each client keeps its own B (personalised)",
                 up="r(d+k) (B only for the global model)", down="r·k (A)",
                 inexact="no (`agg_error` > 0, global model)"),
))
