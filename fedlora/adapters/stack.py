"""A weighted stack of LoRA factors: the update Σ_i c_i B_i A_i kept as its terms, never folded into a copy.

FLoRA's merge (c_i = p_i s_i over the clients) and FedEx-LoRA's residual (c_i = s p_i over the
clients, −s for the new averages B̄, Ā) are sums of this form. As they travel, and as the server
keeps them, the factors are exactly the arrays the clients uploaded (re-sent without a copy: see
:func:`fedlora.adapters.transport.npy_array`) and the coefficients one float64 vector:

    <module>.lora_B.weight@<i>    B_i (d × r_i)
    <module>.lora_A.weight@<i>    A_i (r_i × k)
    stack.coefficients            (c_1, …, c_n), float64, shared by every module

so the update is exact — no coefficient is rounded into a factor — and the receiver adds it with
one ``addmm`` per term (W ← W + c_i·B_i A_i, :func:`fedlora.adapters.lora.merge_into_base`).
:func:`folded` turns it into plain factors [B_1 … B_n]·[c_1 A_1; …; c_n A_n] when one LoRA is
needed (a final adapter).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedlora.adapters.state import LORA_A, LORA_B, AdapterState

#: the float64 coefficient vector of a weighted stack (the one array of a record that is not float32)
COEFFICIENTS = "stack.coefficients"
TERM = "@"


def wire_dtype(name: str) -> type:
    """The dtype an array named ``name`` travels and is stored in: float64 for :data:`COEFFICIENTS`, else float32."""
    return np.float64 if name == COEFFICIENTS else np.float32


def term_name(module: str, suffix: str, index: int) -> str:
    """The name of term ``index``'s factor ``suffix`` (:data:`LORA_A` or :data:`LORA_B`) of ``module``."""
    return f"{module}{suffix}{TERM}{index}"


def weighted_stack(factors: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]],
                   coefficients: Sequence[float]) -> AdapterState:
    """The stack Σ_i c_i B_i A_i of every module in ``factors`` (module -> [(B_i, A_i)], the arrays kept as given)."""
    out: AdapterState = {}
    for module, terms in factors.items():
        if len(terms) != len(coefficients):
            raise ValueError(f"{module}: {len(terms)} terms for {len(coefficients)} coefficients")
        for i, (B, A) in enumerate(terms):
            out[term_name(module, LORA_B, i)], out[term_name(module, LORA_A, i)] = B, A
    out[COEFFICIENTS] = np.asarray(coefficients, dtype=np.float64)
    return out


def is_stack(update: Mapping[str, np.ndarray]) -> bool:
    return COEFFICIENTS in update


def stack_terms(update: Mapping[str, np.ndarray]) -> dict[str, list[tuple[np.ndarray, np.ndarray, float]]]:
    """Module -> its terms (B_i, A_i, c_i) in order; ``ValueError`` for a term without its pair or coefficient."""
    coefficients = np.asarray(update[COEFFICIENTS], dtype=np.float64)
    modules = sorted({k[: -len(f"{LORA_A}{TERM}0")] for k in update if k.endswith(f"{LORA_A}{TERM}0")})
    out = {}
    for module in modules:
        terms = []
        for i, c in enumerate(coefficients):
            B, A = update.get(term_name(module, LORA_B, i)), update.get(term_name(module, LORA_A, i))
            if B is None or A is None:
                raise ValueError(f"weighted stack of {module}: term {i} lacks its factors")
            terms.append((B, A, float(c)))
        out[module] = terms
    return out


def folded(Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], coefficients: Sequence[float],
           dtype: type = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """(U, V) = ([B_1 … B_n], [c_1 A_1; …; c_n A_n]) written straight into arrays of ``dtype``: U·V = Σ_i c_i B_i A_i.

    Any mix of ranks. Each c_i A_i is computed in float64 and rounded once; no float64 copy of the stack.
    """
    ranks = [np.shape(A)[0] for A in As]
    U = np.empty((np.shape(Bs[0])[0], sum(ranks)), dtype=dtype)
    V = np.empty((sum(ranks), np.shape(As[0])[1]), dtype=dtype)
    start = 0
    for B, A, c, r in zip(Bs, As, coefficients, ranks):
        U[:, start:start + r] = B
        np.multiply(A, float(c), out=V[start:start + r], dtype=np.float64, casting="same_kind")
        start += r
    return U, V


def folded_state(update: Mapping[str, np.ndarray], dtype: type | None = None) -> AdapterState:
    """A weighted stack as one plain LoRA per module (``<module>.lora_B/A.weight`` = :func:`folded`, scale 1),
    in ``dtype`` (default: the factors' own, float32 for uploads)."""
    out: AdapterState = {}
    for module, terms in stack_terms(update).items():
        Bs, As, cs = zip(*terms)
        out[module + LORA_B], out[module + LORA_A] = folded(Bs, As, cs, dtype or np.result_type(*Bs, *As))
    return out
