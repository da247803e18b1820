"""RoLoRA: alternate which LoRA factor trains, so that every round's average is exact.

Odd rounds (round 1 first, since B starts at 0 and A would get no gradient) share the
global Ā and train only B; even rounds share the global B̄ and train only A. With the
shared factor identical on every client, averaging the trained one is exact:

    odd round:   B̄ = Σ_k p_k B_k,   s·B̄Ā = Σ_k p_k s·B_k Ā
    even round:  Ā = Σ_k p_k A_k,   s·B̄Ā = Σ_k p_k s·B̄ A_k

Clients receive the whole global adapter every round (they may have missed rounds) and
upload only the factor they trained, plus the head, which trains and is averaged every round.
"""

from fedlora.strategies.registry import Capabilities, DocsRow, StrategySpec, register

register(StrategySpec(
    name="rolora",
    traffic=f"{__name__}.math:traffic",
    server=f"{__name__}.server:RoLoRAServer",
    client=f"{__name__}.client:Alternating",
    capabilities=Capabilities(exact=True, linear=True),
    docs=DocsRow(idea="RoLoRA: alternate rounds, train B (odd) or A (even) over the shared other factor",
                 up="r·d (B, odd rounds) or r·k (A, even)", down="r(d+k)"),
))
