"""FedAvg over LoRA factors (FedIT): clients train A and B, the server averages each.

    Ā = Σ_k p_k A_k,   B̄ = Σ_k p_k B_k,   applied ΔW = s·B̄Ā

Inexact: Σ_k p_k B_k A_k − B̄Ā = Σ_k p_k (B_k − B̄)(A_k − Ā), which vanishes only when the
clients' A (or B) agree. Other trained tensors (a classification head) are averaged plainly.
"""

from fedlora.strategies.registry import Capabilities, DocsRow, StrategySpec, register

register(StrategySpec(
    name="fedavg",
    traffic=f"{__name__}.math:traffic",
    server=f"{__name__}.server:FedAvgServer",
    client="fedlora.client.role:ClientRole",
    capabilities=Capabilities(linear=True),
    docs=DocsRow(inexact="no (`agg_error` > 0)", idea="FedIT: average A and B separately", up="r(d+k)", down="r(d+k)"),
))
