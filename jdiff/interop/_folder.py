"""A diffusers-format folder as a ready jdiff model: :func:`load_diffusers`.

Two layouts are read (the files ``save_pretrained`` writes):

- a pipeline folder: ``model_index.json``, the denoiser in ``unet/`` or
  ``transformer/`` (``config.json`` and its weights), ``scheduler/scheduler_config.json``
  and, for latent diffusion, ``vae/`` (e.g. ``google/ddpm-cifar10-32``,
  ``facebook/DiT-XL-2-256``);
- a model folder: ``config.json`` and its weights, with ``scheduler_config.json`` beside
  it, in ``scheduler/`` or in ``../scheduler/`` (the ``unet/`` folder of a pipeline).

Weights are ``diffusion_pytorch_model.safetensors`` (read with the ``safetensors``
package's NumPy API), else ``diffusion_pytorch_model.bin`` (read by
:func:`jdiff.features.load_torch_state_dict`: no torch, and a pickle naming anything but
tensors is refused before anything runs), else the ``.fp16`` variants of either, or a
sharded ``...safetensors.index.json``. Torch is never imported.

Architectures are looked up by the config's ``_class_name`` in :data:`ARCHITECTURES`
(``UNet2DModel``, ``DiTTransformer2DModel``, ``AutoencoderKL``): each maps to the
``from_diffusers(config, weights)`` of :mod:`jdiff.interop.unet2d`, :mod:`~jdiff.interop.dit`
or :mod:`~jdiff.interop.vae`; :func:`register_architecture` adds or replaces one.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from jdiff._grid import time_grid
from jdiff._param import Denoiser
from jdiff.features._torch_load import load_torch_state_dict
from jdiff.interop import dit, unet2d, vae
from jdiff.interop._convert import UnsupportedModelError, Weights
from jdiff.interop._scheduler import Scheduler, scheduler_from_config
from jdiff.wrappers import guidance as cfg_guidance

__all__ = [
    "ARCHITECTURES",
    "ROLES",
    "DiffusersModel",
    "ModelFolderError",
    "load_diffusers",
    "register_architecture",
    "load_vae",
]

# class name -> from_diffusers(config, weights) building it (or a module path holding one)
ARCHITECTURES: dict[str, str | Callable] = {
    "UNet2DModel": unet2d.from_diffusers,
    "DiTTransformer2DModel": dit.from_diffusers,
    "AutoencoderKL": vae.from_diffusers,
}
# class name -> its role in a pipeline: "denoiser" (unet/, transformer/) or "vae" (vae/)
ROLES = {"UNet2DModel": "denoiser", "DiTTransformer2DModel": "denoiser", "AutoencoderKL": "vae"}
# diffusers' own renaming of an older class name by a config key (models/model_loading_utils.py)
_RENAMED = {("Transformer2DModel", "ada_norm_zero"): "DiTTransformer2DModel"}
# the pipelines' default number of inference steps (their __call__ signatures)
_PIPELINE_STEPS = {"DDPMPipeline": 1000, "DDIMPipeline": 50, "DiTPipeline": 50, "PNDMPipeline": 50, "LDMPipeline": 50}
_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.safetensors.index.fp16.json",
    "diffusion_pytorch_model.fp16.bin",
)
LAYOUT = (
    "a diffusers folder: model_index.json with unet/ or transformer/ (config.json and "
    "diffusion_pytorch_model.safetensors or .bin), scheduler/scheduler_config.json and optionally vae/; "
    "or a model folder with config.json, its weights and scheduler_config.json (beside it or in scheduler/)"
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelFolderError(ValueError):
    """A path that is not a diffusers folder jdiff can read (the message says which
    layout is expected)."""


def register_architecture(class_name: str, builder: str | Callable, role: str = "denoiser") -> None:
    """Let :func:`load_diffusers` build ``class_name`` with ``builder``.

    Arguments:
      class_name: the ``_class_name`` of the model's ``config.json``.
      builder: a module path whose ``from_diffusers(config, weights)`` returns the NNX
        module, or such a callable itself (it must call ``weights.finish()``). A
        denoiser is called ``module(x, timesteps, class_labels)`` (NHWC; labels only for
        class-conditional models); a VAE has ``to_latent(images, key=None)`` and
        ``from_latent(z)``.
      role: ``"denoiser"`` or ``"vae"``.
    """
    if role not in ("denoiser", "vae"):
        raise ValueError(f"role must be 'denoiser' or 'vae', got {role!r}")
    ARCHITECTURES[class_name] = builder
    ROLES[class_name] = role


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            out = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise ModelFolderError(f"{path}: expected a JSON object, got {type(out).__name__}")
    return out


def _class_name(config: dict, where: str) -> str:
    name = config.get("_class_name")
    name = _RENAMED.get((name, config.get("norm_type")), name)
    if name not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{where}: model class {name!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    return name


def _weights_file(folder: str) -> str:
    for name in _WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise ModelFolderError(f"{folder}: no weights (diffusion_pytorch_model.safetensors or .bin); expected {LAYOUT}")


def _read_state(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".json"):  # sharded: {"weight_map": {key: file}}
        files = sorted(set(_read_json(path).get("weight_map", {}).values()))
        if not files:
            raise ModelFolderError(f"{path}: no weight_map")
        state = {}
        for f in files:
            state.update(_read_state(os.path.join(os.path.dirname(path), f)))
        return state
    if path.endswith(".bin"):
        return load_torch_state_dict(path)
    try:
        return safetensors.numpy.load_file(path)
    except Exception as e:  # noqa: BLE001 - the reader's errors are its own (SafetensorError, OSError)
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def _build(folder: str, dtype, role: str):
    """``(class name, config, NNX module, config path)`` of the model in ``folder``,
    whose class must be one of the ``role``'s (``"denoiser"`` or ``"vae"``), checked
    before the weights are read."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelFolderError(f"{folder}: no config.json; expected {LAYOUT}")
    config = _read_json(cfg_path)
    name = _class_name(config, cfg_path)
    allowed = [k for k, v in ROLES.items() if v == role]
    if name not in allowed:
        extra = " (a VAE is read from a pipeline's vae/ folder)" if role == "denoiser" else ""
        raise UnsupportedModelError(f"{cfg_path}: {name} is not a {role}; supported: {', '.join(allowed)}{extra}")
    wpath = _weights_file(folder)
    weights = Weights(_read_state(wpath), source=wpath, dtype=dtype)
    builder = ARCHITECTURES[name]
    if isinstance(builder, str):  # a module path given to register_architecture
        builder = importlib.import_module(builder).from_diffusers
    return name, config, builder(config, weights), cfg_path


