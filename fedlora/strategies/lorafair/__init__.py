"""LoRA-FAIR: average the factors, then correct B so the product matches the ideal update.

For one module (all clients share the scale s, which multiplies every term and is left out):

    Ā = Σ_k p_k A_k,   B̄ = Σ_k p_k B_k,   ΔW = Σ_k p_k B_k A_k
    ΔB* = argmin_ΔB ‖ΔW − (B̄ + ΔB)Ā‖²_F + λ‖ΔB‖²_F = (ΔW − B̄Ā) Āᵀ (ĀĀᵀ + λI)⁻¹

Clients start the next round from (Ā, B̄ + ΔB*). λ → ∞ gives ΔB* → 0, i.e. FedIT; λ = 0
is the least-squares correction (minimum-norm solution when ĀĀᵀ is singular).
"""

from dataclasses import dataclass

from fedlora.config import knob, non_negative
from fedlora.strategies.registry import Capabilities, DocsRow, StrategySpec, register


@dataclass(frozen=True)
class LoraFairOptions:
    lambda_: float = knob(1e-2, non_negative, "ridge weight λ of the LoRA-FAIR correction ΔB")


register(StrategySpec(
    name="lorafair",
    traffic=f"{__name__}.math:traffic",
    server=f"{__name__}.server:LoraFairServer",
    client="fedlora.client.role:ClientRole",
    capabilities=Capabilities(not_linear="LoRA-FAIR releases a non-linear correction ΔB computed from the client "
                                         "factors, not one linear average"),
    docs=DocsRow(inexact="closer than fedavg", idea="LoRA-FAIR: FedIT plus a ridge correction of B (`lorafair.lambda`)",
                 up="r(d+k)", down="r(d+k)"),
    options=LoraFairOptions,
))
