"""UniPC (Zhao et al., "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling
of Diffusion Models", NeurIPS 2023).

UniP-p is the order-p multistep exponential-integrator predictor; UniC re-does the
previous step once the model has been evaluated at its result, adding that output as
a node at ``r = 1``. It costs no extra model call (the output is reused by the next
predictor) and raises the order by one. ``variant`` picks ``B(h)``: ``"bh1"`` (``B =
h``) or ``"bh2"`` (``B = e^h - 1``), which matter when a system has a single node
(order-2 predictor, order-1 corrector); larger systems are solved exactly.
"""

from __future__ import annotations

from jdiff.solvers._base import settings_name
from jdiff.solvers._multistep import Multistep, multistep

__all__ = ["unipc"]


def unipc(
    order: int = 2,
    *,
    variant: str = "bh2",
    corrector: bool = True,
    prediction: str = "data",
    lower_order_final: bool = True,
) -> Multistep:
    """UniPC of ``order`` 1-3 (with UniC, the corrected result has order ``order + 1``).

    Args:
      order: predictor order (1, 2 or 3).
      variant: ``"bh1"`` or ``"bh2"``.
      corrector: False gives the predictor-only UniP.
      prediction: ``"data"`` (x0, the default) or ``"noise"`` (eps).
      lower_order_final: lower the order on the last steps of grids shorter than 15 and
        on a long last step of longer grids with data prediction
        (:func:`jdiff.solvers._base.multistep_order`).
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unknown UniPC variant {variant!r}; expected 'bh1' or 'bh2'")
    if prediction not in ("data", "noise"):
        raise ValueError(f"prediction must be 'data' or 'noise', got {prediction!r}")
    base = f"unip{'c' if corrector else ''}{order}" + ("-bh1" if variant == "bh1" else "")
    extra = ({"prediction": prediction} if prediction != "data" else {}) | (
        {} if lower_order_final else {"lower_order_final": False}
    )
    return multistep(
        order,
        mode=prediction,
        coef=variant,
        corrector=variant if corrector else None,
        lower_order_final=lower_order_final,
        name=settings_name(base, **extra),
    )