def load_vae(path, *, dtype=jnp.float32):
    """The ``AutoencoderKL`` of a diffusers folder (a VAE model folder, or a pipeline's
    ``vae/``), read as :func:`load_diffusers` reads models: ``.safetensors`` with the
    format's NumPy reader, a ``.bin`` with jdiff's torch-free reader (a pickle that names
    anything but tensors is refused before it is imported or run).

    Raises:
      ModelFolderError: no ``config.json`` or no weights; UnsupportedModelError: not a
      VAE or an unsupported config value; WeightError: a missing, extra or mis-shaped
      weight; UnsafePickleError: a hostile ``.bin``.
    """
    return _build(os.fspath(path), dtype, "vae")[2]


@dataclasses.dataclass(frozen=True, eq=False)
class _NetApply:
    """``apply(params, x, t_in, cond)`` of a diffusers denoiser module (NHWC, the
    timestep index ``t_in``): ``nnx.merge`` of its graph and ``params``; the learned
    variance channels of a ``2 C``-channel output are dropped (the prediction is the
    first ``C``). Equal by graph, so a rebuilt denoiser shares compiled programs."""

    graphdef: Any
    num_classes: int

    def __call__(self, params, x, t, cond=None):
        if self.num_classes and cond is None:
            raise ValueError(
                "this model is class-conditional: pass cond= class labels (jdiff.sample(..., cond=labels))"
            )
        if not self.num_classes and cond is not None:
            raise ValueError("this model is unconditional: cond must be None")
        model = nnx.merge(self.graphdef, params)
        out = model(x, t) if cond is None else model(x, t, jnp.asarray(cond, jnp.int32))
        c = x.shape[-1]
        return out[..., :c] if out.shape[-1] == 2 * c else out

    def __eq__(self, other):
        return isinstance(other, _NetApply) and (self.graphdef, self.num_classes) == (
            other.graphdef,
            other.num_classes,
        )

    def __hash__(self):
        return hash((_NetApply, self.graphdef, self.num_classes))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _vae_call(graphdef, method: str, params, x, key):
    vae = nnx.merge(graphdef, params)
    return vae.from_latent(x) if method == "from_latent" else vae.to_latent(x, key=key)


