"""Device maps for decoder-only transformers: manual splits, checks before loading, name translation.

A device map says which device holds each module (``{"model.layers.0": 0, ..., "lm_head": 1}``).
Everything here reads module names from the model itself (built on the meta device from its config,
no weights needed), so it works for GLM-4, Llama, Qwen2 and other transformers decoder models.
``notebooks/02_manual_split.ipynb`` teaches it; the KV-aware builder is in ``notebooks/03``.

>>> from glmkit.models import glm4_9b_chat_config
>>> dm = split_layers(glm4_9b_chat_config(), [20, 20])
>>> dm["model.embed_tokens"], dm["model.layers.19"], dm["model.layers.20"], dm["lm_head"]
(0, 0, 1, 1)
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from glmkit.tables import html_table, text_table
from glmkit.vocabulary import valid_device

# Original remote-code GLM-4 (THUDM/glm-4-9b-chat, trust_remote_code) -> transformers-native names.
REMOTE_TO_NATIVE = {
    "transformer.embedding.word_embeddings": "model.embed_tokens",
    "transformer.embedding": "model.embed_tokens",
    "transformer.encoder.layers": "model.layers",
    "transformer.encoder.final_layernorm": "model.norm",
    "transformer.output_layer": "lm_head",
    "transformer.rotary_pos_emb": "model.rotary_emb",
}
NATIVE_TO_REMOTE = {v: k for k, v in REMOTE_TO_NATIVE.items() if k != "transformer.embedding"}
# The ChatGLM-6B (v1) names a widely read guide maps for GLM-4: they exist in neither model.
CHATGLM6B_PREFIXES = ("transformer.word_embeddings", "transformer.layers.", "transformer.final_layernorm")


class DeviceMapError(ValueError):
    """A device map that would fail (or silently misplace modules) when loading."""


class LayerCountError(DeviceMapError):
    """Layers per device that do not add up to the model's decoder layers: ``counts``, ``n_layers`` and a
    ``suggestion`` that adds up, for a caller that words the error in its own terms (``glmkit --device-map``)."""

    def __init__(self, counts: list[int], layers: list[str]) -> None:
        self.counts, self.n_layers = counts, len(layers)
        self.suggestion = even_split(len(layers), len(counts))
        super().__init__(f"layers_per_device adds up to {sum(counts)}, but the model has {len(layers)} decoder layers "
                         f"({layers[0]} .. {layers[-1]}); e.g. {self.suggestion}.")


# Meta models by (config class, config JSON, default dtype): a config's is built once per process and shared
_META_MODELS: dict[tuple[type, str, torch.dtype], nn.Module] = {}
_META_MODELS_KEPT = 32


def as_model(model_or_config: Any) -> nn.Module:
    """A model to read names and shapes from: the model itself, or one built on the meta device.

    Building on the meta device allocates no memory. Each config's meta model is built once per process (0.2 s of
    CPU for GLM-4-9B's 40 layers) and shared by every later call with an equal config, so a planner asked many
    questions answers in milliseconds and its per-model caches hit: read it, never change it.
    """
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    if isinstance(model_or_config, (str, os.PathLike)):
        model_or_config = AutoConfig.from_pretrained(model_or_config)
    key = (type(model_or_config), model_or_config.to_json_string(), torch.get_default_dtype())
    if key not in _META_MODELS:
        if len(_META_MODELS) >= _META_MODELS_KEPT:
            del _META_MODELS[next(iter(_META_MODELS))]  # the oldest
        with torch.device("meta"):
            _META_MODELS[key] = AutoModelForCausalLM.from_config(model_or_config)
    return _META_MODELS[key]


def no_split_classes(model: nn.Module) -> set[str]:
    """Class names that must stay on one device (``_no_split_modules``), e.g. ``{"GlmDecoderLayer"}``."""
    return set(getattr(model, "_no_split_modules", None) or [])


def layer_list_name(model: nn.Module) -> str:
    """Name of the ``ModuleList`` of decoder blocks, e.g. ``"model.layers"``.

    >>> from glmkit.models import tiny_glm_config
    >>> layer_list_name(as_model(tiny_glm_config()))
    'model.layers'
    """
    blocks = no_split_classes(model)
    best, best_len = "", 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > best_len:
            if not blocks or type(module[0]).__name__ in blocks:
                best, best_len = name, len(module)
    if not best:
        raise DeviceMapError(f"{type(model).__name__} has no list of decoder layers to split.")
    return best


@dataclass
class ModelUnits:
    """The units a device map places: modules before the layers, the layers, modules after them."""

    head: list[str]  # e.g. ["model.embed_tokens", "model.rotary_emb"] (parameter-free ones go first too)
    layers: list[str]  # e.g. ["model.layers.0", ..., "model.layers.39"]
    tail: list[str]  # e.g. ["model.norm", "lm_head"]

    @property
    def all(self) -> list[str]:
        return self.head + self.layers + self.tail


def model_units(model_or_config: Any) -> ModelUnits:
    """Split the model's modules into head / decoder layers / tail, in execution order.

    Modules without parameters (rotary embeddings) join the head: they work on the inputs,
    which live on the first device.

    >>> from glmkit.models import glm4_9b_chat_config
    >>> u = model_units(glm4_9b_chat_config())
    >>> u.head, len(u.layers), u.tail
    (['model.embed_tokens', 'model.rotary_emb'], 40, ['model.norm', 'lm_head'])
    """
    model = as_model(model_or_config)
    if model not in _UNITS:  # a plan asks many times for the same model: read its modules once
        _UNITS[model] = _read_units(model)
    head, layers, tail = _UNITS[model]
    return ModelUnits(list(head), list(layers), list(tail))


# model -> (head, layers, tail); weak keys, so a loaded model is not kept alive by the cache
_UNITS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[str, ...], ...]] = weakref.WeakKeyDictionary()


def _read_units(model: nn.Module) -> tuple[tuple[str, ...], ...]:
    layers_name = layer_list_name(model)
    head: list[str] = []
    tail: list[str] = []
    seen_layers = False

    def visit(prefix: str, module: nn.Module) -> None:
        nonlocal seen_layers
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if name == layers_name:
                seen_layers = True
            elif layers_name.startswith(name + "."):
                visit(name, child)
            elif not any(True for _ in child.parameters()):
                head.append(name)
            else:
                (tail if seen_layers else head).append(name)

    visit("", model)
    layers = [f"{layers_name}.{i}" for i in range(len(model.get_submodule(layers_name)))]
    head.sort(key=lambda n: not any(True for _ in model.get_submodule(n).parameters()))
    return tuple(head), tuple(layers), tuple(tail)


def output_layer_name(model: nn.Module) -> str:
    """Name of the module that computes the logits (``"lm_head"``; ``"transformer.output_layer"`` in remote code)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((n for n, m in model.named_modules() if m is out), "lm_head")


