"""FFA-LoRA: A is random, frozen and identical on all clients; only B (and a head) trains.

    B̄ = Σ_k p_k B_k,   applied ΔW = s·B̄A = Σ_k p_k s·B_k A   (exact, by linearity)

A is drawn from the run seed on every client and never travels (the server sends its
fingerprint, so a client with another A refuses); uploads are every tensor but A — half
of FedIT's LoRA bytes for square modules.
"""

from fedlora.strategies.registry import Capabilities, DocsRow, StrategySpec, register

register(StrategySpec(
    name="ffa",
    traffic=f"{__name__}.math:traffic",
    server=f"{__name__}.server:FFAServer",
    client=f"{__name__}.client:FrozenA",
    capabilities=Capabilities(exact=True, linear=True),
    docs=DocsRow(idea="FFA-LoRA: A frozen from the run seed, train B", up="r·d (B)", down="r·d (B)"),
))
