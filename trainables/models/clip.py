"""open_clip models without downloads: architectures, local weights, the tokenizer.

Stable public API (the classifier ``clip_vit`` and the contrastive side build on it):

- ``ClipConfig``: ``arch`` (an architecture open_clip knows) and ``weights`` (a local file or
  None). Building it checks the name; ``cfg.check_files(path)`` (for the preflight, as the
  project checks files there) checks the file: a missing file, one that would need pickle, or
  weights that do not fit the architecture fail with a ``ConfigError`` naming the field.
  ``create_clip`` runs the same checks before it builds anything.
- ``create_clip(cfg, device, generator=None) -> open_clip.CLIP``: both towers, the weights loaded.
- ``create_clip_visual(cfg, device, generator=None) -> nn.Module``: the visual tower alone
  (images normalised and at ``clip_image_size(arch)`` in, the ``embed_dim`` embedding out).
- ``clip_tokenizer(name)``: open_clip's tokenizer for the architecture; ``tok(list_of_str)``
  gives a LongTensor (N, context_length).
- ``clip_stats(arch)``: the (mean, std) its preprocessing normalises with;
  ``clip_image_size(arch)``: its input side in pixels; ``clip_embed_dim(arch)``.
- ``load_clip_weights(path, field)``: the state dict of a weights file, never unpickled.
- ``check_clip(arch, weights, path)``: the validation ``ClipConfig`` runs, for other configs.
- ``TINY_ARCHS``: this package's CPU-size architectures, registered with open_clip through its
  own mechanism (``open_clip.add_model_config`` on ``clip_configs/``), so
  ``open_clip.create_model("bibau-ViT-tiny-8")`` works like a built-in name.

Nothing downloads: models are created with ``pretrained=None`` and ``pretrained_text=False``,
architectures whose text tower or tokenizer come from the Hugging Face hub are refused, and
weights come only from ``weights``, a local file. ``open_clip`` (3 s of imports) is imported
on first use, so that ``import trainables`` stays fast for runs that use no CLIP.

Weights files: ``.safetensors``, or a ``.pt``/``.pth``/``.bin`` that ``torch.load(weights_only=True)``
reads (a plain state dict, possibly under ``state_dict``; a ``module.`` prefix is dropped).
OpenAI's TorchScript archives need pickle and are refused; convert them once, in a process you
trust, with ``safetensors.torch.save_file(model.state_dict(), ...)`` (open_clip's
``hf-hub:timm/vit_base_patch32_clip_224.openai`` also ships ``open_clip_model.safetensors``).
OpenAI's ViT-B/32 weights were trained with QuickGELU: use ``arch: ViT-B-32-quickgelu`` for them.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import Config, ConfigError, param

CONFIG_DIR = Path(__file__).parent / "clip_configs"
TINY_ARCHS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
DEFAULT_ARCH = "bibau-ViT-tiny-8"
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + TORCH_SUFFIXES


def open_clip():
    """The ``open_clip`` package, with this package's architectures registered (once)."""
    import open_clip as oc

    if not set(TINY_ARCHS) <= set(oc.list_models()):
        oc.add_model_config(CONFIG_DIR)
    return oc