def split_layers(
    model_or_config: Any,
    layers_per_device: Sequence[int] = (20, 20),
    devices: Sequence[int | str] | None = None,
) -> dict[str, int | str]:
    """The manual split: consecutive layers per device, embeddings first, norm + ``lm_head`` last.

    Args:
        model_or_config: a model or its config (names are read from it, never hard-coded).
        layers_per_device: how many decoder layers each device holds; must add up to the
            model's layer count (40 for GLM-4-9B-Chat).
        devices: device of each entry (default ``0, 1, ...``); ``"cpu"`` works too.

    >>> from glmkit.models import tiny_glm_config
    >>> split_layers(tiny_glm_config(), [2, 4])  # doctest: +NORMALIZE_WHITESPACE
    {'model.embed_tokens': 0, 'model.rotary_emb': 0, 'model.layers.0': 0, 'model.layers.1': 0,
     'model.layers.2': 1, 'model.layers.3': 1, 'model.layers.4': 1, 'model.layers.5': 1,
     'model.norm': 1, 'lm_head': 1}
    """
    units = model_units(model_or_config)
    n = len(units.layers)
    counts = list(layers_per_device)
    devices = list(range(len(counts))) if devices is None else list(devices)
    if not counts or any(not isinstance(c, int) or c < 0 for c in counts):
        raise DeviceMapError(f"layers_per_device must be non-negative integers, got {counts}.")
    if len(devices) != len(counts):
        raise DeviceMapError(f"{len(counts)} layer counts for {len(devices)} devices: give one per device.")
    if len(counts) > n:
        raise DeviceMapError(f"{len(counts)} devices for {n} layers: use at most {n} devices.")
    if sum(counts) != n:
        raise LayerCountError(counts, units.layers)
    device_map: dict[str, int | str] = {name: devices[0] for name in units.head}
    start = 0
    for device, count in zip(devices, counts):
        for name in units.layers[start : start + count]:
            device_map[name] = device
        start += count
    device_map.update({name: devices[-1] for name in units.tail})
    return device_map


