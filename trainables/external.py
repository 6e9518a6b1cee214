"""A suspicious model trained elsewhere: the model a researcher brings to check (``attack.external_model``).

The file is a safetensors state dict of ``model`` (any registered classifier architecture, at the
run's ``width``/``depth``), for inputs in [0, 1] normalised inside the model with the data set's
mean and std (``Classifier`` keeps them as non-persistent buffers, so they are not in the file).
Nothing else is read from it: a pickled ``.pt``/``.pth`` is refused, because unpickling a file
a user hands over can run any code. The run's ``attack`` section then only describes the trigger
(ASR, RA and QRA stamp it); the attack stage trains nothing and the trial records the model as
``attack_source: external``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_tensors
from .config import ConfigError
from .models.base import Classifier, ModelConfig, create_model

FIELD = "attack.external_model"
_CONVERT = ("save it as safetensors where it was made: safetensors.torch.save_file(model.state_dict(), "
            "'model.safetensors')")


def external_path(value: str, field: str = FIELD) -> Path:
    path = Path(os.path.expandvars(value)).expanduser()
    if not path.is_file():
        raise ConfigError(f"{field}: {value!r} is not a file; give the suspicious model as a safetensors state dict")
    return path


def read_state(value: str, field: str = FIELD) -> dict[str, torch.Tensor]:
    """The file's tensors; a ConfigError, before anything is unpickled, for any other format."""
    path = external_path(value, field)
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # a torch.save zip archive or a bare pickle
        raise ConfigError(f"{field}: {value!r} is a pickled PyTorch file; pickles are refused (loading one can run "
                          f"code); {_CONVERT}")
    try:
        return load_tensors(path)
    except CheckpointError as exc:
        raise ConfigError(f"{field}: {exc}; {_CONVERT}") from None


def check_external(value: str, field: str = FIELD) -> str:
    """The preflight's check: the file exists and reads as safetensors (its fit to the model is
    checked when the data set, and so the class count, is known)."""
    state = read_state(value, field)
    return f"{field} {value}: a safetensors state dict of {len(state)} tensors"


def load_external(value: str, model_cfg: ModelConfig, num_classes: int, in_channels: int,
                  mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> Classifier:
    """The suspicious model: ``model_cfg``'s architecture with the file's weights, on ``device``;
    a ConfigError naming what does not fit (missing or unexpected keys, shapes)."""
    state = read_state(value)
    model = create_model(model_cfg.architecture(), num_classes, in_channels, mean, std)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} (model: {tuple(own[k].shape)})" for k in sorted(set(own) & set(state))
              if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        what = "; ".join(x for x in (
            f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}" if missing else "",
            f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}" if unexpected else "",
            f"other shapes: {', '.join(shapes[:3])}" if shapes else "") if x)
        arch = ", ".join(f"{k}={v}" for k, v in model_cfg.options().items() if v is not None and k != "weights")
        raise ConfigError(f"{FIELD}: {value!r} does not fit model {model_cfg.name} ({arch or 'its defaults'}) with "
                          f"{num_classes} classes ({what}); "
                          "set model.name, model.width and model.depth to the architecture it was trained as")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return model.to(device).eval()
