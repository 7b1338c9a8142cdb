"""The one place for backend-specific code. Layers use keras.ops only; what cannot be said in
keras.ops (zero-copy host arrays, later compilation and fused attention) lives here."""

import keras
import numpy as np


def host_array_to_tensor(array: np.ndarray):
    """A backend tensor for a host array, without the extra copies keras' generic conversion
    makes (on torch it copies every array, and widens bfloat16 to float32 first)."""
    if keras.backend.backend() == "torch":
        import torch

        array = np.ascontiguousarray(array)
        if array.dtype.name == "bfloat16":  # torch cannot read ml_dtypes' bfloat16 directly
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)
    return array