@contextlib.contextmanager
def _quiet():
    # open_clip warns on the root logger that no pretrained weights were loaded: that is the point here
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _field(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@functools.lru_cache(maxsize=None)
def _arch_config(name: str) -> dict | None:
    return open_clip().get_model_config(name)


def check_arch(name: str, field: str = "arch") -> dict:
    """The open_clip config of ``name``; a ConfigError naming ``field`` when open_clip does not
    know it or it would download (a Hugging Face text tower or tokenizer, a timm tower's weights)."""
    cfg = _arch_config(name)
    if cfg is None:
        known = open_clip().list_models()
        raise ConfigError(f"{field}: {name!r} is not an architecture open_clip knows; allowed: one of the "
                          f"{len(known)} names of open_clip.list_models(), e.g. {', '.join(TINY_ARCHS)} (CPU), "
                          "ViT-B-32, ViT-B-32-quickgelu, ViT-B-16, RN50")
    text = cfg.get("text_cfg", {})
    vision = cfg.get("vision_cfg", {})
    remote = [k for k in ("hf_model_name", "hf_tokenizer_name") if text.get(k)]
    if vision.get("timm_model_pretrained"):
        remote.append("timm_model_pretrained")
    if remote or "siglip" in name.lower():
        raise ConfigError(f"{field}: {name!r} fetches parts from the network ({', '.join(remote) or 'SigLIP tokenizer'}), "
                          "and nothing may download here; allowed: an architecture with open_clip's own text "
                          f"tower and tokenizer (ViT-B-32, ViT-B-32-quickgelu, ViT-B-16, RN50, {', '.join(TINY_ARCHS)}, ...)")
    return cfg


def clip_image_size(arch: str) -> tuple[int, int]:
    size = check_arch(arch)["vision_cfg"].get("image_size", 224)
    return (size, size) if isinstance(size, int) else tuple(size)  # type: ignore[return-value]


def clip_embed_dim(arch: str) -> int:
    return int(check_arch(arch)["embed_dim"])


def clip_stats(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the architecture's preprocessing normalises with (OpenAI's unless its config
    says otherwise): what pretrained weights expect."""
    oc = open_clip()
    pre = check_arch(arch).get("preprocess_cfg", {})
    mean = tuple(float(v) for v in pre.get("mean", oc.OPENAI_DATASET_MEAN))
    std = tuple(float(v) for v in pre.get("std", oc.OPENAI_DATASET_STD))
    return mean, std


# -- weights files ---------------------------------------------------------------------------------


def _read(path: Path, field: str, lazy: bool) -> dict[str, torch.Tensor]:
    """The tensors of a weights file; ``lazy`` maps them (torch) or reads only shapes (safetensors)."""
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                if lazy:  # shapes only (meta tensors): enough to check the names and shapes
                    return {k: torch.empty(fh.get_slice(k).get_shape(), device="meta") for k in fh.keys()}
                return {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ConfigError(f"{field}: {str(path)!r} is not a readable safetensors file ({exc})") from None
    if suffix in TORCH_SUFFIXES:
        try:
            with warnings.catch_warnings():  # torch warns about a file's pickle protocol before refusing it
                warnings.simplefilter("ignore")
                try:
                    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=lazy)
                except RuntimeError as exc:
                    if not (lazy and "mmap" in str(exc)):  # the legacy (non-zip) format cannot be mapped
                        raise
                    obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - whatever the restricted unpickler rejects
            first = _reason(exc)
            raise ConfigError(
                f"{field}: {str(path)!r} is not a plain state dict of tensors and would need pickle, which can "
                f"run arbitrary code ({first}); it is never unpickled. Allowed: .safetensors, or a .pt/.pth/.bin "
                "that torch.load(weights_only=True) reads. Convert it once, in a process you trust: "
                "safetensors.torch.save_file(model.state_dict(), 'clip.safetensors')") from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ConfigError(f"{field}: {str(path)!r} holds a {type(obj).__name__}, not a state dict "
                              "(parameter names -> tensors)")
        return obj
    raise ConfigError(f"{field}: {str(path)!r} has the suffix {suffix or '(none)'!r}; allowed: "
                      f"{', '.join(WEIGHT_SUFFIXES)} (pickle files are never loaded)")


def _reason(exc: Exception) -> str:
    """What torch's refusal says the file needs, in one sentence: its message is long, styled, and
    its first lines ask to file an issue or to allowlist globals, which is not the user's remedy."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    m = re.search(r"WeightsUnpickler error:\s*(\S.*)", text, re.S)
    lines = [line.strip() for line in (m.group(1) if m else text).splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    return re.split(r"(?<=\.)\s", first)[0][:300]


def _clean_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _weights_path(weights: str, field: str) -> Path:
    path = Path(os.path.expandvars(weights)).expanduser()
    if not path.is_file():
        raise ConfigError(f"{field}: {weights!r}: no such file; allowed: a local weights file "
                          f"({', '.join(WEIGHT_SUFFIXES)}); nothing is downloaded, so the file must be given")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{field}: {weights!r} is not readable by this user")
    return path


def load_clip_weights(weights: str, field: str = "weights") -> dict[str, torch.Tensor]:
    """The state dict stored in ``weights`` (safetensors or weights-only torch; never unpickled)."""
    return _clean_keys(_read(_weights_path(weights, field), field, lazy=False))


def _visual_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The visual tower's entries of a whole-CLIP state dict (a visual-only file as it is)."""
    if any(k.startswith("visual.") for k in state):
        return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return state


def _fit(model: nn.Module, state: dict[str, torch.Tensor], field: str, what: str) -> None:
    """A ConfigError naming ``field`` unless ``state`` has exactly the model's names and shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} (needs {tuple(own[k].shape)})" for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
        raise ConfigError(f"{field}: the file does not fit {what}: {'; '.join(parts)}; allowed: a state dict "
                          "of this architecture (open_clip or OpenAI key names)")


# -- creation ---------------------------------------------------------------------------------------


def _create(arch: str, device: torch.device | str, generator: torch.Generator | None) -> nn.Module:
    oc = open_clip()
    check_arch(arch)
    with _quiet(), contextlib.ExitStack() as stack:
        if generator is not None:  # open_clip draws from the global RNG: seed a private copy of it
            stack.enter_context(torch.random.fork_rng(devices=[]))
            torch.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=generator)))
        return oc.create_model(arch, pretrained=None, pretrained_image=False, pretrained_text=False,
                               device=device, output_dict=False)


@functools.lru_cache(maxsize=16)
def _fits(arch: str, weights: str, stamp: tuple, field: str, visual_only: bool) -> None:
    model = _create(arch, "meta", None)
    state = _clean_keys(_read(_weights_path(weights, field), field, lazy=True))
    if visual_only:
        _fit(model.visual, _visual_part(state), field, f"the visual tower of {arch}")
    else:
        _fit(model, state, field, arch)


def check_clip(arch: str, weights: str | None, path: str = "", visual_only: bool = False,
               arch_key: str = "arch", weights_key: str = "weights") -> None:
    """Validate an architecture name and a weights file for it (cheaply: the file's tensors are
    mapped, not read; the model is built on the meta device). Errors name ``path.<key>``."""
    check_arch(arch, _field(path, arch_key))
    if weights is not None:
        field = _field(path, weights_key)
        p = _weights_path(weights, field)
        st = p.stat()
        _fits(arch, str(p.resolve()), (st.st_size, st.st_mtime_ns), field, visual_only)


@dataclass
class ClipConfig(Config):
    """An open_clip model: the architecture and where its weights come from."""

    arch: str = param(DEFAULT_ARCH, "open_clip architecture (open_clip.list_models(); this package adds "
                      f"{', '.join(TINY_ARCHS)} for CPU runs; ViT-B-32-quickgelu for OpenAI's ViT-B/32 weights)")
    weights: str | None = param(None, "local weights file (.safetensors, or a .pt/.pth/.bin that torch.load(weights_only=True) "
                                "reads) of the whole CLIP; None: random initialisation. Never downloaded, never unpickled")

    def check(self, path: str) -> None:  # what needs no file; the weights file: check_files (the preflight's)
        check_arch(self.arch, _field(path, "arch"))

    def check_files(self, path: str = "") -> None:
        """The weights file exists, loads without pickle and fits ``arch`` (cheap: mapped, not read)."""
        check_clip(self.arch, self.weights, path)


def create_clip(cfg: ClipConfig, device: torch.device | str = "cpu",
                generator: torch.Generator | None = None) -> nn.Module:
    """The open_clip CLIP of ``cfg.arch`` on ``device``, with ``cfg.weights`` loaded (strict) or,
    without weights, initialised from ``generator`` (the global RNG when None)."""
    check_clip(cfg.arch, cfg.weights)
    model = _create(cfg.arch, "cpu", generator)
    if cfg.weights is not None:
        state = load_clip_weights(cfg.weights)
        _fit(model, state, "weights", cfg.arch)
        model.load_state_dict(state, strict=True)
    return model.to(device)


def create_clip_visual(cfg: ClipConfig, device: torch.device | str = "cpu",
                       generator: torch.Generator | None = None) -> nn.Module:
    """The visual tower of ``cfg.arch``; its weights from ``cfg.weights`` (a whole-CLIP state dict,
    whose ``visual.`` entries are used, or a visual-only one)."""
    check_clip(cfg.arch, cfg.weights, visual_only=True)
    visual = _create(cfg.arch, "cpu", generator).visual
    if cfg.weights is not None:
        state = _visual_part(load_clip_weights(cfg.weights))
        _fit(visual, state, "weights", f"the visual tower of {cfg.arch}")
        visual.load_state_dict(state, strict=True)
    return visual.to(device)


def clip_tokenizer(name: str = DEFAULT_ARCH):
    """open_clip's tokenizer for architecture ``name`` (its BPE vocabulary ships with the
    package): ``tok(["a photo of a cat"])`` -> LongTensor (1, context_length)."""
    check_arch(name, "arch")
    return open_clip().get_tokenizer(name)
