"""DragModel: the SD-1.x components that drag editing needs, and `load_model`.

`load_model("tiny")` builds a small random SD offline and deterministically: the UNet has SD-1.5's block
structure (4 down blocks, mid, 4 up blocks, the same block types, 2 layers per down block and 3 per up
block, one transformer per attention stage), so `up_blocks[2]` and the 16 MasaCtrl transformer blocks mean
what they mean in SD-1.5; only the widths are tiny. Its tokenizer is a byte-level CLIP vocabulary shipped
in fastdrag/assets/tiny_tokenizer.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import threading
from dataclasses import dataclass, field
from importlib import resources

import torch

from .errors import ModelLoadError

SD15_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD15_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


def make_scheduler():
    """The DDIM scheduler every official drag method constructs explicitly (spec 1.3)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


@dataclass
class DragModel:
    """The networks of one SD-1.x model, on one device.

    Thread safety: every call that reads or changes the weights or the networks' state (an edit, an Editor's
    preparation and save_lora, `to`, `save_pretrained`; the LoRA adapter, the attention processors and the
    dtype are per-model state) holds `lock`, a re-entrant lock, for its whole duration. So calls on one model
    from several threads are serialised, never interleaved: each gets what it would get alone. For parallelism
    use one model per GPU."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    name: str
    device: torch.device
    dtype: torch.dtype
    load_dtype: torch.dtype | None = None  # the weights' dtype as loaded (precision="auto" off the fast GPU path)
    # the loaded floating-point weights, in host memory, kept from the first cast to a narrower dtype (see `to`)
    _loaded: dict = field(default_factory=dict, repr=False, compare=False)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)
    _default_editor: object = field(default=None, repr=False, compare=False)  # fastdrag.edit's Editor for this model

    def __post_init__(self):
        self.load_dtype = self.load_dtype or self.dtype

    def __deepcopy__(self, memo) -> "DragModel":
        """A copy of the networks with a lock of its own (a lock cannot be copied) and no default Editor."""
        new = object.__new__(type(self))
        memo[id(self)] = new
        for f in dataclasses.fields(self):
            fresh = {"lock": threading.RLock, "_default_editor": lambda: None}.get(f.name)
            setattr(new, f.name, fresh() if fresh else copy.deepcopy(getattr(self, f.name), memo))
        return new

    @property
    def resolution(self) -> int:
        """Native image side (512 for SD-1.5): the LoRA fit trains on crops of this size."""
        return int(self.unet.config.sample_size) * self.vae_scale

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    def tokenize(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return ids.to(self.device)

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """CLIP text encoder last hidden state [1, 77, D] (no attention mask, as the official code)."""
        return self.text_encoder(self.tokenize(prompt))[0].to(self.dtype)

    def pad_idx(self, prompt: str) -> int:
        """Index of the first end-of-text token among positions 0..75 (DragText's regularized span)."""
        ids = self.tokenize(prompt)[0].tolist()
        eos = self.tokenizer.eos_token_id
        for i, tok in enumerate(ids[:-1]):
            if tok == eos:
                return i
        return len(ids) - 1

    def to(self, device=None, dtype=None) -> "DragModel":
        """Move and/or cast the three networks. Casts do not compound rounding: before the first cast to a dtype that
        cannot hold the loaded weights exactly (fp32 -> bf16, say), a copy of the loaded floating-point weights is
        kept in host memory, and every later cast, back to the loaded dtype included, starts from that copy. So an
        edit in bf16 leaves an fp32 model's next fp32 edit bit-identical to one on a fresh model. Tensors made after
        the copy (a LoRA adapter, which every edit sets anew) are cast as they are."""
        with self.lock:
            return self._to(device, dtype)

    def _to(self, device, dtype) -> "DragModel":
        device = torch.device(device) if device is not None else self.device
        dtype = dtype or self.dtype
        for m in self._modules():
            m.to(device=device)
        if dtype != self.dtype or any(next(m.parameters()).dtype != dtype for m in self._modules()):
            if not self._loaded and not _holds_exactly(dtype, self.load_dtype):
                self._loaded = {t: t.detach().to("cpu", copy=True) for t in self._float_tensors()}
            for t in self._float_tensors():
                src = self._loaded.get(t, t.data)
                t.data = src.to(device=device, dtype=dtype)
        self.device, self.dtype = device, dtype
        return self

    def _modules(self):
        return (self.unet, self.vae, self.text_encoder)

    def _float_tensors(self):
        for m in self._modules():
            for t in (*m.parameters(), *m.buffers()):
                if t.is_floating_point():
                    yield t

    def save_pretrained(self, path: str) -> None:
        """Write a diffusers SD folder (model_index.json + subfolders) that `load_model(path)` reads back. The base
        model is written: a per-image LoRA that an Editor left in the UNet is not part of it."""
        with self.lock:
            self._save_pretrained(path)

    def _save_pretrained(self, path: str) -> None:
        from diffusers import StableDiffusionPipeline

        unet = self.unet
        if getattr(unet, "peft_config", None):
            unet = copy.deepcopy(unet)
            unet.unload_lora()  # unwrap the peft layers back to the base Linear modules
        pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=unet, scheduler=self.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(path)


def _holds_exactly(wide: torch.dtype, narrow: torch.dtype) -> bool:
    """Whether every value of `narrow` is a value of `wide` (fp16 and bf16 are in fp32; neither is in the other)."""
    return wide == narrow or wide == torch.float64 or (wide == torch.float32 and narrow in (torch.float16,
                                                                                           torch.bfloat16))


def _tiny_tokenizer():
    from transformers import CLIPTokenizer

    root = resources.files("fastdrag.assets") / "tiny_tokenizer"
    tok = CLIPTokenizer(vocab=str(root / "vocab.json"), merges=str(root / "merges.txt"))
    tok.model_max_length = 77
    return tok


def build_tiny(seed: int = 0) -> tuple:
    """Random tiny SD-1.x components built from configs, offline. Same seed -> same weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 32, 64, 64), down_block_types=SD15_DOWN, up_block_types=SD15_UP,
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
            block_out_channels=(16, 16, 32, 32), norm_num_groups=8, sample_size=128,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ))
    return unet, vae, text_encoder, tokenizer


def build_sd15_random(seed: int = 0) -> tuple:
    """The full-size SD-1.5 architecture (859.5 M-param UNet) with random weights, offline. For benchmarks: the
    cost of a pass does not depend on the weights' values. The tokenizer is the tiny byte-level one."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                    down_block_types=SD15_DOWN, up_block_types=SD15_UP)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=512)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    return unet, vae, text_encoder, tokenizer


COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")  # what a drag edit needs from an SD folder
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _read_json(path: str, where: str):
    """A JSON file of a model folder; a corrupt one is a ModelLoadError that names the file and the parse error."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{where!r}: {os.path.relpath(path, where)} is not valid JSON ({e}); the file is corrupt "
                             f"or truncated: restore it from the original model") from None


def _missing_files(path: str, component: str) -> list[str]:
    """What `component`'s subfolder lacks for loading, as paths relative to the model folder."""
    sub = os.path.join(path, component)
    if not os.path.isdir(sub):
        return [f"{component}/"]
    names = set(os.listdir(sub))
    if component == "tokenizer":  # a CLIP tokenizer loads from tokenizer.json or from vocab.json + merges.txt
        if "tokenizer.json" in names or {"vocab.json", "merges.txt"} <= names:
            return []
        return ["tokenizer/tokenizer.json (or tokenizer/vocab.json + tokenizer/merges.txt)"]
    missing = [] if "config.json" in names else [f"{component}/config.json"]
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        missing.append(f"{component}/ weights (*.safetensors or *.bin)")
    return missing


def _check_sd1_folder(path: str, components=COMPONENTS) -> None:
    """Everything that can be told from the files before loading: model_index.json, the component subfolders and their
    files, every JSON file parsing, an SD-1.x UNet, an epsilon-prediction scheduler."""
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise ModelLoadError(f"{path!r} is not a diffusers model folder: model_index.json is missing")
    spec = _read_json(index, path)
    if not isinstance(spec, dict):
        raise ModelLoadError(f"{path!r}: model_index.json holds a {type(spec).__name__}, not a JSON object")
    missing = [c for c in COMPONENTS if c not in spec]
    if missing:
        raise ModelLoadError(f"{path!r} is not a Stable Diffusion model folder: model_index.json lacks {missing}")
    missing = [m for c in components for m in _missing_files(path, c)]
    if missing:
        raise ModelLoadError(f"{path!r} is not a complete Stable Diffusion model folder: missing {', '.join(missing)}")
    for c in (*components, "scheduler"):
        sub = os.path.join(path, c)
        for name in sorted(os.listdir(sub)) if os.path.isdir(sub) else ():
            if name.endswith(".json"):
                _read_json(os.path.join(sub, name), path)
    _check_sd1_unet_config(_read_json(os.path.join(path, "unet", "config.json"), path), path)
    sched_cfg = os.path.join(path, "scheduler", "scheduler_config.json")
    if os.path.isfile(sched_cfg):
        pred = _read_json(sched_cfg, path).get("prediction_type", "epsilon")
        if pred != "epsilon":
            raise ModelLoadError(f"{path!r} is a {pred}-prediction model; the drag methods need epsilon (SD-1.x)")


def _check_tokenizer(tokenizer, text_encoder, where: str) -> None:
    """A tokenizer that loaded but cannot feed the text encoder (no vocabulary, no length limit, ids past the
    embedding table) would fail deep inside transformers at the first edit: refuse it at load."""
    n_pos = int(text_encoder.config.max_position_embeddings)
    n_vocab = int(text_encoder.config.vocab_size)
    if len(tokenizer) < 3 or tokenizer.eos_token_id is None:
        raise ModelLoadError(f"{where!r}: the tokenizer loaded with no vocabulary ({len(tokenizer)} tokens); its "
                             f"vocabulary files are missing or empty")
    if len(tokenizer) > n_vocab:
        raise ModelLoadError(f"{where!r}: the tokenizer has {len(tokenizer)} tokens but the text encoder embeds only "
                             f"{n_vocab}; they do not belong together")
    if tokenizer.model_max_length != n_pos:
        raise ModelLoadError(f"{where!r}: the tokenizer pads prompts to {tokenizer.model_max_length} tokens but the "
                             f"text encoder reads {n_pos} positions (tokenizer_config.json lacks model_max_length "
                             f"{n_pos}?)")


def _check_sd1_unet_config(cfg: dict, where: str) -> None:
    down = tuple(cfg.get("down_block_types", ()))
    up = tuple(cfg.get("up_block_types", ()))
    if down != SD15_DOWN or up != SD15_UP or cfg.get("in_channels") != 4:
        raise ModelLoadError(
            f"{where!r} is not an SD-1.x UNet (expected down blocks {SD15_DOWN}, up blocks {SD15_UP} and 4 input "
            f"channels; got {down}, {up}, in_channels={cfg.get('in_channels')})")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # "org/name" or a legacy "name"


def _looks_like_hub_id(s: str) -> bool:
    return len(s) <= 96 and bool(_HUB_ID.match(s)) and "--" not in s and ".." not in s and not s.endswith(".")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().upper() in ("1", "ON", "YES", "TRUE") or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _in_hub_cache(repo_id: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # noqa: BLE001 - an id the hub client refuses is simply not cached
        return False


def _source(name_or_path, what: str = "name_or_path") -> str:
    """The model argument as a string, or a ModelLoadError that says what it is instead."""
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str):
        raise ModelLoadError(f"{what} must be a string or a path (\"tiny\", a diffusers folder or a hub id such as "
                             f"{'runwayml/stable-diffusion-v1-5'!r}), got {name_or_path!r} "
                             f"({type(name_or_path).__name__})")
    if not name_or_path.strip():
        raise ModelLoadError(f"{what} is empty: give \"tiny\", a diffusers folder or a hub id")
    return name_or_path


def _check_location(name: str, what: str, probe: str) -> None:
    """Before any loading: a path that is not there, or a hub id that cannot be fetched, is said to be so. `probe` is a
    file of the model the hub cache would hold (e.g. "unet/config.json")."""
    if os.path.exists(name):
        return
    if not _looks_like_hub_id(name):
        raise ModelLoadError(f"{what} folder {name!r} does not exist (looked in {os.path.abspath(name)!r})")
    if _hub_offline() and not _in_hub_cache(name, probe):
        raise ModelLoadError(
            f"{what} {name!r} is not a local folder (no {os.path.abspath(name)!r}), and as a hub id it cannot be "
            f"fetched: the hub is offline (HF_HUB_OFFLINE is set) and it is not in the cache ({_hub_cache()}). "
            f"Download it once with network access, or pass a local diffusers folder")


def _load_failure(name: str, what: str, e: Exception) -> ModelLoadError:
    """A from_pretrained failure, said in terms of what went wrong: no network, no such hub model, or the error."""
    from huggingface_hub import errors as hub_errors

    chain, c = [], e
    while c is not None and len(chain) < 20:
        chain.append(c)
        c = c.__cause__ or c.__context__
    if not os.path.isdir(name):
        if any(isinstance(c, (hub_errors.RepositoryNotFoundError, hub_errors.GatedRepoError)) for c in chain):
            return ModelLoadError(f"{what} {name!r} is not a local folder, and the hub has no such model (or it is "
                                  f"private or gated): {e}")
        if any(isinstance(c, (hub_errors.LocalEntryNotFoundError, ConnectionError)) for c in chain):
            state = "offline" if _hub_offline() else "unreachable (no network?)"
            return ModelLoadError(f"{what} {name!r} is not a local folder, the hub is {state} and it is not in the "
                                  f"cache ({_hub_cache()}): {e}")
    return ModelLoadError(f"could not load {what} {name!r}: {e}")


ALIGN = 64  # bytes: what PyTorch's CPU allocator gives every fresh tensor


def own_aligned_storage(module: torch.nn.Module | None) -> None:
    """Give every parameter and buffer that `from_pretrained` left at an address not aligned to ALIGN bytes its own
    freshly allocated storage. safetensors hands back tensors at 8-byte offsets; on such storage the CPU math
    libraries take other code paths (other summation orders: about 1e-6 of difference per UNet pass, which differs
    between Intel and AMD CPUs), so a loaded model would not compute what the same weights compute in memory. A
    copy to a GPU makes fresh storage anyway, so this is done for models that stay on the CPU."""
    if module is None:
        return
    for t in (*module.parameters(), *module.buffers()):
        if t.data_ptr() % ALIGN:
            t.data = t.data.clone(memory_format=torch.contiguous_format)


def _load_vae(vae, device, dtype):
    from diffusers import AutoencoderKL

    if isinstance(vae, torch.nn.Module):
        return vae
    vae = _source(vae, "vae")
    _check_location(vae, "VAE", "config.json")
    if os.path.isdir(vae):
        missing = _missing_files(*os.path.split(os.path.abspath(vae)))
        if missing:
            raise ModelLoadError(f"VAE folder {vae!r} is not a diffusers AutoencoderKL folder: missing "
                                 f"{', '.join(missing)}")
        _read_json(os.path.join(vae, "config.json"), vae)
    try:
        vae = AutoencoderKL.from_pretrained(vae)
    except Exception as e:  # noqa: BLE001 - re-raised with the name that failed
        raise _load_failure(vae, "VAE", e) from e
    if device.type == "cpu":
        own_aligned_storage(vae)
    return vae


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}  # by name


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"unknown device {device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {str(device)!r} asked for, but this torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"device {str(device)!r} is not supported; use 'cpu' or 'cuda'")
    return device