def even_split(n_layers: int, n_devices: int) -> list[int]:
    """Layer counts as even as possible, the remainder on the first devices: ``even_split(40, 3) == [14, 13, 13]``."""
    base, extra = divmod(n_layers, n_devices)
    return [base + (i < extra) for i in range(n_devices)]


def translate_names(device_map: Mapping[str, Any], table: Mapping[str, str] = REMOTE_TO_NATIVE) -> dict[str, Any]:
    """Rename device-map keys by prefix (default: remote-code GLM-4 names -> transformers names).

    >>> translate_names({"transformer.encoder.layers.3": 0, "transformer.output_layer": 1})
    {'model.layers.3': 0, 'lm_head': 1}
    >>> translate_names({"model.layers.3": 0, "lm_head": 1}, NATIVE_TO_REMOTE)
    {'transformer.encoder.layers.3': 0, 'transformer.output_layer': 1}
    """
    out: dict[str, Any] = {}
    for key, device in device_map.items():
        for old in sorted(table, key=len, reverse=True):
            if key == old or key.startswith(old + "."):
                key = table[old] + key[len(old) :]
                break
        out[key] = device
    return out


@dataclass(repr=False)
class DeviceMapSummary:
    """Which layers each device holds, for a map that passed ``check_device_map``."""

    devices: dict[str, list[str]]

    def rows(self) -> list[list[str]]:
        return [[dev, str(len(mods)), _compact(mods)] for dev, mods in self.devices.items()]

    def __repr__(self) -> str:
        return text_table(["device", "modules", "which"], self.rows())

    def _repr_html_(self) -> str:
        return html_table(["device", "modules", "which"], self.rows(), caption="device map")


def _compact(names: list[str]) -> str:
    """``model.layers.0 .. model.layers.19`` style summary of a module list."""
    out: list[str] = []
    run: list[int] = []
    prefix = ""
    for name in names + [""]:
        m = re.match(r"^(.*\.)(\d+)$", name)
        if m and (not run or (m.group(1) == prefix and int(m.group(2)) == run[-1] + 1)):
            prefix, run = m.group(1), run + [int(m.group(2))]
            continue
        if run:
            out.append(f"{prefix}{run[0]}" + (f"..{run[-1]}" if len(run) > 1 else ""))
            run = []
        if m:
            prefix, run = m.group(1), [int(m.group(2))]
        elif name:
            out.append(name)
    return ", ".join(out)