@dataclasses.dataclass(frozen=True, eq=False)
class DiffusersModel:
    """A diffusers-format model as jdiff sees it (see :func:`load_diffusers`).

    Attributes:
      denoiser: the network as a :class:`jdiff.Denoiser` (NHWC; its process, prediction
        and ``time_input="timestep"`` from the scheduler; ``params`` an explicit pytree),
        without guidance or thresholding (see :meth:`sampling_denoiser`).
      scheduler: the scheduler config read (:class:`jdiff.interop.Scheduler`).
      shape: one sample ``(H, W, C)`` in the space the denoiser works in (latents for
        latent diffusion).
      num_classes: class labels ``0..num_classes-1`` (0: unconditional).
      null_class: the label of the unconditional prediction (DiT: ``num_classes``), or None.
      vae: the VAE module (``AutoencoderKL``), or None for pixel-space models.
      default_steps: the pipeline's default number of inference steps.
      path, class_name, pipeline: where it was read, the denoiser's class, the pipeline's.
    """

    denoiser: Denoiser
    scheduler: Scheduler
    shape: tuple
    num_classes: int = 0
    null_class: int | None = None
    vae: Any = None
    default_steps: int = 50
    path: str = ""
    class_name: str = ""
    pipeline: str | None = None

    @property
    def process(self):
        return self.denoiser.process

    @property
    def default_solver(self) -> str:
        """The registry name of the jdiff solver closest to the scheduler's update."""
        return self.scheduler.solver

    def grid(self, nfe: int | None = None, solver=None, kind: str = "default"):
        """The default grid: the scheduler's (:meth:`jdiff.interop.Scheduler.grid`), the
        timesteps diffusers' ``set_timesteps`` gives, then the final point; or, with
        ``kind`` one of :data:`jdiff.GRID_KINDS`, jdiff's grid of that spacing on the same
        process, ending where the scheduler ends (:func:`jdiff.time_grid`).

        Arguments:
          nfe: the number of steps (default :attr:`default_steps`), or, with ``solver``,
            the model evaluations the solver spends (``solver.num_steps(nfe, ...)`` steps).
          solver: a jdiff solver (or None).
          kind: ``"default"`` (the scheduler's timesteps) or a jdiff grid kind.
        """
        nfe = self.default_steps if nfe is None else nfe
        final = self.scheduler.final
        if kind != "default":
            if solver is None:
                return time_grid(self.process, int(nfe), kind=kind, final=final)
            return time_grid(self.process, kind=kind, nfe=int(nfe), solver=solver, final=final)
        steps = nfe
        if solver is not None:
            from_noise = float(self.process.alpha(jnp.float32(1.0))) == 0.0
            steps = solver.num_steps(int(nfe), final == "data", from_noise)
        return self.scheduler.grid(steps)

    def sampling_denoiser(self, guidance: float = 1.0, **guidance_options):
        """The denoiser diffusers' pipeline samples with: classifier-free guidance
        (Ho & Salimans, 2021; :func:`jdiff.wrappers.guidance` with the null class) at
        scale ``guidance`` when it is not 1, then the scheduler's thresholding, applied
        to the guided x0 as diffusers' schedulers do.

        Raises:
          ValueError: guidance for a model without a null class.
        """
        den = self.denoiser
        if guidance != 1.0 or guidance_options:
            if self.null_class is None:
                raise ValueError(
                    f"{self.class_name} has no null class: classifier-free guidance needs a model trained "
                    "with one (a DiT); use guidance 1"
                )
            den = cfg_guidance(den, guidance, np.int32(self.null_class), **guidance_options)
        if self.scheduler.thresholding is not None:
            den = self.scheduler.thresholding(den)
        return den

    def decode(self, z):
        """Latents ``(B, h, w, c)`` -> images ``(B, H, W, 3)``, nominally in [-1, 1],
        through the VAE (its scaling factor undone); the input itself for a
        pixel-space model."""
        if self.vae is None:
            return jnp.asarray(z)
        g, p = nnx.split(self.vae)
        return _vae_call(g, "from_latent", p, jnp.asarray(z), None)

    def encode(self, images, key=None):
        """Images in [-1, 1] -> latents scaled for the denoiser (a sample of the VAE's
        posterior with ``key``, its mean without); the input itself without a VAE."""
        if self.vae is None:
            return jnp.asarray(images)
        g, p = nnx.split(self.vae)
        return _vae_call(g, "to_latent", p, jnp.asarray(images), key)


def _sample_shape(name: str, config: dict, where: str) -> tuple:
    size = config.get("sample_size", 32 if name == "DiTTransformer2DModel" else None)
    if size is None:
        raise ValueError(f"{where}: no sample_size in the config: the sample shape is unknown")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    c = config.get("in_channels", 4 if name == "DiTTransformer2DModel" else 3)
    return (int(h), int(w), int(c))


def _classes(name: str, config: dict) -> tuple[int, int | None]:
    if name == "DiTTransformer2DModel":  # a label table of n + 1 rows: the last is the null class
        n = int(config.get("num_embeds_ada_norm") or 0)
        return n, (n if n else None)
    if config.get("class_embed_type") is None and config.get("num_class_embeds"):
        return int(config["num_class_embeds"]), None
    return 0, None