def _dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ModelLoadError(f"dtype must be one of {list(DTYPES.values())} or their names "
                             f"{list(DTYPES)}, got {dtype!r}")
    return dtype


def load_model(name_or_path: str = "tiny", *, device=None, dtype: torch.dtype | None = None, vae=None) -> DragModel:
    """Load an SD-1.x model for drag editing.

    name_or_path: "tiny" (offline random tiny SD, for tests and the demo), "sd15-random" (the full SD-1.5
    architecture with random weights, for benchmarks), a local diffusers folder, or a hub id
    (e.g. "runwayml/stable-diffusion-v1-5"). vae: optional replacement AutoencoderKL (id, folder or module),
    e.g. "stabilityai/sd-vae-ft-mse" as GoodDrag uses. device defaults to CUDA when present; dtype (a torch
    dtype or "fp32" / "bf16" / "fp16" / "fp64", the last for exact tests) to fp32.
    """
    name_or_path = _source(name_or_path)
    device = _device(device)
    dtype = _dtype(dtype)
    if vae is not None and not isinstance(vae, torch.nn.Module):  # before the UNet loads, not after
        _check_location(_source(vae, "vae"), "VAE", "config.json")
    if name_or_path in ("tiny", "sd15-random"):
        unet, vae_m, text_encoder, tokenizer = (build_tiny if name_or_path == "tiny" else build_sd15_random)()
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        _check_location(name_or_path, "model", "unet/config.json")
        if os.path.isdir(name_or_path):
            _check_sd1_folder(name_or_path, COMPONENTS if vae is None else tuple(c for c in COMPONENTS if c != "vae"))
        elif os.path.exists(name_or_path):
            raise ModelLoadError(f"{name_or_path!r} is a file, not a diffusers model folder or hub id")
        try:
            unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet")
            vae_m = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae") if vae is None else None
            text_encoder = CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder")
            tokenizer = CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer")
        except ModelLoadError:
            raise
        except Exception as e:  # noqa: BLE001
            raise _load_failure(name_or_path, "Stable Diffusion model", e) from e
        _check_sd1_unet_config(dict(unet.config), name_or_path)
        _check_tokenizer(tokenizer, text_encoder, name_or_path)
        if device.type == "cpu":
            for m in (unet, vae_m, text_encoder):
                own_aligned_storage(m)
    if vae is not None:
        vae_m = _load_vae(vae, device, dtype)
    for m in (unet, vae_m, text_encoder):
        m.requires_grad_(False).eval()
    model = DragModel(unet=unet, vae=vae_m, text_encoder=text_encoder, tokenizer=tokenizer,
                      scheduler=make_scheduler(), name=str(name_or_path), device=device, dtype=dtype)
    return model.to(device, dtype)
