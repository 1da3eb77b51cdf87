# The compiled slate draw (_slate.pyx): its signature for the type checker.
from typing import Any

import numpy as np
import numpy.typing as npt

def pick_slate(
    predicted: npt.NDArray[np.float64],
    slots: int,
    gamma: float,
    rng: Any,
    share: float,
    max_gamma: float,
) -> list[tuple[int, float, bool]]: ...