def check_device_map(model_or_config: Any, device_map: Mapping[str, Any]) -> DeviceMapSummary:
    """Check a device map against the model *before* loading; raise ``DeviceMapError`` naming the fix.

    Catches: names from ChatGLM-6B guides (``transformer.layers.N``), original remote-code names
    (``transformer.encoder.layers.N``), unknown modules, modules left unmapped, decoder blocks split
    across devices, and devices that are not devices.

    >>> from glmkit.models import glm4_9b_chat_config
    >>> guide = {"transformer.word_embeddings": 0, "lm_head": 1}
    >>> guide |= {f"transformer.layers.{i}": 0 if i < 15 else 1 for i in range(30)}
    >>> check_device_map(glm4_9b_chat_config(), guide)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    glmkit.device_map.DeviceMapError: This device map uses ChatGLM-6B names (transformer.word_embeddings, ...: 30 layers)...
    """
    model = as_model(model_or_config)
    units = model_units(model)
    n = len(units.layers)
    right = (
        f"This model has {n} decoder layers named {units.layers[0]}..{n - 1}, embeddings "
        f"{units.head[0]}, and {', '.join(units.tail)} at the end. Build the map with "
        f"glmkit.device_map.split_layers(model, {even_split(n, 2)})."
    )
    if not isinstance(device_map, Mapping) or not device_map:
        raise DeviceMapError(f"A device map is a non-empty dict of module name -> device. {right}")
    keys = list(device_map)
    module_names = {name for name, _ in model.named_modules()}
    guide_keys = [k for k in keys if k.startswith(CHATGLM6B_PREFIXES)]
    if guide_keys and not any(k in module_names for k in guide_keys):
        n_guide = len({k for k in guide_keys if k.startswith("transformer.layers.")})
        unmapped = [u for u in units.layers if not any(u == k or u.startswith(k + ".") for k in keys)]
        stay = f"all {n}" if len(unmapped) == n else f"{len(unmapped)} of its {n}"
        raise DeviceMapError(
            f"This device map uses ChatGLM-6B names (transformer.word_embeddings, transformer.layers.0.."
            f"{n_guide - 1}: {n_guide} layers). Those come from ChatGLM-6B v1 guides (28 layers there; the "
            "embeddings and the final norm with lm_head count as two more, \"30\") and match nothing in GLM-4: "
            f"they would be ignored or fail, and {stay} decoder layers "
            f"({units.layers[0].rpartition('.')[0]}.N) would stay unmapped. " + right
        )
    remote_keys = [k for k in keys if k.startswith("transformer.") and k not in module_names]
    if remote_keys and translate_names({k: 0 for k in remote_keys}).keys() <= module_names | set(units.all):
        raise DeviceMapError(
            f"This device map uses the original remote-code names ({remote_keys[0]}, ...). The "
            "transformers-native GLM-4 uses model.* names: convert the map with "
            "glmkit.device_map.translate_names(device_map). " + right
        )
    unknown = [k for k in keys if k != "" and k not in module_names]
    if unknown:
        raise DeviceMapError(f"Unknown module names in the device map: {', '.join(unknown[:5])}. " + right)
    bad = {k: v for k, v in device_map.items() if not valid_device(v)}
    if bad:
        k, v = next(iter(bad.items()))
        raise DeviceMapError(
            f"'{k}' is mapped to {v!r}, which is not a device: use a GPU index (0, 1, ...), "
            "'cuda:N', 'cpu' or 'disk'."
        )
    blocks = no_split_classes(model)
    for key in keys:
        parts = key.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if parent in module_names and type(model.get_submodule(parent)).__name__ in blocks:
                raise DeviceMapError(
                    f"'{key}' is inside the decoder block '{parent}' ({type(model.get_submodule(parent)).__name__}), "
                    "which must stay on one device (its residual stream and KV cache live together). "
                    f"Map '{parent}' as a whole."
                )

    def owner(name: str) -> str | None:
        while True:
            if name in device_map:
                return name
            if "" in device_map and name:
                return ""
            if "." not in name:
                return name if name in device_map else None
            name = name.rsplit(".", 1)[0]

    def unit_of(name: str) -> str:
        return next((u for u in units.all if name.startswith(u + ".")), name.rsplit(".", 1)[0])

    unmapped = sorted(
        {unit_of(name) for name, _ in model.named_parameters() if owner(name) is None},
        key=lambda u: units.all.index(u) if u in units.all else len(units.all),
    )
    if unmapped:
        raise DeviceMapError(
            f"{len(unmapped)} modules are not in the device map: {_compact(unmapped)}. Every module "
            "with weights needs a device. " + right
        )
    per_device: dict[str, list[str]] = {}
    for key, device in device_map.items():
        per_device.setdefault(str(device), []).append(key)
    return DeviceMapSummary(per_device)


def weights_by_device(model: nn.Module) -> dict[str, int]:
    """Bytes of parameters and buffers on each device of a loaded model (e.g. after a manual split)."""
    out: dict[str, int] = {}
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out[str(t.device)] = out.get(str(t.device), 0) + t.numel() * t.element_size()
    return out
