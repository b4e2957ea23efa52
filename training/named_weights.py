"""Published weights by name (``--pretrained torchvision`` / ``--pretrained timm``), through each library's own
weights API, with the preprocessing they were validated with.

torchvision's download once into the torch hub cache ($TORCH_HOME/hub/checkpoints, ~/.cache/torch by default);
timm's into the Hugging Face cache ($HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub by default). Both are
read from the cache afterwards, offline too (HF_HUB_OFFLINE=1 keeps timm's lookup off the network). Only these
two values of --pretrained reach the network, and only when the file is not in the cache yet.
"""
import dataclasses
import math
from fractions import Fraction

from training import timm_keys
from training.utils import UserError, first_line

SOURCES = ("torchvision", "timm")

# Our archs under timm's names (timm's B1 and A1 are the same networks; its mnasnet_140 is not our 1.3).
TIMM_NAMES = {ours: theirs for theirs, ours in timm_keys.TIMM_ARCHS.items()}


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How the weights' publisher validated them: resize the shorter side to floor(crop / crop_pct), centre crop."""
    crop_size: int
    crop_pct: Fraction
    interpolation: str


@dataclasses.dataclass(frozen=True)
class NamedWeights:
    """Which published weights: the spawned processes receive it with the command line's settings (and a
    checkpoint's record of those, checkpoint.plain_args, keeps its text, not a tuple of objects)."""
    source: str
    arch: str
    name: str
    preprocessing: Preprocessing

    @property
    def description(self):
        return f"{self.source}'s {self.name}"


def resize_for(crop_size, crop_pct):
    """timm's rule (transforms_imagenet_eval): the shorter side is resized to floor(crop / crop_pct)."""
    return math.floor(crop_size / crop_pct)


def resolve(source, arch):
    """The weights ``source`` publishes for ``arch``, or a one-line UserError when it has none. Downloads nothing."""
    if source == "torchvision":
        return _torchvision_weights(arch)
    return _timm_weights(arch)


def fetch(weights, progress=True):
    """The weights' state dict: from the library's cache, downloaded there first when missing."""
    if weights.source == "torchvision":
        return _fetch_torchvision(weights, progress)
    return _fetch_timm(weights)


def _torchvision_enum(arch):
    from torchvision.models import get_model_weights
    try:
        return get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None


def _torchvision_weights(arch):
    enum = _torchvision_enum(arch)
    if enum is None:
        from torchvision.models import list_models
        published = list_models(include="mnasnet*")
        raise UserError(f"--pretrained torchvision: torchvision publishes no weights for {arch}; it has them for "
                        f"{', '.join(published)}")
    transform = enum.transforms()
    crop, resize = transform.crop_size[0], transform.resize_size[0]
    preprocessing = Preprocessing(crop, Fraction(crop, resize), transform.interpolation.value)
    return NamedWeights("torchvision", arch, f"{type(enum).__name__}.{enum.name}", preprocessing)


def _fetch_torchvision(weights, progress):
    enum = _torchvision_enum(weights.arch)
    try:
        # check_hash as torchvision's own builders do; weights_only: the file holds tensors, nothing to execute.
        return enum.get_state_dict(progress=progress, check_hash=True, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        file_name = enum.url.rsplit("/", 1)[-1]
        raise UserError(f"cannot get {weights.description} ({enum.url}): {first_line(exc)}; without network, "
                        f"copy {file_name} into $TORCH_HOME/hub/checkpoints (default ~/.cache/torch/hub/checkpoints)"
                        ) from None


def _import_timm():
    try:
        import timm.models
    except ImportError:
        raise UserError("--pretrained timm needs timm: pip install timm") from None
    return timm.models


def _timm_weights(arch):
    models = _import_timm()
    name = TIMM_NAMES.get(arch)
    if name is None or not models.is_model_pretrained(name):
        published = [f"{ours} ({theirs})" for ours, theirs in TIMM_NAMES.items()
                     if models.is_model(theirs) and models.is_model_pretrained(theirs)]
        which = f"{arch} ({name})" if name else f"{arch} (no timm network is the same)"
        raise UserError(f"--pretrained timm: timm publishes no weights for {which}; it has them for "
                        f"{', '.join(published)}")
    cfg = models.get_pretrained_cfg(name)
    crop = cfg.input_size[-1]
    # timm's float crop_pct (0.875) as an exact fraction, so that floor(crop / crop_pct) is timm's resize.
    preprocessing = Preprocessing(crop, Fraction(str(cfg.crop_pct)), cfg.interpolation)
    return NamedWeights("timm", arch, f"{cfg.architecture}.{cfg.tag}", preprocessing)


def _fetch_timm(weights):
    models = _import_timm()
    cfg = models.get_pretrained_cfg(weights.name)
    if not cfg.hf_hub_id:
        raise UserError(f"{weights.description} is not on the Hugging Face hub, the only place timm's weights are "
                        "fetched from here")
    try:
        # timm's own loader for its hub weights: model.safetensors first, pytorch_model.bin otherwise.
        return models.load_state_dict_from_hf(cfg.hf_hub_id, weights_only=True)
    except Exception as exc:  # huggingface_hub's errors (offline, not found, HTTP) share no base class but this
        raise UserError(f"cannot get {weights.description} (hf-hub:{cfg.hf_hub_id}): {first_line(exc)}; without "
                        f"network here, run `hf download {cfg.hf_hub_id}` where there is, copy that Hugging Face "
                        "cache ($HF_HUB_CACHE, default ~/.cache/huggingface/hub) here and set HF_HUB_OFFLINE=1"
                        ) from None
