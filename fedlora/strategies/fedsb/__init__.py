"""Fed-SB: federated LoRA-SB, where only the small r×r matrix R of ΔW = s·B R A trains.

B (d×r) and A (r×k) come from a truncated SVD of an initial full-gradient estimate (the
setup phase before round 1) and are identical on all clients, so averaging R is exact:

    R̄ = Σ_k p_k R_k,   s·B R̄ A = Σ_k p_k s·B R_k A

Clients upload r² numbers per module, independent of d, k and the number of clients.
"""

from dataclasses import dataclass

from fedlora.config import knob, positive
from fedlora.strategies.registry import Capabilities, DocsRow, StrategySpec, register


@dataclass(frozen=True)
class FedSBOptions:
    init_batches: int = knob(2, positive, "batches per client for Fed-SB's initial gradient estimate")


register(StrategySpec(
    name="fedsb",
    traffic=f"{__name__}.math:traffic",
    server=f"{__name__}.server:FedSBServer",
    client=f"{__name__}.client:OnlyR",
    capabilities=Capabilities(exact=True, linear=True, setup_round=True,
                              needs_dense_base="its setup phase takes full-weight gradients of the target modules"),
    docs=DocsRow(idea="Fed-SB: B, A from an SVD of client gradients (round 0), train only R",
                 up="r² (R)", down="r² (+ B, A once: r(d+k))"),
    options=FedSBOptions,
))