def _local(path: str) -> str:
    """``path`` if it is a folder, else a downloaded snapshot of the model id ``path``."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ModelFolderError(f"{path} is a file; expected {LAYOUT}")
    if not _REPO_ID.match(path):
        raise ModelFolderError(f"{path}: no such folder; expected {LAYOUT}")
    try:  # optional: a convenience for model ids, never a dependency of jdiff
        import huggingface_hub
    except ImportError:
        raise ModelFolderError(
            f"{path} is not a local folder, and downloading a model id needs huggingface_hub (not installed); "
            f"pass {LAYOUT}"
        ) from None
    try:  # the safetensors weights where the repository has them, else the .bin ones
        files = huggingface_hub.list_repo_files(path)
        kind = "safetensors" if any(f.endswith("diffusion_pytorch_model.safetensors") for f in files) else "bin"
        patterns = ["*.json", f"*diffusion_pytorch_model.{kind}", f"*diffusion_pytorch_model-*.{kind}"]
        return huggingface_hub.snapshot_download(repo_id=path, allow_patterns=patterns)
    except Exception as e:  # noqa: BLE001 - no network, an unknown id: the hub's errors, in one line
        raise ModelFolderError(
            f"could not download {path} from the Hugging Face Hub ({type(e).__name__}: {' '.join(str(e).split())}); "
            f"download it yourself and pass {LAYOUT}"
        ) from None


def _scheduler_config(folder: str) -> str:
    for cand in (
        os.path.join(folder, "scheduler_config.json"),
        os.path.join(folder, "scheduler", "scheduler_config.json"),
        os.path.join(os.path.dirname(os.path.abspath(folder)), "scheduler", "scheduler_config.json"),
    ):
        if os.path.isfile(cand):
            return cand
    raise ModelFolderError(f"{folder}: no scheduler_config.json; expected {LAYOUT}")


def load_diffusers(path: str, *, dtype=jnp.float32) -> DiffusersModel:
    """Read a diffusers-format folder as a jdiff model (see the module for the layouts).

    Arguments:
      path: a local folder, or a Hugging Face model id ``owner/name`` when
        ``huggingface_hub`` is installed (downloaded with ``snapshot_download``).
      dtype: the parameters' dtype (float32; bfloat16 or float16 for speed).

    Returns:
      a :class:`DiffusersModel`: the denoiser with its process, parameterization and
      default grid from the scheduler config, the sample shape, classes, the VAE.

    Raises:
      ModelFolderError: no such folder, no config or weights (the message says which
        layout is expected), ``huggingface_hub`` missing for a model id.
      UnsupportedModelError: a model or scheduler class, or a config value, jdiff does
        not implement (named, with what is supported).
      jdiff.interop.WeightError: a missing, extra or mis-shaped weight (named, with
        both shapes). ``jdiff.features.UnsafePickleError``: a ``.bin`` that would run code.
    """
    path = os.fspath(path)
    folder = _local(path)
    dtype = np.dtype(dtype)
    index = os.path.join(folder, "model_index.json")
    pipeline, vae = None, None
    if os.path.isfile(index):
        spec = _read_json(index)
        pipeline = spec.get("_class_name")
        part = next((p for p in ("unet", "transformer") if p in spec), None)
        if part is None:
            parts = ", ".join(k for k in spec if not k.startswith("_"))
            raise UnsupportedModelError(
                f"{index}: pipeline {pipeline!r} has no unet or transformer (it has: {parts}); "
                "supported: a pipeline whose denoiser is a UNet2DModel or DiTTransformer2DModel"
            )
        name, config, net, cfg_path = _build(os.path.join(folder, part), dtype, "denoiser")
        sched_path = os.path.join(folder, "scheduler", "scheduler_config.json")
        if not os.path.isfile(sched_path):
            raise ModelFolderError(f"{folder}: no scheduler/scheduler_config.json; expected {LAYOUT}")
        if "vae" in spec and spec["vae"] and spec["vae"][0] is not None:
            vae = _build(os.path.join(folder, "vae"), dtype, "vae")[2]
    elif os.path.isfile(os.path.join(folder, "config.json")):
        name, config, net, cfg_path = _build(folder, dtype, "denoiser")
        sched_path = _scheduler_config(folder)
    else:
        raise ModelFolderError(f"{folder}: neither model_index.json nor config.json; expected {LAYOUT}")
    scheduler = scheduler_from_config(_read_json(sched_path), sched_path)
    num_classes, null_class = _classes(name, config)
    graphdef, params = nnx.split(net)
    den = Denoiser(
        apply_fn=_NetApply(graphdef, num_classes),
        params=params,
        process=scheduler.process,
        prediction=scheduler.prediction,
        time_input="timestep",
    )
    return DiffusersModel(
        denoiser=den,
        scheduler=scheduler,
        shape=_sample_shape(name, config, cfg_path),
        num_classes=num_classes,
        null_class=null_class,
        vae=vae,
        default_steps=_PIPELINE_STEPS.get(pipeline, 50),
        path=path,
        class_name=name,
        pipeline=pipeline,
    )
